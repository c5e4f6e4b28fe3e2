"""Encrypted checkpoints: ciphertexts plus plaintext metadata, written atomically every round.

A crash mid-write leaves the previous checkpoint intact (write to a temp file, fsync, rename).
Loading validates the key fingerprint, profile, scenario and vector sizes, so resuming with the
wrong key or scenario fails with a clear message instead of training garbage.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from coordinator.he_adam import STATE_NAMES, HEAdamState
from coordinator.report import RunRecord
from protos.backend import HEBackend
from protos.codec import PROTOCOL_VERSION, from_proto, parse_message, to_proto
from protos.errors import CheckpointError, WireError
from protos.fedhe.v1 import wire_pb2
from protos.files import write_atomic
from protos.messages import detached

CHECKPOINT_FILE = "checkpoint.pb"
PREVIOUS_FILE = "checkpoint.previous.pb"  # the generation before the latest
log = logging.getLogger("fedhe.coordinator")


@dataclass
class CoordinatorState:
    """What survives between rounds (and restarts)."""

    round: int = 0  # last completed round
    optimizer: HEAdamState | None = None
    history: list[wire_pb2.ReleasedMetrics] = field(default_factory=list)


def save_checkpoint(
    directory: Path, backend: HEBackend, scenario: str, config_json: str, state: CoordinatorState,
    record_json: str = "{}",
) -> Path:
    msg = wire_pb2.Checkpoint(
        protocol_version=PROTOCOL_VERSION,
        round=state.round,
        scenario=scenario,
        key_fingerprint=backend.fingerprint,
        he_profile=backend.profile.name,
        history=state.history,
        optimizer_config_json=config_json,
        run_record_json=record_json,
    )
    if state.optimizer is not None:
        msg.theta.CopyFrom(to_proto(backend, state.optimizer.theta))
        for name, vec in state.optimizer.named().items():
            msg.state[name].CopyFrom(to_proto(backend, vec))
    path = Path(directory) / CHECKPOINT_FILE
    if path.exists():  # keep one previous generation: one unreadable file never loses the run
        os.replace(path, path.with_name(PREVIOUS_FILE))
    write_atomic(path, msg.SerializeToString())
    return path


class CheckpointWriter:
    """Writes each round's checkpoint in the background, while the next round waits for replies.

    Serializing the state costs ~40 ms a round, which the loop would otherwise spend between the
    HE-Adam step and the next round's messages. TenSEAL holds the GIL, so the write is deferred
    until those messages are out (``start``) and then overlaps the wait for replies. One write at
    a time, in order: ``save`` and ``flush`` first finish the previous one and re-raise its error
    (a failed write stops the run a round later, with the previous generation still on disk).
    """

    def __init__(self, directory: Path, backend: HEBackend, scenario: str, config_json: str) -> None:
        self.directory, self.backend, self.scenario, self.config_json = Path(directory), backend, scenario, config_json
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedhe-checkpoint")
        self._queued: tuple[CoordinatorState, str] | None = None
        self._running: Future | None = None

    def save(self, state: CoordinatorState, record_json: str = "{}", *, defer: bool = False) -> None:
        """Write ``state`` (and the run record) now, or (``defer``) snapshot it for ``start``."""
        self.flush()
        # the loop goes on extending the history in place; ciphertext vectors are never changed
        self._queued = (replace(state, history=list(state.history)), record_json)
        if not defer:
            self.flush()

    def start(self) -> None:
        """Begin writing the deferred snapshot on the background thread."""
        if self._queued is not None:
            (queued, record), self._queued = self._queued, None
            self._running = self._pool.submit(
                save_checkpoint, self.directory, self.backend, self.scenario, self.config_json, queued, record
            )

    def flush(self) -> None:
        """Finish every pending write; raises what a write raised."""
        self.start()
        running, self._running = self._running, None
        if running is not None:
            running.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown()


def read_checkpoint(path: Path) -> wire_pb2.Checkpoint:
    """Parse one checkpoint file (no key needed); CheckpointError if it is missing or corrupt."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; start without --resume")
    try:
        return parse_message(wire_pb2.Checkpoint, path.read_bytes(), max_bytes=1 << 34)
    except WireError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc})") from None


def load_checkpoint(
    directory: Path, backend: HEBackend, scenario: str, num_params: int, config_json: str | None = None
) -> tuple[CoordinatorState, RunRecord]:
    """The latest usable generation, validated: key, scenario, optimizer settings, every vector.

    ``config_json``: the optimizer configuration a resume will train with; it must match the
    checkpoint's (None when only reading the policy). When the latest file is unreadable, the
    previous generation is used with a warning (it is one round older).
    """
    latest, previous = Path(directory) / CHECKPOINT_FILE, Path(directory) / PREVIOUS_FILE
    try:
        return _load(latest, backend, scenario, num_params, config_json)
    except CheckpointError as exc:
        if not previous.is_file():
            raise CheckpointError(f"{exc}; there is no previous generation: remove {latest} to start over") from None
        state, record = _load(previous, backend, scenario, num_params, config_json)
        log.warning("%s; resuming from the previous generation %s (round %d)", exc, previous, state.round)
        return state, record


def _load(
    path: Path, backend: HEBackend, scenario: str, num_params: int, config_json: str | None
) -> tuple[CoordinatorState, RunRecord]:
    msg = read_checkpoint(path)
    if msg.protocol_version != PROTOCOL_VERSION:
        raise CheckpointError(
            f"checkpoint {path} was written by a fedhe-rl speaking protocol {msg.protocol_version}, this one speaks "
            f"{PROTOCOL_VERSION}: resume it with the release that wrote it, or start a new run in another --out"
        )
    if msg.key_fingerprint != backend.fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to federation key {msg.key_fingerprint[:12]}…, but this "
            f"coordinator has {backend.fingerprint[:12]}…; resume with the original --key-dir"
        )
    if msg.scenario != scenario:
        raise CheckpointError(f"checkpoint {path} is for scenario {msg.scenario!r}, not {scenario!r}")
    if config_json is not None:
        check_same_optimizer(path, msg.optimizer_config_json, config_json)
    state = CoordinatorState(round=msg.round, history=[detached(h) for h in msg.history])
    try:
        if msg.HasField("theta"):
            if set(msg.state) != set(STATE_NAMES):
                raise CheckpointError(f"checkpoint {path} lacks optimizer state {STATE_NAMES}")
            vectors = {
                name: from_proto(backend, msg.state[name], expected_length=num_params)
                for name in STATE_NAMES
            }
            theta = from_proto(backend, msg.theta, expected_length=num_params)
            state.optimizer = HEAdamState(theta, **vectors, step=msg.round)
        record = RunRecord.from_json(msg.run_record_json)
    except (WireError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unusable: {exc}") from None
    return state, record


def check_same_optimizer(path: Path, saved_json: str, current_json: str) -> None:
    """A resume must not silently change HE-Adam's hyperparameters (C, lr, betas, B, ...)."""
    try:
        saved = json.loads(saved_json or "{}")
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has an unreadable optimizer configuration") from None
    current = json.loads(current_json)
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        changes = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise CheckpointError(
            f"checkpoint {path} was trained with another optimizer configuration ({changes}); "
            "resume with the original settings or start a new run in another --out directory"
        )


def check_resumable(directory: Path, config_json: str) -> None:
    """Without a key: a resume would find a readable generation trained with ``config_json``."""
    latest, previous = Path(directory) / CHECKPOINT_FILE, Path(directory) / PREVIOUS_FILE
    try:
        msg = read_checkpoint(latest)
    except CheckpointError:
        if not previous.is_file():
            raise
        msg = read_checkpoint(previous)
    check_same_optimizer(latest, msg.optimizer_config_json, config_json)
