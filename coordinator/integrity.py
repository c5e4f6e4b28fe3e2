"""The integrity check: a round's aggregate changes the model only if it obeys the honest bound.

Masks and encryption hide a bad update as well as a good one: a ciphertext under another key, a
replay relabelled to another round (its masks no longer cancel) or an inflated update would each
pass unseen into HE-Adam. But every honest update is clipped, so the honest aggregate obeys a
public L2 bound (``RunPlan.aggregate_bound``), which is also HE-Adam's interval guarantee. The
coordinator sends one key holder ``r |S|^2 - r bound^2``, spread over masked slots
(``robust_aggregation.masked_square_sum``, r a secret factor), and ``q S`` under masks uniform in
+-2^15 (q a secret factor in [1, 2)): the key holder sums the first one's slots and reveals only
whether the sum is negative and every slot of the second stays within the masks' range, so neither
side learns the aggregate's norm. The second check stops a key holder's crafted update whose values
are so large that their squares wrap around the ciphertext modulus and pass the first (a
ciphertext under another key decrypts to such values); it tells the checking key holder each
coordinate of S only up to that uniform mask (statistical distance |S_j| / 2^16 per coordinate).
The same key holder decrypts the round's summed statistics, checks they are whole counts within
the round's limits, and releases them rounded.

The check costs no exchange of its own: the step is taken at once and the query rides on the next
round's message to its refresher (``coordinator.driver``); only a round the check confirms is
recorded and checkpointed. A round that fails it is undone, with the next round that trained on
it, and reported as an integrity failure. Not caught: a poisoned update within the bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, Message

from coordinator.aggregation.base import Aggregate, RoundContext
from coordinator.he_adam import add_plain_vector
from coordinator.replies import read_integrity
from coordinator.robust_aggregation import masked_square_sum, secret_factor
from coordinator.secret_random import secret_uniform
from protos import messages
from protos.codec import HEADROOM_LEVEL, PROTOCOL_VERSION, EncryptedVector, map_chunks
from protos.codec import to_proto_for_decryption as for_key_holder
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import MASK_BOUND


@dataclass
class Verdict:
    within_bound: bool
    stats_plausible: bool
    released: wire_pb2.ReleasedMetrics | None

    @property
    def passed(self) -> bool:
        return self.within_bound and self.stats_plausible

    def cause(self) -> str:
        problems = ["the aggregate exceeds the bound every honest round obeys"] * (not self.within_bound)
        if not self.stats_plausible:
            problems.append("the summed statistics are not whole counts within the round's limits")
        return "integrity: " + "; ".join(problems)


def verdict_of(answer: wire_pb2.IntegrityReply) -> Verdict:
    return Verdict(answer.within_bound, answer.stats_plausible,
                   answer.released if answer.HasField("released") else None)


def integrity_query(ctx: RoundContext, aggregate: Aggregate) -> ArrayRecord:
    """The check of this round's aggregate, for a key holder to answer (with the next round's messages)."""
    bound = ctx.plan.aggregate_bound(aggregate.contributors, ctx.participants)
    factor = secret_factor()
    with ctx.outcome.timer.phase("integrity"):
        masked = masked_square_sum(ctx.backend, aggregate.update, factor, offset=-factor * bound**2)
        query = wire_pb2.IntegrityQuery(protocol_version=PROTOCOL_VERSION, round=ctx.round,
                                        masked_norm=for_key_holder(ctx.backend, masked, HEADROOM_LEVEL),
                                        masked_values=for_key_holder(ctx.backend, masked_values(ctx, aggregate.update),
                                                                     HEADROOM_LEVEL),
                                        stats=for_key_holder(ctx.backend, aggregate.stats, HEADROOM_LEVEL),
                                        contributors=aggregate.contributors)
    return messages.pack(query)


def read_verdict(reply: Message, round_: int) -> Verdict | None:
    """The verdict a reply carries on round ``round_``'s aggregate, if it carries one."""
    if messages.INTEGRITY_REPLY not in reply.content.array_records:
        return None
    return verdict_of(read_integrity(reply, round_))


def ask_verdict(ctx: RoundContext, query: ArrayRecord, round_: int, asked: tuple[int, ...] = ()) -> Verdict | None:
    """A dedicated exchange with one key holder, none of ``asked`` (a key holder answers a round's
    check once, so one that was sent it already would refuse)."""
    with ctx.outcome.timer.phase("integrity"):
        return ctx.ask_one(messages.INTEGRITY, {messages.INTEGRITY_QUERY: query},
                           lambda _node, reply: verdict_of(read_integrity(reply, round_)), "integrity reply",
                           exclude=asked)


def masked_values(ctx: RoundContext, update: EncryptedVector) -> EncryptedVector:
    """q S + m: a secret factor q in [1, 2) and masks uniform in +-2^15 (OS entropy)."""
    scale = 1.0 + float(secret_uniform(0.0, 1.0, 1)[0])
    scaled = map_chunks(lambda c: ctx.backend.mul_scalar(c, scale), update)
    return add_plain_vector(ctx.backend, scaled, secret_uniform(-MASK_BOUND, MASK_BOUND, update.length))
