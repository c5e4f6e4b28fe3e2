"""Robust aggregation: each update clipped by a factor from its masked encrypted norm.

The updates are kept (no pairwise masks: each norm must be one participant's), one key holder sums
their masked squared norms (``coordinator.robust_aggregation``), and the aggregate is
``sum_i f_i Enc(u_i)``: ``norm-bound`` clips to a fixed bound, ``median-norm`` to the median norm.
"""

from __future__ import annotations

from flwr.app import Message

from coordinator.aggregation.base import Aggregate, Aggregation, RoundContext, add_vectors
from coordinator.replies import read_norms, read_update
from coordinator.robust_aggregation import (
    check_profile_supports,
    clip_factors,
    masked_squared_norms,
    unmask_squared_norms,
    weighted_sum,
)
from protos import messages
from protos.backend import HEBackend
from protos.codec import HEADROOM_LEVEL, PROTOCOL_VERSION, EncryptedVector, to_proto_for_decryption
from protos.fedhe.v1 import wire_pb2
from protos.plan import RunPlan


class RobustSum(Aggregation):
    levels_used = 1  # the plaintext factors cost the aggregate one level
    rule = ""

    def __init__(self, ctx: RoundContext) -> None:
        super().__init__(ctx)
        self.kept: list[EncryptedVector] = []
        self.stats: EncryptedVector | None = None

    @classmethod
    def check(cls, plan: RunPlan, backend: HEBackend) -> None:
        check_profile_supports(cls.rule, backend.profile.levels, plan.optimizer.depth, backend.profile.name)

    def add(self, node: int, reply: Message) -> None:
        ctx = self.ctx
        answer = read_update(ctx.backend, reply, ctx.round, ctx.plan.num_params, masked=False)
        self.kept.append(answer.update)
        self.stats = add_vectors(ctx.backend, self.stats, answer.stats)
        self.contributors.append(node)

    def finish(self) -> Aggregate | None:
        ctx = self.ctx
        masked, masks = masked_squared_norms(ctx.backend, self.kept)
        query = wire_pb2.NormQuery(protocol_version=PROTOCOL_VERSION, round=ctx.round,
                                   masked=[to_proto_for_decryption(ctx.backend, vec, HEADROOM_LEVEL) for vec in masked])
        read = lambda _node, reply: unmask_squared_norms(read_norms(reply, ctx.round, len(self.kept)), masks)  # noqa: E731
        squared = ctx.ask_one(messages.NORMS, {messages.NORM_QUERY: messages.pack(query)}, read, "norm reply")
        if squared is None:
            self.fail("no key holder answered the norm query")
            return None
        bound = ctx.plan.units(ctx.participants).bound(ctx.plan.settings.defense_bound or ctx.plan.optimizer.clip_bound)
        factors = clip_factors(squared ** 0.5, self.rule, bound)
        ctx.outcome.extras.update(defense=self.rule, clipped=int(sum(factors < 1.0)))
        return Aggregate(weighted_sum(ctx.backend, self.kept, factors), self.stats, len(self.contributors))


class NormBound(RobustSum):
    rule = "norm-bound"


class MedianNorm(RobustSum):
    rule = "median-norm"
