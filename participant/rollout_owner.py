"""Encrypted-rollout mode, the data owner's side (docs/encrypted-rollouts.md).

The owner acts locally with the decrypted policy, then does everything non-polynomial on its own
values: GAE with its own critic, advantage normalization and the loss-layer deltas of A2C (one
server step per round, so PPO's ratio is 1). It clips its own contribution to the gradient and weights
it like any update (``protos.update_units``), by scaling its deltas: the gradient is
linear in them, so the federation's summed gradient stays within HE-Adam's bound ``C`` per
coordinate (``clip_factors``).
What it uploads (``rollout-upload``) is either its sufficient statistics, tiled and under its
pairwise mask, as an ordinary update (``statistics``, the default), or Enc(scaled observations),
Enc(deltas) and Enc(tiled theta) under the owner's own key (``transitions``, ``participant.owner_key``)
in a fixed number of blocks per round; the coordinator's per-slot gradient sums come back to this
owner alone, who checks them against its own gradient and sends them on as an ordinary update
(``owner_update``). Either way sizes reveal nothing, and rewards, returns and actions never leave in
any form but the deltas they shaped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from participant.keyholder import KeyHolder, decrypt_vector
from participant.run_state import kept_for_run
from protos.codec import PROTOCOL_VERSION, EncryptedVector, encrypt_to_proto
from protos.errors import RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.rollout_layout import BlockLayout
from protos.rollout_statistics import StatisticsLayout
from protos.update_units import UpdateUnits
from scenarios import Scenario
from scenarios.poly_net import PolyNetSpec
from scenarios.poly_policy import PolyPolicy, softmax
from scenarios.rollout import RolloutCollector, compute_gae

ROLLOUTS = "encrypted-rollouts"


@dataclass
class OwnerRound:
    """One round's scaled observations and clipped, weighted deltas, packed as the run uploads them."""

    obs: np.ndarray  # (T, d), in [-1, 1]
    d_actor: np.ndarray  # (T, A)
    d_critic: np.ndarray  # (T,)
    d_log_std: np.ndarray | None  # (T, A): a continuous actor's log-std deltas (statistics uploads train it)
    stats: np.ndarray  # [sum of episode returns, episodes, env steps]
    clip_factor: float  # the smaller of the actor's and critic's clip factors (<= 1), kept locally
    transitions: int  # the scenario's rollout size: every owner uploads as many blocks, so sizes reveal nothing

    def blocks(self, layout: BlockLayout) -> list[list[np.ndarray]]:
        """Per block, the layout's plaintext vectors (X_j, D_actor_a, D_critic)."""
        return layout.pack_blocks(self.obs, self.d_actor, self.d_critic, layout.blocks_for(self.transitions))

    def tiled_statistics(self, layout: StatisticsLayout) -> np.ndarray:
        """The sufficient statistics, one per term: the update a statistics upload masks and encrypts."""
        return layout.tile(layout.statistics(self.obs, self.d_actor, self.d_critic, self.d_log_std))


class RolloutOwner:
    """Holds an owner's vector envs and RNG so episodes continue across rounds.

    ``seed``: the owner's own randomness, as for ``participant.ppo.ParticipantTrainer``.
    """

    def __init__(
        self, scenario: Scenario, participant_index: int, seed: int | np.random.SeedSequence, variant: str | None = None
    ) -> None:
        cfg = scenario.rollout
        self.scenario, self.spec = scenario, scenario.poly_spec()
        entropy = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(
            [seed, participant_index, 17])
        env_seed, rng_seed = entropy.generate_state(2)
        self.rng = np.random.default_rng(int(rng_seed))
        self.env = scenario.build_vector_env(participant_index, int(env_seed), variant, num_envs=cfg.num_envs)
        self.collector = RolloutCollector(self.env, int(env_seed))
        self.uploaded: dict[int, tuple[OwnerRound, np.ndarray]] = {}  # transitions: round -> (rollouts, theta)

    def contribute(self, theta: np.ndarray, units: UpdateUnits) -> OwnerRound:
        """One round: collect, compute deltas clipped to ``units.clip`` and weighted like any update."""
        cfg = self.scenario.rollout
        policy = self.scenario.make_policy(ROLLOUTS, theta)
        rollout = self.collector.collect(policy, cfg.steps_per_env, self.rng, cfg.gamma, 1.0)
        adv, ret = compute_gae(rollout.rewards, rollout.values, rollout.dones, rollout.last_value, cfg.gamma,
                               cfg.gae_lambda)
        obs = policy.features(rollout.obs.reshape(-1, rollout.obs.shape[-1]))
        actions = rollout.actions.reshape(len(obs), -1) if self.spec.continuous else rollout.actions.reshape(-1)
        adv, ret, values = adv.reshape(-1), ret.reshape(-1), rollout.values.reshape(-1)
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        d_actor, d_critic, d_log_std = a2c_deltas(policy, obs, actions, adv, values, ret, cfg.vf_coef)
        gradient = self.spec.gradient(theta, obs, d_actor, d_critic, d_log_std)
        fa, fc = clip_factors(self.spec, gradient, units.clip)
        weight = units.factor  # 1/n and HE-Adam's pre-scale s, as for any update
        stats = np.array([float(np.sum(rollout.episode_returns)), float(len(rollout.episode_returns)), float(len(obs))])
        spread = None if d_log_std is None else d_log_std * (fa * weight)
        return OwnerRound(obs, d_actor * (fa * weight), d_critic * (fc * weight), spread, stats, min(fa, fc),
                          cfg.transitions)

    def close(self) -> None:
        self.env.close()


def clip_factors(spec: PolyNetSpec, gradient: np.ndarray, bound: float) -> tuple[float, float]:
    """Factors (<= 1) for the actor's and the critic's deltas so every coordinate of this owner's
    gradient is at most ``bound`` = C in absolute value.

    HE-Adam needs ``|G_j| <= C`` per coordinate; the federation's G is the 1/n-weighted sum of the
    owners' gradients, so owners that keep their own within C keep G within C. The two networks
    have separate parameters, so each is clipped on its own: the critic's early, large value
    errors must not shrink the actor's step (measured in plaintext: CartPole solved at round 106
    with separate clipping, 200 with one L2 clip of the whole gradient).
    """
    n_actor = sum(int(np.prod(shape)) for name, shape in spec.shapes.items() if name.startswith("actor"))
    peaks = [float(np.max(np.abs(part))) for part in (gradient[:n_actor], gradient[n_actor:])]
    return tuple(min(1.0, bound / peak) if peak > 0 else 1.0 for peak in peaks)


def a2c_deltas(policy: PolyPolicy, obs: np.ndarray, actions: np.ndarray, adv: np.ndarray, values: np.ndarray,
               returns: np.ndarray, vf_coef: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Loss-layer deltas of the mean A2C loss -A log pi(a|s) + vf_coef (V - R)^2 / 2 over T transitions.

    Discrete: d loss / d logits = -A (onehot(a) - p) / T; continuous (unit scale): d loss / d mean =
    -A (u - mean) / (std^2 T) and d loss / d log_std = -A ((u - mean)^2 / std^2 - 1) / T (None for
    discrete actions); critic: vf_coef (V - R) / T.
    """
    t = len(obs)
    out, _ = policy.forward(obs)
    d_log_std = None
    if policy.spec.continuous:
        residual = policy.unit_actions(actions) - out
        d_actor = -(adv / t)[:, None] * residual / policy.std**2
        d_log_std = -(adv / t)[:, None] * (residual**2 / policy.std**2 - 1.0)
    else:
        p = softmax(out)
        onehot = np.zeros_like(p)
        onehot[np.arange(t), actions.astype(int)] = 1.0
        d_actor = -(adv / t)[:, None] * (onehot - p)
    return d_actor, vf_coef * (values - returns) / t, d_log_std


_owners: dict[tuple, RolloutOwner] = {}


def owner_for(
    scenario: Scenario, index: int, variant: str | None, seed: np.random.SeedSequence, run_id: int
) -> RolloutOwner:
    """This owner's environments for the run, kept across rounds (``participant.run_state``); ``seed`` is
    its private randomness for a new one (``NodeIdentity.randomness``)."""
    return kept_for_run(_owners, (run_id, index, scenario.name, variant),
                        lambda: RolloutOwner(scenario, index, seed, variant))


def encrypted_rollout(own_key: KeyHolder, round_: int, owner_round: OwnerRound, layout: BlockLayout,
                      theta: np.ndarray) -> wire_pb2.RolloutUpload:
    """Under the owner's own key: every block as one vector of consecutive full chunks (the layout's
    X_j, D_actor_a, D_critic) and theta tiled in the same slots."""
    upload = wire_pb2.RolloutUpload(protocol_version=PROTOCOL_VERSION, round=round_)
    for block in owner_round.blocks(layout):
        upload.blocks.append(encrypt_to_proto(own_key, np.concatenate(block)))
    upload.theta_tiled.CopyFrom(tiled_theta(own_key, theta, layout))
    return upload


# The owner's gradient from the coordinator's sums differs from its own by CKKS's error (measured:
# 1e-6 of the largest coordinate, CartPole); more than this is a wrong or hostile computation.
OWNER_GRADIENT_TOLERANCE = 5e-5


def owner_update(own_key: KeyHolder, per_slot: list[EncryptedVector], layout: BlockLayout,
                 owner_round: OwnerRound, theta: np.ndarray, spec: PolyNetSpec, bound: float) -> np.ndarray:
    """The coordinator's per-slot sums of this owner's terms, decrypted and collapsed: the owner's
    update, once it matches the gradient the owner computes itself (else ``RequestRefusedError``),
    clipped to ``bound`` per coordinate (HE-Adam's C in update units)."""
    if len(per_slot) != layout.gradient_vectors:
        raise RequestRefusedError(
            f"owner-gradient query holds {len(per_slot)} ciphertexts, the layout defines {layout.gradient_vectors}")
    gradient = layout.collapse([decrypt_vector(own_key, vec)[: layout.slots] for vec in per_slot])
    own = spec.gradient(theta, owner_round.obs, owner_round.d_actor, owner_round.d_critic)  # the spread stays fixed
    error = float(np.max(np.abs(gradient - own)))
    if error > OWNER_GRADIENT_TOLERANCE * max(float(np.max(np.abs(own))), 1e-12):
        raise RequestRefusedError(
            f"the coordinator's gradient differs from this owner's own by {error:.3g} (largest coordinate "
            f"{float(np.max(np.abs(own))):.3g}): a wrong key or a wrong computation; refusing to send it on")
    return np.clip(gradient, -bound, bound)


def tiled_theta(holder: KeyHolder, theta: np.ndarray,
                layout: BlockLayout | StatisticsLayout) -> wire_pb2.EncryptedVector:
    """theta in the round's slot layout, so the coordinator can compute the gradient: the coefficients
    ``T(theta)`` for statistics (the refresher's, under the federation key), tiled theta for transitions
    (each owner's, under its own key)."""
    return encrypt_to_proto(holder, np.concatenate(layout.pack_theta(theta)))
