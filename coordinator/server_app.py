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
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.driver import RoundDriver
from coordinator.exchange import RoundOutcome
from coordinator.ray_shards import shard_settings
from coordinator.report import read_metrics, write_summary
from protos.backend import HEBackend, PlainBackend
from protos.keyfile import load_evaluation_backend
from protos.plan import RunPlan, resolve_plan
from protos.profiles import get_profile
from protos.settings import RunConfigError, RunSettings

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
    settings: RunSettings | RunPlan,
    on_round: Callable[[RoundOutcome, dict | None], None] | None = None,
) -> dict:
    """Everything the ServerApp does; returns summary.json's content."""
    plan = settings if isinstance(settings, RunPlan) else resolve_plan(settings)
    settings = plan.settings
    backend = coordinator_backend(settings)
    if backend.profile.name != settings.he_profile:
        raise ValueError(
            f"this run uses HE profile {settings.he_profile}, the key file is {backend.profile.name}; "
            f"create keys with `fedhe keygen --profile {settings.he_profile}`"
        )
    out_dir = Path(settings.out_dir)
    write_run_info(out_dir, settings, plan.scenario.name, plan.num_params)
    driver = RoundDriver(plan, backend, out_dir, on_round)
    driver.run(grid, resume=settings.resume)
    participants = max((row["participants"] for row in read_metrics(out_dir)), default=0)
    return write_summary(
        out_dir,
        scenario=plan.scenario.name,
        encrypted=not settings.plaintext,
        participants=participants,
        threshold=plan.scenario.reward_threshold,
        num_params=plan.num_params,
        wall_s=driver.record.wall_s(),
        extra={"mode": settings.mode, "rollout_upload": settings.rollout_upload,
               "server_optimizer": settings.server_optimizer, "pipeline_rollouts": settings.pipeline_rollouts,
               **driver.summary_fields()},
    )


def write_run_info(out_dir: Path, settings: RunSettings, scenario_name: str, num_params: int) -> None:
    """The resolved public run settings, so `fedhe evaluate DIR` rebuilds exactly this run's scenario."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"scenario_ref": settings.scenario, "scenario": scenario_name, "num_params": num_params,
            "plaintext": settings.plaintext, "seed": settings.seed, "rounds": settings.num_server_rounds,
            "he_profile": settings.he_profile, "robust_training": settings.robust_training, "mode": settings.mode,
            "rollout_upload": settings.rollout_upload, "server_optimizer": settings.server_optimizer,
            "masking": settings.masking, "pipeline_rollouts": settings.pipeline_rollouts,
            "he_shards": shard_settings()[0],  # this machine's FEDHE_HE_SHARDS (coordinator.ray_shards)
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
        try:
            run = settings or RunSettings.from_run_config(context.run_config)
        except RunConfigError as exc:  # the operator's mistakes, one line each, before round 1
            for problem in exc.problems:
                log.error("run config: %s", problem)
            raise
        summary = run_federation(grid, run, on_round)
        log.info("summary: %s", summary)
        if on_summary:
            on_summary(summary)

    return app


app = build_server_app()
