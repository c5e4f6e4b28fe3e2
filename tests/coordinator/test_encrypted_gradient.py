"""Encrypted-rollout gradients: slot layout, block gradient on ciphertexts, masked collapse, HE-Adam."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.numpy_adam import NumpyAdam
from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.encrypted_gradient import (
    GRADIENT_DEPTH,
    GradientSum,
    block_gradient,
    levels_used,
    mask_for_collapse,
    unmask_collapsed,
)
from coordinator.he_adam import HEAdamConfig, HEAdamState, he_adam_step, initial_optimizer_state
from participant.gradient_collapse import COLLAPSE_GRID, MASKED_MIN_MEDIAN, collapse_masked
from participant.keyholder import PlainKeyHolder, decrypt_vector
from protos.backend import PlainBackend
from protos.codec import EncryptedVector, encrypt_vector, from_proto
from protos.errors import ChunkLayoutError, RequestRefusedError
from protos.optimizer import MASK_BOUND
from protos.profiles import get_profile
from protos.rollout_layout import BlockLayout, suggested_delta_scale
from scenarios.poly_net import PolyNetSpec


def _rollout(spec, transitions, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, size=(transitions, spec.obs_dim))
    d_actor = rng.normal(size=(transitions, spec.num_outputs)) * scale / transitions
    d_critic = rng.normal(size=transitions) * scale / transitions
    return obs, d_actor, d_critic


def _theta(spec, seed=0):
    """Init plus noise, so every bias and output weight is nonzero."""
    return spec.init(seed) + np.random.default_rng(seed + 100).normal(scale=0.2, size=spec.num_params)


def _send(src, dst, chunks, fresh=False):
    vec = EncryptedVector(list(chunks), len(chunks) * src.slots)
    return decode_vector(dst, encode_vector(src, vec), expected_length=vec.length, fresh=fresh).chunks


def _encrypt_rows(holder, rows):
    return encrypt_vector(holder, np.concatenate(rows)).chunks


# ----- layout (plaintext) ------------------------------------------------------------------------


def test_layout_offsets_and_sizes_match_the_network():
    spec = PolyNetSpec(4, 16, 2)
    layout = BlockLayout(spec, 8192)
    theta = np.arange(spec.num_params, dtype=float)
    for name, view in spec.unpack(theta).items():
        assert layout.offsets[name] == view.ravel()[0]
    assert layout.num_params == spec.num_params
    assert layout.transitions_per_block == 512 and layout.used_slots == 8192
    assert (layout.block_vectors, layout.theta_vectors, layout.gradient_vectors) == (7, 13, 16)
    assert len(layout.gradient_names) == 16 and layout.gradient_names[5] == "actor_W2_0"
    assert [layout.blocks_for(t) for t in (0, 1, 512, 513, 2048)] == [1, 1, 1, 2, 4]
    assert BlockLayout.of(4, 16, 2, 8192) == layout
    with pytest.raises(ValueError, match="parameters"):
        BlockLayout(type("Spec", (), {"obs_dim": 4, "hidden": 16, "num_outputs": 2, "num_params": 5})(), 8192)


def test_pack_block_and_theta_place_values_in_their_slots():
    spec = PolyNetSpec(3, 5, 2)
    layout = BlockLayout(spec, 64, delta_scale=4.0)  # 12 transitions per block, 4 spare slots
    obs, d_actor, d_critic = _rollout(spec, 7, 0)
    x0, x2, da1, dc = (layout.pack_block(obs, d_actor, d_critic)[n] for n in (0, 2, 4, 5))
    i, k = 6, 3
    assert x0[i * 5 + k] == obs[i, 0] and x2[i * 5 + k] == obs[i, 2]
    assert da1[i * 5 + k] == 4.0 * d_actor[i, 1] and dc[i * 5 + k] == 4.0 * d_critic[i]
    assert not np.any(x0[7 * 5 :])  # missing transitions and spare slots are zero
    theta = _theta(spec)
    p, tiled = spec.unpack(theta), layout.pack_theta(theta)
    assert len(tiled) == layout.theta_vectors
    assert tiled[1][i * 5 + k] == p["actor_W1"][k, 1] and tiled[3][i * 5 + k] == p["actor_b1"][k]
    assert tiled[5][i * 5 + k] == p["actor_W2"][1, k] and tiled[6 + 2][k] == p["critic_W1"][k, 2]
    assert tiled[10][k] == p["critic_W2"][0, k] and not np.any(tiled[0][60:])
    blocks = layout.pack_blocks(*_rollout(spec, 13, 1), num_blocks=3)
    assert len(blocks) == 3 and np.any(blocks[1][0][:5]) and not np.any(blocks[1][0][5:]) and not np.any(blocks[2])
    with pytest.raises(ValueError):
        layout.pack_blocks(*_rollout(spec, 13, 1), num_blocks=1)
    with pytest.raises(ValueError):
        layout.pack_block(*_rollout(spec, 13, 1))
    obs, d_actor, d_critic = _rollout(spec, 3, 2)
    with pytest.raises(ValueError, match="clip them"):
        layout.pack_block(obs * 1.5 + 0.6, d_actor, d_critic)


@pytest.mark.parametrize("spec", [PolyNetSpec(4, 24, 3), PolyNetSpec(2, 16, 2, continuous=True)], ids=["3act", "gauss"])
def test_plain_protocol_collapses_to_the_numpy_gradient(spec):
    """Block gradient on PlainBackend, summed over blocks and owners, collapsed: exactly PolyNetSpec.gradient."""
    backend = PlainBackend(get_profile("n16k-d6"))
    layout = BlockLayout(spec, backend.slots, delta_scale=512.0)  # 24 does not divide 8192: spare slots
    theta = _theta(spec)
    tiled = [backend.encrypt(v) for v in layout.pack_theta(theta)]
    total, expected = GradientSum(backend, layout), np.zeros(spec.num_params)
    for owner, transitions in enumerate((layout.transitions_per_block + 17, 40)):  # a partial block each
        rollout = _rollout(spec, transitions, owner)
        expected += spec.gradient(theta, *rollout)
        for block in layout.pack_blocks(*rollout, num_blocks=3):  # one all-zero padding block
            total.add_block(tiled, [backend.encrypt(v) for v in block])
    assert total.blocks == 6
    np.testing.assert_allclose(layout.collapse(total.result()), expected, rtol=1e-11, atol=1e-14)
    masked, masks = mask_for_collapse(backend, total.result())
    dense = from_proto(backend, collapse_masked(PlainKeyHolder(backend.profile), masked, layout))
    unmasked = unmask_collapsed(backend, dense, masks, layout).chunks[0][: spec.num_params]
    assert np.max(np.abs(unmasked - expected)) <= COLLAPSE_GRID


# ----- on ciphertexts ----------------------------------------------------------------------------

SPEC = PolyNetSpec(3, 8, 3)


@pytest.fixture(scope="module")
def encrypted_block(holder, coordinator_backend):
    """One block (300 transitions, 3 actions) sent to the coordinator and its per-slot gradient."""
    layout = BlockLayout(SPEC, holder.slots, delta_scale=256.0)
    theta = _theta(SPEC)
    rollout = _rollout(SPEC, 300, 7)
    tiled = _send(holder, coordinator_backend, _encrypt_rows(holder, layout.pack_theta(theta)))
    block = _send(holder, coordinator_backend, _encrypt_rows(holder, layout.pack_block(*rollout)), fresh=True)
    per_slot = block_gradient(coordinator_backend, tiled, block, layout)
    return layout, theta, rollout, tiled, block, per_slot


def test_block_gradient_on_ciphertexts_matches_numpy(encrypted_block, holder, coordinator_backend):
    layout, theta, rollout, tiled, block, per_slot = encrypted_block
    assert not coordinator_backend.context.is_private()  # evaluation keys only
    assert not coordinator_backend.context.has_galois_keys()
    assert len(per_slot) == layout.gradient_vectors
    assert levels_used(coordinator_backend, per_slot) == GRADIENT_DEPTH == 3
    full = coordinator_backend.profile.levels
    assert all(coordinator_backend.levels_left(c) == full for c in [*tiled, *block])  # inputs untouched
    decrypted = [holder.decrypt(c) for c in _send(coordinator_backend, holder, per_slot)]
    expected = SPEC.gradient(theta, *rollout)
    assert np.max(np.abs(layout.collapse(decrypted) - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_masked_collapse_shows_the_key_holder_only_masks(encrypted_block, holder, coordinator_backend):
    layout, theta, rollout, _, _, per_slot = encrypted_block
    plain = [holder.decrypt(c) for c in _send(coordinator_backend, holder, per_slot)]
    masked, masks = mask_for_collapse(coordinator_backend, per_slot)
    assert all(np.max(np.abs(m)) <= MASK_BOUND for m in masks)
    seen = [decrypt_vector(holder, v) for v in _wire(coordinator_backend, holder, masked)]
    signal = max(np.max(np.abs(v)) for v in plain)
    # What the key holder decrypts is the mask: per-slot values are a few units, masks span +-2^15.
    assert signal < 10.0
    for values, mask in zip(seen, masks):
        assert np.median(np.abs(values)) > 0.4 * MASK_BOUND > 1000 * signal
        assert np.corrcoef(values, mask)[0, 1] > 0.999999
    dense = from_proto(holder, collapse_masked(holder, _wire(coordinator_backend, holder, masked), layout))
    assert dense.length == layout.num_params and holder.levels_left(dense.chunks[0]) == holder.profile.levels
    (back,) = _wire(holder, coordinator_backend, [dense], fresh=True)
    gradient = unmask_collapsed(coordinator_backend, back, masks, layout)
    result = decrypt_vector(holder, _wire(coordinator_backend, holder, [gradient])[0])
    expected = SPEC.gradient(theta, *rollout)
    assert np.max(np.abs(result - expected)) <= 1e-4 * np.max(np.abs(expected))
    # Masks, rounding and the fresh re-encryption add less than one grid step.
    assert np.max(np.abs(result - layout.collapse(plain))) < COLLAPSE_GRID


def test_key_dependent_error_is_far_below_the_rounding_grid(holder, coordinator_backend):
    """Two encryptions of the same block at a run's delta scale: collapsed values differ by CKKS noise
    only, with the spread ``participant/gradient_collapse.py`` states (std ~3e-10, max ~2e-9)."""
    layout = BlockLayout(SPEC, holder.slots, suggested_delta_scale(3, 2048, 2.0))
    tiled = _send(holder, coordinator_backend, _encrypt_rows(holder, layout.pack_theta(_theta(SPEC))))
    rollout = _rollout(SPEC, 300, 7)
    first, second = (
        layout.collapse([holder.decrypt(c) for c in _send(coordinator_backend, holder, per_slot)])
        for per_slot in (
            block_gradient(coordinator_backend, tiled, _send(holder, coordinator_backend, rows, fresh=True), layout)
            for rows in (_encrypt_rows(holder, layout.pack_block(*rollout)) for _ in range(2))
        )
    )
    difference = first - second
    assert 0 < np.std(difference) < COLLAPSE_GRID / 50
    assert np.max(np.abs(difference)) < COLLAPSE_GRID / 10


def test_collapse_refuses_requests_that_do_not_match_the_layout(encrypted_block, holder, coordinator_backend):
    layout, _, _, _, _, per_slot = encrypted_block
    masked, masks = mask_for_collapse(coordinator_backend, per_slot)
    request = _wire(coordinator_backend, holder, masked)
    with pytest.raises(RequestRefusedError, match="carries 15"):
        collapse_masked(holder, request[:-1], layout)
    with pytest.raises(RequestRefusedError, match="carries 17"):
        collapse_masked(holder, [*request, request[0]], layout)
    two_chunks = EncryptedVector(request[0].chunks * 2, 2 * holder.slots)
    with pytest.raises(RequestRefusedError, match="2 chunks"):
        collapse_masked(holder, [two_chunks, *request[1:]], layout)
    with pytest.raises(RequestRefusedError, match="not masked"):
        collapse_masked(holder, [*request[:-1], encrypt_vector(holder, np.ones(holder.slots))], layout)
    with pytest.raises(RequestRefusedError, match="slots"):
        collapse_masked(holder, request, BlockLayout(SPEC, holder.slots // 2))
    assert MASKED_MIN_MEDIAN == MASK_BOUND / 4
    with pytest.raises(ChunkLayoutError):
        unmask_collapsed(coordinator_backend, encrypt_vector(coordinator_backend, np.zeros(5)), masks, layout)
    with pytest.raises(ValueError, match="masks"):
        unmask_collapsed(coordinator_backend, encrypt_vector(coordinator_backend, np.zeros(layout.num_params)),
                         masks[:-1], layout)  # fmt: skip


def test_one_round_through_he_adam_matches_numpy_adam(holder, coordinator_backend):
    spec, participants, transitions = PolyNetSpec(4, 8, 2), 2, 300
    config = HEAdamConfig(lr=0.05, beta1=0.9, clip_bound=2.0, interval_upper=4)
    poly = config.validate(coordinator_backend.profile)
    layout = BlockLayout(spec, holder.slots, suggested_delta_scale(participants, transitions, config.clip_bound))
    theta0 = _theta(spec, 1)
    l_actor, l_critic = spec.gradient_bounds(theta0)
    tiled = _send(holder, coordinator_backend, _encrypt_rows(holder, layout.pack_theta(theta0)))
    total, grad = GradientSum(coordinator_backend, layout), np.zeros(spec.num_params)
    for owner in range(participants):
        obs, d_actor, d_critic = _rollout(spec, transitions, owner)
        d_actor *= config.clip_bound / participants / (l_actor * np.abs(d_actor).sum())  # provably |G| <= C
        d_critic *= config.clip_bound / participants / (l_critic * np.abs(d_critic).sum())
        grad += spec.gradient(theta0, obs, d_actor, d_critic)
        s = config.update_scale
        for block in layout.pack_blocks(obs, s * d_actor, s * d_critic):
            total.add_block(tiled, _send(holder, coordinator_backend, _encrypt_rows(holder, block), fresh=True))
    masked, masks = mask_for_collapse(coordinator_backend, total.result())
    dense = from_proto(holder, collapse_masked(holder, _wire(coordinator_backend, holder, masked), layout))
    (dense,) = _wire(holder, coordinator_backend, [dense], fresh=True)
    aggregate = unmask_collapsed(coordinator_backend, dense, masks, layout)
    (theta_enc,) = _wire(holder, coordinator_backend, [encrypt_vector(holder, theta0)], fresh=True)
    state = HEAdamState(theta_enc, **initial_optimizer_state(coordinator_backend, spec.num_params))
    result = he_adam_step(coordinator_backend, state, aggregate, config, poly)
    theta = decrypt_vector(holder, _wire(coordinator_backend, holder, [result.state.theta])[0])
    expected = NumpyAdam(spec.num_params, config).step(theta0, grad)
    assert np.max(np.abs(grad)) <= config.clip_bound
    assert np.max(np.abs(theta - expected)) <= 1e-3 * np.max(np.abs(expected - theta0))


def _wire(src, dst, vectors, fresh=False):
    return [decode_vector(dst, encode_vector(src, v), expected_length=v.length, fresh=fresh) for v in vectors]
