"""Key-holder side of the HE layer: key generation, decryption and re-encryption.

Only participants import this module. The secret key never leaves it: what participants send is
produced by ``protos.codec`` from ciphertexts, and what the coordinator gets at keygen is an
evaluation-only context (public + relinearization keys, no Galois keys: HE-Adam needs no
rotations, and Galois keys would add ~100 MB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from protos.backend import PlainBackend, TensealBackend, public_fingerprint
from protos.codec import EncryptedVector, encrypt_to_proto
from protos.errors import KeyFileError, NonFiniteValueError
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import (
    COORDINATOR_KEY,
    FINGERPRINT_FILE,
    PARTICIPANT_KEY,
    public_key_bytes,
    read_key_file,
    write_key_file,
)
from protos.profiles import DEFAULT_PROFILE, HEProfile, get_profile
from protos.seal_ops import encrypt_seeded


class TensealKeyHolder(TensealBackend):
    """A TenSEAL backend whose context holds the federation's secret key."""

    def encrypt_serialized(self, values: np.ndarray) -> bytes:
        """Seeded symmetric encryption (``protos.seal_ops``): every ciphertext a participant uploads
        is half the bytes of a public-key one, and loads as an ordinary fresh ciphertext."""
        return encrypt_seeded(self.context, values)

    def decrypt(self, chunk: ts.CKKSVector) -> np.ndarray:
        return np.asarray(chunk.decrypt(secret_key=self._secret_key), dtype=np.float64)

    @property
    def _secret_key(self) -> ts.enc_context.SecretKey:
        return self.context.secret_key()


class PlainKeyHolder(PlainBackend):
    """Identity decryption for the --plaintext baseline."""

    def decrypt(self, chunk: np.ndarray) -> np.ndarray:
        return np.array(chunk, dtype=np.float64)


KeyHolder = TensealKeyHolder | PlainKeyHolder


@dataclass(frozen=True)
class KeySet:
    directory: Path
    profile: HEProfile
    fingerprint: str

    @property
    def participant_key(self) -> Path:
        return self.directory / PARTICIPANT_KEY

    @property
    def coordinator_key(self) -> Path:
        return self.directory / COORDINATOR_KEY


def generate_keys(out_dir: Path, profile_name: str = DEFAULT_PROFILE) -> KeySet:
    """The key ceremony: one CKKS key pair for the federation, split into two files."""
    profile = get_profile(profile_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / PARTICIPANT_KEY).exists():
        raise KeyFileError(f"{out / PARTICIPANT_KEY} exists; refusing to overwrite a federation key")
    fingerprint = write_key_pair(out / PARTICIPANT_KEY, out / COORDINATOR_KEY, profile)
    (out / FINGERPRINT_FILE).write_text(f"{fingerprint}\n")
    return KeySet(out, profile, fingerprint)


def write_key_pair(secret_path: Path, evaluation_path: Path, profile: HEProfile) -> str:
    """A fresh CKKS key pair: the secret key (and public key) in one file, the evaluation keys (public
    and relinearization, nothing that decrypts) in the other; returns the pair's fingerprint."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=profile.poly_modulus_degree,
        coeff_mod_bit_sizes=list(profile.coeff_mod_bit_sizes),
    )
    context.global_scale = 2.0**profile.scale_bits
    context.generate_relin_keys()
    fingerprint = public_fingerprint(profile.name, public_key_bytes(context))
    secret_bytes = context.serialize(
        save_public_key=True, save_secret_key=True, save_relin_keys=False, save_galois_keys=False
    )
    evaluation_bytes = context.serialize(
        save_public_key=True, save_secret_key=False, save_relin_keys=True, save_galois_keys=False
    )
    write_key_file(secret_path, secret_bytes, profile, fingerprint, secret=True)
    write_key_file(evaluation_path, evaluation_bytes, profile, fingerprint, secret=False)
    return fingerprint


def load_keyholder(path: Path) -> TensealKeyHolder:
    """Load ``participant.ctx`` (or a key directory containing it)."""
    path = Path(path)
    if path.is_dir():
        path = path / PARTICIPANT_KEY
    context, profile, fingerprint = read_key_file(path)
    if not context.is_private():
        raise KeyFileError(
            f"{path} holds no secret key; participants need {PARTICIPANT_KEY}, not {COORDINATOR_KEY}"
        )
    return TensealKeyHolder(context, profile, fingerprint)


def decrypt_vector(holder: KeyHolder, vector: EncryptedVector) -> np.ndarray:
    """Concatenate decrypted chunks; reject non-finite results (a corrupted or foreign input)."""
    return finite_decryption(np.concatenate([holder.decrypt(c) for c in vector.chunks])[: vector.length])


def finite_decryption(values: np.ndarray) -> np.ndarray:
    """``values``, unless a decryption produced NaN/inf (a corrupted or foreign ciphertext)."""
    if not np.all(np.isfinite(values)):
        raise NonFiniteValueError("decryption produced NaN/inf: the ciphertext is corrupt")
    return values


def reencrypt(holder: KeyHolder, vector: EncryptedVector) -> wire_pb2.EncryptedVector:
    """Client-aided bootstrapping: a fresh full-depth encryption of the same values, for the wire."""
    return encrypt_to_proto(holder, decrypt_vector(holder, vector))
