"""Sufficient statistics of rollouts: the algebra against NumPy's backpropagation, and the encrypted path
(summed masked statistics, one product with the key holder's coefficients, the masked collapse)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.encrypted_gradient import levels_used, mask_for_collapse, unmask_collapsed
from participant.gradient_collapse import COLLAPSE_GRID, collapse_masked
from participant.keyholder import decrypt_vector
from protos.codec import EncryptedVector, encrypt_vector, from_proto
from protos.rollout_statistics import StatisticsLayout
from scenarios import load_scenario
from scenarios.poly_net import PolyNetSpec

SLOTS = 8192


def _rollout(spec: PolyNetSpec, transitions: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (transitions, spec.obs_dim)), rng.normal(size=(transitions, spec.num_outputs)),
            rng.normal(size=transitions))


def _theta(spec: PolyNetSpec, seed: int = 0) -> np.ndarray:
    return spec.init(seed) + np.random.default_rng(seed + 1).normal(scale=0.3, size=spec.num_params)


@pytest.mark.parametrize("name", ["cartpole", "acrobot", "pendulum", "lunarlander"])
def test_the_gradient_is_linear_in_the_statistics_exactly(name):
    """grad = T(theta) S reproduces the NumPy backpropagation of the same deltas (a continuous actor's
    learned spread included), and sums over owners."""
    spec = load_scenario(name).poly_spec()
    layout = StatisticsLayout(spec, SLOTS)
    theta = _theta(spec)
    owners = []
    for k in range(3):
        obs, d_actor, d_critic = _rollout(spec, 200 + 50 * k, k)
        spread = np.random.default_rng(10 + k).normal(size=d_actor.shape) if spec.continuous else None
        owners.append((obs, d_actor, d_critic, spread))
    summed = sum(layout.statistics(*owner) for owner in owners)
    expected = sum(spec.gradient(theta, *owner) for owner in owners)
    np.testing.assert_allclose(layout.gradient(theta, summed), expected, rtol=1e-10, atol=1e-10)
    per_output = 1 + spec.obs_dim + spec.obs_dim * (spec.obs_dim + 1) // 2
    assert layout.stats_length == (spec.num_outputs + 1) * per_output + (spec.num_outputs if spec.continuous else 0)


def test_cartpole_fits_one_ciphertext_and_every_coordinate_has_terms():
    layout = StatisticsLayout(load_scenario("cartpole").poly_spec(), SLOTS)
    assert (layout.stats_length, layout.terms, layout.gradient_vectors) == (45, 1923, 1)
    assert set(np.unique(layout.param_of)) == set(range(layout.num_params))
    assert layout.upload_length == SLOTS and not np.any(layout.tile(np.ones(45))[layout.terms:])


def test_statistics_refuse_unscaled_or_broken_rollouts():
    layout = StatisticsLayout(PolyNetSpec(3, 8, 1), SLOTS)
    obs, d_actor, d_critic = _rollout(PolyNetSpec(3, 8, 1), 10, 0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        layout.statistics(obs * 3, d_actor, d_critic)
    with pytest.raises(ValueError, match="finite"):
        layout.statistics(obs, d_actor * np.nan, d_critic)
    with pytest.raises(ValueError, match="statistics must have shape"):
        layout.tile(np.ones(layout.stats_length + 1))


def test_masked_statistics_to_one_dense_gradient_on_ciphertexts(holder, coordinator_backend):
    """Three owners' statistics under masks that cancel, summed by the coordinator, times the key holder's
    coefficients (depth 1), collapsed under fresh masks: NumPy's gradient of all three rollouts."""
    spec = load_scenario("cartpole").poly_spec()
    layout = StatisticsLayout(spec, holder.slots)
    theta = _theta(spec)
    owners = [_rollout(spec, 1024, k) for k in range(3)]
    weight = 1.0 / (3 * 1024)  # deltas carry 1/T and 1/n, as an owner's do
    tiles = [layout.tile(layout.statistics(obs, da * weight, dc * weight)) for obs, da, dc in owners]
    rng = np.random.default_rng(5)
    pair = rng.uniform(-2.0**15, 2.0**15, size=(3, layout.upload_length))
    masks = [pair[0] - pair[2], pair[1] - pair[0], pair[2] - pair[1]]  # cancel in the sum

    def to_coordinator(values: np.ndarray) -> EncryptedVector:
        vec = encrypt_vector(holder, values)
        return decode_vector(coordinator_backend, encode_vector(holder, vec), expected_length=vec.length, fresh=True)

    uploads = [to_coordinator(tile + mask) for tile, mask in zip(tiles, masks)]
    seen = decrypt_vector(holder, uploads[0])  # what a colluding key holder reads of one owner: the mask
    assert abs(np.corrcoef(seen[: layout.terms], tiles[0][: layout.terms])[0, 1]) < 0.05
    summed = uploads[0].chunks
    for upload in uploads[1:]:
        summed = [coordinator_backend.add(a, b) for a, b in zip(summed, upload.chunks)]
    coefficients = to_coordinator(np.concatenate(layout.pack_theta(theta)))
    terms = [coordinator_backend.mul(t, s) for t, s in zip(coefficients.chunks, summed)]
    assert levels_used(coordinator_backend, terms) == 1
    masked, collapse_masks = mask_for_collapse(coordinator_backend, terms)
    wire = [decode_vector(holder, encode_vector(coordinator_backend, v), expected_length=v.length) for v in masked]
    collapsed = from_proto(holder, collapse_masked(holder, wire, layout))
    dense = decode_vector(coordinator_backend, encode_vector(holder, collapsed), expected_length=layout.num_params,
                          fresh=True)
    gradient = unmask_collapsed(coordinator_backend, dense, collapse_masks, layout)
    result = decrypt_vector(holder, decode_vector(holder, encode_vector(coordinator_backend, gradient),
                                                  expected_length=layout.num_params))
    expected = sum(spec.gradient(theta, obs, da * weight, dc * weight) for obs, da, dc in owners)
    assert np.max(np.abs(result - expected)) <= 1e-4 * np.max(np.abs(expected)) + COLLAPSE_GRID

