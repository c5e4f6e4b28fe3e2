"""Encrypted federations on Flower's real simulation engine: training, privacy, faults, resume."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.report import read_metrics
from fedhe.evaluate import evaluate_run
from fedhe.simulate import simulate
from participant.audit import audit_recorded, egress_audit_mod
from protos import messages
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
    summary = simulate(settings, 3, keys.directory, client_mods=[egress_audit_mod(audit)])
    return settings, out, audit, summary


def test_rounds_complete_with_released_federation_metrics(encrypted_run):
    _, out, _, summary = encrypted_run
    info = json.loads((out / "run.json").read_text())
    assert info["reproducible"] is False and info["private_randomness"] is True  # no node seed given
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


def test_only_ciphertexts_and_permitted_metadata_leave_participants(encrypted_run, coordinator_backend):
    """Every field of every reply is a fresh ciphertext under the key or allowed metadata."""
    replies, problems = audit_recorded(encrypted_run[2], coordinator_backend)
    assert problems == []
    kinds = [m["message_type"] for m, _ in _audited_replies(encrypted_run[2])]
    assert replies == len(kinds) and kinds.count(messages.TRAIN) == 9  # 3 participants x 3 rounds


def test_updates_are_clipped_and_prescaled(encrypted_run, holder, keys):
    """Under their pairwise masks (on by default with 3 participants; docs/threat-model.md)."""
    from participant.keyholder import decrypt_vector
    from participant.pairwise_masks import UPDATE_STREAM, PairwiseMasker
    from protos.optimizer import HEAdamConfig

    config = HEAdamConfig.for_scenario(load_scenario("cartpole"))
    assert encrypted_run[3]["masking"] == "pairwise"
    for manifest, folder in _audited_replies(encrypted_run[2]):
        if messages.UPDATE in manifest["array_records"]:
            entry = next(iter(manifest["array_records"][messages.UPDATE].values()))
            update = wire_pb2.ParticipantUpdate.FromString((folder / entry["file"]).read_bytes())
            values = decrypt_vector(holder, from_proto(holder, update.update))
            masker = PairwiseMasker.load(keys.directory, update.masking.participant_index, holder.fingerprint)
            values -= masker.mask(np.zeros(values.size), manifest["run_id"], manifest["request_round"], UPDATE_STREAM)
            assert np.linalg.norm(values) <= config.clip_bound * config.update_scale / 3 * (1 + 1e-4)


def test_theta_is_encrypted_once_and_never_refreshed(encrypted_run, coordinator_backend):
    """HE-Adam only subtracts from theta: the refresher sends it once, before round 1, and it stays at the
    last level (a 4x smaller download). z and w are refreshed every round; m every third round (round 4
    of a run, which the resume test reaches)."""
    refreshes = []
    for manifest, folder in _audited_replies(encrypted_run[2]):
        if messages.REFRESH_REPLY in manifest["array_records"]:
            entry = next(iter(manifest["array_records"][messages.REFRESH_REPLY].values()))
            reply = wire_pb2.RefreshReply.FromString((folder / entry["file"]).read_bytes())
            refreshes.append((manifest["request_round"], reply.HasField("theta"), sorted(reply.state)))
    state = ["v", "w"]  # round 4: the final release of round 3's statistics, no state
    assert sorted(refreshes) == [(1, True, []), (2, False, state), (3, False, state), (4, False, [])]
    checkpoint = wire_pb2.Checkpoint.FromString((encrypted_run[1] / "checkpoint.pb").read_bytes())
    assert coordinator_backend.levels_left(from_proto(coordinator_backend, checkpoint.theta).chunks[0]) == 0


def test_a_checkpoint_keeps_the_rounds_metrics_row_for_a_resume(encrypted_run):
    """Round 3's checkpoint (now the previous generation; the latest one recorded the final release) holds
    the row a resume appends once the statistics are released, timings included."""
    previous = wire_pb2.Checkpoint.FromString((encrypted_run[1] / "checkpoint.previous.pb").read_bytes())
    row = json.loads(previous.pending_round_json)
    assert previous.round == row["round"] == 3 and "he_adam" in row["phases_ms"]


def test_evaluate_decrypts_the_checkpoint(encrypted_run, keys):
    result = evaluate_run(encrypted_run[1], keys.directory, episodes=2)
    assert result["round"] == 3 and result["episodes"] == 2 and result["mean_return"] > 0


def test_resume_continues_from_the_last_round(encrypted_run, keys, tmp_path):
    settings, out, _, _ = encrypted_run
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    resumed = replace(settings, out_dir=str(copy), resume=True, num_server_rounds=5)
    summary = simulate(resumed, 3, keys.directory)
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
    settings = RunSettings(
        scenario=str(path), num_server_rounds=3, out_dir=str(out), min_participants=2, round_timeout=120
    )
    summary = simulate(settings, 3, keys.directory)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["participants"] == 2 for r in rows)
    assert summary["rounds"] == 3


def hostile_mod(keys_dir: Path, bad_index: int):
    """Participant ``bad_index`` sends a well-formed but hostile update: off-scale, oversized, garbage."""
    import tenseal as ts

    from participant.keyholder import TensealKeyHolder, load_keyholder
    from protos.codec import encrypt_vector, to_proto

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_config["partition-id"] != bad_index or reply.has_error():
            return reply
        round_ = int(msg.content.config_records[messages.CONFIG]["round"])
        update = messages.unpack(reply.content, messages.UPDATE, wire_pb2.ParticipantUpdate, max_bytes=1 << 30)
        if round_ == 1:  # the federation's own key, at scale 1.5 x 2^40
            holder = load_keyholder(keys_dir)
            context_ = ts.context_from(holder.context.serialize(save_secret_key=True))
            context_.global_scale = 1.5 * 2.0**40
            off = TensealKeyHolder(context_, holder.profile, holder.fingerprint)
            update.update.CopyFrom(to_proto(off, encrypt_vector(off, np.ones(update.update.length))))
        elif round_ == 2:
            update.update.chunks[0] = update.update.chunks[0] * 8
        else:
            update.update.chunks[0] = bytes(reversed(update.update.chunks[0]))
        reply.content[messages.UPDATE] = messages.pack(update)
        return reply

    return mod


def test_hostile_replies_are_recorded_failures_and_rounds_complete(tmp_path, keys):
    out = tmp_path / "run"
    settings = RunSettings(scenario="cartpole", num_server_rounds=3, out_dir=str(out), min_participants=2, seed=0)
    summary = simulate(settings, 3, keys.directory, client_mods=[hostile_mod(keys.directory, 1)])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["rounds"] == 3
    assert all(r["participants"] == 2 and len(r["failed"]) == 1 for r in rows)
    reasons = [r["failed"][0] for r in rows]
    assert "scale" in reasons[0] and "exceeds the limit" in reasons[1] and "not a valid CKKS ciphertext" in reasons[2]


def test_encrypted_rollout_mode_learns_from_encrypted_rollouts_only(tmp_path, keys, coordinator_backend):
    """The coordinator trains on Enc(states) and Enc(deltas); only allowlisted ciphertexts leave owners."""
    out, audit = tmp_path / "run", tmp_path / "audit"
    settings = RunSettings(scenario="cartpole", mode="encrypted-rollouts", num_server_rounds=2, out_dir=str(out),
                           min_participants=3, seed=0)
    summary = simulate(settings, 3, keys.directory, client_mods=[egress_audit_mod(audit)])
    assert summary["mode"] == "encrypted-rollouts" and summary["rounds"] == 2
    assert json.loads((out / "run.json").read_text())["mode"] == "encrypted-rollouts"
    rows = read_metrics(out)
    assert all(r["participants"] == 3 and r["failed"] == [] and r["mean_return"] > 0 for r in rows)
    replies, problems = audit_recorded(audit, coordinator_backend)
    assert problems == []
    manifests = [m for m, _ in _audited_replies(audit)]
    uploads = [m for m in manifests if messages.ROLLOUT in m["array_records"]]
    assert len(uploads) == 6 and not any(messages.UPDATE in m["array_records"] for m in manifests)
    assert sum(messages.GRADIENT_REPLY in m["array_records"] for m in manifests) == 2  # one collapse per round
    assert evaluate_run(out, keys.directory, episodes=2)["round"] == 2


FLAKY_ONCE = """
import pathlib
import gymnasium as gym
from scenarios import Scenario

FLAGS = pathlib.Path({flags!r})


class FailsOnce(gym.Wrapper):
    def __init__(self, env, flag):
        super().__init__(env)
        self.flag = flag

    def step(self, action):
        if not self.flag.exists():
            self.flag.touch()
            raise RuntimeError("simulator lost its license server (transient)")
        return self.env.step(action)


def make_env(participant_index, seed):
    return FailsOnce(gym.make("CartPole-v1"), FLAGS / f"failed-{{participant_index}}")

SCENARIO = Scenario(name="flaky-once", make_env=make_env, reward_threshold=475.0)
"""


def test_a_failed_first_round_changes_nothing_and_later_rounds_complete(tmp_path, keys):
    """Every participant's environment raises once, in round 1: round 1 fails, rounds 2 and 3 train. The
    coordinator learns only that the environment failed, not what the exception said."""
    path = tmp_path / "flaky_once.py"
    flags = tmp_path / "flags"
    flags.mkdir()
    path.write_text(textwrap.dedent(FLAKY_ONCE.format(flags=str(flags))))
    out = tmp_path / "run"
    settings = RunSettings(scenario=str(path), num_server_rounds=3, out_dir=str(out), min_participants=2)
    summary = simulate(settings, 3, keys.directory)
    assert [r["round"] for r in read_metrics(out)] == [2, 3]
    assert summary["rounds"] == 2 and [r["round"] for r in summary["failed_rounds"]] == [1]
    failed = summary["failed_rounds"][0]["failed"]
    assert len(failed) == 3 and all(line.endswith(": environment failure") for line in failed)
    assert not any("license" in line for line in failed)
