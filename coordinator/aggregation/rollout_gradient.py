"""The encrypted-rollout gradient from transition uploads, each owner's under its own key.

Owners upload encrypted states, loss-layer deltas and their tiled theta under keys of their own
(``participant.owner_key``; docs/encrypted-rollouts.md). For each owner the coordinator computes the
per-slot gradient sums with that owner's registered evaluation keys (``coordinator.owner_keys``) and
sends them to that owner alone (``query.owner_gradient``), who checks them against its own gradient
and answers with an ordinary update under the federation key: summed plainly or under pairwise
masks (``MaskedRolloutGradient``), as in local-ppo mode. No key holder can read an owner's uploads.

The collapse shared with statistics uploads (``collapse``: one key holder sums masked per-slot
values) lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Message

from coordinator.aggregation.base import Aggregate, Aggregation, RoundContext
from coordinator.aggregation.masked_sum import PairwiseMaskedSum
from coordinator.aggregation.plain_sum import PlainSum
from coordinator.encrypted_gradient import GradientSum, mask_for_collapse, unmask_collapsed
from coordinator.owner_keys import owner_backend
from coordinator.replies import read_gradient, read_rollout
from protos import messages
from protos.backend import Chunk, HEBackend
from protos.codec import PROTOCOL_VERSION, EncryptedVector, to_proto_for_decryption
from protos.fedhe.v1 import wire_pb2
from protos.rollout_layout import BlockLayout
from protos.rollout_statistics import StatisticsLayout


@dataclass
class OwnerUpload:
    key: HEBackend  # the owner's evaluation keys
    blocks: list[EncryptedVector]
    theta_tiled: EncryptedVector


class RolloutGradient(PlainSum):
    def __init__(self, ctx: RoundContext) -> None:
        super().__init__(ctx)
        self.layout = ctx.plan.rollout_layout(ctx.backend.slots, ctx.participants)
        self.uploads: dict[int, OwnerUpload] = {}

    def add(self, node: int, reply: Message) -> None:
        """A train reply: the owner's upload, under its own key (its update comes in ``finish``)."""
        ctx, layout = self.ctx, self.layout
        with ctx.outcome.timer.phase("read_updates"):
            key = owner_backend(ctx.backend, ctx.plan.settings.coordinator_key, ctx.name(node))
            blocks, theta = read_rollout(key, reply, ctx.round, layout.block_vectors * layout.slots,
                                         layout.blocks_for(ctx.plan.scenario.rollout.transitions),
                                         layout.theta_vectors * layout.slots)
        self.uploads[node] = OwnerUpload(key, blocks, theta)
        self.contributors.append(node)  # so far: its update, in ``finish``, decides

    def finish(self) -> Aggregate | None:
        """Each owner's per-slot sums back to that owner, sent as soon as they are computed (the owner
        works on them while the next owner's are); its update in reply, summed like any."""
        ctx = self.ctx
        pending: dict[str, int] = {}
        for node, upload in self.uploads.items():
            with ctx.outcome.timer.phase("encrypted_gradient"):
                gradient = GradientSum(upload.key, self.layout)
                for block in upload.blocks:
                    gradient.add_block(upload.theta_tiled.chunks, block.chunks)
                sums = [EncryptedVector([chunk], self.layout.slots) for chunk in gradient.result()]
                query = wire_pb2.GradientQuery(protocol_version=PROTOCOL_VERSION, round=ctx.round,
                                               masked=[to_proto_for_decryption(upload.key, vec) for vec in sums])
            message = ctx.exchange.message(node, ctx.round, ctx.participants, messages.OWNER_GRADIENT,
                                           {messages.OWNER_GRADIENT_QUERY: messages.pack(query)}, self.train_config())
            pending.update(ctx.exchange.push([message], ctx.outcome))
        self.uploads.clear()
        self.contributors = []  # now the owners whose update is in the sum
        take = lambda node, reply: PlainSum.add(self, node, reply)  # noqa: E731 - the update, read and summed
        for _ in ctx.exchange.collect_pending(pending, take, ctx.outcome, "owner update"):
            pass
        if not self.contributors:
            self.fail("no owner sent its update")
            return None
        return super().finish()


class MaskedRolloutGradient(RolloutGradient, PairwiseMaskedSum):
    """The same, the owners' updates summed under pairwise masks (``PairwiseMaskedSum.finish`` removes them)."""


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
