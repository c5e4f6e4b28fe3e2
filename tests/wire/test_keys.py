"""Key ceremony: who holds which key, and that the coordinator's key cannot decrypt."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import numpy as np
import pytest
import tenseal as ts

from benchmarks.wire_bytes import decode_vector, encode_vector
from participant.keyholder import generate_keys, load_keyholder
from protos.codec import encrypt_vector
from protos.errors import KeyFileError
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import inspect_key_file, load_evaluation_backend


def test_keygen_writes_three_files_with_safe_modes(keys):
    assert keys.participant_key.is_file() and keys.coordinator_key.is_file()
    assert stat.S_IMODE(keys.participant_key.stat().st_mode) == 0o600
    assert (keys.directory / "fingerprint.txt").read_text().strip() == keys.fingerprint


def test_participant_key_holds_secret_and_coordinator_key_does_not(keys):
    participant, coordinator = inspect_key_file(keys.participant_key), inspect_key_file(keys.coordinator_key)
    assert participant.has_secret_key and not coordinator.has_secret_key
    assert coordinator.has_relin_keys
    assert participant.fingerprint == coordinator.fingerprint == keys.fingerprint
    assert participant.profile.security_bits == 128


def test_coordinator_context_cannot_decrypt(keys, holder):
    backend = load_evaluation_backend(keys.coordinator_key)
    assert not backend.context.is_private()
    received = decode_vector(backend, encode_vector(holder, encrypt_vector(holder, np.arange(5.0))))
    with pytest.raises(ValueError, match="secret"):
        received.chunks[0].decrypt()
    with pytest.raises(ValueError):
        backend.context.secret_key()
    # Even the raw TenSEAL context inside the file has no secret key.
    raw = wire_pb2.KeyFile.FromString(keys.coordinator_key.read_bytes()).tenseal_context
    assert not ts.context_from(raw).is_private()


def test_coordinator_refuses_a_secret_key_file(keys):
    with pytest.raises(KeyFileError, match="SECRET"):
        load_evaluation_backend(keys.participant_key)


def test_participant_refuses_the_evaluation_key(keys):
    with pytest.raises(KeyFileError, match="no secret key"):
        load_keyholder(keys.coordinator_key)


def test_keygen_refuses_to_overwrite(keys):
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_keys(keys.directory)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[: len(b) // 2], "corrupt"),
        (lambda b: b"garbage" * 10, "not a fedhe key file|corrupt"),
        (lambda b: b"", "corrupt|fingerprint|version"),
    ],
)
def test_corrupt_key_files_get_clear_errors(keys, tmp_path, mutate, message):
    bad = tmp_path / "bad.ctx"
    bad.write_bytes(mutate(keys.coordinator_key.read_bytes()))
    with pytest.raises(KeyFileError, match=message):
        inspect_key_file(bad)


def test_tampered_fingerprint_is_detected(keys, tmp_path):
    msg = wire_pb2.KeyFile.FromString(keys.coordinator_key.read_bytes())
    msg.key_fingerprint = "0" * 32
    bad = tmp_path / "tampered.ctx"
    bad.write_bytes(msg.SerializeToString())
    with pytest.raises(KeyFileError, match="fingerprint"):
        load_evaluation_backend(bad)


def test_missing_key_file_says_how_to_create_one(tmp_path):
    with pytest.raises(KeyFileError, match="fedhe keygen"):
        inspect_key_file(tmp_path / "nope.ctx")


def test_cli_keygen_and_inspect(tmp_path):
    out = tmp_path / "k"
    run = subprocess.run(
        [sys.executable, "-m", "fedhe.cli", "keygen", "--out", str(out), "--profile", "n8k-d2"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "fedhe.cli", "keys", "inspect", str(out / "coordinator.ctx"), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    info = json.loads(shown.stdout)
    assert info["secret_key"] is False and info["profile"] == "n8k-d2"
    assert info["fingerprint"] == (out / "fingerprint.txt").read_text().strip()
    bad = subprocess.run(
        [sys.executable, "-m", "fedhe.cli", "keygen", "--out", str(tmp_path / "x"), "--profile", "nope"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "unknown HE profile" in bad.stderr
