"""Sealing key files for one recipient organization (docs/threat-model.md, "Key ceremony").

Each organization creates an X25519 key pair and publishes the public half. The key-ceremony
holder seals ``participant.ctx`` for each organization: an ephemeral X25519 key agreement,
HKDF-SHA256 and AES-256-GCM (all from ``cryptography``). A sealed file reveals nothing without the
recipient's private key and any modification is detected, so it may travel over any channel,
even through the coordinator's storage; the coordinator still never holds the secret key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protos.codec import parse_message
from protos.errors import KeyFileError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.files import write_atomic

INFO = b"fedhe-rl sealed file v1"
SEALED_FORMAT = 1  # a sealed file's own format version (not the wire protocol's)
MAX_SEALED_BYTES = 1 << 30


def raw_public_key(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def recipient_fingerprint(public: X25519PublicKey) -> str:
    return hashlib.sha256(raw_public_key(public)).hexdigest()[:32]


def create_recipient(out_prefix: Path) -> tuple[Path, Path]:
    """Write ``PREFIX.x25519`` (private, 0600) and ``PREFIX.x25519.pub``."""
    private = X25519PrivateKey.generate()
    key_path, pub_path = Path(f"{out_prefix}.x25519"), Path(f"{out_prefix}.x25519.pub")
    if key_path.exists():
        raise KeyFileError(f"{key_path} exists; refusing to overwrite a private key")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(key_path, pem, 0o600)
    write_atomic(pub_path, private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_public_key(path: Path) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path} is not a readable public key ({exc})") from None
    if not isinstance(key, X25519PublicKey):
        raise KeyFileError(f"{path} is not an X25519 public key (create one with `fedhe keys recipient`)")
    return key


def load_private_key(path: Path) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a readable private key ({exc})") from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 private key")
    return key


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO + ephemeral + recipient).derive(shared)


def seal_file(path: Path, recipient_public: Path, out: Path) -> str:
    """Seal ``path`` for the holder of ``recipient_public``; returns the recipient's fingerprint."""
    recipient = load_public_key(recipient_public)
    ephemeral = X25519PrivateKey.generate()
    eph_raw, rec_raw = raw_public_key(ephemeral.public_key()), raw_public_key(recipient)
    key = _derive(ephemeral.exchange(recipient), eph_raw, rec_raw)
    nonce = os.urandom(12)
    fingerprint = recipient_fingerprint(recipient)
    name = Path(path).name
    msg = wire_pb2.SealedFile(
        protocol_version=SEALED_FORMAT, recipient_fingerprint=fingerprint, ephemeral_public_key=eph_raw,
        nonce=nonce, original_name=name,
        ciphertext=AESGCM(key).encrypt(nonce, Path(path).read_bytes(), _aad(fingerprint, name)),
    )
    write_atomic(Path(out), msg.SerializeToString())
    return fingerprint


def unseal_file(sealed: Path, private_key: Path, out: Path) -> Path:
    """Decrypt a sealed file with this organization's private key; the result is mode 0600.

    ``out``: an existing folder, or a path without a suffix (a folder, created), gets the file under
    its original name (e.g. participant.ctx); a path with a suffix is the file itself.
    """
    try:
        msg = parse_message(wire_pb2.SealedFile, Path(sealed).read_bytes(), max_bytes=MAX_SEALED_BYTES)
    except (OSError, WireError) as exc:
        raise KeyFileError(f"{sealed} is not a sealed fedhe file ({exc})") from None
    private = load_private_key(private_key)
    mine = recipient_fingerprint(private.public_key())
    if msg.recipient_fingerprint != mine:
        raise KeyFileError(
            f"{sealed} was sealed for recipient {msg.recipient_fingerprint[:12]}…, this key is {mine[:12]}…"
        )
    try:
        peer = X25519PublicKey.from_public_bytes(msg.ephemeral_public_key)
        key = _derive(private.exchange(peer), msg.ephemeral_public_key, raw_public_key(private.public_key()))
        data = AESGCM(key).decrypt(msg.nonce, msg.ciphertext, _aad(msg.recipient_fingerprint, msg.original_name))
    except (InvalidTag, ValueError):
        raise KeyFileError(f"{sealed} was modified or corrupted in transit (authentication failed)") from None
    target = Path(out)
    if target.is_dir() or (not target.exists() and not target.suffix):  # a folder, created if missing
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = target / (msg.original_name or "unsealed")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(target, data, 0o600)
    return target


def _aad(fingerprint: str, name: str) -> bytes:
    return INFO + b"\0" + fingerprint.encode() + b"\0" + name.encode()
