"""Run settings shared by the ServerApp and the ClientApp.

Defaults that depend on the scenario (seed -1, rounds 0, profile "") are filled in by one function
both sides call, ``scenarios.resolve_run``; everything downstream reads the resolved object.

They arrive as Flower run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run . <conn> --run-config 'k=v'``) or, for ``fedhe simulate``, straight from the CLI.
Run config is the coordinator's voice: a participant follows it for what to train, never for what
it reveals. Node-local facts and rules (which participant am I, where is my key, encryption,
masking, DP noise, misbehaviour) are the node's own (``participant.policy``, which classifies
every field here), so key paths never travel through the coordinator in deployments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    scenario: str = "cartpole"  # built-in name, entry point, or path to a scenario .py file
    mode: str = "local-ppo"  # local-ppo | encrypted-rollouts (the coordinator learns from encrypted rollouts)
    num_server_rounds: int = 0  # 0: the scenario's default
    plaintext: bool = False  # identical protocol, encryption replaced by identity (simulation only)
    coordinator_key: str = ""  # coordinator.ctx on the coordinator's machine
    participant_key_dir: str = ""  # simulation only: the key directory of every simulated node
    out_dir: str = "fedhe-run"  # checkpoints, metrics.jsonl, summary.json, learning_curve.png
    resume: bool = False
    participants: int = 0  # nodes sampled per round; 0: all available
    min_participants: int = 1  # a round completes with at least this many updates
    round_timeout: float = 600.0  # seconds to wait for replies
    seed: int = -1  # -1: the scenario's seed
    stop_on_solve: bool = False  # end early once the released mean return reaches the threshold
    release_metrics: bool = True  # a participant decrypts and releases rounded federation stats
    he_profile: str = ""  # "": the scenario's HE profile (robust defenses need one spare level: n16k-d7)
    # Threat lab (fedhe simulate and the lab's grids only; a deployed node refuses them). party-mix:
    # JSON list replacing the scenario's party_mix, e.g. '[{"attack": "sign-flip", "participants": [0, 1, 2]}]'.
    party_mix: str = ""
    collusion_dir: str = ""  # where colluding attackers (alie, ipm) cache honest updates
    # JSON object of RobustConfig fields replacing the scenario's ppo.robust, e.g.
    # '{"mode": "sa-ppo", "kappa": 0.02, "epsilon": 0.5}' (local robust training of every participant).
    robust_training: str = ""
    defense: str = "none"  # none | norm-bound | median-norm (encrypted, masked norms) | dp
    defense_bound: float = 0.0  # norm-bound's L2 bound on an update, in update units (0: the scenario's C)
    dp_noise_multiplier: float = 0.0  # z > 0: participants add distributed Gaussian noise (client-level DP)
    dp_delta: float = 1e-5
    # Pairwise masks under the ciphertexts (docs/threat-model.md, "Pairwise masks"): pairwise | off |
    # auto (pairwise with 3+ participants in local-ppo mode without a masked-norm defense, else off).
    masking: str = "auto"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in known:
                continue  # other apps' keys may share the run config
            kind = type(known[name].default)
            values[name] = kind(value) if kind is not bool else _as_bool(key, value)
        return cls(**values)


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in {"true", "1", "yes"}:
        return True
    if str(value).lower() in {"false", "0", "no"}:
        return False
    raise ValueError(f"run config {key!r} must be true or false, got {value!r}")
