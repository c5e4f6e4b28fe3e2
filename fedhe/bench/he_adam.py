"""`fedhe bench he-adam`: HE-Adam on ciphertexts against the same Adam in NumPy.

It plays every role in one process, but through the real wire format: a participant encrypts
the pre-scaled gradient, the coordinator (evaluation-only context) steps, masks its state, a
refresher decrypts and re-encrypts, the coordinator unmasks. Only the coordinator's step is
timed as ``ms_per_step``; refresh cost is reported separately.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamState,
    he_adam_step,
    initial_optimizer_state,
    mask_state,
    reference_adam,
    unmask_state,
)
from participant.keyholder import decrypt_vector, generate_keys, load_keyholder, reencrypt
from protos.backend import HEBackend
from protos.codec import EncryptedVector, chunk_count, decode_vector, encode_vector, encrypt_vector
from protos.keyfile import load_evaluation_backend
from protos.profiles import DEFAULT_PROFILE


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


def run_he_adam_bench(
    steps: int = 200,
    params: int = 10_000,
    profile: str = DEFAULT_PROFILE,
    config: HEAdamConfig | None = None,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    config = config or HEAdamConfig(lr=0.01, clip_bound=1.0)
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
    step_ms, refresh_ms, x_min, x_max, w_err = [], [], np.inf, -np.inf, 0.0
    upload = encode_vector(holder, encrypt_vector(holder, grads[0] * config.update_scale))
    for t, g in enumerate(grads):
        aggregate = send(holder, coordinator, encrypt_vector(holder, g * config.update_scale))
        t0 = time.perf_counter()
        result = he_adam_step(coordinator, state, aggregate, config, poly)
        step_ms.append((time.perf_counter() - t0) * 1e3)

        x = decrypt_vector(holder, send(coordinator, holder, result.x))
        x_min, x_max = min(x_min, float(x.min())), max(x_max, float(x.max()))
        t0 = time.perf_counter()
        masked, masks = mask_state(coordinator, result.state.named())
        fresh = {
            name: send(holder, coordinator, reencrypt(holder, send(coordinator, holder, vec)))
            for name, vec in masked.items()
        }
        theta = send(holder, coordinator, reencrypt(holder, send(coordinator, holder, result.state.theta)))
        state = HEAdamState(theta, **unmask_state(coordinator, fresh, masks), step=t + 1)
        refresh_ms.append((time.perf_counter() - t0) * 1e3)

        w = decrypt_vector(holder, send(coordinator, holder, state.w)) / np.sqrt(config.tau_value)
        w_err = max(w_err, float(np.max(np.abs(w / w_ref[t] - 1))))
        if on_step:
            on_step(t + 1)

    theta_he = decrypt_vector(holder, send(coordinator, holder, state.theta))
    movement = float(np.max(np.abs(theta_ref - theta0)))
    chunks = chunk_count(params, coordinator.slots)
    median_step = statistics.median(step_ms)
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
        "ms_per_step": median_step,
        "ms_per_step_per_8192_params": median_step / chunks * 8192 / coordinator.slots,
        "refresh_ms": statistics.median(refresh_ms),
        "numpy_ms_per_step": numpy_ms,
        "slowdown_vs_numpy": median_step / numpy_ms if numpy_ms > 0 else None,
        "upload_bytes_per_param": len(upload) / params,
        "upload_bytes_per_slot": len(upload) / (chunks * coordinator.slots),
    }
