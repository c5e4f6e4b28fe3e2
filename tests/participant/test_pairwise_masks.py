"""Pairwise masks: the roster, masks that cancel exactly, and what a key holder sees of one update."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord, Metadata, RecordDict
from typer.testing import CliRunner

from coordinator.replies import read_update
from coordinator.rounds import RoundSums
from coordinator.unmasking import MaskedRound
from fedhe.cli import app
from participant.answer_rules import AnswerLedger, check_mask_correction_request
from participant.audit import audit_reply
from participant.keyholder import decrypt_vector
from participant.node import encrypted_update, mask_correction
from participant.pairwise_masks import (
    STATS_STREAM,
    UPDATE_STREAM,
    PairwiseMasker,
    hiding_bound,
    mask_grid,
    pair_bits,
)
from participant.roster import (
    ORG_KEY_FILE,
    ROSTER_FILE,
    SIMULATED_DIR,
    RosterError,
    build_roster,
    load_own_key,
    load_roster,
    read_roster,
    simulated_organizations,
)
from participant.sealing import create_recipient
from protos import messages
from protos.codec import PROTOCOL_VERSION, from_proto
from protos.errors import RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import HEAdamConfig
from protos.update_units import UpdateUnits
from scenarios import load_scenario

FINGERPRINT = "0123456789abcdef0123456789abcdef"
RUN = 77  # the Flower run id


def maskers(directory, fingerprint: str, n: int) -> list[PairwiseMasker]:
    simulated_organizations(directory, fingerprint, n)
    return [PairwiseMasker.load(directory, i, fingerprint) for i in range(n)]


@pytest.fixture(scope="module")
def five(tmp_path_factory) -> list[PairwiseMasker]:
    return maskers(tmp_path_factory.mktemp("roster-5"), FINGERPRINT, 5)


# -- the roster ----------------------------------------------------------------------------------------
def test_a_missing_roster_names_the_key_directory_and_the_fix(tmp_path):
    with pytest.raises(RosterError, match=r"no roster\.json.*fedhe keys roster"):
        load_roster(tmp_path, FINGERPRINT)


def test_a_roster_of_another_federation_is_refused(tmp_path):
    simulated_organizations(tmp_path, "f" * 32, 3)
    with pytest.raises(RosterError, match="another key ceremony"):
        PairwiseMasker.load(tmp_path, 0, FINGERPRINT)


def test_a_participant_not_on_the_roster_is_refused(tmp_path):
    simulated_organizations(tmp_path, FINGERPRINT, 3)
    with pytest.raises(RosterError, match=r"participant 5 is not on the roster \(indices 0..2\)"):
        PairwiseMasker.load(tmp_path, 5, FINGERPRINT)


def test_a_roster_with_a_missing_entry_is_refused(tmp_path):
    roster = simulated_organizations(tmp_path, FINGERPRINT, 3)
    data = json.loads(roster.to_json())
    del data["participants"]["1"]
    (tmp_path / ROSTER_FILE).write_text(json.dumps(data))
    with pytest.raises(RosterError, match="no entry for participant 1"):
        read_roster(tmp_path / ROSTER_FILE)


def test_another_organizations_private_key_is_refused(tmp_path):
    roster = simulated_organizations(tmp_path, FINGERPRINT, 3)
    shutil.copy(tmp_path / SIMULATED_DIR / "participant-2.x25519", tmp_path / ORG_KEY_FILE)  # org.x25519 wins
    with pytest.raises(RosterError, match="not the key the roster lists for participant 0"):
        load_own_key(tmp_path, 0, roster)
    assert load_own_key(tmp_path, 2, roster) is not None


def test_simulated_rosters_are_extended_never_replaced(tmp_path):
    first = simulated_organizations(tmp_path, FINGERPRINT, 3)
    assert simulated_organizations(tmp_path, FINGERPRINT, 2) == first
    grown = simulated_organizations(tmp_path, FINGERPRINT, 4)
    assert grown.public_keys[:3] == first.public_keys and grown.size == 4
    assert read_roster(tmp_path / ROSTER_FILE) == grown


def test_keys_roster_builds_the_roster_from_the_organizations_public_keys(tmp_path, small_keys):
    pubs = [create_recipient(tmp_path / f"org{i}")[1] for i in range(3)]
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "roster", *map(str, pubs), "--key-dir", str(small_keys.directory),
                                 "--out", str(tmp_path / ROSTER_FILE)])
    assert result.exit_code == 0, result.output
    roster = read_roster(tmp_path / ROSTER_FILE)
    assert roster == build_roster(small_keys.fingerprint, pubs) and roster.digest in result.output
    inspected = runner.invoke(app, ["keys", "inspect", str(tmp_path / ROSTER_FILE), "--json"])
    assert json.loads(inspected.output)["roster_digest"] == roster.digest
    again = runner.invoke(app, ["keys", "roster", str(pubs[0]), "--key-dir", str(small_keys.directory),
                                "--out", str(tmp_path / ROSTER_FILE)])
    assert again.exit_code != 0 and "exists" in again.output


# -- masks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_masks_cancel_exactly_in_float64(tmp_path, n):
    group = maskers(tmp_path, FINGERPRINT, n)
    masks = [m.mask(np.zeros(1000), RUN, 7, UPDATE_STREAM) for m in group]
    assert np.all(np.sum(masks, axis=0) == 0.0)  # exactly, not approximately
    assert all(np.max(np.abs(mask)) <= (n - 1) * UPDATE_STREAM.bound for mask in masks)
    assert pair_bits(n) + (max(n - 1, 1) - 1).bit_length() == 53


def test_a_masked_update_is_exact_and_cancels_to_the_sum(five):
    rng = np.random.default_rng(0)
    values = [rng.uniform(-0.6, 0.6, 500) for _ in five]
    masked = [m.mask(v, RUN, 3, UPDATE_STREAM) for m, v in zip(five, values)]
    grid = mask_grid(UPDATE_STREAM, 5)
    assert np.sum(masked, axis=0) == pytest.approx(np.sum(values, axis=0), abs=5 * grid)
    assert np.all(np.sum(masked, axis=0) == np.sum([np.round(v / grid) * grid for v in values], axis=0))


def test_masks_are_fresh_per_round_and_stream_and_spread_over_the_bound(five):
    a, b = five[0].mask(np.zeros(4000), RUN, 1, UPDATE_STREAM), five[0].mask(np.zeros(4000), RUN, 2, UPDATE_STREAM)
    other_run = five[0].mask(np.zeros(4000), RUN + 1, 1, UPDATE_STREAM)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1 and abs(np.corrcoef(a, other_run)[0, 1]) < 0.1
    pair = five[0]._pair_integers(1, RUN, 1, UPDATE_STREAM, 20000) * mask_grid(UPDATE_STREAM, 5)
    assert pair.min() >= -UPDATE_STREAM.bound and pair.max() < UPDATE_STREAM.bound
    assert np.std(pair) == pytest.approx(UPDATE_STREAM.bound / np.sqrt(3), rel=0.03)  # uniform on [-R, R)
    stats = five[0].mask(np.zeros(3), RUN, 1, STATS_STREAM)
    assert np.max(np.abs(stats)) > 2**20  # the statistics' masks are far wider than the update's


def test_corrections_cancel_the_masks_with_the_dropped(five):
    dropped = [1, 4]
    survivors = [m for m in five if m.index not in dropped]
    masked = [m.mask(np.zeros(300), RUN, 9, UPDATE_STREAM) for m in survivors]
    corrections = [m.correction(dropped, RUN, 9, UPDATE_STREAM, 300) for m in survivors]
    assert np.all(np.sum(masked, axis=0) + np.sum(corrections, axis=0) == 0.0)
    assert not np.all(np.sum(masked, axis=0) == 0.0)


def test_the_hiding_bound_is_the_update_range_over_the_mask_range():
    units = UpdateUnits.of(HEAdamConfig.for_scenario(load_scenario("cartpole")), 3)
    bound = hiding_bound(UPDATE_STREAM, units.clip * units.factor)
    assert bound == pytest.approx(units.clip * units.factor / 2**16) and bound < 1e-5


# -- acceptance: a key holder reads nothing from one ciphertext; the sum is right -----------------------
def reply(record: str, proto, node: int):
    from flwr.app import Message

    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"q{node}", group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(RecordDict({record: messages.pack(proto)}), metadata=metadata)


def test_decrypted_updates_are_independent_of_the_true_ones_and_the_sum_is_exact(
    tmp_path, keys, holder, coordinator_backend
):
    """The secret key decrypts each participant's ciphertext: no correlation with its update (16384
    coordinates, each over the full range an update coordinate can take); the sum is within 1e-6."""
    n, d = 3, 16384
    group = maskers(tmp_path, keys.fingerprint, n)
    units = UpdateUnits.of(HEAdamConfig.for_scenario(load_scenario("cartpole")), n)
    bound = units.clip * units.factor
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-bound, bound, d) for _ in range(n)]
    stats = [np.array([1234.5, 9.0, 2048.0]) for _ in range(n)]
    protos = [encrypted_update(holder, 1, updates[i], stats[i], group[i].round(RUN, 1)) for i in range(n)]
    for proto, update in zip(protos, updates):
        seen = decrypt_vector(holder, from_proto(holder, proto.update))
        assert abs(np.corrcoef(seen, update)[0, 1]) <= 0.05
        assert np.std(seen) > 1000 * np.std(update)  # what the key holder sees is the mask
    sums, masked = RoundSums(coordinator_backend), MaskedRound()
    for i, proto in enumerate(protos):
        sums.add(*read_update(coordinator_backend, reply(messages.UPDATE, proto, i), 1, d, masked))
    total = decrypt_vector(holder, sums.update)
    true = np.sum(updates, axis=0)
    assert np.linalg.norm(total - true) <= 1e-6 * np.linalg.norm(true)
    assert np.max(np.abs(total - true)) <= 1e-6 * np.max(np.abs(true))
    assert decrypt_vector(holder, sums.stats) == pytest.approx(np.sum(stats, axis=0), abs=1e-3)
    assert masked.dropped == [] and masked.roster_size == n


def test_a_dropout_is_recovered_with_the_survivors_corrections(tmp_path, keys, holder, coordinator_backend):
    n, d = 4, 1000
    group = maskers(tmp_path, keys.fingerprint, n)
    rng = np.random.default_rng(2)
    updates = [rng.uniform(-0.3, 0.3, d) for _ in range(n)]
    sums, masked = RoundSums(coordinator_backend), MaskedRound()
    for i in (0, 1, 3):  # participant 2 never answers
        proto = encrypted_update(holder, 5, updates[i], np.array([10.0, 1.0, 100.0]), group[i].round(RUN, 5))
        sums.add(*read_update(coordinator_backend, reply(messages.UPDATE, proto, 10 + i), 5, d, masked))
    assert masked.dropped == [2] and masked.nodes == {0: 10, 1: 11, 3: 13}
    request = masked.correction_request(5)
    from coordinator.replies import read_mask_correction

    for i in (0, 1, 3):
        answer = mask_correction(holder, group[i].round(RUN, 5), request, d)
        sums.correct(*read_mask_correction(coordinator_backend, reply(messages.MASK_CORRECTION, answer, i), 5, d))
    assert decrypt_vector(holder, sums.update) == pytest.approx(updates[0] + updates[1] + updates[3], abs=1e-6)
    assert decrypt_vector(holder, sums.stats) == pytest.approx([30.0, 3.0, 300.0], abs=1e-3)


def test_masked_replies_pass_the_egress_audit(tmp_path, small_keys, small_holder):
    group = maskers(tmp_path, small_keys.fingerprint, 3)
    config = ConfigRecord({"round": 2, "key-fingerprint": small_holder.fingerprint,
                           "protocol-version": PROTOCOL_VERSION})
    update = encrypted_update(small_holder, 2, np.ones(30), np.array([5.0, 1.0, 9.0]), group[1].round(RUN, 2))
    assert update.masking.participant_index == 1 and update.masking.roster_size == 3
    request = wire_pb2.MaskCorrectionRequest(protocol_version=PROTOCOL_VERSION, round=2, dropped=[2])
    correction = mask_correction(small_holder, group[1].round(RUN, 2), request, 30)
    for record, proto in [(messages.UPDATE, update), (messages.MASK_CORRECTION, correction)]:
        assert audit_reply(RecordDict({messages.CONFIG: config, record: messages.pack(proto)}), 2, small_holder) == []


# -- what a participant agrees to correct -------------------------------------------------------------
def answered(round_: int = 3) -> AnswerLedger:
    ledger = AnswerLedger()
    ledger.claim("update", round_)
    return ledger


@pytest.mark.parametrize(
    "round_, dropped, ledger, expected",
    [
        (4, [2], answered(), "names round 4"),
        (3, [], answered(), "distinct missing"),
        (3, [2, 2], answered(), "distinct missing"),
        (3, [7], answered(), "the roster has 0..4"),
        (3, [0, 2], answered(), "names this participant"),
        (3, [1, 2, 3, 4], answered(), "leaves 1 of 5"),
        (3, [2], AnswerLedger(), "sent no masked update in round 3"),
    ],
)
def test_correction_requests_outside_the_protocol_are_refused(round_, dropped, ledger, expected):
    request = wire_pb2.MaskCorrectionRequest(protocol_version=PROTOCOL_VERSION, round=round_, dropped=dropped)
    with pytest.raises(RequestRefusedError, match=expected):
        check_mask_correction_request(request, 3, 0, 5, ledger)


def test_a_participant_corrects_once_per_round():
    """Three of five missing still leaves a sum of two updates: allowed, once."""
    ledger = answered()
    request = wire_pb2.MaskCorrectionRequest(protocol_version=PROTOCOL_VERSION, round=3, dropped=[1, 2, 3])
    check_mask_correction_request(request, 3, 0, 5, ledger)
    with pytest.raises(RequestRefusedError, match="already answered"):
        check_mask_correction_request(request, 3, 0, 5, ledger)


def test_bench_masking_reports_what_the_issue_asks_for():
    result = CliRunner().invoke(app, ["bench", "masking", "--participants", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    for key in ("update_correlation", "sum_abs_err", "mask_bound", "hiding_bound", "ms_per_participant",
                "ms_per_dropout_recovery"):
        assert key in report
    assert report["params"] >= 800 and report["update_correlation"] <= 0.05
    assert report["sum_rel_err"] <= 1e-6 and report["dropout_sum_abs_err"] <= 1e-6
    assert report["sum_rel_err"] <= 1.5 * report["unmasked_sum_rel_err"]  # masks add no error of their own
