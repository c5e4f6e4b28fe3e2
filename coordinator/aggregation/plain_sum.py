"""The plain sum: update and statistics ciphertexts added as replies arrive (memory O(model))."""

from __future__ import annotations

from flwr.app import Message

from coordinator.aggregation.base import Aggregate, Aggregation, RoundContext, add_vectors
from coordinator.replies import UpdateReply, read_update
from protos.codec import EncryptedVector


class PlainSum(Aggregation):
    masked = False  # do updates carry pairwise masks

    def __init__(self, ctx: RoundContext) -> None:
        super().__init__(ctx)
        self.update: EncryptedVector | None = None
        self.stats: EncryptedVector | None = None

    def add(self, node: int, reply: Message) -> None:
        ctx = self.ctx
        with ctx.outcome.timer.phase("read_updates"):
            answer = read_update(ctx.backend, reply, ctx.round, ctx.update_length, self.masked)
            self.admit(node, answer)
        with ctx.outcome.timer.phase("sum"):
            self.update = add_vectors(ctx.backend, self.update, answer.update)
            self.stats = add_vectors(ctx.backend, self.stats, answer.stats)
        self.contributors.append(node)

    def admit(self, node: int, answer: UpdateReply) -> None:
        """Last checks before a valid reply is summed (raise to refuse it)."""

    def finish(self) -> Aggregate | None:
        return Aggregate(self.update, self.stats, len(self.contributors))
