"""Double masking in a real simulated federation: what leaves participants, what a key holder reads, dropouts.

One run, 4 participants, 2 rounds, masking on by default; participant 1 fails in round 2's training
(a masked sum needs 3 survivors, so 4 participants keep one dropout recoverable). Everything is
checked from the replies the participants' egress audit recorded, with the organizations' own keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from flwr.app import Error, Message

from coordinator.report import read_metrics
from fedhe.simulate import simulate
from participant.audit import audit_recorded, egress_audit_mod
from participant.keyholder import decrypt_vector, load_keyholder
from participant.pairwise_masks import PairwiseMasker
from participant.roster import ROSTER_FILE, read_roster
from protos import messages
from protos.codec import from_proto
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.masking import STATS_STREAM, UPDATE_STREAM, SelfMaskContext, mask_grid, self_mask
from protos.optimizer import HEAdamConfig
from protos.reply_errors import ENVIRONMENT
from protos.settings import RunSettings
from scenarios import load_scenario

pytestmark = pytest.mark.slow
ORGS, FAILING, FAIL_ROUND = 4, 1, 2


def fails_once(index: int, round_: int):
    """Participant ``index`` loses its simulator while training in ``round_``: a data-free error reply."""

    def mod(msg, context, call_next):
        config = msg.content.config_records.get(messages.CONFIG, {})
        if (context.node_config["partition-id"] == index and msg.metadata.message_type == messages.TRAIN
                and int(config.get("round", 0)) == round_):
            return Message(Error(ENVIRONMENT.code, ENVIRONMENT.reason(f"participant-{index}")), reply_to=msg)
        return call_next(msg, context)

    return mod


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    out, audit = tmp_path_factory.mktemp("masked-run"), tmp_path_factory.mktemp("masked-audit")
    settings = RunSettings(scenario="cartpole", num_server_rounds=2, out_dir=str(out), min_participants=2, seed=0,
                           round_timeout=120)
    summary = simulate(settings, ORGS, client_mods=[egress_audit_mod(audit), fails_once(FAILING, FAIL_ROUND)])
    return out, audit, summary


def recorded(audit: Path, record: str, cls) -> list[tuple[int, int, object]]:
    """(run id, request round, protobuf) of every recorded reply holding ``record``."""
    found = []
    for path in audit.glob("*/manifest.json"):
        manifest = json.loads(path.read_text())
        if not manifest["error"] and record in manifest["array_records"]:
            entry = next(iter(manifest["array_records"][record].values()))
            proto = cls.FromString((path.parent / entry["file"]).read_bytes())
            found.append((int(manifest["run_id"]), int(manifest["request_round"]), proto))
    return found


class Traffic:
    """What the coordinator received, read with the organizations' keys to recover each true update.

    A survivor's self-mask seed is rebuilt as the coordinator does, from the shares the other
    survivors opened in their unmask replies (checked against the seed's commitment); its pair masks
    from the organization's own X25519 key."""

    def __init__(self, out: Path, audit: Path) -> None:
        self.keys = out / "keys"
        self.holder = load_keyholder(self.keys)
        self.updates = recorded(audit, messages.UPDATE, wire_pb2.ParticipantUpdate)
        self.unmasks = recorded(audit, messages.UNMASK_REPLY, wire_pb2.UnmaskReply)

    def decrypt(self, vec: wire_pb2.EncryptedVector) -> np.ndarray:
        return decrypt_vector(self.holder, from_proto(self.holder, vec))

    def seed(self, run_id: int, round_: int, masking: wire_pb2.PairwiseMasking) -> bytes:
        index = masking.participant_index
        shares = sorted({(s.x, bytes(s.share)) for _, r, reply in self.unmasks if r == round_
                         for s in reply.shares if s.sender == index})
        seed = Shamir.combine(shares[: masking.threshold])
        assert SelfMaskContext(self.holder.fingerprint, run_id, round_, index).commitment(seed) == masking.commitment
        return seed

    def mask(self, run_id: int, round_: int, masking: wire_pb2.PairwiseMasking, stream, length: int) -> np.ndarray:
        """Everything participant ``masking.participant_index`` added to its values: pair masks plus self-mask."""
        index = masking.participant_index
        masker = PairwiseMasker.load(self.keys, index, self.holder.fingerprint)
        peers = [j for j in masking.members if j != index]
        pairs = masker.pair_mask(peers, run_id, round_, stream, length).astype(np.float64) * mask_grid(stream, ORGS)
        context = SelfMaskContext(self.holder.fingerprint, run_id, round_, index)
        return pairs + self_mask(self.seed(run_id, round_, masking), context, stream, length, masking.roster_size)


@pytest.fixture(scope="module")
def traffic(masked_run) -> Traffic:
    out, audit, _ = masked_run
    return Traffic(out, audit)


def test_masking_is_on_by_default_and_recorded(masked_run):
    out, _, summary = masked_run
    assert summary["masking"] == "pairwise" and summary["rounds"] == 2
    assert json.loads((out / "run.json").read_text())["masking"] == "pairwise"
    assert read_roster(out / "keys" / ROSTER_FILE).size == ORGS


def test_only_ciphertexts_and_allowed_metadata_leave_participants(masked_run, traffic):
    out, audit, _ = masked_run
    replies, problems = audit_recorded(audit, load_evaluation_backend(out / "keys" / "coordinator.ctx"))
    assert replies > 0 and problems == []
    assert len(traffic.updates) == ORGS + ORGS - 1
    for _, _, update in traffic.updates:
        masking = update.masking
        assert update.HasField("masking") and masking.roster_size == ORGS and list(masking.members) == [0, 1, 2, 3]
        assert sorted(s.recipient for s in masking.shares) == [j for j in range(ORGS) if j != masking.participant_index]
    assert sorted(r for _, r, _ in traffic.unmasks) == [1] * ORGS + [FAIL_ROUND] * (ORGS - 1)
    checks = recorded(audit, messages.INTEGRITY_REPLY, wire_pb2.IntegrityReply)
    assert sorted(reply.round for _, _, reply in checks) == [1, 2]  # one key holder checked each round
    assert all(reply.released.round == reply.round and reply.within_bound for _, _, reply in checks)


def test_decrypted_updates_are_uncorrelated_with_the_true_ones(traffic):
    """With the secret key, each ciphertext shows the masked update; the true update (the masks recomputed
    with the organization's own key and its seed rebuilt from the opened shares) is clipped and pre-scaled,
    and uncorrelated with what the key holder saw."""
    config = HEAdamConfig.of(load_scenario("cartpole").server)
    seen, true = [], []
    for run_id, round_, update in traffic.updates:
        values = traffic.decrypt(update.update)
        u = values - traffic.mask(run_id, round_, update.masking, UPDATE_STREAM, values.size)
        assert np.linalg.norm(u) <= config.clip_bound * config.update_scale / ORGS * (1 + 1e-4)
        assert np.std(values) > 1e3 * np.std(u)
        seen.append(values)
        true.append(u)
    pooled = abs(np.corrcoef(np.concatenate(seen), np.concatenate(true))[0, 1])
    assert sum(v.size for v in seen) >= 800 * 7 and pooled <= 0.05


def test_a_participant_failing_mid_round_leaves_a_complete_round_with_the_right_sum(masked_run, traffic):
    out, _, _ = masked_run
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["participants"] == ORGS and rows[0]["mask_dropped"] == [] and rows[0]["failed"] == []
    assert rows[1]["participants"] == ORGS - 1 and rows[1]["mask_dropped"] == [FAILING]
    assert rows[1]["failed"] == [{"organization": f"participant-{FAILING}", "category": "environment",
                                  "reason": f"participant-{FAILING}: environment failure"}]
    assert all(r["mean_return"] is not None for r in rows)  # the corrected statistics were released

    updates = [(run, u) for run, r, u in traffic.updates if r == FAIL_ROUND]
    unmasks = [reply for _, r, reply in traffic.unmasks if r == FAIL_ROUND]
    assert sorted(u.masking.participant_index for _, u in updates) == [0, 2, 3] and len(unmasks) == ORGS - 1
    assert all(s.sender != FAILING for reply in unmasks for s in reply.shares)  # its seed stays closed
    assert all(reply.HasField("update") and reply.HasField("rollout_stats") for reply in unmasks)
    # what the coordinator sums: the masked updates, the survivors' corrections, minus the rebuilt self-masks
    total = sum(traffic.decrypt(m.update) for m in [u for _, u in updates] + unmasks)
    stats = sum(traffic.decrypt(m.rollout_stats) for m in [u for _, u in updates] + unmasks)
    true, true_stats = 0, 0
    for run_id, u in updates:
        seed, index = traffic.seed(run_id, FAIL_ROUND, u.masking), u.masking.participant_index
        context = SelfMaskContext(traffic.holder.fingerprint, run_id, FAIL_ROUND, index)
        values, raw_stats = traffic.decrypt(u.update), traffic.decrypt(u.rollout_stats)
        total = total - self_mask(seed, context, UPDATE_STREAM, values.size, ORGS)
        stats = stats - self_mask(seed, context, STATS_STREAM, 3, ORGS)
        true = true + values - traffic.mask(run_id, FAIL_ROUND, u.masking, UPDATE_STREAM, values.size)
        true_stats = true_stats + raw_stats - traffic.mask(run_id, FAIL_ROUND, u.masking, STATS_STREAM, 3)
    assert total == pytest.approx(true, abs=1e-6)  # what the coordinator summed is the survivors' sum
    assert stats == pytest.approx(true_stats, abs=1e-3) and stats[1] >= ORGS - 1  # episodes of the survivors
