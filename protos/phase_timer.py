"""Per-round time spent in each named phase, for `fedhe bench round` and the metrics file.

Shared by both sides: the coordinator records its phases in ``metrics.jsonl`` (they are its own
costs); a participant records its phases only in a local file it keeps (``PROFILE_DIR_ENV``), never
in a reply: timings are not on the egress allowlist.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A participant appends one JSON line per handled message to ``$FEDHE_PROFILE_DIR/participant-<i>.jsonl``.
PROFILE_DIR_ENV = "FEDHE_PROFILE_DIR"


class PhaseTimer:
    """Milliseconds per phase, summed over every entry into that phase."""

    def __init__(self) -> None:
        self.ms: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += (time.perf_counter() - start) * 1e3

    def rounded(self) -> dict[str, float]:
        return {name: round(ms, 2) for name, ms in self.ms.items()}


def append_local_profile(participant_index: int, round_: int, timer: PhaseTimer) -> None:
    """Append this participant's phases to its local profile file, if profiling is switched on."""
    directory = os.environ.get(PROFILE_DIR_ENV)
    if not directory or not timer.ms:
        return
    path = Path(directory) / f"participant-{participant_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"round": round_, "ms": timer.rounded()}) + "\n")


__all__ = ["PROFILE_DIR_ENV", "PhaseTimer", "append_local_profile"]
