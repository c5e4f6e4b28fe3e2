"""Sealed key files: only the intended organization can open them, and tampering is detected."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from participant.sealing import create_recipient, seal_file, unseal_file
from protos.errors import KeyFileError
from protos.fedhe.v1 import wire_pb2


@pytest.fixture()
def org(tmp_path):
    return create_recipient(tmp_path / "org-a")


def test_roundtrip_restores_the_file_with_mode_0600(small_keys, org, tmp_path):
    private, public = org
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    sealed = tmp_path / "participant.sealed"
    seal_file(small_keys.participant_key, public, sealed)
    assert small_keys.participant_key.read_bytes() not in sealed.read_bytes()
    out = unseal_file(sealed, private, tmp_path)
    assert out.name == "participant.ctx"
    assert out.read_bytes() == small_keys.participant_key.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_another_organization_cannot_open_it(small_keys, org, tmp_path):
    _, public = org
    other_private, _ = create_recipient(tmp_path / "org-b")
    sealed = tmp_path / "sealed"
    seal_file(small_keys.participant_key, public, sealed)
    with pytest.raises(KeyFileError, match="sealed for recipient"):
        unseal_file(sealed, other_private, tmp_path / "x.ctx")


@pytest.mark.parametrize("field", ["ciphertext", "nonce", "ephemeral_public_key", "original_name"])
def test_tampering_is_detected(small_keys, org, tmp_path, field):
    private, public = org
    sealed = tmp_path / "sealed"
    seal_file(small_keys.participant_key, public, sealed)
    msg = wire_pb2.SealedFile.FromString(sealed.read_bytes())
    value = getattr(msg, field)
    setattr(msg, field, (value[:-1] + bytes([value[-1] ^ 1])) if isinstance(value, bytes) else value + "x")
    sealed.write_bytes(msg.SerializeToString())
    with pytest.raises(KeyFileError, match="modified or corrupted"):
        unseal_file(sealed, private, tmp_path / "x.ctx")


def test_garbage_is_not_a_sealed_file(org, tmp_path):
    private, _ = org
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff" * 100)
    with pytest.raises(KeyFileError, match="not a sealed fedhe file"):
        unseal_file(bad, private, tmp_path / "x.ctx")


def test_cli_seal_and_unseal(small_keys, tmp_path):
    fedhe = [sys.executable, "-m", "fedhe.cli", "keys"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*fedhe, *args], capture_output=True, text=True, timeout=120)

    assert run("recipient", "--out", str(tmp_path / "org")).returncode == 0
    sealed = tmp_path / "p.sealed"
    assert (
        run(
            "seal", str(small_keys.participant_key), "--to", str(tmp_path / "org.x25519.pub"), "--out", str(sealed)
        ).returncode
        == 0
    )
    done = run("unseal", str(sealed), "--key", str(tmp_path / "org.x25519"), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "participant.ctx").read_bytes() == small_keys.participant_key.read_bytes()
    wrong = run("unseal", str(sealed), "--key", str(tmp_path / "org.x25519.pub"), "--out", str(tmp_path / "y"))
    assert wrong.returncode == 2 and "private key" in wrong.stderr


def test_unseal_into_a_folder_that_does_not_exist_yet(small_keys, tmp_path):
    from participant.sealing import create_recipient, seal_file, unseal_file

    private, public = create_recipient(tmp_path / "org")
    sealed = tmp_path / "org.sealed"
    seal_file(small_keys.participant_key, public, sealed)
    target = unseal_file(sealed, private, tmp_path / "srv" / "fedhe" / "keys")
    assert target == tmp_path / "srv" / "fedhe" / "keys" / "participant.ctx"
    assert target.read_bytes() == small_keys.participant_key.read_bytes()
    assert oct(target.stat().st_mode & 0o777) == "0o600"
