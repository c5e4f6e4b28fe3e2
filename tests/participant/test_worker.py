"""The deployed ClientApp answers through the organization's long-lived worker, which outlives messages."""

from __future__ import annotations

import shutil

import pytest
from support.node_calls import call, request

import participant.client_app as client_app
from participant.roster import simulated_organizations
from participant.worker import PID, WorkerClient, stop_worker
from protos import messages
from protos.keyfile import PARTICIPANT_KEY


@pytest.fixture()
def node_config(tmp_path, keys):
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    shutil.copy(keys.participant_key, key_dir / PARTICIPANT_KEY)
    simulated_organizations(key_dir, keys.fingerprint, 3)
    config = {"participant-index": 0, "key-dir": str(key_dir), "state-dir": str(tmp_path / "state"),
              "masking": "optional"}
    yield config
    stop_worker(tmp_path / "state")


def test_messages_are_answered_by_one_long_lived_worker(node_config, keys, tmp_path):
    run = {"masking": "off", "num-server-rounds": 5}
    identify = request(keys.fingerprint, 0, messages.IDENTIFY, identify=True)
    reply = call(client_app.app, node_config, run, identify)
    assert not reply.has_error(), reply.error
    config = reply.content.config_records[messages.CONFIG]
    assert (config["participant-index"], config["organization"]) == (0, "participant-0")
    pid = (tmp_path / "state" / PID).read_text()
    trained = call(client_app.app, node_config, run, request(keys.fingerprint, 1))
    assert not trained.has_error(), trained.error
    assert messages.UPDATE in trained.content.array_records
    assert (tmp_path / "state" / PID).read_text() == pid  # the same process: environments persist
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_a_worker_that_cannot_start_is_an_internal_error_reply(node_config, keys, monkeypatch):
    monkeypatch.setattr("participant.worker.START_S", 0.5)
    monkeypatch.setattr(WorkerClient, "_start", lambda self: None)  # nothing ever listens
    reply = call(client_app.app, node_config, {"masking": "off"}, request(keys.fingerprint, 1))
    assert reply.has_error() and reply.error.reason == "participant-0: internal error"
