"""`fedhe bench masking`: pairwise masks under CKKS, every role in one process, through the wire format.

1. A fresh federation key and a roster of ``participants`` simulated organizations (temp dir).
2. Every participant draws an update in update units whose coordinates are uniform over the whole
   range an update coordinate can take (``+-C s / n``: the worst case for hiding) and rollout
   statistics, masks both for one round and encrypts them (``participant.node.encrypted_update``).
3. ``update_correlation``: the secret key decrypts each participant's update ciphertext; the
   largest absolute Pearson correlation, over participants, with its true update.
4. The coordinator reads and sums the replies as in a round (``read_update``, ``RoundSums``);
   ``sum_abs_err`` (largest coordinate error) and ``sum_rel_err`` (L2, relative) compare the
   decrypted sum with the true sum; ``unmasked_sum_*`` are the same for the sum without masks.
5. Dropout recovery: the last ``dropouts`` participants' updates never arrive; the others' mask
   corrections (``participant.node.mask_correction``) are read and added (``read_mask_correction``,
   ``RoundSums.correct``); ``dropout_sum_abs_err`` against the true sum of those that answered.

``ms_per_participant``: deriving and adding one participant's masks (update and statistics).
``ms_per_dropout_recovery``: one survivor's correction (derive, encrypt, serialize; survivors
work in parallel) plus the coordinator reading and adding all corrections.
``hiding_bound``: statistical distance, per coordinate, between the masked views of any two
updates (``|a - a'| / 2R`` with ``|a|, |a'| <= C s / n``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Message, Metadata, RecordDict

from coordinator.replies import read_mask_correction, read_update
from coordinator.rounds import RoundSums
from coordinator.unmasking import MaskedRound
from participant.keyholder import decrypt_vector, generate_keys, load_keyholder
from participant.node import encrypted_update, mask_correction
from participant.pairwise_masks import STATS_STREAM, UPDATE_STREAM, PairwiseMasker, hiding_bound
from participant.roster import simulated_organizations
from protos import messages
from protos.codec import decode_vector, encode_vector, from_proto
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.optimizer import HEAdamConfig
from protos.profiles import DEFAULT_PROFILE
from protos.update_units import UpdateUnits
from scenarios import load_scenario

RUN, ROUND = 1, 1


def as_reply(record: str, proto, node: int) -> Message:
    """A participant's reply as the coordinator receives it."""
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"q{node}", group_id=str(ROUND), created_at=0.0, ttl=60.0,
                        message_type=messages.TRAIN)
    return Message(RecordDict({record: messages.pack(proto)}), metadata=metadata)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def run_masking_bench(
    participants: int = 5,
    params: int = 16384,
    dropouts: int = 1,
    profile: str = DEFAULT_PROFILE,
    scenario: str = "cartpole",
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    if participants < 3 or not 1 <= dropouts <= participants - 2:
        raise ValueError("need at least 3 participants and 1 <= dropouts <= participants - 2")
    step = on_step or (lambda _: None)
    units = UpdateUnits.of(HEAdamConfig.for_scenario(load_scenario(scenario)), participants)
    bound = units.clip * units.factor  # the largest an update coordinate can be: C s / n
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-bound, bound, params) for _ in range(participants)]
    stats = [np.array([rng.uniform(0, 500) * 8, 8.0, float(rng.integers(1000, 4096))]) for _ in range(participants)]
    with tempfile.TemporaryDirectory(prefix="fedhe-bench-masking-") as tmp:
        keys = generate_keys(Path(tmp), profile)
        simulated_organizations(Path(tmp), keys.fingerprint, participants)
        holder, coordinator = load_keyholder(keys.directory), load_evaluation_backend(keys.coordinator_key)
        maskers = [PairwiseMasker.load(Path(tmp), i, keys.fingerprint) for i in range(participants)]
    step("keys")

    mask_ms = []
    for i, masker in enumerate(maskers):
        t0 = time.perf_counter()
        masker.mask(updates[i], RUN, ROUND, UPDATE_STREAM)
        masker.mask(stats[i], RUN, ROUND, STATS_STREAM)
        mask_ms.append((time.perf_counter() - t0) * 1e3)
    uploads = [encrypted_update(holder, ROUND, updates[i], stats[i], maskers[i].round(RUN, ROUND))
               for i in range(participants)]
    replies = [as_reply(messages.UPDATE, proto, node=i) for i, proto in enumerate(uploads)]
    plain_replies = [as_reply(messages.UPDATE, encrypted_update(holder, ROUND, updates[i], stats[i]), node=i)
                     for i in range(participants)]
    step("participants")

    # What a key holder colluding with the coordinator reads from one participant's update ciphertext.
    seen = []
    for reply in replies:
        update = messages.unpack(reply.content, messages.UPDATE, wire_pb2.ParticipantUpdate, max_bytes=1 << 30)
        seen.append(decrypt_vector(holder, from_proto(holder, update.update)))
    update_correlation = max(abs(correlation(seen[i], updates[i])) for i in range(participants))

    def summed(replies: list[Message], masked: MaskedRound | None) -> RoundSums:
        sums = RoundSums(coordinator)
        for reply in replies:
            sums.add(*read_update(coordinator, reply, ROUND, params, masked))
        return sums

    def error(sums: RoundSums, members: range) -> tuple[float, float]:
        total = decrypt_vector(holder, decode_vector(holder, encode_vector(coordinator, sums.update)))
        true = np.sum([updates[i] for i in members], axis=0)
        return float(np.max(np.abs(total - true))), float(np.linalg.norm(total - true) / np.linalg.norm(true))

    def stats_error(sums: RoundSums, members: range) -> float:
        total = decrypt_vector(holder, decode_vector(holder, encode_vector(coordinator, sums.stats)))
        return float(np.max(np.abs(total - np.sum([stats[i] for i in members], axis=0))))

    everyone = range(participants)
    full = summed(replies, MaskedRound())
    sum_abs_err, sum_rel_err = error(full, everyone)
    unmasked_abs_err, unmasked_rel_err = error(summed(plain_replies, None), everyone)
    step("sum")

    # Dropout recovery: the last `dropouts` never answer; the others cancel their masks with them.
    survivors = range(participants - dropouts)
    masked = MaskedRound()
    partial = summed([replies[i] for i in survivors], masked)
    request = masked.correction_request(ROUND)
    survivor_ms, corrections = [], []
    for i in survivors:
        t0 = time.perf_counter()
        answer = mask_correction(holder, maskers[i].round(RUN, ROUND), request, params)
        corrections.append(as_reply(messages.MASK_CORRECTION, answer, node=i))
        answer.SerializeToString()
        survivor_ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    for reply in corrections:
        partial.correct(*read_mask_correction(coordinator, reply, ROUND, params))
    coordinator_ms = (time.perf_counter() - t0) * 1e3
    dropout_abs_err, _ = error(partial, survivors)
    step("dropout")

    return {
        "profile": coordinator.profile.name,
        "participants": participants,
        "params": params,
        "dropouts": dropouts,
        "update_correlation": round(update_correlation, 5),
        "sum_abs_err": sum_abs_err,
        "sum_rel_err": sum_rel_err,
        "unmasked_sum_abs_err": unmasked_abs_err,
        "unmasked_sum_rel_err": unmasked_rel_err,
        "stats_sum_abs_err": stats_error(full, everyone),
        "dropout_sum_abs_err": dropout_abs_err,
        "dropout_stats_sum_abs_err": stats_error(partial, survivors),
        "mask_bound": UPDATE_STREAM.bound,
        "stats_mask_bound": STATS_STREAM.bound,
        "update_coordinate_bound": bound,
        "hiding_bound": hiding_bound(UPDATE_STREAM, bound),
        "mask_grid": maskers[0].grid(UPDATE_STREAM),
        "ms_per_participant": round(float(np.mean(mask_ms)), 3),
        "ms_per_dropout_recovery": round(float(np.mean(survivor_ms)) + coordinator_ms, 3),
        "recovery_survivor_ms": round(float(np.mean(survivor_ms)), 3),
        "recovery_coordinator_ms": round(coordinator_ms, 3),
    }

