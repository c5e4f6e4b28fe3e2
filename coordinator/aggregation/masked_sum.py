"""The pairwise-masked sum: double masks cancelled and removed, without the coordinator learning one.

Participants mask their update and statistics (``participant.pairwise_masks``) over the round's
masking set, which the train message names (``members``: the roster indices of the round's
participants, so a participant known to be gone costs nothing in later rounds). The masked
ciphertexts are summed as they arrive; the pair masks cancel between the survivors. Then one
exchange with every survivor (``query.unmask``): each opens its shares of the other survivors'
self-mask seeds and, if members are missing, sends encrypted corrections that cancel its pair
masks with them. The coordinator rebuilds each survivor's seed from ``threshold`` shares (Shamir,
pycryptodome), checks it against the survivor's commitment, and subtracts the self-masks, which
are public arithmetic (``protos.masking``) once a seed is known. A survivor silent in this exchange
costs nothing when no member dropped: the others' shares rebuild its self-mask. When members
dropped, its corrections are missing, masks stay in the sum and the round changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from Crypto.Protocol.SecretSharing import Shamir

from coordinator.aggregation.base import Aggregate, add_vectors
from coordinator.aggregation.plain_sum import PlainSum
from coordinator.he_adam import add_plain_vector
from coordinator.replies import UpdateReply, read_unmask
from protos import messages
from protos.codec import PROTOCOL_VERSION
from protos.errors import MalformedMessageError
from protos.fedhe.v1 import wire_pb2
from protos.masking import STATS_STREAM, UPDATE_STREAM, SelfMaskContext, self_mask

MIN_SURVIVORS = 3  # with 2, each one's update is the sum minus its own


@dataclass
class Survivor:
    node: int
    index: int
    masking: wire_pb2.PairwiseMasking
    revealed: dict[int, bytes] = field(default_factory=dict)  # Shamir x -> share


class PairwiseMaskedSum(PlainSum):
    masked = True
    minimum = MIN_SURVIVORS

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.members = sorted(ctx.members[node] for node in ctx.nodes)
        self.survivors: dict[int, Survivor] = {}  # roster index -> survivor
        self.roster_size: int | None = None

    def train_config(self) -> dict:
        return {"members": self.members}

    def admit(self, node: int, answer: UpdateReply) -> None:
        """A masked update must come from the roster index its node named, masked over this round's set."""
        masking, index = answer.masking, self.ctx.members[node]
        if masking.participant_index != index:
            raise MalformedMessageError(
                f"update names roster index {masking.participant_index}, the node identified as {index}")
        if list(masking.members) != self.members:
            raise MalformedMessageError(
                f"update is masked over {list(masking.members)}, the round's set is {self.members}")
        if self.roster_size is not None and masking.roster_size != self.roster_size:
            raise MalformedMessageError(
                f"update is masked for a roster of {masking.roster_size}, this round's others for {self.roster_size}: "
                "the participants hold different rosters")
        others = [m for m in self.members if m != index]
        if not 2 <= masking.threshold <= len(others):
            raise MalformedMessageError(f"self-mask threshold {masking.threshold} for {len(others)} other members")
        if sorted(s.recipient for s in masking.shares) != others or any(s.sender != index for s in masking.shares):
            raise MalformedMessageError("update does not carry one sealed share for each other member")
        self.roster_size = masking.roster_size
        self.survivors[index] = Survivor(node, index, masking)

    def finish(self) -> Aggregate | None:
        ctx = self.ctx
        if len(self.survivors) < MIN_SURVIVORS:
            self.fail(f"only {len(self.survivors)} masked updates arrived; a masked sum needs at least {MIN_SURVIVORS}")
            return None
        with ctx.outcome.timer.phase("unmask"):
            if not self._unmask():
                return None
            seeds = self._rebuild_seeds()
            if seeds is None:
                return None
            update, stats = self.update, self.stats
            for survivor in self.survivors.values():
                context = SelfMaskContext(ctx.backend.fingerprint, ctx.exchange.run_id, ctx.round, survivor.index)
                update = add_plain_vector(ctx.backend, update, -self_mask(
                    seeds[survivor.index], context, UPDATE_STREAM, ctx.update_length, self.roster_size))
                stats = add_plain_vector(ctx.backend, stats, -self_mask(
                    seeds[survivor.index], context, STATS_STREAM, messages.STATS_LENGTH, self.roster_size))
        return Aggregate(update, stats, len(self.contributors))

    def _unmask(self) -> bool:
        """Every survivor opens its shares of the others' seeds and corrects for the dropped, once."""
        ctx, outcome = self.ctx, self.ctx.outcome
        survivors = sorted(self.survivors)
        dropped = [m for m in self.members if m not in self.survivors]
        outgoing = []
        for index in survivors:
            shares = [s for other in survivors if other != index
                      for s in self.survivors[other].masking.shares if s.recipient == index]
            request = wire_pb2.UnmaskRequest(protocol_version=PROTOCOL_VERSION, round=ctx.round, survivors=survivors,
                                             dropped=dropped, shares=shares)
            outgoing.append(ctx.exchange.message(self.survivors[index].node, ctx.round, ctx.participants,
                                                 messages.UNMASK, {messages.UNMASK_REQUEST: messages.pack(request)}))
        by_node = {s.node: s for s in self.survivors.values()}
        read = lambda _node, reply: read_unmask(ctx.backend, reply, ctx.round, ctx.update_length,  # noqa: E731
                                                bool(dropped), len(survivors) - 1)
        answered = set()
        for node, (shares, corrections) in ctx.exchange.collect(outgoing, read, outcome, "unmask reply"):
            for share in shares:
                if share.sender in self.survivors and share.sender != by_node[node].index:
                    self.survivors[share.sender].revealed[share.x] = bytes(share.share)
            if corrections is not None:
                self.update = add_vectors(ctx.backend, self.update, corrections[0])
                self.stats = add_vectors(ctx.backend, self.stats, corrections[1])
            answered.add(node)
        outcome.extras.update(mask_dropped=dropped)
        missing = [ctx.name(s.node) for s in self.survivors.values() if s.node not in answered]
        if missing and dropped:  # their corrections for the dropped members are needed; without them
            self.fail(f"{', '.join(missing)} did not unmask; their masks stay in the sum")
            return False
        return True  # a survivor that went silent only now: the others' shares rebuild its self-mask

    def _rebuild_seeds(self) -> dict[int, bytes] | None:
        """Each survivor's seed from its threshold of revealed shares, checked against its commitment."""
        ctx, seeds = self.ctx, {}
        for index, survivor in self.survivors.items():
            threshold = survivor.masking.threshold
            shares = sorted(survivor.revealed.items())[:threshold]
            if len(shares) < threshold:  # too few survivors unmasked: nobody to blame
                self.fail(f"the self-mask of {ctx.name(survivor.node)} needs {threshold} revealed shares, "
                          f"{len(shares)} arrived")
                return None
            seed = Shamir.combine(shares)
            context = SelfMaskContext(ctx.backend.fingerprint, ctx.exchange.run_id, ctx.round, index)
            if context.commitment(seed) != survivor.masking.commitment:
                self.offender = survivor.node
                self.fail(f"the self-mask of {ctx.name(survivor.node)} could not be rebuilt from "
                          f"{len(survivor.revealed)} revealed shares (needs {threshold})")
                return None
            seeds[index] = seed
        return seeds
