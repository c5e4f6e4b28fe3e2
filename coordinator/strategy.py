"""The coordinator's round logic as a Flower Strategy: encrypted sum, HE-Adam, masked refresh.

One round (threat-model.md): send Enc(theta) to the sampled participants (and the masked
optimizer state to one refresher), sum update ciphertexts as replies arrive (memory O(model)),
unmask the refreshed state, take one HE-Adam step, checkpoint. Participants that fail or time
out are skipped while at least ``min_participants`` answered; a missing refresh is retried with
another participant; a round that cannot complete changes nothing already learned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from coordinator.checkpoint import CoordinatorState, load_checkpoint, save_checkpoint
from coordinator.he_adam import (
    HEAdamConfig,
    HEAdamState,
    Masks,
    he_adam_step,
    initial_optimizer_state,
    mask_state,
    unmask_state,
)
from coordinator.privacy import effective_noise_multiplier, rdp_epsilon
from coordinator.report import append_metrics, is_solved, read_metrics, truncate_metrics
from coordinator.robust import (
    DEFENSES,
    ROBUST_DEFENSES,
    DefenseError,
    check_profile_supports,
    clip_factors,
    masked_squared_norms,
    unmask_squared_norms,
    weighted_sum,
)
from protos import messages
from protos.backend import HEBackend
from protos.codec import PROTOCOL_VERSION, EncryptedVector, from_proto, map_chunks, to_proto
from protos.errors import WireError
from protos.fedhe.v1 import wire_pb2

log = logging.getLogger("fedhe.coordinator")
POLL_SECONDS = 0.05


@dataclass
class RoundOutcome:
    round: int
    completed: bool
    answered: int
    failed: list[str] = field(default_factory=list)
    he_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0


class StreamingSum:
    """Adds ciphertext vectors as they arrive; never holds more than one per stream.

    ``keep=True`` (robust aggregation) keeps the individual vectors instead: the sum is then
    formed after the masked-norm exchange, with per-update factors.
    """

    def __init__(self, backend: HEBackend, keep: bool = False) -> None:
        self.backend, self.total, self.count = backend, None, 0
        self.kept: list[EncryptedVector] | None = [] if keep else None

    def add(self, vec: EncryptedVector) -> None:
        if self.kept is not None:
            self.kept.append(vec)
        else:
            self.total = vec if self.total is None else map_chunks(self.backend.add, self.total, vec)
        self.count += 1


class HEAdamStrategy(Strategy):
    """Encrypted federated training with HE-Adam. ``start`` runs the whole federation."""

    def __init__(
        self,
        backend: HEBackend,
        config: HEAdamConfig,
        scenario_name: str,
        num_params: int,
        out_dir: Path,
        *,
        participants: int = 0,
        min_participants: int = 1,
        round_timeout: float = 600.0,
        release_metrics: bool = True,
        reward_threshold: float | None = None,
        stop_on_solve: bool = False,
        on_round: Callable[[RoundOutcome, dict | None], None] | None = None,
        seed: int = 0,
        defense: str = "none",
        defense_bound: float = 0.0,
        dp_noise_multiplier: float = 0.0,
        dp_delta: float = 1e-5,
    ) -> None:
        self.backend, self.config = backend, config
        self.poly = config.validate(backend.profile)
        self.scenario_name, self.num_params = scenario_name, num_params
        self.out_dir = Path(out_dir)
        self.participants, self.min_participants = participants, max(1, min_participants)
        self.round_timeout, self.release = round_timeout, release_metrics
        self.threshold, self.stop_on_solve, self.on_round = reward_threshold, stop_on_solve, on_round
        self.rng = np.random.default_rng(seed + 7919)
        self.state = CoordinatorState()
        if defense not in DEFENSES:
            raise DefenseError(f"unknown defense {defense!r}; known: {', '.join(DEFENSES)}")
        check_profile_supports(defense, backend.profile.levels, config.depth, backend.profile.name)
        if defense == "dp" and dp_noise_multiplier <= 0:
            raise DefenseError("defense dp needs a noise multiplier z > 0 (dp-noise-multiplier)")
        self.defense, self.dp_z, self.dp_delta = defense, dp_noise_multiplier, dp_delta
        self.defense_bound = defense_bound if defense_bound > 0 else config.clip_bound  # in update units (C)
        self.dp_history: list[float] = []  # effective noise multiplier per completed round
        self._round_extra: dict = {}

    # -- Flower Strategy interface --------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = self._sample(list(grid.get_node_ids()))
        messages_, _ = self._train_messages(server_round, nodes, nodes[(server_round - 1) % len(nodes)])
        return messages_

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the update ciphertexts of ``replies`` (used by ``start`` one reply at a time)."""
        updates, stats = StreamingSum(self.backend), StreamingSum(self.backend)
        for reply in replies:
            self._add_update(server_round, reply, updates, stats)
        return None, MetricRecord({"answered": updates.count})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # evaluation happens at participants (released rollout stats) and `fedhe evaluate`

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "HE-Adam on %s (%s, fingerprint %s…): lr=%g b1=%g b2=%g C=%g tau=%.3g P deg %d on [%.3g, %.3g]",
            self.scenario_name, self.backend.profile.name, self.backend.fingerprint[:12], self.config.lr,
            self.config.beta1, self.config.beta2, self.config.clip_bound, self.config.tau_value,
            self.config.degree, *self.poly.interval,
        )

    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable | None = None,
        resume: bool = False,
    ) -> Result:
        self.summary()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.state = load_checkpoint(self.out_dir, self.backend, self.scenario_name, self.num_params)
            truncate_metrics(self.out_dir, max((h.round for h in self.state.history), default=0))
            self.dp_history = [r["dp_z"] for r in read_metrics(self.out_dir) if r.get("dp_z")]
            log.info("resumed from round %d", self.state.round)
        result = Result()
        for server_round in range(self.state.round + 1, num_rounds + 1):
            outcome = self.run_round(grid, server_round)
            rows = read_metrics(self.out_dir)
            if self.on_round:
                self.on_round(outcome, rows[-1] if rows else None)
            if self.stop_on_solve and is_solved(rows, self.threshold):
                log.info("solved at round %d: stopping", server_round)
                break
        self._final_release(grid)
        return result

    # -- one round --------------------------------------------------------------------------------
    def run_round(self, grid: Grid, server_round: int) -> RoundOutcome:
        t0 = time.perf_counter()
        nodes = self._wait_for_nodes(grid)
        refresher = nodes[(server_round - 1) % len(nodes)]
        outgoing, masks = self._train_messages(server_round, nodes, refresher)
        outcome = RoundOutcome(server_round, False, 0)
        outcome.bytes_down = sum(messages.payload_bytes(m.content) for m in outgoing)
        updates, stats = StreamingSum(self.backend, keep=self.defense in ROBUST_DEFENSES), StreamingSum(self.backend)
        refreshed: tuple[EncryptedVector, dict] | None = None
        self._round_extra = {}
        for reply in self._stream(grid, outgoing):
            outcome.bytes_up += messages.payload_bytes(reply.content) if not reply.has_error() else 0
            if self._add_update(server_round, reply, updates, stats, outcome.failed) and reply.metadata.src_node_id == refresher:
                refreshed = self._take_refresh(reply, masks, server_round, outcome.failed)
        outcome.answered = updates.count
        if updates.count < self.min_participants:
            log.warning("round %d: only %d of %d participants answered (minimum %d); state unchanged: %s",
                        server_round, updates.count, len(nodes), self.min_participants, outcome.failed)
            return self._finish(outcome, t0, completed=False)
        if refreshed is None:
            refreshed = self._fallback_refresh(grid, server_round, nodes, refresher, outcome)
            if refreshed is None:
                log.warning("round %d: no participant could refresh the state; state unchanged", server_round)
                return self._finish(outcome, t0, completed=False)
        theta, state = refreshed
        t_he = time.perf_counter()
        aggregate = updates.total
        if updates.kept is not None:
            aggregate = self._robust_aggregate(grid, server_round, nodes, refresher, updates.kept, outcome)
            if aggregate is None:
                log.warning("round %d: no key holder answered the norm query; state unchanged", server_round)
                return self._finish(outcome, t0, completed=False)
        step = he_adam_step(self.backend, HEAdamState(theta, **state, step=server_round - 1), aggregate, self.config, self.poly)
        outcome.he_ms = (time.perf_counter() - t_he) * 1e3
        if self.dp_z > 0:
            z_eff = effective_noise_multiplier(self.dp_z, updates.count, len(nodes))
            self.dp_history.append(z_eff)
            self._round_extra.update(dp_z=round(z_eff, 6), dp_epsilon=round(rdp_epsilon(self.dp_history, self.dp_delta), 4))
        self.state.optimizer = step.state
        self.state.pending_stats = stats.total
        return self._finish(outcome, t0, completed=True)

    def _finish(self, outcome: RoundOutcome, t0: float, completed: bool) -> RoundOutcome:
        outcome.completed = completed
        outcome.wall_s = time.perf_counter() - t0
        self.state.round = outcome.round
        if completed:
            self.state.pending_round = {
                "round": outcome.round, "wall_s": round(outcome.wall_s, 3), "bytes_up": outcome.bytes_up,
                "bytes_down": outcome.bytes_down, "he_ms": round(outcome.he_ms, 1), "participants": outcome.answered,
                **self._round_extra,
            }
        save_checkpoint(self.out_dir, self.backend, self.scenario_name, self.config.to_json(), self.state)
        return outcome

    # -- robust aggregation -----------------------------------------------------------------------
    def _robust_aggregate(
        self, grid: Grid, server_round: int, nodes: list[int], refresher: int, kept: list[EncryptedVector], outcome: RoundOutcome
    ) -> EncryptedVector | None:
        """Masked-norm exchange with one key holder, then sum_i f_i Enc(u_i) (coordinator/robust.py)."""
        masked, masks = masked_squared_norms(self.backend, kept, self.rng)
        query = wire_pb2.NormQuery(protocol_version=PROTOCOL_VERSION, round=server_round)
        for vec in masked:
            query.masked.append(to_proto(self.backend, vec))
        packed = messages.pack(query)
        for node in [refresher] + [n for n in nodes if n != refresher]:
            content = RecordDict({messages.CONFIG: self._base_config(server_round, 0.0), messages.NORM_QUERY: packed})
            msg = Message(content, dst_node_id=node, message_type=messages.NORMS, group_id=str(server_round))
            outcome.bytes_down += messages.payload_bytes(content)
            for reply in self._stream(grid, [msg]):
                if reply.has_error():
                    self._fail(outcome.failed, node, f"norm query error: {reply.error.reason}")
                    continue
                try:
                    answer = messages.unpack(reply.content, messages.NORM_REPLY, wire_pb2.NormReply)
                    if answer.round != server_round:
                        raise WireError(f"norm reply is for round {answer.round}")
                    norms = np.sqrt(unmask_squared_norms(list(answer.masked_sums), masks))
                except (WireError, ValueError) as exc:
                    self._fail(outcome.failed, node, f"rejected norm reply: {exc}")
                    continue
                bound = self.defense_bound * self.config.update_scale / len(nodes)  # C in pre-weighted, pre-scaled units
                factors = clip_factors(norms, self.defense, bound)
                self._round_extra.update(defense=self.defense, clipped=int(np.sum(factors < 1.0)))
                return weighted_sum(self.backend, kept, factors)
        return None

    def summary_fields(self) -> dict:
        """Defense and privacy fields for summary.json."""
        out: dict = {"defense": self.defense}
        if self.dp_z > 0:
            out.update(dp_noise_multiplier=self.dp_z, dp_delta=self.dp_delta, dp_rounds=len(self.dp_history),
                       dp_epsilon=round(rdp_epsilon(self.dp_history, self.dp_delta), 4))
        else:
            out.update(dp_epsilon=None)
        return out

    # -- messages ---------------------------------------------------------------------------------
    def _sample(self, node_ids: list[int]) -> list[int]:
        nodes = sorted(node_ids)
        return nodes[: self.participants] if self.participants else nodes

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.monotonic() + self.round_timeout
        while True:
            nodes = self._sample(list(grid.get_node_ids()))
            if len(nodes) >= max(self.min_participants, self.participants or 1):
                return nodes
            if time.monotonic() > deadline:
                if len(nodes) >= self.min_participants:
                    return nodes
                raise TimeoutError(f"only {len(nodes)} participants connected; need {self.min_participants}")
            time.sleep(0.5)

    def _base_config(self, server_round: int, weight: float) -> ConfigRecord:
        return ConfigRecord({
            "round": server_round, "weight": weight, "key-fingerprint": self.backend.fingerprint,
            "protocol-version": PROTOCOL_VERSION,
        })

    def _refresh_request(self, server_round: int) -> tuple[wire_pb2.RefreshRequest, Masks | None]:
        request = wire_pb2.RefreshRequest(protocol_version=PROTOCOL_VERSION, round=server_round)
        masks = None
        if self.state.optimizer is not None:
            masked, masks = mask_state(self.backend, self.state.optimizer.named(), self.rng)
            for name, vec in masked.items():
                request.masked_state[name].CopyFrom(to_proto(self.backend, vec))
        if self.release:
            self._attach_stats(request)
        return request, masks

    def _attach_stats(self, request: wire_pb2.RefreshRequest) -> None:
        """Ask the key holder to release the last completed round's summed rollout stats."""
        if self.state.pending_stats is not None:
            request.stats_to_release.CopyFrom(to_proto(self.backend, self.state.pending_stats))
            request.stats_round = self.state.pending_round.get("round", 0)

    def _theta_record(self) -> ArrayRecord | None:
        if self.state.optimizer is None:
            return None
        return messages.pack(to_proto(self.backend, self.state.optimizer.theta))

    def _train_messages(self, server_round: int, nodes: list[int], refresher: int) -> tuple[list[Message], Masks | None]:
        theta = self._theta_record()
        request, masks = self._refresh_request(server_round)
        out = []
        for node in nodes:
            content = RecordDict({messages.CONFIG: self._base_config(server_round, 1.0 / len(nodes))})
            if theta is not None:
                content[messages.THETA] = theta
            if node == refresher:
                content[messages.REFRESH_REQUEST] = messages.pack(request)
            out.append(Message(content, dst_node_id=node, message_type=messages.TRAIN, group_id=str(server_round)))
        return out, masks

    def _stream(self, grid: Grid, outgoing: list[Message]) -> Iterable[Message]:
        """Yield replies as they arrive until all are in or the round times out."""
        pending = {i for i in grid.push_messages(outgoing) if i}
        deadline = time.monotonic() + self.round_timeout
        while pending and time.monotonic() < deadline:
            replies = list(grid.pull_messages(pending))
            for reply in replies:
                pending.discard(reply.metadata.reply_to_message_id)
                yield reply
            if not replies:
                time.sleep(POLL_SECONDS)
        if pending:
            log.warning("%d participant(s) timed out after %.0f s", len(pending), self.round_timeout)

    # -- replies ----------------------------------------------------------------------------------
    def _add_update(self, server_round: int, reply: Message, updates: StreamingSum, stats: StreamingSum, failed: list[str] | None = None) -> bool:
        node = reply.metadata.src_node_id
        if reply.has_error():
            self._fail(failed, node, f"error: {reply.error.reason}")
            return False
        try:
            update = messages.unpack(reply.content, messages.UPDATE, wire_pb2.ParticipantUpdate)
            if update.protocol_version != PROTOCOL_VERSION or update.round != server_round:
                raise WireError(f"update is for round {update.round}, this is round {server_round}")
            vec = from_proto(self.backend, update.update, expected_length=self.num_params, require_full_depth=True)
            st = from_proto(self.backend, update.rollout_stats, expected_length=messages.STATS_LENGTH)
        except WireError as exc:
            self._fail(failed, node, f"rejected update: {exc}")
            return False
        updates.add(vec)
        stats.add(st)
        return True

    def _take_refresh(self, reply: Message, masks: Masks | None, server_round: int, failed: list[str]):
        node = reply.metadata.src_node_id
        try:
            answer = messages.unpack(reply.content, messages.REFRESH_REPLY, wire_pb2.RefreshReply)
            if answer.round != server_round or not answer.HasField("theta"):
                raise WireError("refresh reply is for another round or lacks theta")
            theta = from_proto(self.backend, answer.theta, expected_length=self.num_params, require_full_depth=True)
            fresh = {k: from_proto(self.backend, v, expected_length=self.num_params, require_full_depth=True)
                     for k, v in answer.state.items()}
            state = unmask_state(self.backend, fresh, masks) if masks else initial_optimizer_state(self.backend, self.num_params)
        except (WireError, ValueError) as exc:
            self._fail(failed, node, f"rejected refresh: {exc}")
            return None
        if answer.HasField("released"):
            self._record_release(answer.released)
        return theta, state

    def _fallback_refresh(self, grid: Grid, server_round: int, nodes: list[int], refresher: int, outcome: RoundOutcome):
        for node in [n for n in nodes if n != refresher]:
            log.info("round %d: refresher %s failed; asking %s", server_round, refresher, node)
            request, masks = self._refresh_request(server_round)
            content = RecordDict({messages.CONFIG: self._base_config(server_round, 0.0), messages.REFRESH_REQUEST: messages.pack(request)})
            theta = self._theta_record()
            if theta is not None:
                content[messages.THETA] = theta
            else:
                content[messages.CONFIG]["init"] = True
            msg = Message(content, dst_node_id=node, message_type=messages.REFRESH, group_id=str(server_round))
            for reply in self._stream(grid, [msg]):
                if reply.has_error():
                    self._fail(outcome.failed, node, f"refresh error: {reply.error.reason}")
                    continue
                refreshed = self._take_refresh(reply, masks, server_round, outcome.failed)
                if refreshed is not None:
                    return refreshed
        return None

    def _final_release(self, grid: Grid) -> None:
        """Release the last round's stats (no training, no state)."""
        if not self.release or self.state.pending_stats is None:
            return
        nodes = self._sample(list(grid.get_node_ids()))
        request = wire_pb2.RefreshRequest(protocol_version=PROTOCOL_VERSION, round=self.state.round + 1)
        self._attach_stats(request)
        for node in nodes:
            content = RecordDict({messages.CONFIG: self._base_config(self.state.round + 1, 0.0),
                                  messages.REFRESH_REQUEST: messages.pack(request)})
            msg = Message(content, dst_node_id=node, message_type=messages.REFRESH, group_id="release")
            for reply in self._stream(grid, [msg]):
                try:
                    answer = messages.unpack(reply.content, messages.REFRESH_REPLY, wire_pb2.RefreshReply)
                except WireError as exc:
                    log.warning("final release by %s failed: %s", node, exc)
                    continue
                if answer.HasField("released"):
                    self._record_release(answer.released)
                    self.state.pending_stats = None
                    save_checkpoint(self.out_dir, self.backend, self.scenario_name, self.config.to_json(), self.state)
                    return

    def _record_release(self, released: wire_pb2.ReleasedMetrics) -> None:
        pending = self.state.pending_round
        if not pending or pending.get("round") != released.round:
            return
        row = dict(pending)
        row.update(mean_return=released.mean_return if released.valid else None,
                   episodes=int(released.episodes), steps=int(released.steps))
        append_metrics(self.out_dir, row)
        self.state.history.append(released)
        self.state.pending_round = {}

    @staticmethod
    def _fail(failed: list[str] | None, node: int, reason: str) -> None:
        log.warning("participant node %s: %s", node, reason)
        if failed is not None:
            failed.append(f"{node}: {reason}")
