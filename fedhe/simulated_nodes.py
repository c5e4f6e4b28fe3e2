"""What each simulated organization runs: its node policy and its ClientApp, without the coordinator.

Kept apart from ``fedhe.simulate`` so that each simulated organization's worker, which builds its
ClientApp from here (``participant.worker``), imports the participant side only. One person runs
every party in a simulation, so each simulated node's policy lets the run decide what a deployed
node decides itself (plaintext, masking off, the threat lab's party mix and robust training,
scenario files), and the nodes take the lab's update source (``fedhe.lab.update_source``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.clientapp import ClientApp

from fedhe.lab.update_source import party_mix_update
from participant.client_app import PolicyFactory, build_client_app
from participant.policy import ALL_PERMITS, NodePolicy
from protos.settings import RunSettings

WORKERS_DIR = "workers"  # each simulated organization's worker state and log


def simulated_node_seed(node_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([node_seed, index]).generate_state(1)[0])


def simulated_policies(node_seed: int | None, out_dir: Path) -> PolicyFactory:
    """Each simulated node's policy: permissive (one person runs every party), seeded if asked, its
    worker (``participant.worker``) keeping its state and log in ``OUT/workers/participant-<i>``."""

    def policy_for(context: Context) -> NodePolicy:
        policy = NodePolicy.from_node_config(context.node_config)
        seed = None if node_seed is None else simulated_node_seed(node_seed, policy.participant_index)
        workers = Path(out_dir).resolve() / WORKERS_DIR / f"participant-{policy.participant_index}"
        return replace(policy, masking="optional", permits=ALL_PERMITS, seed=seed, state_dir=str(workers))

    return policy_for


def simulated_client_app(settings: RunSettings, node_seed: int | None, out_dir: Path) -> ClientApp:
    """What each simulated organization's worker runs: the participant with the run's settings fixed,
    its simulated policy and the threat lab's update source (honest unless the party mix says otherwise)."""
    return build_client_app(settings, policy_for=simulated_policies(node_seed, out_dir),
                            update_source=party_mix_update)
