"""Published single-machine learning curves to compare a federation with, stored as data.

One JSON file per scenario in ``references/`` (its source, how the numbers were obtained, and the
curve as ``steps``/``returns``), so a claim about a published result lives next to where it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REFERENCE_DIR = Path(__file__).parent / "references"


@dataclass(frozen=True)
class ReferenceCurve:
    """Mean episode return of a published run set against its environment steps."""

    label: str
    source: str
    url: str
    steps: tuple[float, ...]
    returns: tuple[float, ...]
    points: tuple[tuple[str, float, float, float], ...] = ()  # (label, steps, return, std): other published results

    def __post_init__(self) -> None:
        if len(self.steps) < 2 or len(self.steps) != len(self.returns) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"reference {self.label!r}: need >= 2 increasing steps, one return each")

    def at(self, steps: float) -> float | None:
        """The curve at ``steps`` (linear between points); None outside the published range."""
        if not self.steps[0] <= steps <= self.steps[-1]:
            return None
        return float(np.interp(steps, self.steps, self.returns))


def reference_for(scenario_name: str) -> ReferenceCurve | None:
    path = REFERENCE_DIR / f"{scenario_name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    points = tuple((p["label"], p["steps"], p["return"], p.get("std", 0.0)) for p in data.get("points", ()))
    return ReferenceCurve(data["label"], data["source"], data["url"], tuple(data["steps"]), tuple(data["returns"]),
                          points)


def reference_summary(scenario_name: str, steps: float | None) -> dict | None:
    """What a benchmark result records: the reference's return at the runs' environment steps, and its source."""
    curve = reference_for(scenario_name)
    if curve is None:
        return None
    at = None if steps is None else curve.at(steps)
    return {"label": curve.label, "source": curve.source, "url": curve.url, "steps": steps,
            "return": None if at is None else round(at, 1)}
