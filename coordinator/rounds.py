"""The coordinator's round loop: encrypted sum, HE-Adam, masked refresh (docs/threat-model.md).

One round: send Enc(theta) to the sampled participants (and the masked optimizer state to one
refresher), sum update ciphertexts as replies arrive (memory O(model)), unmask the refreshed
state, take one HE-Adam step, checkpoint. Participants that fail, time out or send a reply that
does not validate are recorded and skipped while at least ``min_participants`` answered; a
missing refresh is retried with another participant. A round that cannot complete changes
nothing: the next round starts from the same state (round 1 included).

This is not a Flower ``Strategy``: Flower's strategies aggregate plaintext arrays with hooks this
protocol has no use for, so the loop drives Flower's ``Grid`` directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.checkpoint import CheckpointWriter, CoordinatorState, load_checkpoint
from coordinator.dp_accounting import effective_noise_multiplier, rdp_epsilon
from coordinator.encrypted_gradient import GradientSum, RolloutPlan, mask_for_collapse, unmask_collapsed
from coordinator.he_adam import (
    STATE_NAMES,
    HEAdamConfig,
    HEAdamState,
    Masks,
    initial_optimizer_state,
    mask_state,
    refresh_due,
    step_levels,
    unmask_state,
)
from coordinator.parallel_step import parallel_he_adam_step
from coordinator.replies import (
    RefreshAnswer,
    read_gradient,
    read_mask_correction,
    read_norms,
    read_refresh,
    read_rollout,
    read_update,
)
from coordinator.report import append_metrics, is_solved, read_metrics, truncate_metrics
from coordinator.robust_aggregation import (
    DEFENSES,
    ROBUST_DEFENSES,
    DefenseError,
    NormMasks,
    check_profile_supports,
    clip_factors,
    masked_squared_norms,
    unmask_squared_norms,
    weighted_sum,
)
from coordinator.unmasking import MaskedRound, check_masking
from protos import messages
from protos.backend import HEBackend
from protos.chunk_workers import ChunkWorkers
from protos.codec import PROTOCOL_VERSION, EncryptedVector, map_chunks, to_proto
from protos.errors import WireError
from protos.fedhe.v1 import wire_pb2
from protos.phase_timer import PhaseTimer
from protos.rollout_layout import BlockLayout
from protos.update_units import UpdateUnits

log = logging.getLogger("fedhe.coordinator")
POLL_SECONDS = 0.05
T = TypeVar("T")


@dataclass
class RoundOutcome:
    round: int
    completed: bool = False
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    he_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    extras: dict = field(default_factory=dict)  # defense and DP fields of this round's metrics row
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # the coordinator's own costs, per phase

    def fail(self, node: int, reason: str) -> None:
        """One line per failed participant round; participants' own error replies already name
        themselves and the round ("participant 1, round 3: ...")."""
        line = reason if reason.startswith("participant ") else f"participant node {node}, round {self.round}: {reason}"
        log.warning("%s", line)
        self.failed.append(line)


class RoundSums:
    """Update and statistics ciphertexts summed as they arrive; one vector per stream.

    ``keep=True`` (robust aggregation) keeps the individual updates instead: the sum is then
    formed after the masked-norm exchange, with per-update factors.
    """

    def __init__(self, backend: HEBackend, keep: bool = False) -> None:
        self.backend, self.count = backend, 0
        self.update: EncryptedVector | None = None
        self.stats: EncryptedVector | None = None
        self.kept: list[EncryptedVector] | None = [] if keep else None

    def add(self, update: EncryptedVector | None, stats: EncryptedVector) -> None:
        """Both sums change or neither does (``update`` None: encrypted rollouts carry none)."""
        new_stats = stats if self.stats is None else map_chunks(self.backend.add, self.stats, stats)
        if update is None:
            pass
        elif self.kept is None:
            self.update = update if self.update is None else map_chunks(self.backend.add, self.update, update)
        else:
            self.kept.append(update)
        self.stats = new_stats
        self.count += 1

    def correct(self, update: EncryptedVector, stats: EncryptedVector) -> None:
        """Pairwise masking: add a participant's mask correction to both sums (not an update: no count)."""
        if self.update is None or self.stats is None:
            raise WireError("a mask correction arrived for a round without updates")
        new_update = map_chunks(self.backend.add, self.update, update)
        self.stats = map_chunks(self.backend.add, self.stats, stats)
        self.update = new_update


class HEAdamCoordinator:
    """Encrypted federated training with HE-Adam; ``run`` drives the whole federation."""

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
        defense: str = "none",
        defense_bound: float = 0.0,
        dp_noise_multiplier: float = 0.0,
        dp_delta: float = 1e-5,
        rollouts: RolloutPlan | None = None,
        masking: str = "off",
    ) -> None:
        """``rollouts``: the encrypted-rollout mode (the coordinator learns from encrypted rollouts);
        None: local-ppo (participants send updates). ``masking``: pairwise (participants mask their
        updates, ``coordinator/unmasking.py``) or off."""
        self.backend, self.config, self.rollouts = backend, config, rollouts
        self.workers = ChunkWorkers(backend)  # processes start only for a multi-chunk model
        self.poly = config.validate(backend.profile)
        self.scenario_name, self.num_params = scenario_name, num_params
        self.out_dir = Path(out_dir)
        self.participants, self.min_participants = participants, max(1, min_participants)
        self.round_timeout, self.release = round_timeout, release_metrics
        self.threshold, self.stop_on_solve, self.on_round = reward_threshold, stop_on_solve, on_round
        self.state = CoordinatorState()
        if defense not in DEFENSES:
            raise DefenseError(f"unknown defense {defense!r}; known: {', '.join(DEFENSES)}")
        check_profile_supports(defense, backend.profile.levels, config.depth, backend.profile.name)
        if defense == "dp" and dp_noise_multiplier <= 0:
            raise DefenseError("defense dp needs a noise multiplier z > 0 (dp-noise-multiplier)")
        self.defense, self.dp_z, self.dp_delta = defense, dp_noise_multiplier, dp_delta
        check_masking(masking, defense, ROBUST_DEFENSES, rollouts is not None)
        self.masking = masking
        self.defense_bound = defense_bound if defense_bound > 0 else config.clip_bound  # in update units (C)
        self.dp_history: list[float] = []  # effective noise multiplier per completed round
        self.failed_rounds: list[dict] = []  # rounds that changed nothing, with every cause
        self.excluded: set[int] = set()  # nodes told once that they hold another federation's key
        self.checkpoints = CheckpointWriter(self.out_dir, backend, scenario_name, config.to_json())
        # levels each state vector has used, tracked by a dry run of every step (the same for the
        # plaintext baseline); None until the first step or after a resume: then all are refreshed
        self.levels: dict[str, int] | None = None

    def describe(self) -> None:
        log.info(
            "HE-Adam on %s (%s, fingerprint %s…): lr=%g b1=%g b2=%g C=%g tau=%.3g P deg %d on [%.3g, %.3g]",
            self.scenario_name,
            self.backend.profile.name,
            self.backend.fingerprint[:12],
            self.config.lr,
            self.config.beta1,
            self.config.beta2,
            self.config.clip_bound,
            self.config.tau_value,
            self.config.degree,
            *self.poly.interval,
        )

    def run(self, grid: Grid, num_rounds: int, resume: bool = False) -> None:
        self.describe()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.state = load_checkpoint(
                self.out_dir, self.backend, self.scenario_name, self.num_params, self.config.to_json()
            )
            truncate_metrics(self.out_dir, max((h.round for h in self.state.history), default=0))
            self.dp_history = [r["dp_z"] for r in read_metrics(self.out_dir) if r.get("dp_z")]
            log.info("resumed from round %d", self.state.round)
        try:
            for server_round in range(self.state.round + 1, num_rounds + 1):
                outcome = self.run_round(grid, server_round)
                rows = read_metrics(self.out_dir)
                if self.on_round:
                    self.on_round(outcome, rows[-1] if rows else None)
                if self.stop_on_solve and is_solved(rows, self.threshold):
                    log.info("solved at round %d: stopping", server_round)
                    break
            self._final_release(grid)
        finally:
            try:
                self.checkpoints.close()  # the last round's write completes even on the way out
            finally:
                self.workers.close()

    # -- one round --------------------------------------------------------------------------------
    def run_round(self, grid: Grid, server_round: int) -> RoundOutcome:
        t0 = time.perf_counter()
        outcome = RoundOutcome(server_round)
        nodes = self._wait_for_nodes(grid)
        refresher = nodes[(server_round - 1) % len(nodes)]
        with outcome.timer.phase("messages_out"):
            outgoing, masks = self.train_messages(server_round, nodes, refresher)
        outcome.bytes_down = sum(messages.payload_bytes(m.content) for m in outgoing)
        self.checkpoints.start()  # last round's checkpoint, written while participants train
        sums = RoundSums(self.backend, keep=self.defense in ROBUST_DEFENSES)
        refreshed: tuple[EncryptedVector, dict, EncryptedVector | None, dict[str, int]] | None = None
        layout = self.rollouts.layout(len(nodes)) if self.rollouts else None
        uploads: list[list[EncryptedVector]] = []
        masked = MaskedRound() if self.masking == "pairwise" else None

        def read_train(reply: Message) -> Message:
            if layout is None:
                with outcome.timer.phase("read_updates"):
                    update = read_update(self.backend, reply, server_round, self.num_params, masked)
                with outcome.timer.phase("sum"):
                    sums.add(*update)
            else:
                blocks, stats = read_rollout(self.backend, reply, server_round, layout.block_vectors * layout.slots,
                                             self.rollouts.blocks(layout))
                sums.add(None, stats)
                uploads.append(blocks)
            return reply

        for node, reply in self._exchange(grid, outgoing, read_train, outcome, "update"):
            if node == refresher:
                with outcome.timer.phase("refresh_in"):
                    refreshed = self._guarded(
                        outcome, node, "refresh", lambda r=reply: self._take_refresh(r, masks, server_round)
                    )
        outcome.answered = sums.count
        if sums.count < self.min_participants:
            log.warning(
                "round %d: only %d of %d participants answered (minimum %d); state unchanged",
                server_round,
                sums.count,
                len(nodes),
                self.min_participants,
            )
            return self._finish(outcome, t0)
        if masked is not None and masked.dropped and not self._unmask(grid, server_round, nodes, masked, sums, outcome):
            log.warning("round %d: a participant did not cancel its masks with the missing; state unchanged",
                        server_round)
            return self._finish(outcome, t0)
        if refreshed is None:
            refreshed = self._fallback_refresh(grid, server_round, nodes, refresher, outcome)
            if refreshed is None:
                log.warning("round %d: no participant could refresh the state; state unchanged", server_round)
                return self._finish(outcome, t0)
        theta, state, theta_tiled, start_levels = refreshed
        t_he = time.perf_counter()
        aggregate = sums.update
        if layout is not None:
            aggregate = self._rollout_gradient(grid, server_round, nodes, refresher, layout, theta_tiled, uploads,
                                               outcome)
            if aggregate is None:
                log.warning("round %d: no key holder collapsed the gradient; state unchanged", server_round)
                return self._finish(outcome, t0)
        if sums.kept is not None:
            aggregate = self._robust_aggregate(grid, server_round, nodes, refresher, sums.kept, outcome)
            if aggregate is None:
                log.warning("round %d: no key holder answered the norm query; state unchanged", server_round)
                return self._finish(outcome, t0)
        with outcome.timer.phase("he_adam"):
            step = parallel_he_adam_step(
                self.workers, HEAdamState(theta, **state, step=self._steps()), aggregate, self.config, self.poly
            )
        outcome.he_ms = (time.perf_counter() - t_he) * 1e3
        self.levels = step_levels(start_levels, self._aggregate_level(), self.config, self.poly)[0]
        if self.dp_z > 0:
            z_eff = effective_noise_multiplier(self.dp_z, sums.count, len(nodes))
            self.dp_history.append(z_eff)
            outcome.extras.update(
                dp_z=round(z_eff, 6), dp_epsilon=round(rdp_epsilon(self.dp_history, self.dp_delta), 4)
            )
        self.state.optimizer = step.state
        self.state.pending_stats = sums.stats
        outcome.completed = True
        return self._finish(outcome, t0)

    def _steps(self) -> int:
        return self.state.optimizer.step if self.state.optimizer is not None else 0

    def _finish(self, outcome: RoundOutcome, t0: float) -> RoundOutcome:
        """Checkpoint a completed round; a failed one leaves state and checkpoint as they were."""
        outcome.wall_s = time.perf_counter() - t0
        if outcome.completed:
            self.state.round = outcome.round
            self.state.pending_round = {
                "round": outcome.round,
                "wall_s": round(outcome.wall_s, 3),
                "bytes_up": outcome.bytes_up,
                "bytes_down": outcome.bytes_down,
                "he_ms": round(outcome.he_ms, 1),
                "participants": outcome.answered,
                "failed": outcome.failed,
                **outcome.extras,
            }
            self.state.pending_round["phases_ms"] = outcome.timer.rounded()  # kept in the checkpoint, for a resume
            with outcome.timer.phase("checkpoint"):  # a snapshot: the write overlaps the next round's wait
                self._save(defer=True)
            self.state.pending_round["phases_ms"] = outcome.timer.rounded()  # the live row: with the snapshot
        else:
            causes = outcome.failed or [f"round {outcome.round}: only {outcome.answered} participant(s) answered"]
            self.failed_rounds.append({"round": outcome.round, "failed": causes})
        return outcome

    def _save(self, *, defer: bool = False) -> None:
        self.checkpoints.save(self.state, defer=defer)

    # -- encrypted rollouts -----------------------------------------------------------------------
    def _rollout_gradient(
        self, grid: Grid, server_round: int, nodes: list[int], refresher: int, layout: BlockLayout,
        theta_tiled: EncryptedVector | None, uploads: list[list[EncryptedVector]], outcome: RoundOutcome,
    ) -> EncryptedVector | None:
        """Backpropagate on every owner's encrypted blocks, then the second exchange collapses the sums."""
        if theta_tiled is None:
            raise WireError("the refresh carried no tiled theta")
        gradient = GradientSum(self.backend, layout)
        for blocks in uploads:
            for block in blocks:
                gradient.add_block(theta_tiled.chunks, block.chunks)
        masked, masks = mask_for_collapse(self.backend, gradient.result())
        query = wire_pb2.GradientQuery(protocol_version=PROTOCOL_VERSION, round=server_round)
        for vec in masked:
            query.masked.append(to_proto(self.backend, vec))
        packed = messages.pack(query)
        for node in [refresher] + [n for n in nodes if n != refresher]:
            msg = self._message(node, server_round, len(nodes), messages.GRADIENT, {messages.GRADIENT_QUERY: packed})
            outcome.bytes_down += messages.payload_bytes(msg.content)
            read = lambda reply: read_gradient(self.backend, reply, server_round, self.num_params)  # noqa: E731
            for _, dense in self._exchange(grid, [msg], read, outcome, "gradient"):
                return unmask_collapsed(self.backend, dense, masks, layout)
        return None

    # -- pairwise masking -------------------------------------------------------------------------
    def _unmask(
        self, grid: Grid, server_round: int, nodes: list[int], masked: MaskedRound, sums: RoundSums,
        outcome: RoundOutcome,
    ) -> bool:
        """The round's set is fixed: every participant in it cancels its masks with the missing ones.

        One message per sender, all at once; the round completes only if every one of them answers.
        """
        t0 = time.perf_counter()
        packed = messages.pack(masked.correction_request(server_round))
        senders = set(masked.nodes.values())
        outgoing = [self._message(node, server_round, len(nodes), messages.UNMASK,
                                  {messages.MASK_CORRECTION_REQUEST: packed}) for node in sorted(senders)]
        outcome.bytes_down += sum(messages.payload_bytes(m.content) for m in outgoing)
        read = lambda reply: read_mask_correction(self.backend, reply, server_round, self.num_params)  # noqa: E731
        corrected: set[int] = set()
        for node, (update, stats) in self._exchange(grid, outgoing, read, outcome, "mask correction"):
            if node in senders - corrected:
                sums.correct(update, stats)
                corrected.add(node)
        outcome.extras.update(mask_dropped=masked.dropped, unmask_ms=round((time.perf_counter() - t0) * 1e3, 1))
        return corrected == senders

    # -- robust aggregation -----------------------------------------------------------------------
    def norm_query(self, server_round: int, kept: list[EncryptedVector]) -> tuple[ArrayRecord, NormMasks]:
        """The masked squared norms a key holder sums (coordinator/robust_aggregation.py)."""
        masked, masks = masked_squared_norms(self.backend, kept)
        query = wire_pb2.NormQuery(protocol_version=PROTOCOL_VERSION, round=server_round)
        for vec in masked:
            query.masked.append(to_proto(self.backend, vec))
        return messages.pack(query), masks

    def _robust_aggregate(
        self,
        grid: Grid,
        server_round: int,
        nodes: list[int],
        refresher: int,
        kept: list[EncryptedVector],
        outcome: RoundOutcome,
    ) -> EncryptedVector | None:
        """Masked-norm exchange with one key holder, then sum_i f_i Enc(u_i)."""
        packed, masks = self.norm_query(server_round, kept)
        for node in [refresher] + [n for n in nodes if n != refresher]:
            msg = self._message(node, server_round, len(nodes), messages.NORMS, {messages.NORM_QUERY: packed})
            outcome.bytes_down += messages.payload_bytes(msg.content)
            read = lambda reply: unmask_squared_norms(read_norms(reply, server_round, len(kept)), masks)  # noqa: E731
            for _, squared in self._exchange(grid, [msg], read, outcome, "norm reply"):
                bound = UpdateUnits.of(self.config, len(nodes)).bound(self.defense_bound)
                factors = clip_factors(np.sqrt(squared), self.defense, bound)
                outcome.extras.update(defense=self.defense, clipped=int(np.sum(factors < 1.0)))
                return weighted_sum(self.backend, kept, factors)
        return None

    def summary_fields(self) -> dict:
        """Defense and privacy fields for summary.json."""
        out: dict = {"defense": self.defense, "masking": self.masking, "failed_rounds": self.failed_rounds}
        if self.dp_z > 0:
            out.update(
                dp_noise_multiplier=self.dp_z,
                dp_delta=self.dp_delta,
                dp_rounds=len(self.dp_history),
                dp_epsilon=round(rdp_epsilon(self.dp_history, self.dp_delta), 4),
            )
        else:
            out.update(dp_epsilon=None)
        return out

    # -- messages ---------------------------------------------------------------------------------
    def _sample(self, node_ids: list[int]) -> list[int]:
        nodes = sorted(n for n in node_ids if n not in self.excluded)
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
            self.checkpoints.start()  # no round starts soon: write the last one now
            time.sleep(0.5)

    def _message(
        self,
        node: int,
        server_round: int,
        participants: int,
        kind: str,
        arrays: dict[str, ArrayRecord],
        group: str | None = None,
    ) -> Message:
        """Every message carries the round's public metadata; ``init`` while there is no theta yet."""
        config = ConfigRecord(
            {
                "round": server_round,
                "participants": participants,
                "key-fingerprint": self.backend.fingerprint,
                "protocol-version": PROTOCOL_VERSION,
            }
        )
        if self.state.optimizer is None:
            config["init"] = True
        content = RecordDict({messages.CONFIG: config, **arrays})
        return Message(content, dst_node_id=node, message_type=kind, group_id=group or str(server_round))

    def due_for_refresh(self) -> tuple[str, ...]:
        """The state vectors the next step needs fresh (``he_adam.refresh_due``): at the default
        profile v and w every round, m every third round."""
        if self.levels is None:
            return STATE_NAMES
        return refresh_due(self.levels, self._aggregate_level(), self.backend.profile.levels, self.config, self.poly)

    def _aggregate_level(self) -> int:
        """Levels the summed update has used when the step starts: one for the robust defenses' factors."""
        return 1 if self.defense in ROBUST_DEFENSES else 0

    def refresh_request(
        self, server_round: int, with_state: bool = True
    ) -> tuple[wire_pb2.RefreshRequest, Masks | None]:
        """The state vectors due for a refresh under fresh secret masks, plus last round's stats to release."""
        request = wire_pb2.RefreshRequest(protocol_version=PROTOCOL_VERSION, round=server_round)
        masks = None
        if with_state and self.state.optimizer is not None:
            named = self.state.optimizer.named()
            masked, masks = mask_state(self.backend, {name: named[name] for name in self.due_for_refresh()})
            for name, vec in masked.items():
                request.masked_state[name].CopyFrom(to_proto(self.backend, vec))
        if self.release and self.state.pending_stats is not None:
            request.stats_to_release.CopyFrom(to_proto(self.backend, self.state.pending_stats))
            request.stats_round = self.state.pending_round.get("round", 0)
        return request, masks

    def _theta_arrays(self) -> dict[str, ArrayRecord]:
        if self.state.optimizer is None:
            return {}
        return {messages.THETA: messages.pack(to_proto(self.backend, self.state.optimizer.theta))}

    def train_messages(self, server_round: int, nodes: list[int], refresher: int) -> tuple[list[Message], Masks | None]:
        theta = self._theta_arrays()
        request, masks = self.refresh_request(server_round)
        out = []
        for node in nodes:
            arrays = dict(theta)
            if node == refresher:
                arrays[messages.REFRESH_REQUEST] = messages.pack(request)
            out.append(self._message(node, server_round, len(nodes), messages.TRAIN, arrays))
        return out, masks

    def _stream(self, grid: Grid, outgoing: list[Message], outcome: RoundOutcome) -> Iterator[tuple[int, Message]]:
        """Yield (node, reply) as replies arrive until all are in or the round times out.

        The node is the one the request went to (Flower's error replies for a dead node do not
        name it); every node that stays silent is recorded as that participant's failure.
        """
        with outcome.timer.phase("push"):
            ids = grid.push_messages(outgoing)
        pending = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, outgoing) if mid}
        deadline = time.monotonic() + self.round_timeout
        while pending and time.monotonic() < deadline:
            with outcome.timer.phase("wait"):
                replies = list(grid.pull_messages(list(pending)))
                if not replies:
                    time.sleep(POLL_SECONDS)
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                yield node, reply
        for node in pending.values():
            outcome.fail(node, f"no reply within the round timeout ({self.round_timeout:g} s)")

    def _exchange(
        self, grid: Grid, outgoing: list[Message], read: Callable[[Message], T], outcome: RoundOutcome, what: str
    ) -> Iterator[tuple[int, T]]:
        """Push, stream replies, and read each one; every failure is that participant's, never the round's."""
        for node, reply in self._stream(grid, outgoing, outcome):
            if reply.has_error():
                if reply.error.code == messages.WRONG_FEDERATION and node not in self.excluded:
                    self.excluded.add(node)
                    log.warning("participant node %s holds another federation's key; left out of this run", node)
                outcome.fail(node, reply.error.reason)
                continue
            outcome.bytes_up += messages.payload_bytes(reply.content)
            value = self._guarded(outcome, node, what, lambda r=reply: read(r))
            if value is not None:
                yield node, value

    @staticmethod
    def _guarded(outcome: RoundOutcome, node: int, what: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except WireError as exc:
            outcome.fail(node, f"rejected {what}: {exc}")
        except Exception as exc:  # a hostile reply must never stop the round
            outcome.fail(node, f"rejected {what}: {type(exc).__name__}: {exc}")
        return None

    # -- refresh ----------------------------------------------------------------------------------
    def _take_refresh(self, reply: Message, masks: Masks | None, server_round: int):
        tiled_length = self.rollouts.tiled_length() if self.rollouts else 0
        current = self.state.optimizer
        due = tuple(masks.values) if masks is not None else ()
        answer: RefreshAnswer = read_refresh(
            self.backend, reply, server_round, self.num_params, due, tiled_length, want_theta=current is None,
        )
        # theta is never refreshed: HE-Adam only subtracts from it, which needs no level.
        theta = answer.theta if current is None else current.theta
        if current is None or masks is None:  # before round 1: the initial state, fresh
            state, start = initial_optimizer_state(self.backend, self.num_params), dict.fromkeys(STATE_NAMES, 0)
        else:
            state = {**current.named(), **unmask_state(self.backend, answer.state, masks)}
            start = {name: 0 if name in due else self.levels[name] for name in STATE_NAMES}
        if answer.released is not None:
            self._record_release(answer.released)
        return theta, state, answer.theta_tiled, start

    def _fallback_refresh(self, grid: Grid, server_round: int, nodes: list[int], refresher: int, outcome: RoundOutcome):
        for node in [n for n in nodes if n != refresher]:
            log.info("round %d: refresher %s failed; asking %s", server_round, refresher, node)
            request, masks = self.refresh_request(server_round)
            arrays = {**self._theta_arrays(), messages.REFRESH_REQUEST: messages.pack(request)}
            msg = self._message(node, server_round, len(nodes), messages.REFRESH, arrays)
            read = lambda reply, m=masks: self._take_refresh(reply, m, server_round)  # noqa: E731
            for _, refreshed in self._exchange(grid, [msg], read, outcome, "refresh"):
                return refreshed
        return None

    def _final_release(self, grid: Grid) -> None:
        """Release the last round's stats (no training, no state)."""
        if not self.release or self.state.pending_stats is None:
            return
        release_round = self.state.round + 1
        nodes = self._sample(list(grid.get_node_ids()))
        request, _ = self.refresh_request(release_round, with_state=False)
        outcome = RoundOutcome(release_round)
        for node in nodes:
            msg = self._message(
                node,
                release_round,
                len(nodes),
                messages.REFRESH,
                {messages.REFRESH_REQUEST: messages.pack(request)},
                group="release",
            )
            read = lambda reply: read_refresh(self.backend, reply, release_round, self.num_params, ())  # noqa: E731
            for _, answer in self._exchange(grid, [msg], read, outcome, "release"):
                if answer.released is not None:
                    self._record_release(answer.released)
                    self._save()
                    return

    def _record_release(self, released: wire_pb2.ReleasedMetrics) -> None:
        pending = self.state.pending_round
        if not pending or pending.get("round") != released.round:
            return
        row = dict(pending)
        row.update(
            mean_return=released.mean_return if released.valid else None,
            episodes=int(released.episodes),
            steps=int(released.steps),
        )
        append_metrics(self.out_dir, row)
        self.state.history.append(released)
        self.state.pending_round, self.state.pending_stats = {}, None
