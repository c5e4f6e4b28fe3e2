"""Reading key files and building backends from them.

A key file is a ``fedhe.v1.KeyFile`` protobuf around a serialized TenSEAL context. Loading
re-derives the fingerprint from the public key and checks the secret-key flag against the
context itself, so a tampered or mislabeled file is rejected with a clear message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts
from google.protobuf.message import DecodeError

from protos.backend import TensealBackend, public_fingerprint
from protos.errors import KeyFileError
from protos.fedhe.v1 import wire_pb2
from protos.files import write_atomic
from protos.profiles import HEProfile, UnknownProfileError, get_profile

PROTOCOL_VERSION = 1
PARTICIPANT_KEY = "participant.ctx"
COORDINATOR_KEY = "coordinator.ctx"
FINGERPRINT_FILE = "fingerprint.txt"
MAX_KEY_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class KeyInfo:
    """What `fedhe keys inspect` shows."""

    path: Path
    profile: HEProfile
    fingerprint: str
    has_secret_key: bool
    has_relin_keys: bool
    size_bytes: int


def public_key_bytes(context: ts.Context) -> bytes:
    return context.serialize(
        save_public_key=True, save_secret_key=False, save_relin_keys=False, save_galois_keys=False
    )


def _read(path: Path) -> tuple[wire_pb2.KeyFile, ts.Context, HEProfile]:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"key file {path} not found; create keys with `fedhe keygen --out DIR`")
    size = path.stat().st_size
    if size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is {size} bytes, larger than any valid key file")
    msg = wire_pb2.KeyFile()
    try:
        msg.ParseFromString(path.read_bytes())
    except DecodeError:
        raise KeyFileError(f"{path} is not a fedhe key file (corrupt or wrong file)") from None
    if msg.protocol_version != PROTOCOL_VERSION:
        raise KeyFileError(
            f"{path} has key format version {msg.protocol_version}, this fedhe-rl reads "
            f"{PROTOCOL_VERSION}; regenerate keys with this version"
        )
    try:
        profile = get_profile(msg.he_profile)
    except UnknownProfileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    try:
        context = ts.context_from(msg.tenseal_context)
    except Exception as exc:
        raise KeyFileError(f"{path} holds a corrupt TenSEAL context ({exc})") from None
    if context.is_private() != msg.has_secret_key:
        raise KeyFileError(f"{path}: secret-key flag does not match its content (tampered?)")
    fingerprint = public_fingerprint(profile.name, public_key_bytes(context))
    if fingerprint != msg.key_fingerprint:
        raise KeyFileError(f"{path}: fingerprint does not match its public key (tampered?)")
    return msg, context, profile


def inspect_key_file(path: Path) -> KeyInfo:
    msg, context, profile = _read(path)
    return KeyInfo(
        path=Path(path),
        profile=profile,
        fingerprint=msg.key_fingerprint,
        has_secret_key=context.is_private(),
        has_relin_keys=context.has_relin_keys(),
        size_bytes=os.path.getsize(path),
    )


def load_evaluation_backend(path: Path) -> TensealBackend:
    """The coordinator's backend: refuses any context that could decrypt."""
    msg, context, profile = _read(path)
    if context.is_private():
        raise KeyFileError(
            f"{path} holds a SECRET key; the coordinator must only get {COORDINATOR_KEY} "
            "(evaluation keys). Never copy participant.ctx to the coordinator."
        )
    if not context.has_relin_keys():
        raise KeyFileError(f"{path} has no relinearization keys; HE-Adam needs them")
    context.auto_relin = context.auto_rescale = context.auto_mod_switch = True
    context.global_scale = 2.0**profile.scale_bits
    return TensealBackend(context, profile, msg.key_fingerprint)


def read_key_file(path: Path) -> tuple[ts.Context, HEProfile, str]:
    """Context, profile and fingerprint of any valid key file (used by key holders)."""
    msg, context, profile = _read(path)
    context.global_scale = 2.0**profile.scale_bits
    return context, profile, msg.key_fingerprint


def write_key_file(
    path: Path, context_bytes: bytes, profile: HEProfile, fingerprint: str, secret: bool
) -> None:
    """Write atomically; secret files are created with mode 0600 from the first byte."""
    msg = wire_pb2.KeyFile(
        protocol_version=PROTOCOL_VERSION,
        he_profile=profile.name,
        key_fingerprint=fingerprint,
        has_secret_key=secret,
        tenseal_context=context_bytes,
    )
    write_atomic(Path(path), msg.SerializeToString(), 0o600 if secret else 0o644)
