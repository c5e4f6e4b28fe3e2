"""The coordinator as a Flower ServerApp.

Run config (pyproject ``[tool.flwr.app.config]``, see ``protos.settings.RunSettings``) names the
scenario, the coordinator's evaluation key file (``coordinator-key``, a path on the SuperLink's
machine) and the output directory. The coordinator loads only ``coordinator.ctx``; a secret-key
context is refused.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.encrypted_gradient import RolloutPlan
from coordinator.report import read_metrics, write_summary
from coordinator.rounds import HEAdamCoordinator, RoundOutcome
from protos.backend import HEBackend, PlainBackend
from protos.keyfile import load_evaluation_backend
from protos.optimizer import HEAdamConfig
from protos.profiles import get_profile
from protos.settings import RunSettings
from scenarios import resolve_run

log = logging.getLogger("fedhe.coordinator")
RUN_INFO_FILE = "run.json"


def coordinator_backend(settings: RunSettings) -> HEBackend:
    if settings.plaintext:
        return PlainBackend(get_profile(settings.he_profile))
    if not settings.coordinator_key:
        raise ValueError(
            "no coordinator key: set run config coordinator-key=\"/path/to/coordinator.ctx\" "
            "(created by `fedhe keygen`)"
        )
    return load_evaluation_backend(Path(settings.coordinator_key))


def run_federation(
    grid: Grid,
    settings: RunSettings,
    on_round: Callable[[RoundOutcome, dict | None], None] | None = None,
) -> dict:
    """Everything the ServerApp does; returns summary.json's content."""
    t0 = time.perf_counter()
    scenario, settings = resolve_run(settings)
    backend = coordinator_backend(settings)
    if backend.profile.name != settings.he_profile:
        raise ValueError(
            f"this run uses HE profile {settings.he_profile}, the key file is {backend.profile.name}; "
            f"create keys with `fedhe keygen --profile {settings.he_profile}`"
        )
    num_params = scenario.network(settings.mode).num_params
    rollouts = RolloutPlan(scenario, backend.slots) if settings.mode == "encrypted-rollouts" else None
    write_run_info(Path(settings.out_dir), settings, scenario.name, num_params)
    coordinator = HEAdamCoordinator(
        backend,
        HEAdamConfig.for_scenario(scenario, settings.mode),
        scenario.name,
        num_params,
        Path(settings.out_dir),
        participants=settings.participants,
        min_participants=settings.min_participants,
        round_timeout=settings.round_timeout,
        release_metrics=settings.release_metrics,
        reward_threshold=scenario.reward_threshold,
        stop_on_solve=settings.stop_on_solve,
        on_round=on_round,
        defense=settings.defense,
        defense_bound=settings.defense_bound,
        dp_noise_multiplier=settings.dp_noise_multiplier,
        dp_delta=settings.dp_delta,
        rollouts=rollouts,
        masking=settings.masking,
    )
    coordinator.run(grid, num_rounds=settings.num_server_rounds, resume=settings.resume)
    participants = max((row["participants"] for row in read_metrics(Path(settings.out_dir))), default=0)
    return write_summary(
        Path(settings.out_dir),
        scenario=scenario.name,
        encrypted=not settings.plaintext,
        participants=participants,
        threshold=scenario.reward_threshold,
        num_params=num_params,
        wall_s=time.perf_counter() - t0,
        extra={"mode": settings.mode, **coordinator.summary_fields()},
    )


def write_run_info(out_dir: Path, settings: RunSettings, scenario_name: str, num_params: int) -> None:
    """The resolved public run settings, so `fedhe evaluate DIR` rebuilds exactly this run's scenario."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"scenario_ref": settings.scenario, "scenario": scenario_name, "num_params": num_params,
            "plaintext": settings.plaintext, "seed": settings.seed, "rounds": settings.num_server_rounds,
            "he_profile": settings.he_profile, "robust_training": settings.robust_training, "mode": settings.mode,
            "masking": settings.masking,
            # The seed above makes only the initial policy; each participant's randomness is its own.
            "reproducible": False, "private_randomness": True,
            "randomness": "decided by each organization's node (OS entropy unless its policy sets a seed)"}
    (out_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _log_to_stdout() -> None:
    """Flower forwards the ServerApp's stdout to `flwr run --stream`/`flwr log`."""
    logger = logging.getLogger("fedhe")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def build_server_app(
    settings: RunSettings | None = None,
    on_round: Callable[[RoundOutcome, dict | None], None] | None = None,
    on_summary: Callable[[dict], None] | None = None,
) -> ServerApp:
    """``settings`` fixed by `fedhe simulate`; None reads them from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_to_stdout()
        summary = run_federation(grid, settings or RunSettings.from_run_config(context.run_config), on_round)
        log.info("summary: %s", summary)
        if on_summary:
            on_summary(summary)

    return app


app = build_server_app()
