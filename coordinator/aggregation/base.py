"""What every aggregation path shares: the round it works in and the interface the driver calls.

A path turns one round's train replies into the aggregate HE-Adam steps on (``add`` as replies
arrive, ``finish`` once they are in, with any exchange of its own), after Flower's strategy
hooks (``configure_train`` / ``aggregate_train``). The driver knows nothing of masks, norms or
rollouts: a new defense or mode is one new module and one registry line (``__init__``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from flwr.app import ArrayRecord, Message

from coordinator.exchange import Exchange, RoundOutcome
from coordinator.refresh import Refreshed
from protos.backend import HEBackend
from protos.codec import EncryptedVector, map_chunks
from protos.plan import RunPlan

T = TypeVar("T")


@dataclass
class RoundContext:
    """One round as every part of the coordinator sees it."""

    plan: RunPlan
    backend: HEBackend
    exchange: Exchange
    round: int
    nodes: list[int]  # the round's participants, in node order
    members: dict[int, int]  # node -> roster index
    refresher: int
    outcome: RoundOutcome
    refreshed: Refreshed | None = None  # set once the refresher (or a fallback) answered

    @property
    def update_length(self) -> int:
        """Values in one participant's update (theta's size, or an owner's tiled statistics)."""
        return self.plan.update_length(self.backend.slots)

    @property
    def participants(self) -> int:
        return len(self.nodes)

    def name(self, node: int) -> str:
        return self.exchange.organizations.name(node)

    def ask_one(self, kind: str, arrays: dict[str, ArrayRecord], read: Callable[[int, Message], T],
                what: str, exclude: tuple[int, ...] = ()) -> T | None:
        """A key holder's answer: the refresher first, then the others one at a time, none of ``exclude``
        (None: nobody answered)."""
        for node in [self.refresher] + [n for n in self.nodes if n != self.refresher]:
            if node in exclude:
                continue
            msg = self.exchange.message(node, self.round, self.participants, kind, arrays)
            for _, value in self.exchange.collect([msg], read, self.outcome, what):
                return value
        return None


@dataclass
class Aggregate:
    update: EncryptedVector  # what HE-Adam steps on
    stats: EncryptedVector  # the round's summed rollout statistics
    contributors: int  # updates in the sum


class Aggregation(ABC):
    """One round's aggregation; a fresh instance per round."""

    levels_used: ClassVar[int] = 0  # levels the aggregate has used when HE-Adam starts
    minimum: ClassVar[int] = 1  # the fewest contributors the path can sum

    def __init__(self, ctx: RoundContext) -> None:
        self.ctx = ctx
        self.contributors: list[int] = []  # nodes whose reply is in the aggregate
        self.offender: int | None = None  # a node ``finish`` found to break the protocol (its round fails)

    @classmethod
    def check(cls, plan: RunPlan, backend: HEBackend) -> None:
        """Refuse, before round 1, a plan this path cannot run (every path runs any plan by default)."""
        return None

    def train_config(self) -> dict:
        """Extra public config for the round's train messages."""
        return {}

    @abstractmethod
    def add(self, node: int, reply: Message) -> None:
        """Read one train reply (raise a WireError if it does not validate) and take it in."""

    @abstractmethod
    def finish(self) -> Aggregate | None:
        """The round's aggregate, after any exchange of its own; None (with ``outcome.cause``): the
        round changes nothing."""

    def fail(self, cause: str) -> None:
        self.ctx.outcome.cause = cause


def add_vectors(backend: HEBackend, total: EncryptedVector | None, vec: EncryptedVector) -> EncryptedVector:
    return vec if total is None else map_chunks(backend.add, total, vec)
