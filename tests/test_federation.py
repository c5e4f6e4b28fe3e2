"""Encrypted federations on Flower's real simulation engine: training, privacy, faults, resume."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet

from coordinator.report import read_metrics
from participant.audit import egress_audit_mod
from participant.evaluate import evaluate_run
from participant.simulate import simulate
from protos import messages
from protos.backend import TensealBackend
from protos.codec import from_proto
from protos.fedhe.v1 import wire_pb2
from protos.settings import RunSettings
from scenarios import load_scenario

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encrypted_run(tmp_path_factory, keys):
    out = tmp_path_factory.mktemp("run")
    audit = tmp_path_factory.mktemp("audit")
    settings = RunSettings(scenario="cartpole", num_server_rounds=3, out_dir=str(out), min_participants=2, seed=0)
    summary = simulate(load_scenario("cartpole"), settings, 3, keys.directory, client_mods=[egress_audit_mod(audit)])
    return settings, out, audit, summary


def test_rounds_complete_with_released_federation_metrics(encrypted_run):
    _, out, _, summary = encrypted_run
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["participants"] == 3 and r["mean_return"] > 0 and r["he_ms"] > 0 for r in rows)
    assert all(r["bytes_up"] > 0 and r["wall_s"] > 0 for r in rows)
    assert summary["encrypted"] is True and summary["rounds"] == 3
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text()) == summary


def _audited_replies(audit: Path) -> list[tuple[dict, Path]]:
    found = [(json.loads(m.read_text()), m.parent) for m in audit.glob("*/manifest.json")]
    assert found, "the audit recorded nothing"
    return found


def _no_unknown_fields(msg) -> bool:
    """No smuggled fields anywhere in a parsed protobuf."""
    if len(UnknownFieldSet(msg)):
        return False
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = value.values()
        elif field.is_repeated:
            values = value
        else:
            values = [value]
        if not all(_no_unknown_fields(v) for v in values if hasattr(v, "ListFields")):
            return False
    return True


def _check_vector(vec: wire_pb2.EncryptedVector, backend: TensealBackend) -> None:
    assert vec.encoding == wire_pb2.ENCODING_CKKS
    assert vec.key_fingerprint == backend.fingerprint
    from_proto(backend, vec)  # every chunk must be a valid CKKS ciphertext for this key


def test_only_ciphertexts_and_permitted_metadata_leave_participants(encrypted_run, coordinator_backend):
    replies = _audited_replies(encrypted_run[2])
    allowed_records = {messages.CONFIG, messages.UPDATE, messages.REFRESH_REPLY}
    updates = 0
    for manifest, folder in replies:
        assert not manifest["error"]
        assert manifest["metric_records"] == {}
        assert set(manifest["config_records"]) == {messages.CONFIG}
        assert set(manifest["config_records"][messages.CONFIG]) <= messages.PERMITTED_CONFIG_KEYS
        assert set(manifest["array_records"]) <= allowed_records
        for record, arrays in manifest["array_records"].items():
            ((_, entry),) = arrays.items()
            data = (folder / entry["file"]).read_bytes()
            if record == messages.UPDATE:
                update = wire_pb2.ParticipantUpdate.FromString(data)
                assert _no_unknown_fields(update)
                _check_vector(update.update, coordinator_backend)
                _check_vector(update.rollout_stats, coordinator_backend)
                updates += 1
            elif record == messages.REFRESH_REPLY:
                reply = wire_pb2.RefreshReply.FromString(data)
                assert _no_unknown_fields(reply)
                if reply.HasField("theta"):
                    _check_vector(reply.theta, coordinator_backend)
                for vec in reply.state.values():
                    _check_vector(vec, coordinator_backend)
                if reply.HasField("released"):  # a federation-level aggregate, rounded
                    assert reply.released.mean_return == round(reply.released.mean_return, 2)
    assert updates == 9  # 3 participants x 3 rounds


def test_updates_are_clipped_and_prescaled(encrypted_run, holder):
    from participant.keyholder import decrypt_vector
    from protos.optimizer import HEAdamConfig

    config = HEAdamConfig.for_scenario(load_scenario("cartpole"))
    for manifest, folder in _audited_replies(encrypted_run[2]):
        if messages.UPDATE in manifest["array_records"]:
            entry = next(iter(manifest["array_records"][messages.UPDATE].values()))
            update = wire_pb2.ParticipantUpdate.FromString((folder / entry["file"]).read_bytes())
            values = decrypt_vector(holder, from_proto(holder, update.update))
            assert np.linalg.norm(values) <= config.clip_bound * config.update_scale / 3 * (1 + 1e-4)


def test_evaluate_decrypts_the_checkpoint(encrypted_run, keys):
    result = evaluate_run(encrypted_run[1], keys.directory, episodes=2)
    assert result["round"] == 3 and result["episodes"] == 2 and result["mean_return"] > 0


def test_resume_continues_from_the_last_round(encrypted_run, keys, tmp_path):
    settings, out, _, _ = encrypted_run
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    resumed = replace(settings, out_dir=str(copy), resume=True, num_server_rounds=5)
    summary = simulate(load_scenario("cartpole"), resumed, 3, keys.directory)
    assert [r["round"] for r in read_metrics(copy)] == [1, 2, 3, 4, 5]
    assert summary["rounds"] == 5


FAULTY_SCENARIO = """
import gymnasium as gym
from scenarios import Scenario

def make_env(participant_index, seed):
    if participant_index == {bad}:
        raise RuntimeError("this organization's simulator is down")
    return gym.make("CartPole-v1")

SCENARIO = Scenario(name="flaky-cartpole", make_env=make_env, reward_threshold=475.0)
"""


def test_a_failing_participant_does_not_stop_the_federation(tmp_path, keys):
    """Participant 1 fails every round; with min-participants 2 the others keep training.

    Node order decides the refresher; whichever it is, a failing refresher is replaced."""
    path = tmp_path / "flaky.py"
    path.write_text(textwrap.dedent(FAULTY_SCENARIO.format(bad=1)))
    out = tmp_path / "run"
    settings = RunSettings(scenario=str(path), num_server_rounds=3, out_dir=str(out), min_participants=2, round_timeout=120)
    summary = simulate(load_scenario(str(path)), settings, 3, keys.directory)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["participants"] == 2 for r in rows)
    assert summary["rounds"] == 3
