"""`fedhe simulate`: a whole federation on Flower's simulation engine, on this machine.

The ServerApp and ClientApps are the same code `flwr run` deploys; only the settings are passed
directly instead of through run config, and every simulated participant reads the same local
key directory (in a deployment each organization keeps its own copy), including its own X25519
key for pairwise masking (``participant.roster``). Each simulated organization runs what
``fedhe.simulated_nodes`` gives it (a permissive policy: one person runs every party). Their
private randomness is OS entropy, or derived from ``node_seed`` (`fedhe simulate --seed`) and each
index for reproducible runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from flwr.clientapp.typing import Mod

from coordinator.checkpoint import check_resumable
from coordinator.exchange import RoundOutcome
from coordinator.server_app import RUN_INFO_FILE, build_server_app
from fedhe.run_dir import KEYS_DIR, ensure_keys
from fedhe.simulated_nodes import WORKERS_DIR, simulated_policies
from participant.client_app import forwarding_app
from participant.worker import stop_worker
from protos.keyfile import COORDINATOR_KEY
from protos.plan import resolve_plan
from protos.settings import RunSettings


def simulate(
    settings: RunSettings,
    num_participants: int,
    key_dir: Path | None = None,
    on_round: Callable[[RoundOutcome, dict | None], None] | None = None,
    verbose: bool = False,
    client_mods: list[Mod] | None = None,
    node_seed: int | None = None,
) -> dict:
    """Run the federation; returns summary.json's content.

    Keys: ``key_dir`` or a fresh federation key in ``OUT/keys`` (the run's HE profile); with
    pairwise masking also one X25519 key pair per simulated organization and their roster there.
    ``node_seed``: every simulated node's private randomness derives from it and its index (a
    reproducible run); None: OS entropy. ``settings.seed`` seeds only the public initial policy.
    """
    from flwr.simulation import run_simulation

    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = resolve_plan(settings, participants=num_participants)
    resolved = plan.settings
    settings = replace(settings, masking=resolved.masking)  # auto resolved with the number of organizations
    if settings.resume:  # refuse here, with the coordinator's message, before any process starts
        check_resumable(out_dir, plan.optimizer.to_json())
    if not settings.plaintext:
        organizations = num_participants if resolved.masking == "pairwise" else 0
        owners = num_participants if plan.rollouts and not plan.statistics else 0
        keys = ensure_keys(key_dir or out_dir / KEYS_DIR, resolved.he_profile, organizations, owners).resolve()
        settings = replace(settings, coordinator_key=str(keys / COORDINATOR_KEY), participant_key_dir=str(keys))
    summary: dict = {}
    quiet_simulation_engine(verbose)
    run_simulation(
        server_app=build_server_app(settings, on_round=on_round, on_summary=summary.update),
        client_app=forwarding_app(client_mods, policy_for=simulated_policies(node_seed, out_dir),
                                  factory="fedhe.simulated_nodes:simulated_client_app",
                                  factory_kwargs={"settings": settings, "node_seed": node_seed, "out_dir": out_dir}),
        num_supernodes=num_participants,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"log_to_driver": verbose}},
        verbose_logging=verbose,
    )
    for worker in sorted((out_dir / WORKERS_DIR).glob("participant-*")):  # they would exit with Ray, a moment later
        stop_worker(worker)
    if not summary:
        raise RuntimeError(f"the federation did not finish; see the log above and {out_dir}")
    record_randomness(out_dir, node_seed)
    return summary


def record_randomness(out_dir: Path, node_seed: int | None) -> None:
    """run.json: whether the participants' randomness can be replayed (here: only from --seed, which whoever
    ran the simulation knows) and whether it is private to each node."""
    path = out_dir / RUN_INFO_FILE
    info = json.loads(path.read_text())
    info.update(reproducible=node_seed is not None, private_randomness=node_seed is None,
                randomness="fedhe simulate: node seeds derived from --seed" if node_seed is not None
                else "fedhe simulate: every node's OS entropy")
    path.write_text(json.dumps(info, indent=2) + "\n")


class _DropRunSimulationDeprecation(logging.Filter):
    """`flwr run` needs a SuperLink; in-process simulation is what a library user wants here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def quiet_simulation_engine(verbose: bool) -> None:
    # Tiny matrices: one BLAS thread per simulated participant is 1.5-2x faster on 2 cores.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationDeprecation) for f in logger.filters):
        logger.addFilter(_DropRunSimulationDeprecation())
    fedhe_log = logging.getLogger("fedhe")
    if not fedhe_log.handlers:  # on this machine the coordinator's lines go to stderr: stdout may carry JSON
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fedhe_log.addHandler(handler)
    if not verbose:
        logger.setLevel(logging.WARNING)
        fedhe_log.setLevel(logging.WARNING)  # the progress bar tells the story
