"""Run settings shared by the ServerApp and the ClientApp.

Defaults that depend on the scenario (seed -1, rounds 0, profile "") are filled in by one function
both sides call, ``protos.plan.resolve_plan``; everything downstream reads the resolved plan.

They arrive as Flower run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run . <conn> --run-config 'k=v'``) or, for ``fedhe simulate``, straight from the CLI.
Run config is the coordinator's voice: a participant follows it for what to train, never for what
it reveals. Node-local facts and rules (which participant am I, where is my key, encryption,
masking, DP noise, misbehaviour) are the node's own (``participant.policy``, which classifies
every field here), so key paths never travel through the coordinator in deployments.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from protos.optimizer import SERVER_OPTIMIZERS
from protos.profiles import PROFILES
from scenarios.scenario import MODES

MASKING = ("auto", "pairwise", "off")
ROLLOUT_UPLOADS = ("statistics", "transitions")
DEFENSES = ("none", "norm-bound", "median-norm", "dp")


class RunConfigError(ValueError):
    """Run settings an operator got wrong; ``problems`` holds one line each, naming the key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class RunSettings:
    scenario: str = "cartpole"  # built-in name, entry point, or path to a scenario .py file
    mode: str = "local-ppo"  # local-ppo | encrypted-rollouts (the coordinator learns from encrypted rollouts)
    # encrypted-rollouts only: statistics (owners send sufficient statistics, under pairwise masks) |
    # transitions (owners send every transition under a key of their own: docs/encrypted-rollouts.md)
    rollout_upload: str = "statistics"
    server_optimizer: str = "adam"  # adam (HE-Adam) | sgd (HE-SGD with momentum, the linear baseline)
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
    # auto (pairwise with 3+ participants unless a masked-norm defense rules masks out).
    masking: str = "auto"
    # local-ppo: participants collect the next round's rollouts with the current theta while the
    # coordinator aggregates and steps; PPO's ratio corrects against that behaviour policy.
    pipeline_rollouts: bool = False

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        """Settings from a Flower run config: every key known, every value of its type and in range.

        Values arrive as TOML gives them (``"10"`` is a string), so nothing is converted: a value of
        the wrong type is a mistake to name, not to guess at. Raises ``RunConfigError``."""
        known = {f.name: f for f in fields(cls)}
        values, problems = {}, []
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
                problems.append(f"unknown run config key {key!r}{hint}")
                continue
            kind = type(known[name].default)
            if not _of_type(value, kind):
                quoted = isinstance(value, str) and kind is not str
                problems.append(f"run config {key!r} must be {_TYPE_NAMES[kind]}, got {value!r}"
                                + (" (a string: drop the quotes)" if quoted else ""))
                continue
            values[name] = kind(value)
        settings = cls(**values)
        try:
            settings.check()
        except RunConfigError as exc:
            problems += exc.problems
        if problems:
            raise RunConfigError(problems)
        return settings

    def check(self) -> None:
        """Refuse values out of range, one line per problem (``RunConfigError``)."""
        rules = [
            (self.mode in MODES, f"mode {self.mode!r} is not one of {', '.join(MODES)}"),
            (self.rollout_upload in ROLLOUT_UPLOADS,
             f"rollout-upload {self.rollout_upload!r} is not one of {', '.join(ROLLOUT_UPLOADS)}"),
            (self.server_optimizer in SERVER_OPTIMIZERS,
             f"server-optimizer {self.server_optimizer!r} is not one of {', '.join(SERVER_OPTIMIZERS)}"),
            (self.masking in MASKING, f"masking {self.masking!r} is not one of {', '.join(MASKING)}"),
            (self.defense in DEFENSES, f"defense {self.defense!r} is not one of {', '.join(DEFENSES)}"),
            (self.he_profile in ("", *PROFILES), f"he-profile {self.he_profile!r} is not one of {', '.join(PROFILES)}"),
            (self.num_server_rounds >= 0, f"num-server-rounds must be >= 0 (0: the scenario's), got "
                                          f"{self.num_server_rounds}"),
            (self.participants >= 0, f"participants must be >= 0 (0: every connected node), got {self.participants}"),
            (self.min_participants >= 1, f"min-participants must be >= 1, got {self.min_participants}"),
            (self.participants <= 0 or self.participants >= self.min_participants,
             f"participants ({self.participants}) is below min-participants ({self.min_participants})"),
            (self.round_timeout > 0, f"round-timeout must be > 0 seconds, got {self.round_timeout}"),
            (self.seed >= -1, f"seed must be >= 0 (or -1: the scenario's), got {self.seed}"),
            (self.defense_bound >= 0, f"defense-bound must be >= 0, got {self.defense_bound}"),
            (self.dp_noise_multiplier >= 0, f"dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}"),
            (self.defense != "dp" or self.dp_noise_multiplier > 0,
             "defense dp needs a noise multiplier: set dp-noise-multiplier > 0"),
            (0 < self.dp_delta < 1, f"dp-delta must be in (0, 1), got {self.dp_delta}"),
        ]
        problems = [message for ok, message in rules if not ok]
        if problems:
            raise RunConfigError(problems)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _of_type(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)
