"""`fedhe bench encrypted-gradient`: one round of encrypted-rollout training against NumPy.

``--upload statistics`` (the default): owners send tiled sufficient statistics under masks that
cancel in the sum, the key holder encrypts the coefficients, the coordinator sums and multiplies
once (``protos.rollout_statistics``). ``--upload transitions``, as described below, with every
owner under one key: the arithmetic per block is that of a federation, where each owner's blocks
are under its own key and its sums go back to it (``fedhe bench round --rollout-upload transitions``
times that whole protocol).

It plays every role in one process, through the real wire format (``protos.codec``):

1. A fresh key pair in a temp dir; the coordinator gets an evaluation-only context.
2. The key holder encrypts theta twice: flat (HE-Adam's state) and tiled (``BlockLayout.pack_theta``).
3. Every participant draws bounded random rollouts (states uniform in [-1, 1], A2C-style deltas
   ``-A (onehot(a) - p) / T`` and ``c_v (V - R) / T`` with normalized, clipped advantages), scales
   its deltas by the provable bound ``PolyNetSpec.gradient_bounds`` so the sum of all
   participants keeps ``|G_j| <= C`` (HE-Adam's interval guarantee), pre-scales them by
   ``config.update_scale``, and encrypts and serializes its blocks.
4. The coordinator decodes every block, computes ``block_gradient`` and sums (``GradientSum``),
   masks the per-slot sums, the key holder collapses them (``collapse_masked``), the coordinator
   unmasks and runs ONE ``he_adam_step``.
5. The result is compared with ``PolyNetSpec.gradient`` and ``NumpyAdam`` on the same data.

``coordinator_ms_per_round`` is the coordinator's compute (gradient, masking, unmasking, HE-Adam);
parsing the uploads is reported as ``coordinator_decode_ms``. ``--plaintext`` runs the identical
protocol on ``PlainBackend``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.numpy_adam import NumpyAdam
from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.encrypted_gradient import GradientSum, levels_used, mask_for_collapse, unmask_collapsed
from coordinator.he_adam import HEAdamConfig, HEAdamState, he_adam_step, initial_optimizer_state
from participant.gradient_collapse import COLLAPSE_GRID, collapse_masked
from participant.keyholder import KeyHolder, PlainKeyHolder, decrypt_vector, generate_keys, load_keyholder
from protos.backend import HEBackend, PlainBackend
from protos.codec import EncryptedVector, encrypt_to_proto, encrypt_vector
from protos.keyfile import load_evaluation_backend
from protos.optimizer import MASK_BOUND
from protos.profiles import DEFAULT_PROFILE, get_profile
from protos.rollout_layout import BlockLayout, suggested_delta_scale
from protos.rollout_statistics import StatisticsLayout
from scenarios.poly_net import PolyNetSpec


def bench_config(clip_bound: float = 2.0) -> HEAdamConfig:
    """The encrypted-rollout server optimizer of the feasibility study: lr 0.05, beta1 0.9, B = 4."""
    return HEAdamConfig(lr=0.05, beta1=0.9, clip_bound=clip_bound, interval_upper=4)


def bounded_rollout(
    spec: PolyNetSpec, theta: np.ndarray, transitions: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States in [-1, 1] and A2C-style loss-layer deltas (1/T weighted, advantages clipped to +-3)."""
    obs = rng.uniform(-1.0, 1.0, size=(transitions, spec.obs_dim))
    outputs, values = spec.forward(theta, obs)
    advantages = np.clip(rng.standard_normal(transitions), -3.0, 3.0)
    if spec.continuous:
        d_actor = -advantages[:, None] * np.clip(rng.standard_normal(outputs.shape), -3.0, 3.0) / transitions
    else:
        probs = np.exp(outputs - outputs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        onehot = np.eye(spec.num_outputs)[rng.integers(spec.num_outputs, size=transitions)]
        d_actor = -advantages[:, None] * (onehot - probs) / transitions
    returns = values + np.clip(rng.standard_normal(transitions), -3.0, 3.0)
    d_critic = 0.5 * (values - returns) / transitions
    return obs, d_actor, d_critic


def bound_deltas(
    spec: PolyNetSpec, theta: np.ndarray, d_actor: np.ndarray, d_critic: np.ndarray, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scale deltas so every gradient coordinate is provably at most ``budget`` (C / participants)."""
    l_actor, l_critic = spec.gradient_bounds(theta)
    actor = l_actor * float(np.abs(d_actor).sum())
    critic = l_critic * float(np.abs(d_critic).sum())
    return d_actor * min(1.0, budget / max(actor, 1e-300)), d_critic * min(1.0, budget / max(critic, 1e-300))


@dataclass
class Uploads:
    """One round's per-slot gradient at the coordinator, and what it cost to get there."""

    layout: BlockLayout | StatisticsLayout
    per_slot: list
    coefficients_bytes: int  # the key holder's tiled theta or coefficients, on the wire
    upload_bytes: list[int]  # per participant
    encrypt_ms: list[float]  # per participant: pack, encrypt, serialize
    key_holder_ms: float  # tiled theta or coefficients
    gradient_ms: float  # the coordinator's products and sums
    decode_ms: float
    extra: dict


def _transitions(spec, holder, coordinator, rollouts, participants, transitions, config, theta, on_block) -> Uploads:
    """Every transition uploaded: blocks, tiled theta, backpropagation per block (depth 3)."""
    layout = BlockLayout(spec, coordinator.slots, suggested_delta_scale(participants, transitions, config.clip_bound))
    blocks, scale = layout.blocks_for(transitions), config.update_scale
    t0 = time.perf_counter()
    tiled_bytes = encrypt_to_proto(holder, np.concatenate(layout.pack_theta(theta))).SerializeToString()
    theta_ms = (time.perf_counter() - t0) * 1e3
    tiled_chunks = decode_vector(coordinator, tiled_bytes, expected_length=layout.theta_vectors * layout.slots).chunks
    uploads, encrypt_ms = [], []
    for obs, d_actor, d_critic in rollouts:
        t0 = time.perf_counter()
        packed = layout.pack_blocks(obs, d_actor * scale, d_critic * scale, num_blocks=blocks)
        uploads.append([encrypt_to_proto(holder, np.concatenate(b)).SerializeToString() for b in packed])
        encrypt_ms.append((time.perf_counter() - t0) * 1e3)
    block_length = layout.block_vectors * coordinator.slots
    total, block_ms, decode_ms, done = GradientSum(coordinator, layout), [], 0.0, 0
    for up in uploads:
        for data in up:
            t0 = time.perf_counter()
            block = decode_vector(coordinator, data, expected_length=block_length, fresh=True)
            t1 = time.perf_counter()
            total.add_block(tiled_chunks, block.chunks)
            block_ms.append((time.perf_counter() - t1) * 1e3)
            decode_ms += (t1 - t0) * 1e3
            done += 1
            if on_block:
                on_block(done)
    extra = {"transitions_per_block": layout.transitions_per_block, "blocks_per_participant": blocks,
             "upload_ciphertexts_per_block": layout.block_vectors, "delta_scale": layout.delta_scale,
             "ms_per_block": statistics.median(block_ms)}
    return Uploads(layout, total.result(), len(tiled_bytes), [sum(len(b) for b in up) for up in uploads], encrypt_ms,
                   theta_ms, float(sum(block_ms)), decode_ms, extra)


def _statistics(spec, holder, coordinator, rollouts, config, theta, rng) -> Uploads:
    """Sufficient statistics: tiled, under masks that cancel in the sum; one product with the coefficients."""
    layout = StatisticsLayout(spec, coordinator.slots)
    t0 = time.perf_counter()
    coefficient_bytes = encrypt_to_proto(holder, np.concatenate(layout.pack_theta(theta))).SerializeToString()
    theta_ms = (time.perf_counter() - t0) * 1e3
    coefficient_chunks = decode_vector(coordinator, coefficient_bytes, expected_length=layout.upload_length).chunks
    masks = rng.uniform(-MASK_BOUND, MASK_BOUND, size=(len(rollouts), layout.upload_length))
    masks -= np.roll(masks, 1, axis=0)  # pair masks: each owner adds its own and subtracts its neighbour's
    uploads, encrypt_ms = [], []
    for (obs, d_actor, d_critic), mask in zip(rollouts, masks):
        t0 = time.perf_counter()
        tiled = layout.tile(layout.statistics(obs, d_actor * config.update_scale, d_critic * config.update_scale))
        uploads.append(encrypt_to_proto(holder, tiled + mask).SerializeToString())
        encrypt_ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    summed = [decode_vector(coordinator, data, expected_length=layout.upload_length, fresh=True) for data in uploads]
    t1 = time.perf_counter()
    total = summed[0].chunks
    for vec in summed[1:]:
        total = [coordinator.add(a, b) for a, b in zip(total, vec.chunks)]
    per_slot = [coordinator.mul(c, t) for c, t in zip(coefficient_chunks, total)]
    gradient_ms = (time.perf_counter() - t1) * 1e3
    extra = {"statistics": layout.stats_length, "terms": layout.terms, "upload_ciphertexts": layout.gradient_vectors}
    return Uploads(layout, per_slot, len(coefficient_bytes), [len(u) for u in uploads], encrypt_ms, theta_ms,
                   gradient_ms, (t1 - t0) * 1e3, extra)


def run_encrypted_gradient_bench(
    participants: int = 3,
    transitions: int = 2048,
    hidden: int = 16,
    obs_dim: int = 4,
    actions: int = 2,
    profile: str = DEFAULT_PROFILE,
    plaintext: bool = False,
    clip_bound: float = 2.0,
    seed: int = 0,
    on_block: Callable[[int], None] | None = None,
    upload: str = "statistics",
) -> dict:
    config = bench_config(clip_bound)
    if plaintext:
        prof = get_profile(profile)
        holder: KeyHolder = PlainKeyHolder(prof)
        coordinator: HEBackend = PlainBackend(prof)
    else:
        with tempfile.TemporaryDirectory(prefix="fedhe-bench-") as tmp:
            keys = generate_keys(Path(tmp), profile)
            coordinator = load_evaluation_backend(keys.coordinator_key)
            holder = load_keyholder(keys.participant_key)
    poly = config.validate(coordinator.profile)
    spec = PolyNetSpec(obs_dim, hidden, actions)
    scale = config.update_scale

    def send(src: HEBackend, dst: HEBackend, vec: EncryptedVector, fresh: bool = False) -> EncryptedVector:
        return decode_vector(dst, encode_vector(src, vec), expected_length=vec.length, fresh=fresh)

    theta0 = spec.init(seed)
    rng = np.random.default_rng(seed + 1)
    state = HEAdamState(
        send(holder, coordinator, encrypt_vector(holder, theta0)),
        **initial_optimizer_state(coordinator, spec.num_params),
    )

    # Participants: rollouts with deltas bounded so the sum keeps |G_j| <= C (HE-Adam's interval guarantee).
    budget = config.clip_bound / participants
    grad_ref = np.zeros(spec.num_params)
    rollouts = []
    for _ in range(participants):
        obs, d_actor, d_critic = bounded_rollout(spec, theta0, transitions, rng)
        d_actor, d_critic = bound_deltas(spec, theta0, d_actor, d_critic, budget)
        grad_ref += spec.gradient(theta0, obs, d_actor, d_critic)
        rollouts.append((obs, d_actor, d_critic))
    if upload == "statistics":
        got = _statistics(spec, holder, coordinator, rollouts, config, theta0, rng)
    elif upload == "transitions":
        got = _transitions(spec, holder, coordinator, rollouts, participants, transitions, config, theta0, on_block)
    else:
        raise ValueError(f"upload must be statistics or transitions, got {upload!r}")
    layout, per_slot = got.layout, got.per_slot
    used = levels_used(coordinator, per_slot)

    # Second exchange: mask, key-holder collapse, unmask.
    t0 = time.perf_counter()
    masked, masks = mask_for_collapse(coordinator, per_slot)
    mask_ms = (time.perf_counter() - t0) * 1e3
    request = [encode_vector(coordinator, v) for v in masked]
    received = [decode_vector(holder, data, expected_length=holder.slots) for data in request]
    t0 = time.perf_counter()
    dense = collapse_masked(holder, received, layout)
    collapse_ms = (time.perf_counter() - t0) * 1e3
    reply = dense.SerializeToString()
    dense_at_coordinator = decode_vector(coordinator, reply, expected_length=spec.num_params, fresh=True)
    t0 = time.perf_counter()
    aggregate = unmask_collapsed(coordinator, dense_at_coordinator, masks, layout)
    unmask_ms = (time.perf_counter() - t0) * 1e3

    # HE-Adam on the collapsed, pre-scaled gradient u = s G.
    t0 = time.perf_counter()
    result = he_adam_step(coordinator, state, aggregate, config, poly)
    adam_ms = (time.perf_counter() - t0) * 1e3

    # Reference and errors (the key holder decrypts for the report only).
    grad_he = decrypt_vector(holder, send(coordinator, holder, aggregate)) / scale
    theta_he = decrypt_vector(holder, send(coordinator, holder, result.state.theta))
    x = decrypt_vector(holder, send(coordinator, holder, result.x))
    theta_ref = NumpyAdam(spec.num_params, config).step(theta0, grad_ref)
    grad_peak = float(np.max(np.abs(grad_ref)))
    movement = float(np.max(np.abs(theta_ref - theta0)))
    real_transitions = participants * transitions
    return {
        "mode": "plaintext" if plaintext else "encrypted",
        "upload": upload,
        "profile": coordinator.profile.name,
        "participants": participants,
        "transitions": transitions,
        "obs_dim": obs_dim,
        "actions": actions,
        "hidden": hidden,
        "params": spec.num_params,
        **got.extra,
        "gradient_ciphertexts": layout.gradient_vectors,
        "grad_rel_err": float(np.max(np.abs(grad_he - grad_ref))) / grad_peak,
        "grad_max_abs": grad_peak,
        "clip_bound": config.clip_bound,
        "levels_used": used,
        "theta_rel_err": float(np.max(np.abs(theta_he - theta_ref))) / movement,
        "theta_movement": movement,
        "x_min": float(x.min()),
        "x_max": float(x.max()),
        "collapse_grid": COLLAPSE_GRID,
        "gradient_ms": got.gradient_ms,
        "mask_ms": mask_ms,
        "unmask_ms": unmask_ms,
        "he_adam_ms": adam_ms,
        "coordinator_ms_per_round": got.gradient_ms + mask_ms + unmask_ms + adam_ms,
        "coordinator_decode_ms": got.decode_ms,
        "key_holder_ms": got.key_holder_ms + collapse_ms,
        "key_holder_theta_ms": got.key_holder_ms,
        "key_holder_collapse_ms": collapse_ms,
        "participant_encrypt_ms": statistics.mean(got.encrypt_ms),
        "upload_bytes_per_participant": int(statistics.mean(got.upload_bytes)),
        "bytes_per_transition": sum(got.upload_bytes) / real_transitions,
        "tiled_theta_bytes": got.coefficients_bytes,
        "exchange_bytes": sum(len(r) for r in request) + len(reply),
    }
