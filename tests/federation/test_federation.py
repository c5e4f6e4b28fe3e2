"""Encrypted federations on Flower's real simulation engine: training, privacy, faults, resume."""

from __future__ import annotations

import json
import textwrap
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


def recorded_protos(audit: Path, record: str, cls) -> list[tuple[dict, object]]:
    """(manifest, protobuf) of every recorded reply holding ``record``."""
    found = []
    for manifest, folder in _audited_replies(audit):
        if record in manifest["array_records"]:
            entry = next(iter(manifest["array_records"][record].values()))
            found.append((manifest, cls.FromString((folder / entry["file"]).read_bytes())))
    return found


def test_updates_are_clipped_and_prescaled(encrypted_run, holder, keys):
    """Under their double masks (on by default with 3 participants; docs/threat-model.md): each update less
    its pair masks (the organization's own key) and its self-mask (the seed rebuilt, as the coordinator
    rebuilds it, from the shares the other survivors opened)."""
    from Crypto.Protocol.SecretSharing import Shamir

    from participant.keyholder import decrypt_vector
    from participant.pairwise_masks import PairwiseMasker
    from protos.masking import UPDATE_STREAM, SelfMaskContext, mask_grid, self_mask
    from protos.optimizer import HEAdamConfig

    config = HEAdamConfig.of(load_scenario("cartpole").server)
    assert encrypted_run[3]["masking"] == "pairwise"
    opened = [(m["request_round"], s) for m, reply in recorded_protos(encrypted_run[2], messages.UNMASK_REPLY,
                                                                       wire_pb2.UnmaskReply) for s in reply.shares]
    updates = recorded_protos(encrypted_run[2], messages.UPDATE, wire_pb2.ParticipantUpdate)
    assert len(updates) == 9
    for manifest, update in updates:
        masking, run_id, round_ = update.masking, manifest["run_id"], manifest["request_round"]
        index = masking.participant_index
        values = decrypt_vector(holder, from_proto(holder, update.update))
        shares = sorted((s.x, bytes(s.share)) for r, s in opened if r == round_ and s.sender == index)
        seed = Shamir.combine(shares[: masking.threshold])
        context = SelfMaskContext(holder.fingerprint, run_id, round_, index)
        assert context.commitment(seed) == masking.commitment
        masker = PairwiseMasker.load(keys.directory, index, holder.fingerprint)
        pairs = masker.pair_mask([j for j in masking.members if j != index], run_id, round_, UPDATE_STREAM,
                                 values.size) * mask_grid(UPDATE_STREAM, masking.roster_size)
        values -= pairs + self_mask(seed, context, UPDATE_STREAM, values.size, masking.roster_size)
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
    state = ["w", "z"]
    assert sorted(refreshes) == [(1, True, []), (2, False, state), (3, False, state)]
    checkpoint = wire_pb2.Checkpoint.FromString((encrypted_run[1] / "checkpoint.pb").read_bytes())
    assert coordinator_backend.levels_left(from_proto(coordinator_backend, checkpoint.theta).chunks[0]) == 0


def test_each_rounds_statistics_are_released_by_its_integrity_check(encrypted_run):
    """Round r's check rides on round r+1's message to the refresher (the last round's goes in an exchange
    of its own); the key holder that answers it releases round r's statistics, and only then is round r
    recorded."""
    checks = recorded_protos(encrypted_run[2], messages.INTEGRITY_REPLY, wire_pb2.IntegrityReply)
    assert sorted(((m["request_round"], m["message_type"], reply.round) for m, reply in checks),
                  key=lambda c: c[2]) == [
        (2, messages.TRAIN, 1), (3, messages.TRAIN, 2), (3, messages.INTEGRITY, 3)]
    rows = {r["round"]: r for r in read_metrics(encrypted_run[1])}
    for _, reply in checks:
        assert reply.within_bound and reply.stats_plausible and reply.released.round == reply.round
        assert rows[reply.round]["mean_return"] == reply.released.mean_return
        assert rows[reply.round]["episodes"] == reply.released.episodes


def test_a_checkpoint_keeps_the_released_history_and_the_run_record_for_a_resume(encrypted_run):
    """The latest checkpoint is the last confirmed round's; it holds every release so far and the run
    record (who took part, how often) a resumed run continues; the previous generation is one round older."""
    out = encrypted_run[1]
    latest = wire_pb2.Checkpoint.FromString((out / "checkpoint.pb").read_bytes())
    previous = wire_pb2.Checkpoint.FromString((out / "checkpoint.previous.pb").read_bytes())
    assert latest.round == 3 and previous.round == 2
    assert [(h.round, h.mean_return) for h in latest.history] == [(r["round"], r["mean_return"])
                                                                 for r in read_metrics(out)]
    record = json.loads(latest.run_record_json)
    assert record["failed_rounds"] == [] and record["wall_s"] > 0
    assert {entry["rounds_answered"] for entry in record["organizations"].values()} == {3}
    assert len(record["organizations"]) == 3


def test_evaluate_decrypts_the_checkpoint(encrypted_run, keys):
    result = evaluate_run(encrypted_run[1], keys.directory, episodes=2)
    assert result["round"] == 3 and result["episodes"] == 2 and result["mean_return"] > 0


FAULTY_SCENARIO = """
import gymnasium as gym
from scenarios import Scenario

def make_env(participant_index, seed):
    if participant_index == {bad}:
        raise RuntimeError("this organization's simulator is down")
    return gym.make("CartPole-v1")

SCENARIO = Scenario(name="flaky-cartpole", make_env=make_env, reward_threshold=475.0)
"""


def test_a_failing_participant_does_not_stop_the_federation(tmp_path):
    """Participant 1 of 4 fails every round; with min-participants 2 the others keep training (a masked
    sum needs 3 survivors: with 3 organizations, one failing would stop every round).

    Node order decides the refresher; whichever it is, a failing refresher is replaced."""
    path = tmp_path / "flaky.py"
    path.write_text(textwrap.dedent(FAULTY_SCENARIO.format(bad=1)))
    out = tmp_path / "run"
    settings = RunSettings(
        scenario=str(path), num_server_rounds=3, out_dir=str(out), min_participants=2, round_timeout=120
    )
    summary = simulate(settings, 4)
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["masking"] == "pairwise"
    assert all(r["participants"] == 3 and r["mask_dropped"] == [1] for r in rows)
    # only participant 1 fails, once a round (as the refresher its check is asked of another key holder)
    assert all([(f["organization"], f["category"]) for f in r["failed"]] == [("participant-1", "environment")]
               for r in rows)
    assert summary["rounds"] == 3


def hostile_mod(keys_dir: Path, bad_index: int):
    """Participant ``bad_index`` sends a well-formed but hostile update: off-scale, oversized, garbage."""
    import tenseal as ts

    from participant.keyholder import TensealKeyHolder, load_keyholder
    from protos.codec import encrypt_vector, to_proto

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if (context.node_config["partition-id"] != bad_index or reply.has_error()
                or messages.UPDATE not in reply.content.array_records):
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


def test_hostile_replies_are_recorded_failures_and_rounds_complete(tmp_path):
    """Participant 1 of 4 (3 survivors keep the masked sum possible) sends hostile updates."""
    out = tmp_path / "run"
    settings = RunSettings(scenario="cartpole", num_server_rounds=3, out_dir=str(out), min_participants=2, seed=0)
    summary = simulate(settings, 4, client_mods=[hostile_mod(out / "keys", 1)])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["rounds"] == 3
    # participant 1 fails each round with its update, once a round
    assert all(r["participants"] == 3 and r["mask_dropped"] == [1] for r in rows)
    assert all([(f["organization"], f["category"]) for f in r["failed"]] == [("participant-1", "rejected")]
               for r in rows)
    reasons = [r["failed"][0]["reason"] for r in rows]
    assert "scale" in reasons[0] and "exceeds the limit" in reasons[1] and "not a valid CKKS ciphertext" in reasons[2]


@pytest.mark.parametrize("upload", ["statistics", "transitions"])
def test_encrypted_rollout_mode_learns_from_encrypted_rollouts_only(tmp_path, keys, coordinator_backend, upload):
    """The coordinator trains on owners' encrypted statistics or transitions (under each owner's own key,
    then each owner's update), every update masked; only allowlisted ciphertexts leave owners."""
    out, audit = tmp_path / "run", tmp_path / "audit"
    rounds = 2 if upload == "statistics" else 1  # a transitions round takes ~9 s of HE
    settings = RunSettings(scenario="cartpole", mode="encrypted-rollouts", rollout_upload=upload,
                           num_server_rounds=rounds, out_dir=str(out), min_participants=3, seed=0)
    summary = simulate(settings, 3, keys.directory, client_mods=[egress_audit_mod(audit)])
    assert summary["mode"] == "encrypted-rollouts" and summary["rounds"] == rounds
    assert summary["masking"] == "pairwise"
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["mode"] == "encrypted-rollouts" and run_info["rollout_upload"] == upload
    rows = read_metrics(out)
    assert all(r["participants"] == 3 and r["failed"] == [] and r["mean_return"] > 0 for r in rows)
    manifests = [m for m, _ in _audited_replies(audit)]
    assert sum(messages.UPDATE in m["array_records"] for m in manifests) == 3 * rounds
    uploads = sum(messages.ROLLOUT in m["array_records"] for m in manifests)
    collapses = sum(messages.GRADIENT_REPLY in m["array_records"] for m in manifests)
    if upload == "statistics":  # a key holder collapses the federation's terms, once a round
        assert (uploads, collapses) == (0, rounds)
        assert audit_recorded(audit, coordinator_backend)[1] == []
    else:  # each owner's terms come back to that owner: no collapse by anyone else
        assert (uploads, collapses) == (3 * rounds, 0)
        _assert_owner_uploads_unreadable(audit, keys.directory)
    assert evaluate_run(out, keys.directory, episodes=2)["round"] == rounds


def _assert_owner_uploads_unreadable(audit, key_dir):
    """Every rollout upload is a fresh ciphertext under its owner's own key, and neither the federation
    key nor another owner's key can load it: no key holder, with or without the coordinator, reads it."""
    from participant.audit import audit_proto
    from participant.keyholder import load_keyholder
    from participant.owner_key import owner_key_path
    from protos.errors import FingerprintMismatchError

    federation = load_keyholder(key_dir)
    owners = [load_keyholder(owner_key_path(key_dir, i)) for i in range(3)]
    assert len({o.fingerprint for o in owners} | {federation.fingerprint}) == 4
    uploads = recorded_protos(audit, messages.ROLLOUT, wire_pb2.RolloutUpload)
    assert {u.blocks[0].key_fingerprint for _, u in uploads} == {o.fingerprint for o in owners}
    for _, upload in uploads:
        own = next(o for o in owners if o.fingerprint == upload.blocks[0].key_fingerprint)
        assert audit_proto(upload, upload.round, federation, own) == []
        assert "this owner's own key" in " ".join(audit_proto(upload, upload.round, federation))
        for other in [federation] + [o for o in owners if o is not own]:
            with pytest.raises(FingerprintMismatchError):
                from_proto(other, upload.blocks[0])


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
    assert len(failed) == 3 and all(f["category"] == "environment" for f in failed)
    assert all(f["reason"] == f"{f['organization']}: environment failure" for f in failed)
    assert not any("license" in f["reason"] for f in failed)
