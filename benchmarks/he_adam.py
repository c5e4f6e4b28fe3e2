"""`fedhe bench he-adam`: HE-Adam on ciphertexts against the same Adam in NumPy.

It plays every role in one process, but through the real wire format: a participant encrypts
the pre-scaled gradient, the coordinator (evaluation-only context) steps, masks its state, a
refresher decrypts and re-encrypts it, the coordinator unmasks. As in a federation, theta is
encrypted once and never refreshed (HE-Adam only subtracts from it), and of the rest only what the
next step needs fresh is refreshed (``he_adam.refresh_due``: z and w every step, m every third).
``ms_per_step`` (median) times the coordinator's unmasking and step (over workers, unmasking runs
in the step's workers, ``benchmarks.parallel_unmask_step``); ``refresh_ms`` (mean over steps, so a multiple of 3 steps
weighs the schedule right) the rest of the refresh, both sides (``refresh_key_holder_ms`` the
refresher's part).

With ``workers`` > 1 every step and refresh runs twice on the same inputs, in-process and over
that many worker processes per side (``coordinator.chunk_workers``), so the two timings are paired
(same machine load) and the two steps are checked to give the same ciphertexts byte for byte.
With ``shards`` > 1 the paired side is the step sharded on Ray (``coordinator.ray_shards``) instead:
the actors own the state for the whole run, each upload goes to them as its wire bytes, they unmask
the refresher's reply and mask the next request themselves; the ``_workers`` fields then hold the
shards' timings (``paired`` says which) and the refresher's side runs over ``shards`` processes.
``step_cpu_ms``, ``refresh_cpu_ms`` and their ``_workers`` twins are CPU time, the workers' included:
on a shared machine the wall times depend on the other jobs, the CPU time shows what the workers
add (serializing chunks in and out), and CPU time over cores is the best wall time idle cores give.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.numpy_adam import reference_adam
from benchmarks.parallel_keyholder import keyholder_workers, reencrypt_message
from benchmarks.parallel_unmask_step import parallel_unmask_step
from benchmarks.proc_stats import cpu_seconds
from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.chunk_workers import ChunkWorkers, default_workers
from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamState,
    Masks,
    he_adam_step,
    initial_optimizer_state,
    mask_state,
    refresh_due,
    step_levels,
    unmask_state,
)
from coordinator.parallel_step import parallel_he_adam_step
from coordinator.ray_shards import ShardedHEAdam
from participant.keyholder import decrypt_vector, generate_keys, load_keyholder
from protos.backend import HEBackend
from protos.codec import (
    EncryptedVector,
    chunk_count,
    encrypt_vector,
    from_proto,
    parse_message,
    to_proto,
)
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.optimizer import STATE_NAMES
from protos.profiles import DEFAULT_PROFILE


def _typical(phase: str, values: list[float]) -> float:
    """The median step; the mean refresh, whose size follows the schedule (m every third round)."""
    return statistics.fmean(values) if phase.startswith("refresh") else statistics.median(values)


def gradient_sequence(steps: int, params: int, clip: float, seed: int) -> list[np.ndarray]:
    """Heavy-tailed per-coordinate scales, a 10x jump halfway, each clipped to L2 norm C."""
    rng = np.random.default_rng(seed)
    coordinate_scale = np.exp(rng.uniform(np.log(1e-3), 0.0, size=params))
    coordinate_scale *= 0.05 * clip / np.linalg.norm(coordinate_scale)
    grads = []
    for t in range(steps):
        g = rng.normal(size=params) * coordinate_scale * (10.0 if t >= steps // 2 else 1.0)
        norm = np.linalg.norm(g)
        grads.append(g * min(1.0, clip / norm))
    return grads


@dataclass
class Refreshed:
    """The refresher's reply as the coordinator read it: still masked, each vector also as on the wire."""

    wire: dict[str, wire_pb2.EncryptedVector]
    fresh: dict[str, EncryptedVector]
    masks: Masks
    coordinator_ms: float
    key_holder_ms: float
    request_bytes: int
    reply_bytes: int


def refresh_roundtrip(
    coordinator: HEBackend, holder_workers: ChunkWorkers, state: dict[str, EncryptedVector]
) -> Refreshed:
    """The refresh of the optimizer state as a round runs it, through the wire format, up to unmasking.

    The coordinator masks and serializes (``coordinator_ms``), the refresher re-encrypts from the
    wire message to the wire message (``key_holder_ms``, over ``holder_workers``), the coordinator
    checks the fresh ciphertexts (``coordinator_ms`` again). Unmasking is left to the caller:
    ``unmask_state`` in-process, or in the step's workers (``parallel_unmask_step``).
    """
    t0 = time.perf_counter()
    masked, masks = mask_state(coordinator, state)
    request = {name: to_proto(coordinator, vec).SerializeToString() for name, vec in masked.items()}
    t1 = time.perf_counter()
    reply = reencrypt_request(holder_workers, request, next(iter(state.values())).length)
    t2 = time.perf_counter()
    wire = {name: parse_message(wire_pb2.EncryptedVector, data) for name, data in reply.items()}
    fresh = {name: from_proto(coordinator, msg, expected_length=msg.length, fresh=True) for name, msg in wire.items()}
    t3 = time.perf_counter()
    return Refreshed(wire, fresh, masks, (t1 - t0 + t3 - t2) * 1e3, (t2 - t1) * 1e3,
                     sum(len(data) for data in request.values()), sum(len(data) for data in reply.values()))


def sharded_refresh_roundtrip(
    coordinator: HEBackend, sharded: ShardedHEAdam, holder_workers: ChunkWorkers, names: tuple[str, ...]
) -> Refreshed:
    """``refresh_roundtrip`` with the state masked inside the shards; the shards check the fresh
    chunks when they unmask them (in the next step), so ``fresh`` is read here untimed, for the
    in-process side only."""
    t0 = time.perf_counter()
    masked, masks = sharded.masked(names)
    request = {name: msg.SerializeToString() for name, msg in masked.items()}
    t1 = time.perf_counter()
    reply = reencrypt_request(holder_workers, request, sharded.length)
    t2 = time.perf_counter()
    wire = {name: parse_message(wire_pb2.EncryptedVector, data) for name, data in reply.items()}
    t3 = time.perf_counter()
    fresh = {name: from_proto(coordinator, msg, expected_length=msg.length, fresh=True) for name, msg in wire.items()}
    return Refreshed(wire, fresh, masks, (t1 - t0 + t3 - t2) * 1e3, (t2 - t1) * 1e3,
                     sum(len(data) for data in request.values()), sum(len(data) for data in reply.values()))


def reencrypt_request(holder_workers: ChunkWorkers, request: dict[str, bytes], length: int) -> dict[str, bytes]:
    """The refresher's side: every masked vector re-encrypted, wire bytes in and out."""
    return {
        name: reencrypt_message(holder_workers, parse_message(wire_pb2.EncryptedVector, data),
                                expected_length=length).SerializeToString()
        for name, data in request.items()
    }


def run_he_adam_bench(
    steps: int = 200,
    params: int = 10_000,
    profile: str = DEFAULT_PROFILE,
    config: HEAdamConfig | None = None,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    workers: int | None = None,
    shards: int = 0,
    ray_address: str | None = None,
) -> dict:
    config = config or HEAdamConfig(lr=0.01, clip_bound=1.0)
    workers = default_workers() if workers is None else max(1, workers)
    if shards > 1:
        workers = shards  # the paired side: shards for the coordinator, as many processes for the refresher
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-") as tmp:
        keys = generate_keys(Path(tmp), profile)
        coordinator = load_evaluation_backend(keys.coordinator_key)
        holder = load_keyholder(keys.participant_key)
    poly = config.validate(coordinator.profile)

    def send(src: HEBackend, dst: HEBackend, vec: EncryptedVector) -> EncryptedVector:
        return decode_vector(dst, encode_vector(src, vec), expected_length=vec.length)

    rng = np.random.default_rng(seed + 1)
    theta0 = rng.normal(scale=0.1, size=params)
    grads = gradient_sequence(steps, params, config.clip_bound, seed)
    t0 = time.perf_counter()
    theta_ref, w_ref, _ = reference_adam(theta0, grads, config)
    numpy_ms = (time.perf_counter() - t0) * 1e3 / steps

    state = HEAdamState(
        send(holder, coordinator, encrypt_vector(holder, theta0)),
        **initial_optimizer_state(coordinator, params),
    )
    phases = ("step", "refresh", "refresh_key_holder", "step_cpu", "refresh_cpu")
    timings: dict[str, list[float]] = {key: [] for key in phases}
    paired: dict[str, list[float]] = {key: [] for key in timings}
    x_min, x_max, w_err, identical = np.inf, -np.inf, 0.0, True
    upload = encode_vector(holder, encrypt_vector(holder, grads[0] * config.update_scale))
    in_process = keyholder_workers(holder, workers=1)
    refreshed: Refreshed | None = None
    start = dict.fromkeys(STATE_NAMES, 0)  # levels used at the start of the next step
    with ((ShardedHEAdam(coordinator, shards, ray_address) if shards > 1 else nullcontext()) as sharded,
          ChunkWorkers(coordinator, 1 if sharded else workers) as step_workers,
          keyholder_workers(holder, workers) as refresh_workers):
        step_workers.warm()
        refresh_workers.warm()
        shard_pids: list[int] = []
        if sharded is not None:  # Ray's start and the actors' context loading stay out of the timings
            sharded.set_state(state)
            shard_pids = sharded.local_pids()
        for t, g in enumerate(grads):
            uploaded = encode_vector(holder, encrypt_vector(holder, g * config.update_scale))
            aggregate = decode_vector(coordinator, uploaded, expected_length=params)
            t0, cpu0 = time.perf_counter(), time.process_time()
            kept = state
            if refreshed is not None:
                unmasked = unmask_state(coordinator, refreshed.fresh, refreshed.masks)
                state = HEAdamState(state.theta, **{**state.named(), **unmasked}, step=t)
            result = he_adam_step(coordinator, state, aggregate, config, poly)
            timings["step"].append((time.perf_counter() - t0) * 1e3)
            timings["step_cpu"].append((time.process_time() - cpu0) * 1e3)
            x = decrypt_vector(holder, send(coordinator, holder, result.x))  # workers do not return x
            x_min, x_max = min(x_min, float(x.min())), max(x_max, float(x.max()))
            if sharded is not None:
                t0, cpu0 = time.perf_counter(), cpu_seconds(shard_pids)
                if refreshed is not None:
                    sharded.unmask(refreshed.wire, refreshed.masks)
                sharded.accumulate(parse_message(wire_pb2.EncryptedVector, uploaded), fresh=True)
                sharded.step(config, poly)
                paired["step"].append((time.perf_counter() - t0) * 1e3)
                paired["step_cpu"].append((cpu_seconds(shard_pids) - cpu0) * 1e3)
                identical = identical and _same_bytes(result.state.theta, sharded.vector("theta"))
                identical = identical and _same_bytes(result.state.w, sharded.vector("w"))
            elif workers > 1:
                t0, cpu0 = time.perf_counter(), cpu_seconds(step_workers.pids())
                if refreshed is None:
                    parallel = parallel_he_adam_step(step_workers, state, aggregate, config, poly)
                else:
                    parallel = parallel_unmask_step(step_workers, kept, refreshed.wire, refreshed.masks,
                                                    aggregate, config, poly)
                paired["step"].append((time.perf_counter() - t0) * 1e3)
                paired["step_cpu"].append((cpu_seconds(step_workers.pids()) - cpu0) * 1e3)
                identical = identical and _same_bytes(result.state.theta, parallel.state.theta)
                identical = identical and _same_bytes(result.state.w, parallel.state.w)
                result = parallel
            levels = step_levels(start, 0, config, poly)[0]
            state = result.state
            due = refresh_due(levels, 0, coordinator.profile.levels, config, poly)  # as the round loop does
            start = {name: 0 if name in due else levels[name] for name in levels}
            cpu0 = time.process_time()
            refreshed = refresh_roundtrip(coordinator, in_process, {name: state.named()[name] for name in due})
            timings["refresh_cpu"].append((time.process_time() - cpu0) * 1e3)
            timings["refresh"].append(refreshed.coordinator_ms + refreshed.key_holder_ms)
            timings["refresh_key_holder"].append(refreshed.key_holder_ms)
            if workers > 1:  # the same state refreshed again, re-encrypted over the workers; the run goes on from it
                cpu0 = cpu_seconds(refresh_workers.pids() + shard_pids)
                if sharded is not None:  # masked in the shards (their state is the same, byte for byte)
                    again = sharded_refresh_roundtrip(coordinator, sharded, refresh_workers, due)
                else:
                    again = refresh_roundtrip(coordinator, refresh_workers, {name: state.named()[name] for name in due})
                paired["refresh"].append(again.coordinator_ms + again.key_holder_ms)
                paired["refresh_key_holder"].append(again.key_holder_ms)
                paired["refresh_cpu"].append((cpu_seconds(refresh_workers.pids() + shard_pids) - cpu0) * 1e3)
                refreshed = again

            w = decrypt_vector(holder, send(coordinator, holder, state.w)) / np.sqrt(config.tau_value)
            w_err = max(w_err, float(np.max(np.abs(w / w_ref[t] - 1))))
            if on_step:
                on_step(t + 1)

    theta_he = decrypt_vector(holder, send(coordinator, holder, state.theta))
    movement = float(np.max(np.abs(theta_ref - theta0)))
    chunks = chunk_count(params, coordinator.slots)
    typical = {key: _typical(key, values) for key, values in timings.items()}
    with_workers = {key: _typical(key, values) for key, values in paired.items()} if workers > 1 else typical
    he_ms = typical["step"] + typical["refresh"]
    he_ms_workers = with_workers["step"] + with_workers["refresh"]
    return {
        "profile": coordinator.profile.name,
        "params": params,
        "steps": steps,
        "chunks": chunks,
        "theta_rel_err": float(np.max(np.abs(theta_he - theta_ref))) / movement,
        "w_rel_err": w_err,
        "x_min": x_min,
        "x_max": x_max,
        "interval": list(poly.interval),
        "x_bound": [config.beta2, config.x_bound],
        "poly_degree": config.degree,
        "poly_rel_err": poly.max_rel_error,
        "tau": config.tau_value,
        "ms_per_step": typical["step"],
        "ms_per_step_per_8192_params": typical["step"] / chunks * 8192 / coordinator.slots,
        "refresh_ms": typical["refresh"],
        "refresh_key_holder_ms": typical["refresh_key_holder"],
        "he_ms_per_100k_params": he_ms / params * 100_000,
        "workers": workers,
        "shards": shards if shards > 1 else 1,
        "paired": "shards" if shards > 1 else "workers",
        "ms_per_step_workers": with_workers["step"],
        "refresh_ms_workers": with_workers["refresh"],
        "refresh_key_holder_ms_workers": with_workers["refresh_key_holder"],
        "he_ms_per_100k_params_workers": he_ms_workers / params * 100_000,
        "step_cpu_ms": typical["step_cpu"],
        "step_cpu_ms_workers": with_workers["step_cpu"],
        "refresh_cpu_ms": typical["refresh_cpu"],
        "refresh_cpu_ms_workers": with_workers["refresh_cpu"],
        "step_speedup": typical["step"] / with_workers["step"],
        "refresh_speedup": typical["refresh"] / with_workers["refresh"],
        "he_speedup": he_ms / he_ms_workers,
        "steps_identical": identical,
        "numpy_ms_per_step": numpy_ms,
        "slowdown_vs_numpy": typical["step"] / numpy_ms if numpy_ms > 0 else None,
        "upload_bytes_per_param": len(upload) / params,
        "upload_bytes_per_slot": len(upload) / (chunks * coordinator.slots),
    }


def _same_bytes(a: EncryptedVector, b: EncryptedVector) -> bool:
    """Ciphertexts at the last level serialize in well under a millisecond: a cheap exact check."""
    return [c.serialize() for c in a.chunks] == [c.serialize() for c in b.chunks]
