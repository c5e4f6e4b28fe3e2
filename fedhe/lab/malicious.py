"""Malicious participants for the threat lab: who misbehaves, how, and the crafted updates.

Lab code, never part of what an organization deploys: only `fedhe simulate` and the threat lab's
grids apply it (``fedhe.lab.update_source``), and a deployed node refuses a run that asks for it.
A federation's *party mix* (``Scenario.party_mix``, or the ``party-mix`` run setting that
overrides it) lists behaviours and the participant indices that follow them::

    [{"attack": "sign-flip", "participants": [0, 1, 2], "k": 2.5}]

Two families (names and defaults after FedPG-BR and the Byzantine-FL literature, see
``docs/threat-lab.md``):

* **Update attacks** train honestly, then replace the (clipped) update ``g`` before encrypting
  it. They do not clip what they send: a malicious participant ignores the protocol, which
  is what server-side (coordinator) defenses are for.

  ``sign-flip`` (``-k g``, k=2.5), ``scale`` (model-replacement style boosting of a malicious
  direction: a fixed random unit direction per attacker times ``boost * |g|``, boost=10),
  ``noise`` (``g + U(-1,1) * (max g - min g) * magnitude``, magnitude=3), ``zero`` (free rider),
  and the colluding omniscient attacks ``alie`` (A Little Is Enough: ``mu - z sigma`` per
  coordinate, z defaults to ``Phi^-1((n-s)/n)`` with ``s = floor(n/2 + 1) - f``) and ``ipm``
  (inner-product manipulation: ``-eps mu``, eps=0.1), where ``mu``/``sigma`` are the mean/std of
  the colluders' own honest updates of this round.

* **Data attacks** corrupt what the participant learns from, then follow the protocol (clip,
  weight, encrypt): ``reward-flip`` (r -> -r), ``reward-shuffle`` (each reward is replaced by one
  drawn from the rewards of the episode so far, an online version of shuffling an episode's
  rewards; a no-op where rewards are constant, e.g. CartPole), ``random-action`` (the
  environment executes a fixed action, 0 or the zero vector, whatever the policy chose).

Colluders share honest updates in simulation by **deterministic re-computation**: every colluder
re-runs each colluder's honest local round from the public ``theta`` with a seed derived from
(run seed, colluder index, round), so all colluders craft the same vector without waiting for
each other (waiting could deadlock when fewer workers than colluders run at once). With
``collusion-dir`` set, results are cached there (one ``.npy`` per colluder and round) so each is
computed once. This stands in for a side channel between colluding organizations.

Every malicious participant sends all-zero rollout statistics, so the released federation
return (and "solved") measures the honest participants, as in FedPG-BR's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from participant.ppo import ParticipantTrainer
from protos.update_units import clip_l2
from scenarios import Scenario

UPDATE_ATTACKS: dict[str, dict[str, float]] = {
    "sign-flip": {"k": 2.5},
    "scale": {"boost": 10.0},
    "noise": {"magnitude": 3.0},
    "zero": {},
    "alie": {"z": float("nan")},  # nan: z_max from n and f
    "ipm": {"eps": 0.1},
}
DATA_ATTACKS: dict[str, dict[str, float]] = {"reward-flip": {}, "reward-shuffle": {}, "random-action": {}}
ATTACKS: dict[str, dict[str, float]] = {**UPDATE_ATTACKS, **DATA_ATTACKS}
COLLUDING = frozenset({"alie", "ipm"})


class PartyMixError(ValueError):
    """A party mix that names an unknown behaviour, a bad parameter or a participant twice."""


@dataclass(frozen=True)
class Behaviour:
    attack: str
    colluders: tuple[int, ...]  # every participant index of this party-mix entry
    params: Mapping[str, float] = field(default_factory=dict)

    def param(self, name: str) -> float:
        return float(self.params.get(name, ATTACKS[self.attack][name]))


def parse_party_mix(mix: Sequence[Mapping[str, Any]] | str) -> dict[int, Behaviour]:
    """participant index -> Behaviour; a JSON string is accepted (run config)."""
    if isinstance(mix, str):
        try:
            mix = json.loads(mix) if mix.strip() else []
        except json.JSONDecodeError as exc:
            raise PartyMixError(f"party mix is not valid JSON: {exc}") from None
    if not isinstance(mix, Sequence):
        raise PartyMixError("party mix must be a list of {attack, participants, ...} objects")
    out: dict[int, Behaviour] = {}
    for entry in mix:
        if not isinstance(entry, Mapping):
            raise PartyMixError(f"party mix entry {entry!r} is not an object")
        name = entry.get("attack")
        if name not in ATTACKS:
            raise PartyMixError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
        who = entry.get("participants", [])
        if not isinstance(who, Sequence) or not all(isinstance(i, int) and i >= 0 for i in who):
            raise PartyMixError(f"attack {name}: participants must be a list of indices, got {who!r}")
        params = {k: v for k, v in entry.items() if k not in ("attack", "participants")}
        unknown = set(params) - set(ATTACKS[name])
        if unknown:
            raise PartyMixError(
                f"attack {name} has no parameter(s) {sorted(unknown)}; it takes {sorted(ATTACKS[name]) or 'none'}"
            )
        for i in who:
            if i in out:
                raise PartyMixError(f"participant {i} appears twice in the party mix")
            out[i] = Behaviour(name, tuple(sorted(who)), {k: float(v) for k, v in params.items()})
    return out


def behaviour_for(scenario: Scenario, override_json: str, index: int) -> Behaviour | None:
    mix = parse_party_mix(override_json) if override_json.strip() else parse_party_mix(list(scenario.party_mix))
    return mix.get(index)


def party_mix_for(attack: str, malicious: int, **params: float) -> list[dict[str, Any]]:
    """The first ``malicious`` participant indices follow ``attack`` ("none": nobody)."""
    if attack == "none" or malicious == 0:
        return []
    if attack not in ATTACKS:
        raise PartyMixError(f"unknown attack {attack!r}; known: none, {', '.join(ATTACKS)}")
    return [{"attack": attack, "participants": list(range(malicious)), **params}]


# -- data attacks: environment wrappers ------------------------------------------------------------
class _RewardFlip(gym.RewardWrapper):
    def reward(self, reward: float) -> float:
        return -float(reward)


class _RewardShuffle(gym.Wrapper):
    """Each reward is replaced by one drawn uniformly from the episode's rewards so far."""

    def __init__(self, env: gym.Env, seed: int) -> None:
        super().__init__(env)
        self._rng = np.random.default_rng(seed)
        self._seen: list[float] = []

    def reset(self, **kwargs):
        self._seen = []
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._seen.append(float(reward))
        return obs, self._seen[int(self._rng.integers(len(self._seen)))], terminated, truncated, info


class _FixedAction(gym.ActionWrapper):
    def action(self, action):
        space = self.env.action_space
        if isinstance(space, gym.spaces.Discrete):
            return int(space.start)
        return np.zeros(space.shape, dtype=space.dtype)


def attacked_scenario(scenario: Scenario, behaviour: Behaviour | None) -> Scenario:
    """The scenario a data attacker trains on (its environments wrapped); others unchanged."""
    if behaviour is None or behaviour.attack not in DATA_ATTACKS:
        return scenario
    attack = behaviour.attack

    def make_env(participant_index: int, seed: int, **kwargs: Any) -> gym.Env:
        env = (
            scenario.make_env(participant_index, seed, **kwargs)
            if scenario.make_env
            else gym.make(scenario.env_id, **kwargs)
        )
        if attack == "reward-flip":
            return _RewardFlip(env)
        if attack == "reward-shuffle":
            return _RewardShuffle(env, seed)
        return _FixedAction(env)

    return scenario.with_overrides(env_id=None, make_env=make_env, reward_threshold=scenario.reward_threshold)


# -- update attacks ---------------------------------------------------------------------------------
def alie_z(n: int, f: int) -> float:
    """z_max of Baruch et al.: Phi^-1((n - s) / n) with s = floor(n/2 + 1) - f."""
    from statistics import NormalDist

    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


def craft_update(
    behaviour: Behaviour,
    honest: np.ndarray,
    *,
    n: int,
    attacker_seed: int,
    colluder_updates: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """The malicious update (in the same units as the honest clipped ``honest``)."""
    name = behaviour.attack
    if name in DATA_ATTACKS:
        return honest
    if name == "sign-flip":
        return -behaviour.param("k") * honest
    if name == "zero":
        return np.zeros_like(honest)
    if name == "scale":
        direction = np.random.default_rng(attacker_seed).standard_normal(honest.size)
        direction /= np.linalg.norm(direction)
        return behaviour.param("boost") * float(np.linalg.norm(honest)) * direction
    if name == "noise":
        rng = np.random.default_rng([attacker_seed, int.from_bytes(honest.tobytes()[:8].ljust(8, b"\0"), "little")])
        spread = float(honest.max() - honest.min())
        return honest + rng.uniform(-1.0, 1.0, honest.size) * spread * behaviour.param("magnitude")
    stack = np.stack(colluder_updates) if len(colluder_updates) else honest[None, :]
    mu = stack.mean(axis=0)
    if name == "ipm":
        return -behaviour.param("eps") * mu
    if name == "alie":
        z = behaviour.param("z")
        if math.isnan(z):
            z = alie_z(n, len(behaviour.colluders))
        sigma = stack.std(axis=0, ddof=1) if stack.shape[0] > 1 else np.zeros_like(mu)
        return mu - z * sigma
    raise AssertionError(name)


def colluder_seed(run_seed: int, index: int, round_: int) -> int:
    return int.from_bytes(hashlib.sha256(f"collude:{run_seed}:{index}:{round_}".encode()).digest()[:4], "little")


def colluders_honest_updates(
    behaviour: Behaviour,
    scenario: Scenario,
    theta: np.ndarray,
    round_: int,
    run_seed: int,
    variant: str | None,
    clip: float,
    cache_dir: str = "",
) -> list[np.ndarray]:
    """Every colluder's honest, clipped update of this round (deterministic re-computation)."""
    digest = hashlib.sha256(np.ascontiguousarray(theta, dtype=np.float64).tobytes()).hexdigest()[:16]
    out = []
    for j in behaviour.colluders:
        path = Path(cache_dir) / f"round{round_}-p{j}-{digest}.npy" if cache_dir else None
        if path is not None and path.is_file():
            try:
                out.append(np.load(path))
                continue
            except (OSError, ValueError):
                pass  # a concurrent writer; recompute
        trainer = ParticipantTrainer(scenario, j, colluder_seed(run_seed, j, round_), variant)
        try:
            update = clip_l2(trainer.train(theta, round_).update, clip)
        finally:
            trainer.close()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, update)
            os.replace(tmp, path)
        out.append(update)
    return out


__all__ = [
    "ATTACKS",
    "Behaviour",
    "COLLUDING",
    "DATA_ATTACKS",
    "PartyMixError",
    "UPDATE_ATTACKS",
    "alie_z",
    "attacked_scenario",
    "behaviour_for",
    "colluders_honest_updates",
    "craft_update",
    "parse_party_mix",
    "party_mix_for",
]
