"""The coordinator's round driver: encrypted aggregate, integrity check, HE-Adam, checkpoint.

One round (docs/threat-model.md, "One round"):

1. Sample the round's participants among the organizations that named themselves and are still
   present; the train messages carry Enc(theta), the aggregation path's public config (the masking
   set) and, for one *refresher*, the masked optimizer state (``coordinator.refresh``).
2. Replies stream into the run plan's aggregation path (``coordinator.aggregation``), which then
   runs any exchange of its own (unmasking, masked norms, the gradient collapse).
3. One key holder checks the aggregate against the honest bound and releases the round's
   statistics (``coordinator.integrity``).
4. One HE-Adam step; observers (DP accounting) add to the round's row; checkpoint.

A round that cannot complete changes nothing: the next starts from the same state. This is not a
Flower ``Strategy`` (those aggregate plaintext arrays) but follows its hooks: the aggregation path
configures the train messages and aggregates the replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from coordinator.aggregation import AGGREGATIONS, RoundContext
from coordinator.checkpoint import CheckpointWriter, CoordinatorState, load_checkpoint
from coordinator.chunk_workers import ChunkWorkers
from coordinator.dp_accounting import DPAccountant
from coordinator.exchange import NODE_UNAVAILABLE, Exchange, RoundOutcome
from coordinator.he_adam import HEAdamState
from coordinator.integrity import Verdict, ask_verdict, integrity_query, read_verdict
from coordinator.offenders import OffenderSearch
from coordinator.organizations import EXCLUDED, GONE, Organizations
from coordinator.parallel_step import parallel_he_adam_step
from coordinator.ray_shards import ShardedHEAdam, shard_settings
from coordinator.refresh import StateRefresh, init_config
from coordinator.report import (
    RunRecord,
    TensorBoardLog,
    append_metrics,
    is_solved,
    read_metrics,
    round_line,
    truncate_metrics,
)
from protos import messages
from protos.backend import HEBackend
from protos.codec import to_proto_for_decryption
from protos.plan import RunPlan

log = logging.getLogger("fedhe.coordinator")
HE_PHASES = ("he_adam", "encrypted_gradient")  # the coordinator's own HE work in a round (he_ms)
NODE_WAIT_S = 60.0  # how long a run waits for the participants it asks for before going on without them


@dataclass
class Unverified:
    """A stepped round whose aggregate the integrity check has not confirmed yet.

    Its query rides on the next round's message to the refresher; if it fails, the state returns
    to ``before`` (the step's starting point, at ``levels``) and the next round is discarded."""

    round: int
    query: ArrayRecord
    before: HEAdamState
    levels: dict[str, int]
    row: dict  # its metrics row, without the release
    contributors: list[int]  # the nodes whose updates are in its aggregate
    participants: int


class RoundDriver:
    """Encrypted federated training with HE-Adam; ``run`` drives the whole federation."""

    def __init__(self, plan: RunPlan, backend: HEBackend, out_dir: Path,
                 on_round: Callable[[RoundOutcome, dict | None], None] | None = None) -> None:
        self.plan, self.backend, self.out_dir, self.on_round = plan, backend, Path(out_dir), on_round
        self.poly = plan.optimizer.validate(backend.profile)
        self.aggregation = AGGREGATIONS[plan.aggregation]
        self.aggregation.check(plan, backend)
        tiled = plan.rollout_layout(backend.slots, 1).theta_vectors * backend.slots if plan.statistics else 0
        self.refresh = StateRefresh(backend, plan.optimizer, self.poly, self.aggregation.levels_used,
                                    plan.num_params, tiled)
        self.dp = DPAccountant(plan.settings) if plan.settings.dp_noise_multiplier > 0 else None
        self.workers = ChunkWorkers(backend)  # processes start only for a multi-chunk model
        shards, ray_address = shard_settings()  # FEDHE_HE_SHARDS > 1: the step on Ray actors instead
        self.sharded = ShardedHEAdam(backend, shards, ray_address) if shards > 1 else None
        self.state = CoordinatorState()
        self.organizations = Organizations()
        self.record = RunRecord()
        self.checkpoints = CheckpointWriter(self.out_dir, backend, plan.scenario.name, plan.optimizer.to_json())
        self.probes: dict[str, int] = {}  # identify messages still unanswered: message id -> node
        self.unverified: Unverified | None = None  # the last stepped round, until its integrity check
        self.offenders = OffenderSearch()

    def describe(self) -> None:
        cfg = self.plan.optimizer
        log.info("HE-Adam on %s (%s, fingerprint %s…, %s aggregation): lr=%g b1=%g b2=%g C=%g tau=%.3g "
                 "P deg %d on [%.3g, %.3g]", self.plan.scenario.name, self.backend.profile.name,
                 self.backend.fingerprint[:12], self.plan.aggregation, cfg.lr, cfg.beta1, cfg.beta2, cfg.clip_bound,
                 cfg.tau_value, cfg.degree, *self.poly.interval)

    def run(self, grid: Grid, resume: bool = False) -> None:
        self.describe()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        settings = self.plan.settings
        if resume:
            self.state, self.record = load_checkpoint(self.out_dir, self.backend, self.plan.scenario.name,
                                                      self.plan.num_params, self.plan.optimizer.to_json())
            truncate_metrics(self.out_dir, self.state.round)
            if self.dp:
                self.dp.resume(read_metrics(self.out_dir))
            log.info("resumed from round %d", self.state.round)
        self.record.start(resumed_from=self.state.round if resume else None)
        exchange = Exchange(grid, self.backend, self.organizations, settings.round_timeout)
        board = TensorBoardLog(self.out_dir)
        try:
            for server_round in range(self.state.round + 1, settings.num_server_rounds + 1):
                outcome = self.run_round(exchange, server_round)
                self.report(outcome, board)
                if self.organizations.all_left_out([int(n) for n in exchange.grid.get_node_ids()]):
                    log.error("every connected organization has been left out of this run (the reasons are above): "
                              "stopping; fix them and start a new run")
                    break
                threshold = self.plan.scenario.reward_threshold
                if settings.stop_on_solve and is_solved(read_metrics(self.out_dir), threshold):
                    log.info("solved at round %d: stopping", server_round - 1)
                    break
            self.settle_last(exchange)
        finally:
            board.close()
            try:
                self.checkpoints.close()  # the last round's write completes even on the way out
            finally:
                self.workers.close()
                if self.sharded is not None:
                    self.sharded.close()

    def report(self, outcome: RoundOutcome, board: TensorBoardLog) -> None:
        """The round's log line (``flwr log``), TensorBoard point and callback, with the latest confirmed row."""
        rows = read_metrics(self.out_dir)
        log.info("%s", round_line(outcome, self.plan.settings.num_server_rounds, rows))
        board.round(outcome, rows[-1] if rows else None)
        if self.on_round:
            self.on_round(outcome, rows[-1] if rows else None)

    # -- one round --------------------------------------------------------------------------------
    def run_round(self, exchange: Exchange, server_round: int) -> RoundOutcome:
        t0 = time.perf_counter()
        outcome = RoundOutcome(server_round)
        nodes = self.participants(exchange, outcome)
        if len(nodes) < self.plan.settings.min_participants:
            outcome.cause = (f"only {len(nodes)} organizations available (minimum "
                             f"{self.plan.settings.min_participants})")
            return self.finish(outcome, t0)
        members = {node: self.organizations.of(node).index for node in nodes}
        ctx = RoundContext(self.plan, self.backend, exchange, server_round, nodes, members,
                           nodes[(server_round - 1) % len(nodes)], outcome)
        aggregation = self.aggregation(ctx)
        with outcome.timer.phase("messages_out"):
            outgoing, masks = self.train_messages(ctx, aggregation.train_config())
        pending = exchange.push(outgoing, outcome)
        self.checkpoints.start()  # the last confirmed round's checkpoint, written while participants train
        verdict = None
        for node, reply in exchange.replies(pending, outcome):
            if reply.has_error():
                exchange.error_reply(node, reply, outcome)
                continue
            outcome.bytes_up += messages.payload_bytes(reply.content)
            if node == ctx.refresher and self.unverified is not None:  # whatever becomes of its update
                verdict = self.verdict_in(ctx, node, reply)
            if self.take(ctx, node, "update", lambda r=reply, n=node: aggregation.add(n, r)) and node == ctx.refresher:
                with outcome.timer.phase("refresh_in"):
                    ctx.refreshed = self.take(ctx, node, "refresh", lambda r=reply: self.refresh.take(
                        r, server_round, masks, self.state.optimizer))
        outcome.answered = [ctx.name(node) for node in aggregation.contributors]
        confirmed = self.unverified is None or self.settle(ctx, verdict, asked=(ctx.refresher,))
        for node in aggregation.contributors:  # after the settled round's snapshot: a resume retrains this one
            self.organizations.of(node).answered += 1
        if not confirmed:
            outcome.cause = (f"discarded: its participants trained on round {outcome.round - 1}'s model, which the "
                             "integrity check refused")
            return self.finish(outcome, t0)
        if len(aggregation.contributors) < self.plan.settings.min_participants:
            outcome.cause = (f"only {len(aggregation.contributors)} of {len(nodes)} participants answered "
                             f"(minimum {self.plan.settings.min_participants})")
            return self.finish(outcome, t0)
        if ctx.refreshed is None:
            ctx.refreshed = self.refresh.fallback(exchange, server_round, nodes, ctx.refresher, outcome,
                                                  self.state.optimizer, self.theta_arrays())
            if ctx.refreshed is None:
                outcome.cause = "no participant could refresh the state"
                return self.finish(outcome, t0)
        aggregate = aggregation.finish()
        if aggregate is None:
            if aggregation.offender is not None:
                self.leave_out(self.offenders.self_mask_failed(aggregation.offender), outcome)
            return self.finish(outcome, t0)
        refreshed = ctx.refreshed
        before = HEAdamState(refreshed.theta, **refreshed.state, step=self.steps())
        with outcome.timer.phase("he_adam"):
            if self.sharded is not None:  # the state goes to the shards and back: the driver keeps it
                step = self.sharded.he_adam_step(before, aggregate.update, self.plan.optimizer, self.poly)
            else:
                step = parallel_he_adam_step(self.workers, before, aggregate.update, self.plan.optimizer, self.poly)
        outcome.he_ms = sum(outcome.timer.ms.get(phase, 0.0) for phase in HE_PHASES)
        self.refresh.stepped(refreshed.start_levels)
        self.state.optimizer = step.state
        outcome.completed = True
        query = integrity_query(ctx, aggregate)
        self.finish(outcome, t0)
        self.unverified = Unverified(server_round, query, before, refreshed.start_levels, self.row(outcome),
                                     list(aggregation.contributors), len(nodes))
        return outcome

    def verdict_in(self, ctx: RoundContext, node: int, reply: Message) -> Verdict | None:
        """The refresher's answer to the last round's check, if its reply holds a valid one."""
        try:
            return read_verdict(reply, self.unverified.round)
        except Exception as exc:  # a hostile reply must never stop the round
            ctx.outcome.fail(self.organizations, node, "rejected", f"rejected integrity reply: {exc}")
            return None

    def settle(self, ctx: RoundContext, verdict: Verdict | None, asked: tuple[int, ...] = ()) -> bool:
        """Confirm or undo the last round's step, asking a key holder other than ``asked`` (who were
        sent its check already) if ``verdict`` is None; True if the step stands."""
        unverified, self.unverified = self.unverified, None
        if verdict is None:
            verdict = ask_verdict(ctx, unverified.query, unverified.round, asked)
        if verdict is None or not verdict.passed:
            cause = verdict.cause() if verdict else "integrity: no key holder answered the check"
            log.warning("round %d is undone: %s", unverified.round, cause)
            self.record.failed_rounds.append({"round": unverified.round, "cause": cause, "failed": []})
            self.state.optimizer, self.refresh.levels = unverified.before, unverified.levels
            if verdict is not None:
                self.leave_out(self.offenders.refused(unverified.contributors), ctx.outcome)
            return False
        self.leave_out(self.offenders.passed(unverified.contributors), ctx.outcome)
        row = dict(unverified.row)
        released = verdict.released
        row.update(mean_return=released.mean_return if released is not None and released.valid else None,
                   episodes=int(released.episodes) if released is not None else 0,
                   steps=int(released.steps) if released is not None else 0)
        if self.dp:
            row.update(self.dp.completed(len(unverified.contributors), unverified.participants))
        if released is not None:
            self.state.history.append(released)
        self.state.round = unverified.round  # confirmed: its row and its state are the run's now
        append_metrics(self.out_dir, row)
        with ctx.outcome.timer.phase("checkpoint"):  # a snapshot; written while the next round trains
            self.checkpoints.save(self.state, self.record.snapshot(self.organizations), defer=True)
        return True

    def settle_last(self, exchange: Exchange) -> None:
        """After the last round: the check of its aggregate, in an exchange of its own."""
        if self.unverified is None:
            return
        nodes = self.organizations.active([int(n) for n in exchange.grid.get_node_ids()])
        if not nodes:
            log.warning("no key holder left to check round %d: it is undone", self.unverified.round)
            self.state.optimizer = self.unverified.before
            self.unverified = None
            return
        outcome = RoundOutcome(self.unverified.round)
        ctx = RoundContext(self.plan, self.backend, exchange, self.unverified.round, nodes, {}, nodes[0], outcome)
        self.settle(ctx, None)

    def take(self, ctx: RoundContext, node: int, what: str, fn: Callable[[], object]):
        """Run ``fn`` on one reply; a reply that does not validate is that organization's failure."""
        try:
            result = fn()
        except Exception as exc:  # a hostile reply must never stop the round
            detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            ctx.outcome.fail(self.organizations, node, "rejected", f"rejected {what}: {detail}")
            return None
        return True if result is None else result

    def steps(self) -> int:
        return self.state.optimizer.step if self.state.optimizer is not None else 0

    def row(self, outcome: RoundOutcome) -> dict:
        """A stepped round's metrics row; the released statistics come with the integrity check."""
        return {"round": outcome.round, "wall_s": round(outcome.wall_s, 3), "bytes_up": outcome.bytes_up,
                "bytes_down": outcome.bytes_down, "he_ms": round(outcome.he_ms, 1),
                "participants": len(outcome.answered), "answered": outcome.answered, "failed": outcome.failed,
                **outcome.extras, "phases_ms": outcome.timer.rounded()}

    def finish(self, outcome: RoundOutcome, t0: float) -> RoundOutcome:
        """A round that changed nothing is recorded; a stepped one waits for its integrity check."""
        outcome.wall_s = time.perf_counter() - t0
        if not outcome.completed:
            log.warning("round %d changed nothing: %s", outcome.round, outcome.cause)
            self.record.failed_round(outcome)
        return outcome

    # -- who takes part ---------------------------------------------------------------------------
    def participants(self, exchange: Exchange, outcome: RoundOutcome) -> list[int]:
        """The round's participants: named, present organizations. With fewer than the run asks, it
        says so, waits up to NODE_WAIT_S (at most the round timeout), then goes on with those present."""
        settings = self.plan.settings
        wanted = max(settings.participants, settings.min_participants, 1)
        wait_s = min(NODE_WAIT_S, settings.round_timeout)
        deadline, waited = time.monotonic() + wait_s, self.record.warned_short  # waits once per run
        while True:
            present = [int(n) for n in exchange.grid.get_node_ids()]
            self.identify(exchange, present, outcome, wait=not self.organizations.active(present))
            active = self.organizations.active(present)
            enough = len(active) >= settings.min_participants
            left_out = self.organizations.all_left_out(present)  # nobody to wait for
            if len(active) >= wanted or time.monotonic() > deadline or (waited and enough) or left_out:
                break
            if not self.record.warned_short:
                log.warning("round %d: the run asks for %d participants, %d organizations are available (%d "
                            "connected, the others left out or not yet named); waiting up to %g s, then going on "
                            "with those present", outcome.round, wanted, len(active), len(present), wait_s)
                self.record.warned_short = True
            self.checkpoints.start()  # no round starts soon: write the last one now
            time.sleep(0.5)
        active = active[: settings.participants] if settings.participants else active
        return self.offenders.sample(active, outcome.round, max(settings.min_participants, self.aggregation.minimum))

    def leave_out(self, node: int | None, outcome: RoundOutcome) -> None:
        """An organization found to send updates the integrity check refuses: out for the rest of the run."""
        if node is None:
            return
        self.organizations.mark(node, EXCLUDED)
        outcome.fail(self.organizations, node, "integrity",
                     "its updates broke the integrity check (found by leaving organizations out of rounds); left "
                     "out for the rest of this run")

    def identify(self, exchange: Exchange, present: list[int], outcome: RoundOutcome, wait: bool) -> None:
        """Ask new and gone nodes who they are; read what answered (waiting only if ``wait``)."""
        asked = set(self.probes.values())
        new = [n for n in self.organizations.to_probe(present) if n not in asked]
        if new:
            probes = [exchange.message(n, outcome.round, 0, messages.IDENTIFY, {}, {"identify": True}) for n in new]
            self.probes.update(exchange.push(probes, outcome))
        deadline = time.monotonic() + (self.plan.settings.round_timeout if wait else 0.0)
        while self.probes:
            for reply in exchange.grid.pull_messages(list(self.probes)):
                node = self.probes.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.identified(exchange, node, reply, outcome)
            if not wait or time.monotonic() > deadline or not any(n in present for n in self.probes.values()):
                break
            time.sleep(0.05)
        self.probes = {mid: n for mid, n in self.probes.items() if n in present}

    def identified(self, exchange: Exchange, node: int, reply: Message, outcome: RoundOutcome) -> None:
        if reply.has_error():
            if self.organizations.of(node).status == GONE and reply.error.code == NODE_UNAVAILABLE:
                log.debug("round %d: %s is still gone", outcome.round, self.organizations.name(node))
                return  # its failure was counted when it went silent
            exchange.error_reply(node, reply, outcome)
            return
        config = reply.content.config_records.get(messages.CONFIG, {})
        try:
            index, name = int(config["participant-index"]), str(config["organization"])
        except (KeyError, TypeError, ValueError):
            outcome.fail(self.organizations, node, "rejected", "did not say which organization it is")
            return
        problem = self.organizations.identify(node, index, name)
        if problem:
            self.organizations.mark(node, EXCLUDED)
            outcome.fail(self.organizations, node, "rejected", problem)
        else:
            log.info("%s (roster index %d) takes part", name, index)

    # -- messages ---------------------------------------------------------------------------------
    def theta_arrays(self) -> dict[str, ArrayRecord]:
        if self.state.optimizer is None:
            return {}
        return {messages.THETA: messages.pack(to_proto_for_decryption(self.backend, self.state.optimizer.theta))}

    def train_messages(self, ctx: RoundContext, config: dict) -> tuple[list[Message], object]:
        """Theta for everybody; for the refresher also the state to refresh and last round's integrity check."""
        theta = self.theta_arrays()
        request, masks = self.refresh.request(ctx.round, self.state.optimizer)
        refresher = {**theta, messages.REFRESH_REQUEST: request}
        if self.unverified is not None:
            refresher[messages.INTEGRITY_QUERY] = self.unverified.query
        config = {**config, **init_config(self.state.optimizer)}
        out = []
        for node in ctx.nodes:
            arrays = refresher if node == ctx.refresher else theta
            out.append(ctx.exchange.message(node, ctx.round, ctx.participants, messages.TRAIN, arrays, config))
        return out, masks

    def summary_fields(self) -> dict:
        """Privacy, failure and organization fields for summary.json."""
        out = {"defense": self.plan.settings.defense, "masking": self.plan.settings.masking,
               "aggregation": self.plan.aggregation, "he_shards": self.sharded.shards if self.sharded else 1,
               **self.record.summary(self.organizations)}
        out.update(self.dp.summary() if self.dp else {"dp_epsilon": None})
        return out
