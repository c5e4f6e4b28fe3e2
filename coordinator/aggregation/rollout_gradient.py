"""The encrypted-rollout gradient: backpropagation on every owner's encrypted blocks, then a collapse.

Owners upload encrypted states and loss-layer deltas (docs/encrypted-rollouts.md); the coordinator
computes per-slot gradient sums on the ciphertexts with the refresher's tiled theta, masks them,
and one key holder collapses them into one fresh dense gradient (``query.gradient``).
"""

from __future__ import annotations

from flwr.app import Message

from coordinator.aggregation.base import Aggregate, Aggregation, RoundContext, add_vectors
from coordinator.encrypted_gradient import GradientSum, mask_for_collapse, unmask_collapsed
from coordinator.replies import read_gradient, read_rollout
from protos import messages
from protos.backend import Chunk
from protos.codec import PROTOCOL_VERSION, EncryptedVector, to_proto_for_decryption
from protos.fedhe.v1 import wire_pb2
from protos.rollout_layout import BlockLayout
from protos.rollout_statistics import StatisticsLayout


class RolloutGradient(Aggregation):
    def __init__(self, ctx: RoundContext) -> None:
        super().__init__(ctx)
        self.layout = ctx.plan.rollout_layout(ctx.backend.slots, ctx.participants)
        self.uploads: list[list[EncryptedVector]] = []
        self.stats: EncryptedVector | None = None

    def add(self, node: int, reply: Message) -> None:
        ctx, layout = self.ctx, self.layout
        blocks, stats = read_rollout(ctx.backend, reply, ctx.round, layout.block_vectors * layout.slots,
                                     layout.blocks_for(ctx.plan.scenario.rollout.transitions))
        self.uploads.append(blocks)
        self.stats = add_vectors(ctx.backend, self.stats, stats)
        self.contributors.append(node)

    def finish(self) -> Aggregate | None:
        ctx = self.ctx
        theta_tiled = tiled_theta(self)
        if theta_tiled is None:
            return None
        gradient = GradientSum(ctx.backend, self.layout)
        with ctx.outcome.timer.phase("encrypted_gradient"):
            for blocks in self.uploads:
                for block in blocks:
                    gradient.add_block(theta_tiled.chunks, block.chunks)
        dense = collapse(self, gradient.result(), self.layout)
        return None if dense is None else Aggregate(dense, self.stats, len(self.contributors))


def tiled_theta(path: Aggregation) -> EncryptedVector | None:
    """The refresher's theta in the round's slot layout (None, and the round fails, without one)."""
    refreshed = path.ctx.refreshed
    if refreshed is None or refreshed.theta_tiled is None:
        path.fail("the refresh carried no tiled theta")
        return None
    return refreshed.theta_tiled


def collapse(path: Aggregation, per_slot: list[Chunk],
             layout: BlockLayout | StatisticsLayout) -> EncryptedVector | None:
    """Second exchange: the per-slot sums, masked, to one key holder, who sums the slots of each coordinate;
    the dense gradient with the masks' sums removed (None, and the round fails, if nobody answered)."""
    ctx = path.ctx
    with ctx.outcome.timer.phase("encrypted_gradient"):
        masked, masks = mask_for_collapse(ctx.backend, per_slot)
    query = wire_pb2.GradientQuery(protocol_version=PROTOCOL_VERSION, round=ctx.round,
                                   masked=[to_proto_for_decryption(ctx.backend, vec) for vec in masked])
    read = lambda _node, reply: read_gradient(ctx.backend, reply, ctx.round, ctx.plan.num_params)  # noqa: E731
    dense = ctx.ask_one(messages.GRADIENT, {messages.GRADIENT_QUERY: messages.pack(query)}, read, "gradient")
    if dense is None:
        path.fail("no key holder collapsed the gradient")
        return None
    return unmask_collapsed(ctx.backend, dense, masks, layout)
