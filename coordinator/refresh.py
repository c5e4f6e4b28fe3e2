"""Client-aided bootstrapping: one participant re-encrypts the masked HE-Adam state each round.

TenSEAL has no bootstrapping, so the state HE-Adam leaves low-level is sent, under fresh additive
masks only the coordinator knows, to the round's *refresher*, which returns fresh full-depth
ciphertexts of the still-masked values (docs/threat-model.md, step 5). It rides on the refresher's
train message; if the refresher fails, another participant is asked. Only the vectors the next
step needs fresh are sent (``he_adam.refresh_due``); theta is never refreshed, since HE-Adam only
subtracts from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.app import ArrayRecord, Message

from coordinator.exchange import Exchange, RoundOutcome
from coordinator.he_adam import (
    STATE_NAMES,
    HEAdamState,
    Masks,
    initial_optimizer_state,
    mask_state,
    refresh_due,
    step_levels,
    unmask_state,
)
from coordinator.replies import read_refresh
from protos import messages
from protos.backend import HEBackend
from protos.codec import PROTOCOL_VERSION, EncryptedVector, to_proto_for_decryption
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import HEAdamConfig, InverseSqrtPolynomial

log = logging.getLogger("fedhe.coordinator")


@dataclass
class Refreshed:
    """The state a step starts from: theta, the unmasked state and the levels each has used."""

    theta: EncryptedVector
    state: dict[str, EncryptedVector]
    start_levels: dict[str, int]
    theta_tiled: EncryptedVector | None  # encrypted-rollout mode: theta in the block layout


class StateRefresh:
    def __init__(self, backend: HEBackend, config: HEAdamConfig, poly: InverseSqrtPolynomial,
                 aggregate_level: int, num_params: int, tiled_length: int = 0) -> None:
        self.backend, self.config, self.poly = backend, config, poly
        self.aggregate_level, self.num_params, self.tiled_length = aggregate_level, num_params, tiled_length
        # levels each state vector has used, tracked by a dry run of every step (the plaintext
        # baseline too); None before the first step or after a resume: then all are refreshed
        self.levels: dict[str, int] | None = None

    def due(self) -> tuple[str, ...]:
        """At the default profile z and w every round, m every third round."""
        if self.levels is None:
            return STATE_NAMES
        return refresh_due(self.levels, self.aggregate_level, self.backend.profile.levels, self.config, self.poly)

    def request(self, round_: int, optimizer: HEAdamState | None) -> tuple[ArrayRecord, Masks | None]:
        """The due state vectors under fresh secret masks (none before round 1)."""
        request = wire_pb2.RefreshRequest(protocol_version=PROTOCOL_VERSION, round=round_)
        masks = None
        if optimizer is not None:
            named = optimizer.named()
            masked, masks = mask_state(self.backend, {name: named[name] for name in self.due()})
            for name, vec in masked.items():
                request.masked_state[name].CopyFrom(to_proto_for_decryption(self.backend, vec))
        return messages.pack(request), masks

    def take(self, reply: Message, round_: int, masks: Masks | None, optimizer: HEAdamState | None) -> Refreshed:
        """Read and unmask a refresh reply; before round 1 it carries the initial theta."""
        due = tuple(masks.values) if masks is not None else ()
        answer = read_refresh(self.backend, reply, round_, self.num_params, due, self.tiled_length,
                              want_theta=optimizer is None)
        if optimizer is None or masks is None:  # before round 1: the initial state, fresh
            return Refreshed(answer.theta, initial_optimizer_state(self.backend, self.num_params),
                             dict.fromkeys(STATE_NAMES, 0), answer.theta_tiled)
        state = {**optimizer.named(), **unmask_state(self.backend, answer.state, masks)}
        start = {name: 0 if name in due else self.levels[name] for name in STATE_NAMES}
        return Refreshed(optimizer.theta, state, start, answer.theta_tiled)

    def stepped(self, start_levels: dict[str, int]) -> None:
        self.levels = step_levels(start_levels, self.aggregate_level, self.config, self.poly)[0]

    def fallback(self, exchange: Exchange, round_: int, nodes: list[int], refresher: int, outcome: RoundOutcome,
                 optimizer: HEAdamState | None, theta: dict[str, ArrayRecord]) -> Refreshed | None:
        """Ask the round's other participants, one at a time, until one refreshes."""
        for node in [n for n in nodes if n != refresher]:
            log.info("round %d: the refresher failed; asking %s", round_, exchange.organizations.name(node))
            packed, masks = self.request(round_, optimizer)
            msg = exchange.message(node, round_, len(nodes), messages.REFRESH,
                                   {**theta, messages.REFRESH_REQUEST: packed}, init_config(optimizer))
            read = lambda _node, reply, m=masks: self.take(reply, round_, m, optimizer)  # noqa: E731
            for _, refreshed in exchange.collect([msg], read, outcome, "refresh"):
                return refreshed
        return None


def init_config(optimizer: HEAdamState | None) -> dict:
    """``init`` while the coordinator holds no theta: participants start from the scenario's."""
    return {"init": True} if optimizer is None else {}
