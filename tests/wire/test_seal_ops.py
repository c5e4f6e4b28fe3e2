"""protos.seal_ops, for every HE profile: seeded symmetric uploads and modulus-switched downloads.

The participant side uses the key holder's context (secret key); the coordinator side uses the
evaluation-only context it loads from coordinator.ctx, exactly as in a federation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from participant.keyholder import TensealKeyHolder, generate_keys, load_keyholder
from protos.backend import TensealBackend
from protos.errors import ChunkLayoutError, NonFiniteValueError
from protos.keyfile import load_evaluation_backend
from protos.profiles import PROFILES, HEProfile
from protos.seal_ops import (
    LevelError,
    SecretKeyRequiredError,
    encrypt_seeded,
    switch_to_last,
    switch_to_level,
    unwrap_vector,
)

SLOW_PROFILES = {"n32k-d12"}  # ~17 s to generate its keys on 2 cores
SHARED = {"n16k-d6": ("holder", "coordinator_backend"), "n8k-d2": ("small_holder", "small_coordinator")}


@dataclass(frozen=True)
class Federation:
    profile: HEProfile
    holder: TensealKeyHolder
    coordinator: TensealBackend

    @property
    def slots(self) -> int:
        return self.profile.slots

    def values(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).uniform(-1.0, 1.0, self.slots)

    def public_key_bytes(self, values: np.ndarray) -> bytes:
        return self.holder.serialize(self.holder.encrypt(values))

    def decrypt(self, data: bytes, length: int | None = None) -> np.ndarray:
        """What a participant gets from bytes the coordinator sent (validated, not fresh)."""
        return self.holder.decrypt(self.holder.deserialize(data, length or self.slots))

    def from_coordinator(self, chunk: ts.CKKSVector) -> np.ndarray:
        return self.decrypt(self.coordinator.serialize(chunk))


@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW_PROFILES else n for n in PROFILES],
)
def fed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Federation:
    name = request.param
    if name in SHARED:
        holder, coordinator = (request.getfixturevalue(f) for f in SHARED[name])
    else:
        keyset = generate_keys(tmp_path_factory.mktemp(name), name)
        holder, coordinator = load_keyholder(keyset.directory), load_evaluation_backend(keyset.coordinator_key)
    assert holder.profile.name == coordinator.profile.name == name
    assert holder.context.is_private() and not coordinator.context.is_private()
    return Federation(PROFILES[name], holder, coordinator)


def _primes(chunk: ts.CKKSVector) -> int:
    (ct,) = chunk.ciphertext()
    return ct.coeff_modulus_size()


def _all_slots(fed: Federation, chunk: ts.CKKSVector) -> np.ndarray:
    """Every slot of a chunk, not just its first ``size()`` values (SEAL decrypt + decode)."""
    seal_context = fed.holder.context.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal_context, fed.holder.context.secret_key().data).decrypt(chunk.ciphertext()[0], plain)
    return np.asarray(sealapi.CKKSEncoder(seal_context).decode_double(plain))


# --- seeded symmetric encryption ---------------------------------------------------------------


def test_seeded_decrypts_to_the_values(fed: Federation) -> None:
    values = fed.values()
    got = fed.decrypt(encrypt_seeded(fed.holder.context, values))
    assert got.shape == values.shape
    assert np.max(np.abs(got - values)) < 1e-6


def test_seeded_is_a_fresh_full_depth_ciphertext_for_the_coordinator(fed: Federation) -> None:
    data = encrypt_seeded(fed.holder.context, fed.values())
    chunk = fed.coordinator.deserialize(data, fed.slots, fresh=True)
    (ct,) = chunk.ciphertext()
    assert ct.size() == 2
    assert ct.coeff_modulus_size() == fed.profile.levels + 1
    assert ct.scale == 2.0**fed.profile.scale_bits
    assert fed.coordinator.levels_left(chunk) == fed.profile.levels
    sizes, ciphertexts, scale = unwrap_vector(data)
    assert (sizes, len(ciphertexts), scale) == ([fed.slots], 1, 2.0**fed.profile.scale_bits)


def test_seeded_adds_and_multiplies_with_public_key_ciphertexts(fed: Federation) -> None:
    x, y = fed.values(1), fed.values(2)
    a = fed.coordinator.deserialize(encrypt_seeded(fed.holder.context, x), fed.slots, fresh=True)
    b = fed.coordinator.deserialize(fed.public_key_bytes(y), fed.slots, fresh=True)
    assert np.max(np.abs(fed.from_coordinator(fed.coordinator.add(a, b)) - (x + y))) < 1e-6
    assert np.max(np.abs(fed.from_coordinator(fed.coordinator.sub(b, a)) - (y - x))) < 1e-6
    product = fed.coordinator.mul(a, b)
    assert fed.coordinator.levels_left(product) == fed.profile.levels - 1
    assert np.max(np.abs(fed.from_coordinator(product) - x * y)) < 1e-5
    assert np.max(np.abs(fed.from_coordinator(fed.coordinator.mul(a, a)) - x * x)) < 1e-5


def test_seeded_is_half_the_bytes_of_public_key_encryption(fed: Federation) -> None:
    values = fed.values()
    seeded, public = encrypt_seeded(fed.holder.context, values), fed.public_key_bytes(values)
    assert 0.47 < len(seeded) / len(public) < 0.53
    # Loaded, the seed is expanded: re-serialized, it is an ordinary full-size ciphertext.
    resaved = fed.coordinator.serialize(fed.coordinator.deserialize(seeded, fed.slots, fresh=True))
    assert 0.97 < len(resaved) / len(public) < 1.03


def test_short_seeded_vector_is_replicated_across_slots_like_tenseal(fed: Federation) -> None:
    short = np.array([0.5, -0.25, 0.125])
    seeded = fed.holder.deserialize(encrypt_seeded(fed.holder.context, short), 3, fresh=True)
    public = fed.holder.deserialize(fed.public_key_bytes(short), 3, fresh=True)
    assert np.max(np.abs(fed.holder.decrypt(seeded) - short)) < 1e-6
    expected = np.resize(short, fed.slots)
    assert np.max(np.abs(_all_slots(fed, public) - expected)) < 1e-6  # TenSEAL's own layout
    assert np.max(np.abs(_all_slots(fed, seeded) - expected)) < 1e-6


def test_seeded_needs_the_secret_key(fed: Federation) -> None:
    with pytest.raises(SecretKeyRequiredError, match="needs the secret key"):
        encrypt_seeded(fed.coordinator.context, fed.values())


def test_seeded_refuses_values_it_cannot_encrypt(small_holder: TensealKeyHolder) -> None:
    context, slots = small_holder.context, small_holder.slots
    for bad in (np.zeros(0), np.zeros(slots + 1), np.zeros((2, 3))):
        with pytest.raises(ChunkLayoutError):
            encrypt_seeded(context, bad)
    with pytest.raises(NonFiniteValueError):
        encrypt_seeded(context, np.array([1.0, np.nan]))


# --- modulus switching -------------------------------------------------------------------------


def test_switch_to_every_level_on_the_evaluation_only_context(fed: Federation) -> None:
    values = fed.values()
    chunk = fed.coordinator.deserialize(fed.public_key_bytes(values), fed.slots, fresh=True)
    sizes = []
    for level in range(fed.profile.levels, -1, -1):
        data = switch_to_level(fed.coordinator.context, chunk, level)
        loaded = fed.holder.deserialize(data, fed.slots)
        assert _primes(loaded) == level + 1
        assert fed.holder.levels_left(loaded) == level
        assert np.max(np.abs(fed.holder.decrypt(loaded) - values)) < 1e-5
        sizes.append(len(data))
    # Each dropped 40-bit prime removes its 2N residues: 6.04 bytes each after zstd at N >= 16384,
    # 5.86-6.34 at N = 8192 (measured; 40 bits need at least 5). Bytes shrink linearly with level.
    per_residue = -np.diff(sizes) / (2 * fed.profile.poly_modulus_degree)
    assert np.all((5.8 < per_residue) & (per_residue < 6.4)), (sizes, per_residue)
    assert _primes(chunk) == fed.profile.levels + 1  # the coordinator's own copy is untouched


def test_switch_to_last_from_bytes_after_a_multiplication(fed: Federation) -> None:
    x, y = fed.values(3), fed.values(4)
    a = fed.coordinator.deserialize(fed.public_key_bytes(x), fed.slots, fresh=True)
    b = fed.coordinator.deserialize(fed.public_key_bytes(y), fed.slots, fresh=True)
    product = fed.coordinator.serialize(fed.coordinator.mul(a, b))
    last = switch_to_last(fed.coordinator.context, product)
    assert unwrap_vector(last)[::2] == unwrap_vector(product)[::2]  # chunk sizes and scale kept
    loaded = fed.holder.deserialize(last, fed.slots)
    assert _primes(loaded) == 1
    assert np.max(np.abs(fed.holder.decrypt(loaded) - x * y)) < 1e-5
    assert len(last) < len(product)
    assert len(last) == pytest.approx(len(switch_to_last(fed.coordinator.context, a)), rel=0.01)


def test_switch_refuses_levels_it_cannot_reach(fed: Federation) -> None:
    a = fed.coordinator.deserialize(fed.public_key_bytes(fed.values()), fed.slots, fresh=True)
    product = fed.coordinator.mul(a, a)
    with pytest.raises(LevelError, match="cannot switch up"):
        switch_to_level(fed.coordinator.context, product, fed.profile.levels)
    for level in (-1, fed.profile.levels + 1):
        with pytest.raises(LevelError, match="outside"):
            switch_to_level(fed.coordinator.context, a, level)


def test_switch_keeps_a_multi_chunk_vectors_layout(small_holder: TensealKeyHolder) -> None:
    slots = small_holder.slots
    values = np.linspace(-1.0, 1.0, 2 * slots + 5)
    vec = ts.ckks_vector(small_holder.context, values)  # TenSEAL chunks it itself
    for data in (switch_to_last(small_holder.context, vec), switch_to_last(small_holder.context, vec.serialize())):
        assert unwrap_vector(data)[0] == [slots, slots, 5]
        loaded = ts.ckks_vector_from(small_holder.context, data)
        assert [ct.coeff_modulus_size() for ct in loaded.ciphertext()] == [1, 1, 1]
        assert np.max(np.abs(np.asarray(loaded.decrypt()) - values)) < 1e-5
