"""HE-Adam on ciphertexts agrees with NumPy Adam and keeps x inside the fitted interval."""

from __future__ import annotations

import gc
import itertools

import numpy as np
import pytest

from benchmarks.numpy_adam import reference_adam
from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamConfigError,
    HEAdamState,
    he_adam_step,
    initial_optimizer_state,
    mask_state,
    refresh_due,
    step_levels,
    unmask_state,
)
from participant.keyholder import PlainKeyHolder, decrypt_vector, reencrypt
from protos.backend import PlainBackend
from protos.codec import EncryptedVector, encrypt_vector, from_proto
from protos.profiles import get_profile


def test_default_tau_makes_the_interval_a_guarantee():
    config = HEAdamConfig(clip_bound=2.0, beta2=0.99, interval_upper=4.0)
    assert config.tau_value == pytest.approx(0.01 * 4 / 3)
    assert config.x_bound == pytest.approx(4.0)


def test_tau_too_small_is_refused():
    with pytest.raises(HEAdamConfigError, match="cannot keep x inside"):
        HEAdamConfig(clip_bound=1.0, tau=1e-5).validate()


def test_depth_beyond_profile_is_refused():
    with pytest.raises(HEAdamConfigError, match="levels"):
        HEAdamConfig(clip_bound=1.0, degree=15, interval_upper=8.0).validate(get_profile("n16k-d6"))
    with pytest.raises(HEAdamConfigError, match="levels"):
        HEAdamConfig(clip_bound=1.0).validate(get_profile("n8k-d2"))
    HEAdamConfig(clip_bound=1.0, degree=15, interval_upper=8.0).validate(get_profile("n16k-d7"))


def test_polynomial_too_coarse_for_the_interval_is_refused():
    with pytest.raises(HEAdamConfigError, match="relative error"):
        HEAdamConfig(clip_bound=1.0, degree=3, interval_upper=8.0).validate()


@pytest.mark.parametrize("upper, degree", [(2.0, 3), (4.0, 7), (8.0, 15)])
def test_polynomial_approximates_inverse_sqrt(upper, degree):
    poly = HEAdamConfig(clip_bound=1.0, interval_upper=upper, degree=degree).validate()
    xs = np.linspace(*poly.interval, 1000)
    assert np.max(np.abs(poly(xs) * np.sqrt(xs) - 1)) <= poly.max_rel_error < 1e-3


def _gradients(steps: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    grads = []
    for t in range(steps):
        g = rng.normal(size=n) * (0.02 if t < steps // 2 else 0.2)
        grads.append(g * min(1.0, 1.0 / np.linalg.norm(g)))
    return grads


def _run(backend, holder, grads, config, send=lambda v: v, back=lambda v: v):
    poly = config.validate(backend.profile)
    n = grads[0].size
    theta0 = np.linspace(-1, 1, n)
    state = HEAdamState(send(encrypt_vector(holder, theta0)), **initial_optimizer_state(backend, n))
    xs, ws = [], []
    for g in grads:
        result = he_adam_step(backend, state, send(encrypt_vector(holder, g * config.update_scale)), config, poly)
        if result.x is not None:  # HE-SGD has no polynomial input
            xs.append(decrypt_vector(holder, back(result.x)))
        masked, masks = mask_state(backend, result.state.named())
        fresh = {k: from_proto(backend, reencrypt(holder, back(v))) for k, v in masked.items()}
        theta = from_proto(backend, reencrypt(holder, back(result.state.theta)))
        state = HEAdamState(theta, **unmask_state(backend, fresh, masks), step=result.state.step)
        ws.append(decrypt_vector(holder, back(state.w)) / np.sqrt(config.tau_value))
    return theta0, decrypt_vector(holder, back(state.theta)), xs, ws


def _run_over_the_wire(backend, holder, grads, config):
    """``_run`` with every ciphertext serialized between the key holder and the coordinator."""
    def send(v):
        return decode_vector(backend, encode_vector(holder, v))

    def back(v):
        return decode_vector(holder, encode_vector(backend, v))

    return _run(backend, holder, grads, config, send, back)


def test_ciphertext_adam_matches_numpy_adam(holder, coordinator_backend):
    config = HEAdamConfig(lr=0.05, clip_bound=1.0)
    grads = _gradients(8, 300)
    theta0, theta, xs, ws = _run_over_the_wire(coordinator_backend, holder, grads, config)
    expected, w_ref, _ = reference_adam(theta0, grads, config)
    movement = np.max(np.abs(expected - theta0))
    assert np.max(np.abs(theta - expected)) / movement < 1e-3
    for w, ref in zip(ws, w_ref):
        assert np.max(np.abs(w / ref - 1)) < 1e-3
    lo, hi = config.validate().interval
    assert all(lo <= x.min() and x.max() <= hi for x in xs)


def test_ciphertext_sgd_matches_numpy_sgd_with_momentum(holder, coordinator_backend):
    """HE-SGD, the linear baseline: m = b1 m + (1 - b1) G, theta -= lr m, two levels, z and w~ untouched."""
    config = HEAdamConfig(lr=0.5, optimizer="sgd", clip_bound=1.0)
    grads = _gradients(6, 300)
    theta0, theta, xs, _ = _run_over_the_wire(coordinator_backend, holder, grads, config)
    expected, m = theta0.copy(), np.zeros_like(theta0)
    for g in grads:
        m = config.beta1 * m + (1 - config.beta1) * g
        expected -= config.lr * m
    assert xs == [] and np.max(np.abs(theta - expected)) / np.max(np.abs(expected - theta0)) < 1e-3
    poly = config.validate(get_profile("n16k-d6"))
    levels, worst = step_levels(dict.fromkeys(("m", "z", "w"), 0), 0, config, poly)
    assert (levels, worst) == ({"m": 1, "z": 0, "w": 0}, 2)
    assert refresh_due({"m": 4, "z": 0, "w": 0}, 0, 6, config, poly) == ()
    assert refresh_due({"m": 5, "z": 0, "w": 0}, 0, 6, config, poly) == ("m",)


def test_a_step_leaves_its_inputs_untouched_and_frees_everything(coordinator_backend):
    """TenSEAL lowers a higher-level right operand in place, and a recursive closure would keep every
    ciphertext of a polynomial evaluation alive until a full garbage collection (gigabytes over a
    200-round soak). Both would break keeping the old state after a failed round."""
    config = HEAdamConfig(lr=0.05, clip_bound=1.0)
    poly, n = config.validate(coordinator_backend.profile), 100
    theta = encrypt_vector(coordinator_backend, np.zeros(n))
    state = HEAdamState(theta, **initial_optimizer_state(coordinator_backend, n))
    aggregate = encrypt_vector(coordinator_backend, np.full(n, 0.1))
    inputs = [state.theta, state.m, state.z, state.w, aggregate]
    full = coordinator_backend.profile.levels
    gc.collect()
    gc.disable()
    try:
        he_adam_step(coordinator_backend, state, aggregate, config, poly)
        cycles = gc.collect()
    finally:
        gc.enable()
    assert cycles == 0
    assert [coordinator_backend.levels_left(v.chunks[0]) for v in inputs] == [full] * 5


def test_plaintext_backend_runs_the_identical_algorithm():
    profile = get_profile("n16k-d6")
    backend, holder = PlainBackend(profile), PlainKeyHolder(profile)
    config = HEAdamConfig(lr=0.05, clip_bound=1.0)
    grads = _gradients(50, 40)
    theta0, theta, xs, ws = _run(backend, holder, grads, config)
    expected, w_ref, _ = reference_adam(theta0, grads, config)
    # Only the polynomial's approximation error separates the two.
    assert np.max(np.abs(theta - expected)) / np.max(np.abs(expected - theta0)) < 1e-3
    assert max(np.max(np.abs(w / r - 1)) for w, r in zip(ws, w_ref)) < 2e-4
    assert max(x.max() for x in xs) <= config.x_bound


def test_unmask_rejects_a_reply_with_missing_state(coordinator_backend):
    state = initial_optimizer_state(coordinator_backend, 3)
    masked, masks = mask_state(coordinator_backend, state)
    del masked["z"]
    with pytest.raises(ValueError, match="expected"):
        unmask_state(coordinator_backend, masked, masks)


def test_config_roundtrips_through_json():
    config = HEAdamConfig(lr=0.3, beta1=0.5, clip_bound=2.5)
    assert HEAdamConfig.from_json(config.to_json()) == config


def test_encrypted_vector_needs_values():
    with pytest.raises(ValueError):
        EncryptedVector([], 0)


def _used(backend, vec: EncryptedVector) -> int:
    return backend.profile.levels - backend.levels_left(vec.chunks[0])


def _lowered(backend, vec: EncryptedVector, levels: int) -> EncryptedVector:
    """The same values, ``levels`` levels further down (each product by 1.0 uses one)."""
    for _ in range(levels):
        vec = EncryptedVector([backend.mul_scalar(c, 1.0) for c in vec.chunks], vec.length)
    return vec


def test_the_level_dry_run_is_tenseals_arithmetic(coordinator_backend):
    """The refresh schedule rests on it: for every start level of m~, z, w~ and the aggregate, a
    real step fits exactly when the dry run says so, and lands on the levels it predicts."""
    config = HEAdamConfig(clip_bound=1.0)
    poly = config.validate(coordinator_backend.profile)
    levels = coordinator_backend.profile.levels
    fresh = initial_optimizer_state(coordinator_backend, 8)
    theta = encrypt_vector(coordinator_backend, np.zeros(8))
    u = encrypt_vector(coordinator_backend, np.full(8, 0.1))
    fitted = 0
    for m_level, z_level, w_level, u_level in itertools.product((0, 2, 3), (0, 1), (0, 1), (0, 1)):
        start = {"m": m_level, "z": z_level, "w": w_level}
        expected, deepest = step_levels(start, u_level, config, poly)
        state = HEAdamState(theta, **{name: _lowered(coordinator_backend, fresh[name], start[name]) for name in start})
        aggregate = _lowered(coordinator_backend, u, u_level)
        if deepest > levels:
            with pytest.raises(ValueError):  # TenSEAL: the modulus chain ends
                he_adam_step(coordinator_backend, state, aggregate, config, poly)
            continue
        result = he_adam_step(coordinator_backend, state, aggregate, config, poly)
        assert {name: _used(coordinator_backend, vec) for name, vec in result.state.named().items()} == expected
        fitted += 1
    assert fitted == 2  # fresh z, w~ and aggregate; m~ fresh or two levels down


def test_z_and_w_are_refreshed_every_round_and_m_every_third():
    config = HEAdamConfig(clip_bound=1.0)
    poly = config.validate(get_profile("n16k-d6"))
    levels, schedule = dict.fromkeys(("m", "z", "w"), 0), []
    for _ in range(6):
        due = refresh_due(levels, 0, 6, config, poly)
        schedule.append(due)
        levels = step_levels({name: 0 if name in due else used for name, used in levels.items()}, 0, config, poly)[0]
    assert schedule == [(), ("z", "w"), ("z", "w"), ("m", "z", "w"), ("z", "w"), ("z", "w")]
