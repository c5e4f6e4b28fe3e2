"""Checkpoints: a resume restores exactly what was saved, and refuses what does not belong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.wire_bytes import decode_vector, encode_vector
from coordinator.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointWriter,
    CoordinatorState,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from coordinator.he_adam import HEAdamState
from coordinator.organizations import Organizations
from coordinator.report import RunRecord
from participant.keyholder import decrypt_vector
from protos.codec import encrypt_vector
from protos.errors import CheckpointError
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.optimizer import HEAdamConfig

D = 40
CONFIG = HEAdamConfig(clip_bound=1.0).to_json()
RECORD = json.dumps({"failed_rounds": [{"round": 5, "cause": "integrity: the aggregate exceeds the bound",
                                        "failed": []}],
                     "resumed_from": [2], "wall_s": 12.5,
                     "organizations": {"participant-0": {"index": 0, "status": "active", "rounds_answered": 6,
                                                         "rounds_failed": 1, "why": {"timeout": 1}}}})


@pytest.fixture()
def saved(tmp_path, coordinator_backend, holder):
    rng = np.random.default_rng(0)
    values = {k: rng.normal(size=D) for k in ("theta", "m", "z", "w")}
    enc = {
        k: decode_vector(coordinator_backend, encode_vector(holder, encrypt_vector(holder, v)))
        for k, v in values.items()
    }
    state = CoordinatorState(round=7, optimizer=HEAdamState(enc["theta"], enc["m"], enc["z"], enc["w"], step=7),
                             history=[wire_pb2.ReleasedMetrics(round=r, mean_return=20.5 + r, episodes=4, steps=90,
                                                               valid=True) for r in range(1, 8)])
    save_checkpoint(tmp_path, coordinator_backend, "cartpole", CONFIG, state, RECORD)
    return tmp_path, values


def test_resume_restores_theta_and_optimizer_state_exactly(saved, coordinator_backend, holder):
    directory, values = saved
    state, _ = load_checkpoint(directory, coordinator_backend, "cartpole", D, CONFIG)
    assert state.round == 7 and state.optimizer.step == 7
    for name in ("theta", "m", "z", "w"):
        back = decode_vector(holder, encode_vector(coordinator_backend, getattr(state.optimizer, name)))
        np.testing.assert_allclose(decrypt_vector(holder, back), values[name], atol=1e-6)


def test_resume_restores_the_released_history_and_the_run_record(saved, coordinator_backend):
    """Statistics are released in their own round: the history holds rounds 1..7, nothing pending."""
    state, record = load_checkpoint(saved[0], coordinator_backend, "cartpole", D, CONFIG)
    assert [h.round for h in state.history] == list(range(1, 8)) and state.history[-1].mean_return == 27.5
    assert record.failed_rounds == json.loads(RECORD)["failed_rounds"] and record.resumed_from == [2]
    assert record.wall_s_before == 12.5
    assert record.organizations_before["participant-0"]["rounds_answered"] == 6


def test_wrong_key_is_refused(saved, other_keys):
    other = load_evaluation_backend(other_keys / "coordinator.ctx")
    with pytest.raises(CheckpointError, match="federation key"):
        load_checkpoint(saved[0], other, "cartpole", D, CONFIG)


def test_wrong_scenario_is_refused(saved, coordinator_backend):
    with pytest.raises(CheckpointError, match="scenario 'cartpole', not 'acrobot'"):
        load_checkpoint(saved[0], coordinator_backend, "acrobot", D, CONFIG)


def test_truncated_checkpoint_is_refused(saved, coordinator_backend):
    path = saved[0] / CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt|unusable"):
        load_checkpoint(saved[0], coordinator_backend, "cartpole", D, CONFIG)


def test_changed_optimizer_configuration_is_refused_naming_the_fields(saved, coordinator_backend):
    changed = HEAdamConfig(lr=0.02, clip_bound=2.0).to_json()
    with pytest.raises(CheckpointError, match=r"clip_bound 1.0 -> 2.0, lr 0.01 -> 0.02"):
        load_checkpoint(saved[0], coordinator_backend, "cartpole", D, changed)


def test_an_unreadable_latest_generation_falls_back_to_the_previous_one(saved, coordinator_backend, holder, caplog):
    directory, values = saved
    state, record = load_checkpoint(directory, coordinator_backend, "cartpole", D, CONFIG)
    state.round = 8
    save_checkpoint(directory, coordinator_backend, "cartpole", CONFIG, state)  # round 7 becomes the previous one
    latest = directory / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[:1000])
    with caplog.at_level("WARNING"):
        restored, restored_record = load_checkpoint(directory, coordinator_backend, "cartpole", D, CONFIG)
    assert restored.round == 7 and "previous generation" in caplog.text
    assert restored_record.failed_rounds == record.failed_rounds  # the record of that generation
    back = decode_vector(holder, encode_vector(coordinator_backend, restored.optimizer.theta))
    np.testing.assert_allclose(decrypt_vector(holder, back), values["theta"], atol=1e-6)


def test_a_deferred_checkpoint_holds_the_state_as_it_was_saved(tmp_path, coordinator_backend):
    """The round loop changes its round, history and run record after deferring the write."""
    writer = CheckpointWriter(tmp_path, coordinator_backend, "cartpole", CONFIG)
    state, record = CoordinatorState(round=3), RunRecord()
    record.failed_rounds.append({"round": 2, "cause": "no key holder answered the integrity check", "failed": []})
    writer.save(state, record.snapshot(Organizations()), defer=True)
    state.round = 4
    state.history.append(object())  # not a ReleasedMetrics: would fail the write if it were seen
    record.failed_rounds.append({"round": 4, "cause": "later", "failed": []})
    writer.close()
    written = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert written.round == 3 and not written.history
    assert [r["round"] for r in json.loads(written.run_record_json)["failed_rounds"]] == [2]


def test_a_failed_background_write_is_raised_at_the_next_save(tmp_path, coordinator_backend):
    """A write error stops the run a round later; the file on disk stays the previous generation."""
    writer = CheckpointWriter(tmp_path, coordinator_backend, "cartpole", CONFIG)
    writer.save(CoordinatorState(round=1))
    writer.save(CoordinatorState(round=2, history=[object()]), defer=True)  # not a ReleasedMetrics: the write fails
    writer.start()
    with pytest.raises(TypeError):
        writer.save(CoordinatorState(round=3), defer=True)
    writer.close()
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE).round == 1
