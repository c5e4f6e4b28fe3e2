"""Messages out, replies in: the round's Flower I/O and the record of who failed and why.

Every message carries the round's public metadata; replies stream back as they arrive, each read
by the caller's reader, and every failure (no reply, an error reply, a reply that does not
validate) is that organization's, recorded once with its category, never the round's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.organizations import EXCLUDED, GONE, Organizations
from protos import messages
from protos.backend import HEBackend
from protos.codec import PROTOCOL_VERSION
from protos.errors import WireError
from protos.phase_timer import PhaseTimer
from protos.reply_errors import category_of_code

log = logging.getLogger("fedhe.coordinator")
POLL_SECONDS = (0.05, 0.5)  # wait between pulls: the first second of an exchange (a simulation's replies),
FAST_POLL_FOR = 1.0  # then backing off to the longest: a deployment's exchange takes seconds and each pull is an RPC
NODE_UNAVAILABLE = 5  # Flower's error code for a node that stopped sending heartbeats
T = TypeVar("T")


@dataclass
class RoundOutcome:
    round: int
    completed: bool = False
    answered: list[str] = field(default_factory=list)  # organizations whose update is in the aggregate
    failed: list[dict] = field(default_factory=list)  # {"organization", "category", "reason"}
    cause: str = ""  # why a round changed nothing
    he_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    extras: dict = field(default_factory=dict)  # aggregation, integrity and DP fields of the metrics row
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # the coordinator's own costs, per phase

    def fail(self, organizations: Organizations, node: int, category: str, reason: str) -> None:
        name = organizations.name(node)
        log.warning("round %d: %s", self.round, reason if reason.startswith(name) else f"{name}: {reason}")
        organizations.failed(node, category)
        self.failed.append({"organization": name, "category": category, "reason": reason})


class Exchange:
    """One run's messages to and from the participants through Flower's ``Grid``."""

    def __init__(self, grid: Grid, backend: HEBackend, organizations: Organizations, timeout: float) -> None:
        self.grid, self.backend, self.organizations, self.timeout = grid, backend, organizations, timeout
        self.run_id = int(grid.run.run_id)  # participants bind their masks to it

    def message(self, node: int, round_: int, participants: int, kind: str, arrays: dict[str, ArrayRecord],
                config: dict | None = None) -> Message:
        """A message with the round's public metadata (plus ``config``: members, init, identify)."""
        record = ConfigRecord({"round": round_, "participants": participants,
                               "key-fingerprint": self.backend.fingerprint, "protocol-version": PROTOCOL_VERSION,
                               **(config or {})})
        content = RecordDict({messages.CONFIG: record, **arrays})
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(round_))

    def push(self, outgoing: list[Message], outcome: RoundOutcome) -> dict[str, int]:
        """Send; returns message id -> the node it went to."""
        outcome.bytes_down += sum(messages.payload_bytes(m.content) for m in outgoing)
        with outcome.timer.phase("push"):
            ids = self.grid.push_messages(outgoing)
        return {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, outgoing) if mid}

    def replies(self, pending: dict[str, int], outcome: RoundOutcome) -> Iterator[tuple[int, Message]]:
        """(node, reply) as replies arrive until all are in or the timeout; a silent node is gone.

        The node is the one the request went to (Flower's error replies for a dead node do not
        name it)."""
        start = time.monotonic()
        deadline, pause = start + self.timeout, POLL_SECONDS[0]
        while pending and time.monotonic() < deadline:
            with outcome.timer.phase("wait"):
                replies = list(self.grid.pull_messages(list(pending)))
                if not replies:
                    time.sleep(pause)
                if time.monotonic() - start > FAST_POLL_FOR:
                    pause = min(pause * 1.5, POLL_SECONDS[1])
            for reply in replies:
                yield pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id), reply
        for node in pending.values():
            self.organizations.mark(node, GONE)
            outcome.fail(self.organizations, node, "timeout", f"no reply within the round timeout ({self.timeout:g} s)")

    def stream(self, outgoing: list[Message], outcome: RoundOutcome) -> Iterator[tuple[int, Message]]:
        return self.replies(self.push(outgoing, outcome), outcome)

    def collect(self, outgoing: list[Message], read: Callable[[int, Message], T], outcome: RoundOutcome,
                what: str) -> Iterator[tuple[int, T]]:
        """Push, stream and read each reply; an error reply or one that does not read is a failure."""
        return self.collect_pending(self.push(outgoing, outcome), read, outcome, what)

    def collect_pending(self, pending: dict[str, int], read: Callable[[int, Message], T], outcome: RoundOutcome,
                        what: str) -> Iterator[tuple[int, T]]:
        """``collect`` for messages already pushed (``pending``: message id -> node)."""
        for node, reply in self.replies(pending, outcome):
            if reply.has_error():
                self.error_reply(node, reply, outcome)
                continue
            outcome.bytes_up += messages.payload_bytes(reply.content)
            try:
                yield node, read(node, reply)
            except WireError as exc:
                outcome.fail(self.organizations, node, "rejected", f"rejected {what}: {exc}")
            except Exception as exc:  # a hostile reply must never stop the round
                outcome.fail(self.organizations, node, "rejected", f"rejected {what}: {type(exc).__name__}: {exc}")

    def error_reply(self, node: int, reply: Message, outcome: RoundOutcome) -> None:
        """A participant's data-free error reply, or Flower's for a node that is gone."""
        code, reason = reply.error.code, reply.error.reason
        category = category_of_code(code)
        if category is not None:
            self.organizations.named_in(node, reason)
        name = category.name if category else "flower"
        if code == NODE_UNAVAILABLE:
            self.organizations.mark(node, GONE)
            name, reason = "unavailable", "the node stopped answering (no heartbeat)"
        elif category is not None and category.excludes:
            self.organizations.mark(node, EXCLUDED)
            reason = f"{reason}; left out for the rest of this run"
        outcome.fail(self.organizations, node, name, reason)
