"""Double masks: the roster, pair masks that cancel exactly, self-masks whose seeds only a threshold of
members can open, what a key holder sees of one update, and what a participant agrees to unmask."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir
from typer.testing import CliRunner

from benchmarks.masking import LocalFederation
from benchmarks.wire_bytes import decode_vector, encode_vector
from fedhe.cli import app
from participant.answer_rules import AnswerLedger, check_members, check_unmask_request
from participant.audit import audit_reply
from participant.keyholder import decrypt_vector
from participant.pairwise_masks import PairwiseMasker
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
from protos.masking import (
    SEED_BYTES,
    STATS_STREAM,
    UPDATE_STREAM,
    SelfMaskContext,
    default_threshold,
    hiding_bound,
    mask_bits,
    mask_grid,
    self_mask,
)
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
def self_masks(masks, stream, length: int) -> np.ndarray:
    """A participant's self-mask, as the coordinator computes it once the seed is rebuilt (public arithmetic)."""
    return self_mask(masks.seed, masks.context, stream, length, masks.masker.size)


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_pair_masks_cancel_exactly_in_float64(tmp_path, n):
    group = maskers(tmp_path, FINGERPRINT, n)
    everyone = list(range(n))
    pairs = [m.pair_mask([j for j in everyone if j != m.index], RUN, 7, UPDATE_STREAM, 1000) for m in group]
    assert np.all(np.sum(pairs, axis=0) == 0)  # exactly, not approximately
    grid = mask_grid(UPDATE_STREAM, n)
    assert all(np.max(np.abs(p * grid)) <= (n - 1) * UPDATE_STREAM.bound for p in pairs)
    assert mask_bits(n) + (max(n, 2) - 1).bit_length() == 53  # n masks on the grid sum exactly in float64
    if n < 3:  # nothing to hide behind: a round cannot even be masked
        with pytest.raises(RequestRefusedError, match="needs at least 3 members"):
            group[0].round(RUN, 7, everyone)
        return
    for m, pair in zip(group, pairs):
        masks = m.round(RUN, 7, everyone)
        # what it adds: its pair masks plus its self-mask, each an integer on the grid
        assert np.all(masks.mask(np.zeros(1000), UPDATE_STREAM) - self_masks(masks, UPDATE_STREAM, 1000)
                      == pair * grid)


def test_a_masked_update_is_exact_and_the_sum_less_the_self_masks_is_the_sum(five):
    rng = np.random.default_rng(0)
    values = [rng.uniform(-0.6, 0.6, 500) for _ in five]
    rounds = [m.round(RUN, 3, range(5)) for m in five]
    masked = [r.mask(v, UPDATE_STREAM) for r, v in zip(rounds, values)]
    unmasked = np.sum(masked, axis=0) - np.sum([self_masks(r, UPDATE_STREAM, 500) for r in rounds], axis=0)
    grid = mask_grid(UPDATE_STREAM, 5)
    assert unmasked == pytest.approx(np.sum(values, axis=0), abs=5 * grid)
    assert np.all(unmasked == np.sum([np.round(v / grid) * grid for v in values], axis=0))
    assert not np.allclose(np.sum(masked, axis=0), np.sum(values, axis=0), atol=1.0)  # the self-masks stay on


def test_masks_are_fresh_per_round_and_stream_and_spread_over_the_bound(five):
    a, b = (five[0].pair_mask([1, 2], RUN, r, UPDATE_STREAM, 4000) for r in (1, 2))
    other_run = five[0].pair_mask([1, 2], RUN + 1, 1, UPDATE_STREAM, 4000)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1 and abs(np.corrcoef(a, other_run)[0, 1]) < 0.1
    first, again = (five[0].round(RUN, 1, range(5)) for _ in range(2))  # a fresh seed every time
    assert first.seed != again.seed and len(first.seed) == SEED_BYTES
    assert abs(np.corrcoef(self_masks(first, UPDATE_STREAM, 4000), self_masks(again, UPDATE_STREAM, 4000))[0, 1]) < 0.1
    pair = five[0].pair_mask([1], RUN, 1, UPDATE_STREAM, 20000) * mask_grid(UPDATE_STREAM, 5)
    assert pair.min() >= -UPDATE_STREAM.bound and pair.max() < UPDATE_STREAM.bound
    assert np.std(pair) == pytest.approx(UPDATE_STREAM.bound / np.sqrt(3), rel=0.03)  # uniform on [-R, R)
    assert np.std(self_masks(first, UPDATE_STREAM, 20000)) == pytest.approx(UPDATE_STREAM.bound / np.sqrt(3), rel=0.03)
    stats = first.mask(np.zeros(3), STATS_STREAM)
    assert np.max(np.abs(stats)) > 2**20  # the statistics' masks are far wider than the update's


def test_corrections_cancel_the_pair_masks_with_the_dropped(five):
    dropped = [1, 4]
    survivors = [m.round(RUN, 9, range(5)) for m in five if m.index not in dropped]
    masked = [r.mask(np.zeros(300), UPDATE_STREAM) - self_masks(r, UPDATE_STREAM, 300) for r in survivors]
    corrections = [r.correction(dropped, UPDATE_STREAM, 300) for r in survivors]
    assert np.all(np.sum(masked, axis=0) + np.sum(corrections, axis=0) == 0.0)
    assert not np.all(np.sum(masked, axis=0) == 0.0)


def test_the_hiding_bound_is_the_update_range_over_the_mask_range():
    units = UpdateUnits.of(HEAdamConfig.of(load_scenario("cartpole").server), 3)
    bound = hiding_bound(UPDATE_STREAM, units.clip * units.factor)
    assert bound == pytest.approx(units.clip * units.factor / 2**16) and bound < 1e-5


# -- self-mask seeds: sealed shares, a threshold to rebuild ---------------------------------------------
def test_a_seed_is_shared_one_sealed_share_per_other_member_and_a_threshold_rebuilds_it(five):
    masks = five[2].round(RUN, 4, [0, 1, 2, 4])
    metadata = masks.metadata()
    assert list(metadata.members) == [0, 1, 2, 4] and metadata.participant_index == 2 and metadata.roster_size == 5
    assert metadata.threshold == default_threshold(4) == 2
    assert metadata.commitment == SelfMaskContext(FINGERPRINT, RUN, 4, 2).commitment(masks.seed)
    assert [(s.sender, s.recipient) for s in metadata.shares] == [(2, 0), (2, 1), (2, 4)]
    opened = [five[s.recipient].open_share(s, RUN, 4) for s in metadata.shares]
    assert all(o.sender == 2 and len(o.share) == SEED_BYTES for o in opened)
    assert Shamir.combine([(o.x, bytes(o.share)) for o in opened[:2]]) == masks.seed
    assert Shamir.combine([(opened[0].x, bytes(opened[0].share)), (opened[1].x, bytes(16))]) != masks.seed
    assert five[2].round(RUN, 4, range(5), threshold=4).metadata().threshold == 4
    with pytest.raises(RequestRefusedError, match="threshold of 5 needs at least 6 members"):
        five[2].round(RUN, 4, range(5), threshold=5)


def test_a_sealed_share_opens_only_for_its_recipient_in_its_run_and_round(five):
    share = five[2].round(RUN, 4, range(5)).metadata().shares[0]  # 2 -> 0
    with pytest.raises(RequestRefusedError, match="is not this participant's"):
        five[1].open_share(share, RUN, 4)
    with pytest.raises(RequestRefusedError, match="does not open for round 5"):
        five[0].open_share(share, RUN, 5)
    with pytest.raises(RequestRefusedError, match="does not open"):
        five[0].open_share(share, RUN + 1, 4)
    altered = wire_pb2.SealedShare()
    altered.CopyFrom(share)
    altered.ciphertext = bytes([share.ciphertext[0] ^ 1]) + share.ciphertext[1:]
    with pytest.raises(RequestRefusedError, match="altered or replayed"):
        five[0].open_share(altered, RUN, 4)
    assert five[0].open_share(share, RUN, 4).sender == 2


# -- acceptance: a key holder reads nothing from one ciphertext; the sum is right -----------------------
def decrypted(holder, backend, vec) -> np.ndarray:
    """A vector the coordinator holds, decrypted with the secret key."""
    return decrypt_vector(holder, decode_vector(holder, encode_vector(backend, vec)))


def test_decrypted_updates_are_independent_of_the_true_ones_and_the_sum_is_exact(
    tmp_path, keys, holder, coordinator_backend
):
    """The secret key decrypts each participant's ciphertext: no correlation with its update (16384
    coordinates, each over the full range an update coordinate can take); the coordinator's masked
    sum (``PairwiseMaskedSum``, its unmask exchange included) is within 1e-6."""
    n, d = 3, 16384
    simulated_organizations(tmp_path, keys.fingerprint, n)
    units = UpdateUnits.of(HEAdamConfig.of(load_scenario("cartpole").server), n)
    bound = units.clip * units.factor
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-bound, bound, d) for _ in range(n)]
    stats = [np.array([1234.5, 9.0, 2048.0]) for _ in range(n)]
    federation = LocalFederation(tmp_path, holder, coordinator_backend, updates, stats)
    aggregation, aggregate = federation.round(1)
    uploads = federation.uploads(1)
    for i, update in enumerate(updates):
        seen = decrypt_vector(holder, from_proto(holder, uploads[i].update))
        assert abs(np.corrcoef(seen, update)[0, 1]) <= 0.05
        assert np.std(seen) > 1000 * np.std(update)  # what the key holder sees is the mask
    total = decrypted(holder, coordinator_backend, aggregate.update)
    true = np.sum(updates, axis=0)
    assert np.linalg.norm(total - true) <= 1e-6 * np.linalg.norm(true)
    assert np.max(np.abs(total - true)) <= 1e-6 * np.max(np.abs(true))
    assert decrypted(holder, coordinator_backend, aggregate.stats) == pytest.approx(np.sum(stats, axis=0), abs=1e-3)
    assert aggregate.contributors == 3 and aggregation.ctx.outcome.extras["mask_dropped"] == []
    assert sorted(aggregation.survivors) == [0, 1, 2] and aggregation.roster_size == n


def test_a_dropout_is_recovered_in_the_unmask_exchange(tmp_path, keys, holder, coordinator_backend):
    n, d = 4, 1000
    simulated_organizations(tmp_path, keys.fingerprint, n)
    rng = np.random.default_rng(2)
    updates = [rng.uniform(-0.3, 0.3, d) for _ in range(n)]
    federation = LocalFederation(tmp_path, holder, coordinator_backend, updates, [np.array([10.0, 1.0, 100.0])] * n)
    federation.silent = {2}  # participant 2 never answers
    aggregation, aggregate = federation.round(5)
    assert aggregation.ctx.outcome.extras["mask_dropped"] == [2] and sorted(aggregation.survivors) == [0, 1, 3]
    total = decrypted(holder, coordinator_backend, aggregate.update)
    assert total == pytest.approx(updates[0] + updates[1] + updates[3], abs=1e-6)
    assert decrypted(holder, coordinator_backend, aggregate.stats) == pytest.approx([30.0, 3.0, 300.0], abs=1e-3)
    unmasked = [(i, reply) for i, kind, r, _, reply, _ in federation.sent if kind == messages.UNMASK]
    assert [i for i, _ in unmasked] == [0, 1, 3]
    for i, content in unmasked:
        reply = messages.unpack(content, messages.UNMASK_REPLY, wire_pb2.UnmaskReply, max_bytes=1 << 28)
        assert sorted(s.sender for s in reply.shares) == [j for j in (0, 1, 3) if j != i]  # never 2's
        assert reply.HasField("update") and reply.HasField("rollout_stats")  # corrections for 2
    assert all(federation.ledgers[i].has("unmask", 5) for i in (0, 1, 3)) and not federation.ledgers[2].has("update", 5)


def test_masked_replies_pass_the_egress_audit(tmp_path, small_keys, small_holder):
    """A masked update with its sealed shares and an unmask reply with opened shares and corrections."""
    simulated_organizations(tmp_path, small_keys.fingerprint, 4)
    from protos.keyfile import load_evaluation_backend

    backend = load_evaluation_backend(small_keys.coordinator_key)
    federation = LocalFederation(tmp_path, small_holder, backend, [np.ones(30)] * 4, [np.array([5.0, 1.0, 9.0])] * 4)
    federation.silent = {3}
    assert federation.round(2)[1] is not None
    kinds = [kind for _, kind, _, _, _, _ in federation.sent]
    assert kinds.count(messages.TRAIN) == 3 and kinds.count(messages.UNMASK) == 3
    for _, kind, round_, _, reply, _ in federation.sent:
        assert audit_reply(reply, round_, small_holder) == [], kind
    update = federation.uploads(2)[1]
    assert update.masking.participant_index == 1 and update.masking.roster_size == 4


# -- what a participant agrees to mask over and to unmask ---------------------------------------------
@pytest.mark.parametrize(
    "members, expected",
    [
        ([0, 2, 1], "not a sorted set of roster indices"),
        ([0, 1, 1, 2], "not a sorted set of roster indices"),
        ([0, 1, 7], "not a sorted set of roster indices"),
        ([1, 2, 3], "does not include this participant"),
        ([0, 1], "has 2 members; this node requires at least 3"),
    ],
)
def test_masking_sets_outside_the_protocol_are_refused(members, expected):
    with pytest.raises(RequestRefusedError, match=expected):
        check_members(members, 0, 5, 3)
    assert check_members([0, 1, 4], 0, 5, 3) == [0, 1, 4]


def answered(round_: int = 3, members=(0, 1, 2, 3, 4)) -> AnswerLedger:
    """Participant 0 masked its round-``round_`` update over ``members``."""
    ledger = AnswerLedger()
    ledger.claim("update", round_)
    ledger.remember_members(round_, list(members))
    return ledger


def unmask_request(round_=3, survivors=(0, 1, 2, 3), dropped=(4,), senders=(1, 2, 3), recipient=0):
    shares = [wire_pb2.SealedShare(sender=j, recipient=recipient, nonce=bytes(12), ciphertext=bytes(34))
              for j in senders]
    return wire_pb2.UnmaskRequest(protocol_version=PROTOCOL_VERSION, round=round_, survivors=list(survivors),
                                  dropped=list(dropped), shares=shares)


@pytest.mark.parametrize(
    "request_, ledger, expected",
    [
        (unmask_request(round_=4), answered(), "names round 4"),
        (unmask_request(), AnswerLedger(), "sent no masked update in round 3"),
        (unmask_request(dropped=()), answered(),
         r"splits \[0, 1, 2, 3\], but round 3 was masked over \[0, 1, 2, 3, 4\]"),
        (unmask_request(dropped=(4, 5)), answered(), "splits"),
        (unmask_request(survivors=(0, 1, 2, 3, 4)), answered(), "splits"),  # 4 both survivor and dropped
        (unmask_request(survivors=(1, 2, 3), dropped=(0, 4)), answered(), "does not count this participant"),
        (unmask_request(survivors=(0, 1), dropped=(2, 3, 4), senders=(1,)), answered(),
         "leaves 2 updates in the sum; this node requires at least 3"),
        # a member named as dropped never has its seed opened: its pair masks are being corrected
        (unmask_request(senders=(1, 2, 4)), answered(), r"shares from \[1, 2, 4\]; only other survivors'"),
        (unmask_request(senders=(0, 1)), answered(), "only other survivors'"),
        (unmask_request(senders=(1, 1)), answered(), "only other survivors'"),
        (unmask_request(recipient=2), answered(), "addressed to another participant"),
    ],
)
def test_unmask_requests_outside_the_protocol_are_refused(request_, ledger, expected):
    with pytest.raises(RequestRefusedError, match=expected):
        check_unmask_request(request_, 3, 0, 3, ledger)
    assert not ledger.has("unmask", 3)


def test_a_participant_unmasks_once_per_round():
    """One of five missing leaves a sum of four updates: allowed, once; a second request (say, now
    naming 4 a survivor to get its seed opened too) is refused."""
    ledger = answered()
    check_unmask_request(unmask_request(), 3, 0, 3, ledger)
    with pytest.raises(RequestRefusedError, match="already answered"):
        check_unmask_request(unmask_request(survivors=(0, 1, 2, 3, 4), dropped=(), senders=(1, 2, 3, 4)), 3, 0, 3,
                             ledger)
    with pytest.raises(RequestRefusedError, match="this node requires at least 4"):  # a node's own stricter rule
        check_unmask_request(unmask_request(survivors=(0, 1, 2), dropped=(3, 4), senders=(1, 2)), 3, 0, 4,
                             answered())


def test_bench_masking_reports_what_the_issue_asks_for():
    result = CliRunner().invoke(app, ["bench", "masking", "--participants", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    for key in ("update_correlation", "sum_abs_err", "mask_bound", "hiding_bound", "ms_per_participant",
                "unmask_ms", "unmask_ms_with_dropout", "unmask_bytes", "unmask_bytes_with_dropout"):
        assert key in report
    assert report["params"] >= 800 and report["update_correlation"] <= 0.05
    assert report["sum_rel_err"] <= 1e-6 and report["dropout_sum_abs_err"] <= 1e-6
    assert report["sum_rel_err"] <= 1.5 * report["unmasked_sum_rel_err"]  # masks add no error of their own
    assert report["unmask_bytes_with_dropout"] > report["unmask_bytes"]  # the survivors' encrypted corrections


def test_bench_masking_refuses_a_round_too_small_to_recover_a_dropout():
    result = CliRunner().invoke(app, ["bench", "masking", "--participants", "3", "--json"])
    assert result.exit_code != 0 and "needs at least 1 dropout and 3 survivors" in result.output
