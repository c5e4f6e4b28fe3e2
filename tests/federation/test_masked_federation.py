"""Pairwise masking in a real simulated federation: what leaves participants, what a key holder reads, dropouts.

One run, 3 participants, 2 rounds, masking on by default; participant 1 fails in round 2's training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from coordinator.report import read_metrics
from fedhe.simulate import simulate
from participant.audit import audit_recorded, egress_audit_mod
from participant.keyholder import decrypt_vector, load_keyholder
from participant.pairwise_masks import STATS_STREAM, UPDATE_STREAM, PairwiseMasker
from participant.roster import ROSTER_FILE, read_roster
from protos import messages
from protos.codec import from_proto
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.optimizer import HEAdamConfig
from protos.settings import RunSettings
from scenarios import load_scenario

pytestmark = pytest.mark.slow
FAILING, FAIL_ROUND = 1, 2


def fails_once(index: int, round_: int):
    """Participant ``index`` loses its simulator while training in ``round_``: an error reply, like the ClientApp."""

    def mod(msg, context, call_next):
        config = msg.content.config_records.get(messages.CONFIG, {})
        if (context.node_config["partition-id"] == index and msg.metadata.message_type == messages.TRAIN
                and int(config.get("round", 0)) == round_):
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                 f"participant {index}, round {round_}: simulator lost"), reply_to=msg)
        return call_next(msg, context)

    return mod


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    out, audit = tmp_path_factory.mktemp("masked-run"), tmp_path_factory.mktemp("masked-audit")
    settings = RunSettings(scenario="cartpole", num_server_rounds=2, out_dir=str(out), min_participants=2, seed=0,
                           round_timeout=120)
    summary = simulate(settings, 3, client_mods=[egress_audit_mod(audit), fails_once(FAILING, FAIL_ROUND)])
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


def test_masking_is_on_by_default_and_recorded(masked_run):
    out, _, summary = masked_run
    assert summary["masking"] == "pairwise" and summary["rounds"] == 2
    assert json.loads((out / "run.json").read_text())["masking"] == "pairwise"
    assert read_roster(out / "keys" / ROSTER_FILE).size == 3


def test_the_egress_audit_accepts_masked_updates_and_corrections(masked_run):
    out, audit, _ = masked_run
    replies, problems = audit_recorded(audit, load_evaluation_backend(out / "keys" / "coordinator.ctx"))
    assert replies > 0 and problems == []
    updates = recorded(audit, messages.UPDATE, wire_pb2.ParticipantUpdate)
    assert len(updates) == 5 and all(u.HasField("masking") and u.masking.roster_size == 3 for _, _, u in updates)


def test_decrypted_updates_are_uncorrelated_with_the_true_ones(masked_run):
    """With the secret key, each ciphertext shows the masked update; the true update (recomputed with the
    organization's own keys) is clipped and pre-scaled, and uncorrelated with what the key holder saw."""
    out, audit, _ = masked_run
    keys = out / "keys"
    holder = load_keyholder(keys)
    config = HEAdamConfig.for_scenario(load_scenario("cartpole"))
    seen, true = [], []
    for run_id, round_, update in recorded(audit, messages.UPDATE, wire_pb2.ParticipantUpdate):
        masker = PairwiseMasker.load(keys, update.masking.participant_index, holder.fingerprint)
        values = decrypt_vector(holder, from_proto(holder, update.update))
        mask = masker.mask(np.zeros(values.size), run_id, round_, UPDATE_STREAM)
        u = values - mask
        assert np.linalg.norm(u) <= config.clip_bound * config.update_scale / 3 * (1 + 1e-4)
        assert np.std(values) > 1e3 * np.std(u)
        seen.append(values)
        true.append(u)
    pooled = abs(np.corrcoef(np.concatenate(seen), np.concatenate(true))[0, 1])
    assert sum(v.size for v in seen) >= 800 * 5 and pooled <= 0.05


def test_a_participant_failing_mid_round_leaves_a_complete_round_with_the_right_sum(masked_run):
    out, audit, _ = masked_run
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["participants"] == 3 and "mask_dropped" not in rows[0]
    assert rows[1]["participants"] == 2 and rows[1]["mask_dropped"] == [FAILING] and len(rows[1]["failed"]) == 1
    assert rows[1]["mean_return"] is not None  # the corrected statistics were released

    holder = load_keyholder(out / "keys")
    updates = [(run, u) for run, r, u in recorded(audit, messages.UPDATE, wire_pb2.ParticipantUpdate)
               if r == FAIL_ROUND]
    corrections = [c for _, r, c in recorded(audit, messages.MASK_CORRECTION, wire_pb2.MaskCorrection)
                   if r == FAIL_ROUND]
    assert sorted(u.masking.participant_index for _, u in updates) == [0, 2] and len(corrections) == 2
    sent = [u for _, u in updates] + corrections
    total = sum(decrypt_vector(holder, from_proto(holder, m.update)) for m in sent)
    stats = sum(decrypt_vector(holder, from_proto(holder, m.rollout_stats)) for m in sent)
    true, true_stats = 0, 0
    for run_id, u in updates:
        masks = PairwiseMasker.load(out / "keys", u.masking.participant_index, holder.fingerprint).round(
            run_id, FAIL_ROUND)
        values = decrypt_vector(holder, from_proto(holder, u.update))
        true = true + values - masks.mask(np.zeros(values.size), UPDATE_STREAM)
        raw_stats = decrypt_vector(holder, from_proto(holder, u.rollout_stats))
        true_stats = true_stats + raw_stats - masks.mask(np.zeros(3), STATS_STREAM)
    assert total == pytest.approx(true, abs=1e-6)  # what the coordinator summed is the survivors' sum
    assert stats == pytest.approx(true_stats, abs=1e-3) and stats[1] >= 2  # episodes of the two survivors
