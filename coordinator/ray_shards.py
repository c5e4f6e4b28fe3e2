"""The HE-Adam step sharded over Ray actors, each owning a contiguous chunk range for the whole run.

``coordinator.chunk_workers`` ships every chunk of m, z, w and the aggregate to a worker and back
each step; a model that outgrows one machine needs its state to *live* where it is computed. So
here every actor owns, for as long as it runs, its range of theta, m~, z and w~ and the running
sum of the round's updates for that range:

* ``accumulate`` forwards each update's chunks (the wire bytes it arrived as) to the actors, which
  validate them and add them to their sums: the coordinator process never holds the full sum;
* ``step`` runs ``he_adam.step_chunk`` on every actor at once; nothing crosses a process boundary;
* ``masked``/``unmask`` do the refresh's masking and unmasking inside the actors (the masks are
  the coordinator's secret, the actors are its own processes), ``export`` sends out theta or the
  state as wire bytes (theta for decryption, checkpoints), ``keep``/``restore`` undo a step.

Only wire bytes (and the coordinator's plaintext masks) cross process boundaries: TenSEAL cannot
pickle a ciphertext. Actors load the coordinator's *evaluation* context (public and relinearization
keys, no secret key), as chunk workers do. The results are the ciphertexts ``he_adam_step`` gives,
byte for byte: serialization is lossless and every operation is deterministic.

A model of one chunk, one shard or the plaintext backend runs in-process: no Ray is started and no
chunk is serialized. Otherwise Ray is started locally (``num_cpus`` = shards, no dashboard) or,
with ``ray_address``, an existing cluster is joined; its nodes must run this same fedhe-rl release
and belong to the coordinator (they see the evaluation keys and the refresh masks).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coordinator.chunk_workers import tensealbackend_from
from coordinator.he_adam import HEAdamState, Masks, StepResult, step_chunk
from coordinator.secret_random import secret_uniform
from protos.backend import Chunk, HEBackend, TensealBackend
from protos.codec import EncryptedVector, check_header, pad_to_chunks, proto_of_chunks
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import MASK_BOUND, STATE_NAMES, HEAdamConfig, InverseSqrtPolynomial

log = logging.getLogger("fedhe.coordinator")
VECTORS = ("theta", *STATE_NAMES)
SHARDS_ENV, RAY_ADDRESS_ENV = "FEDHE_HE_SHARDS", "FEDHE_RAY_ADDRESS"
REACH_TIMEOUT_S = 5.0
PLACE_TIMEOUT_S = 120.0  # actors Ray cannot place (no free CPU, no node with the resources) wait forever


def shard_settings() -> tuple[int, str | None]:
    """The coordinator machine's own choice, like ``FEDHE_WORKERS``: ``FEDHE_HE_SHARDS`` (default 1,
    the in-process step over chunk workers) and ``FEDHE_RAY_ADDRESS`` (default: a local Ray)."""
    configured = os.environ.get(SHARDS_ENV, "").strip() or "1"
    try:
        shards = int(configured)
    except ValueError:
        raise ValueError(f"{SHARDS_ENV} must be a whole number of shards, got {configured!r}") from None
    return max(1, shards), os.environ.get(RAY_ADDRESS_ENV, "").strip() or None


class ShardError(RuntimeError):
    """Ray could not start, or the cluster at ``ray_address`` could not be reached."""


class ChunkShard:
    """One contiguous chunk range of theta, m~, z, w~ and of the round's running sum.

    The body of each Ray actor and, with the coordinator's own backend, the single in-process
    shard. Inputs may be chunks or wire bytes (bytes are validated as they load); ``export``
    returns wire bytes, ``chunks`` the ciphertexts themselves (in-process only).
    """

    def __init__(self, backend: HEBackend) -> None:
        self.backend = backend
        self.vectors: dict[str, list[Chunk]] = {}
        self.total: list[Chunk] | None = None
        self.kept: dict[str, list[Chunk]] | None = None

    def _load(self, item: bytes | Chunk, fresh: bool = False) -> Chunk:
        if isinstance(item, (bytes, bytearray)):
            return self.backend.deserialize(bytes(item), self.backend.slots, fresh=fresh)
        return item

    def _plain(self, chunks: list[Chunk], values: np.ndarray) -> list[Chunk]:
        slots = self.backend.slots
        return [self.backend.add_plain(c, values[i * slots : (i + 1) * slots]) for i, c in enumerate(chunks)]

    def load(self, name: str, chunks: Sequence[bytes | Chunk], minus: np.ndarray | None = None,
             fresh: bool = False) -> None:
        """Own ``name``'s chunks from now on; ``minus`` (padded to the range) is added first (unmasking)."""
        loaded = [self._load(c, fresh) for c in chunks]
        self.vectors[name] = loaded if minus is None else self._plain(loaded, minus)

    def chunks(self, name: str) -> list[Chunk]:
        return self.vectors[name]

    def export(self, name: str, plus: np.ndarray | None = None, for_decryption: bool = False) -> list[bytes]:
        """``name``'s chunks as wire bytes, ``plus`` (a mask) added first; switched down for a key holder."""
        chunks = self.vectors[name] if plus is None else self._plain(self.vectors[name], plus)
        serialize = self.backend.serialize_for_decryption if for_decryption else self.backend.serialize
        return [serialize(c) for c in chunks]

    def accumulate(self, chunks: Sequence[bytes | Chunk], fresh: bool = False) -> None:
        """Add one update's chunks to the running sum; every chunk is validated before any is added."""
        loaded = [self._load(c, fresh) for c in chunks]
        if self.total is None:
            self.total = loaded
        else:
            self.total = [self.backend.add(t, c) for t, c in zip(self.total, loaded)]

    def subtract(self, chunks: Sequence[bytes | Chunk]) -> None:
        """Take an accumulated update out again (exact: CKKS addition is modular integer arithmetic)."""
        if self.total is not None:
            self.total = [self.backend.sub(t, self._load(c)) for t, c in zip(self.total, chunks)]

    def clear(self) -> None:
        self.total = None

    def step(self, config: HEAdamConfig, poly: InverseSqrtPolynomial) -> None:
        """One HE-Adam step of the range on its running sum, which starts afresh afterwards."""
        if self.total is None:
            raise RuntimeError("an HE-Adam step needs at least one accumulated update")
        parts = [step_chunk(self.backend, m, z, w, u, config, poly, False) for m, z, w, u in
                 zip(self.vectors["m"], self.vectors["z"], self.vectors["w"], self.total)]
        self.vectors = {"theta": [self.backend.sub(t, p[0]) for t, p in zip(self.vectors["theta"], parts)],
                        **{name: [p[i] for p in parts] for i, name in enumerate(STATE_NAMES, start=1)}}
        self.total = None

    def keep(self) -> None:
        """Remember the current state (cheap: ciphertexts are never changed in place)."""
        self.kept = dict(self.vectors)

    def restore(self) -> None:
        if self.kept is None:
            raise RuntimeError("nothing kept to restore")
        self.vectors, self.total = dict(self.kept), None

    def where(self) -> tuple[str, int]:
        """The Ray node and process this shard runs in (tests, benchmarks)."""
        ray = sys.modules.get("ray")  # never imported for the in-process shard
        node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"
        return node, os.getpid()


class _ShardActor(ChunkShard):
    """A Ray actor's shard: the evaluation context loaded once, from its bytes."""

    def __init__(self, context_bytes: bytes, profile_name: str, fingerprint: str) -> None:
        super().__init__(tensealbackend_from(context_bytes, profile_name, fingerprint))


def check_reachable(address: str) -> None:
    """Refuse a ``host:port`` no TCP connection reaches: ``ray.init`` would retry it for many minutes."""
    if address == "auto" or "://" in address:
        return  # Ray's own discovery, or a Ray Client address
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        raise ShardError(f"cannot reach the Ray cluster at {address} ({exc}); is `ray start --head` "
                         "running there, and is the port open?") from None


def chunk_ranges(chunks: int, shards: int) -> list[range]:
    """Contiguous, near-equal chunk ranges, at most one per chunk."""
    count = max(1, min(shards, chunks))
    return [range(i * chunks // count, (i + 1) * chunks // count) for i in range(count)]


class ShardedHEAdam:
    """The HE-Adam state spread over ``shards`` Ray actors (or kept in-process), for a whole run.

    ``resources``: custom Ray resources per shard (e.g. ``[{"node_a": 1}, {"node_b": 1}]``) to pin
    each shard to a node of a cluster; by default Ray places them.
    """

    def __init__(self, backend: HEBackend, shards: int = 2, ray_address: str | None = None,
                 resources: Sequence[Mapping[str, float]] | None = None) -> None:
        self.backend, self.shards, self.ray_address = backend, max(1, int(shards)), ray_address
        self.resources = list(resources) if resources else None
        self.ranges: list[range] = []
        self.length = 0
        self.step_count = 0
        self.local: ChunkShard | None = None
        self.actors: list[Any] = []
        self.connected = False  # whether this object called ray.init (and so ray.shutdown)

    # -- placement ---------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        return bool(self.actors)

    def set_state(self, state: HEAdamState) -> None:
        """Own ``state`` from now on (the run's first state, or one read from a checkpoint)."""
        chunks = len(state.theta.chunks)
        in_process = self.shards == 1 or chunks < 2 or not isinstance(self.backend, TensealBackend)
        ranges = [range(chunks)] if in_process else chunk_ranges(chunks, self.shards)
        if ranges != self.ranges or in_process != (self.local is not None):
            self._place(ranges, in_process)
        self.length, self.step_count = state.theta.length, state.step
        vectors = {"theta": state.theta, **state.named()}
        if self.local is not None:
            for name, vec in vectors.items():
                self.local.load(name, vec.chunks)
            self.local.clear()
            return
        serialized = {name: vec.serialized or [self.backend.serialize(c) for c in vec.chunks]
                      for name, vec in vectors.items()}
        self._all([actor.load.remote(name, data[r.start:r.stop]) for actor, r in zip(self.actors, self.ranges)
                   for name, data in serialized.items()] + [actor.clear.remote() for actor in self.actors])

    def _place(self, ranges: list[range], in_process: bool) -> None:
        self._stop_actors()
        self.ranges = ranges
        if in_process:
            self.local = ChunkShard(self.backend)
            return
        self.local = None
        ray = self._ray()
        context = self.backend.context
        context_bytes = ray.put(context.serialize(save_public_key=True, save_secret_key=False,
                                                  save_relin_keys=context.has_relin_keys(),
                                                  save_galois_keys=False))
        # One CPU each, so Ray spreads them; none in a Ray this object did not start (a Flower
        # simulation's, whose CPUs its ClientApps hold): there they would never be placed.
        actor_class = ray.remote(num_cpus=1 if self.connected else 0)(_ShardActor)
        self.actors = []
        for i in range(len(ranges)):
            options = {"resources": dict(self.resources[i % len(self.resources)])} if self.resources else {}
            self.actors.append(actor_class.options(**options).remote(
                context_bytes, self.backend.profile.name, self.backend.fingerprint))
        try:  # every actor up, its context loaded
            ray.get([actor.where.remote() for actor in self.actors], timeout=PLACE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self._stop_actors()
            raise ShardError(f"Ray could not place {len(ranges)} shards within {PLACE_TIMEOUT_S:.0f} s (too few "
                             "free CPUs, or no node with the requested resources)") from None
        log.info("HE-Adam state sharded over %d Ray actors (%s chunks each)", len(self.actors),
                 ", ".join(str(len(r)) for r in ranges))

    def _ray(self) -> Any:
        """Ray, started here (or joined at ``ray_address``) once; a clear error if it cannot be."""
        try:
            import ray
        except ImportError as exc:
            raise ShardError(f"--shards needs Ray (pip install 'flwr[simulation]'): {exc}") from None
        if ray.is_initialized():
            return ray
        if self.ray_address:
            check_reachable(self.ray_address)
        try:
            if self.ray_address:
                ray.init(address=self.ray_address, log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=self.shards, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError... on a bad start
            where = f"the Ray cluster at {self.ray_address}" if self.ray_address else "a local Ray"
            raise ShardError(f"cannot start {where}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        self.connected = True
        return ray

    def _all(self, refs: list[Any]) -> list[Any]:
        """Wait for every call; an actor's exception comes back as itself (a WireError stays one)."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            raise cause from None

    def _split(self, values: np.ndarray) -> list[np.ndarray]:
        """A flat plaintext vector padded to the chunks and cut at the shards' ranges."""
        slots, padded = self.backend.slots, pad_to_chunks(values, self.backend.slots)
        return [padded[r.start * slots : r.stop * slots] for r in self.ranges]

    # -- a round -----------------------------------------------------------------------------------
    def accumulate(self, update: EncryptedVector | wire_pb2.EncryptedVector, fresh: bool = False) -> None:
        """Add one update to the running sums, as it arrives; a wire message's chunks go on as they are.

        ``fresh``: every chunk must be a fresh full-depth encryption (checked by the shard holding it).
        If any shard refuses its part, the parts others added are taken out again and the error raised.
        """
        if isinstance(update, wire_pb2.EncryptedVector):
            check_header(self.backend, update, expected_length=self.length)
            chunks: list = list(update.chunks)
        else:
            chunks = update.chunks
        if self.local is not None:
            self.local.accumulate(chunks, fresh)
            return
        if not isinstance(update, wire_pb2.EncryptedVector):
            chunks = update.serialized or [self.backend.serialize(c) for c in update.chunks]
        parts = [chunks[r.start:r.stop] for r in self.ranges]
        refs = [actor.accumulate.remote(part, fresh) for actor, part in zip(self.actors, parts)]
        errors = [_error(ref) for ref in refs]
        failed = next((error for error in errors if error is not None), None)
        if failed is not None:
            self._all([actor.subtract.remote(part) for actor, part, error in zip(self.actors, parts, errors)
                       if error is None])
            raise failed

    def step(self, config: HEAdamConfig, poly: InverseSqrtPolynomial) -> None:
        """One HE-Adam step on every shard at once, on the updates accumulated since the last one."""
        if self.local is not None:
            self.local.step(config, poly)
        else:
            self._all([actor.step.remote(config, poly) for actor in self.actors])
        self.step_count += 1

    def he_adam_step(self, state: HEAdamState, aggregate: EncryptedVector, config: HEAdamConfig,
                     poly: InverseSqrtPolynomial) -> StepResult:
        """``he_adam.he_adam_step`` through the shards, for a caller that keeps the state itself."""
        self.set_state(state)
        self.accumulate(aggregate)
        self.step(config, poly)
        return StepResult(self.state(), None)

    # -- moving state in and out -------------------------------------------------------------------
    def export(self, name: str, for_decryption: bool = False) -> wire_pb2.EncryptedVector:
        """One vector as a wire message (``for_decryption``: switched down for a key holder)."""
        return proto_of_chunks(self.backend, self._gather(name, None, for_decryption), self.length)

    def vector(self, name: str) -> EncryptedVector:
        """One vector as ciphertexts in this process (checkpoints, tests)."""
        if self.local is not None:
            return EncryptedVector(list(self.local.chunks(name)), self.length)
        chunks = [self.backend.deserialize(data, self.backend.slots) for data in self._gather(name, None, False)]
        return EncryptedVector(chunks, self.length)

    def state(self) -> HEAdamState:
        theta, m, z, w = (self.vector(name) for name in VECTORS)
        return HEAdamState(theta, m, z, w, self.step_count)

    def masked(self, names: Sequence[str]) -> tuple[dict[str, wire_pb2.EncryptedVector], Masks]:
        """The refresh request's vectors under fresh secret masks (``he_adam.mask_state``), masked in
        the shards and switched down for the refresher."""
        masks = Masks({name: secret_uniform(-MASK_BOUND, MASK_BOUND, self.length) for name in names})
        wire = {name: proto_of_chunks(self.backend, self._gather(name, masks.values[name], True), self.length)
                for name in names}
        return wire, masks

    def unmask(self, refreshed: Mapping[str, wire_pb2.EncryptedVector], masks: Masks) -> None:
        """Own the refresher's fresh vectors with the masks removed (``he_adam.unmask_state``); each
        chunk is checked as a fresh ciphertext by the shard that loads it."""
        if set(refreshed) != set(masks.values) or not set(refreshed) <= set(STATE_NAMES):
            raise ValueError(f"refresh returned {sorted(refreshed)}, expected {sorted(masks.values)}")
        for msg in refreshed.values():
            check_header(self.backend, msg, expected_length=self.length)
        minus = {name: self._split(-masks.values[name]) for name in refreshed}
        if self.local is not None:
            for name, msg in refreshed.items():
                self.local.load(name, list(msg.chunks), minus[name][0], fresh=True)
            return
        self._all([actor.load.remote(name, list(msg.chunks[r.start:r.stop]), minus[name][i], True)
                   for name, msg in refreshed.items() for i, (actor, r) in enumerate(zip(self.actors, self.ranges))])

    def keep(self) -> None:
        """Remember the state, to ``restore`` it if the step turns out to be refused."""
        self._each("keep")

    def restore(self) -> None:
        self._each("restore")

    def where(self) -> list[tuple[str, int]]:
        """(Ray node id, process id) per shard."""
        if self.local is not None:
            return [self.local.where()]
        return self._all([actor.where.remote() for actor in self.actors])

    def local_pids(self) -> list[int]:
        """The actor processes on this machine (benchmarks read their CPU time and memory in /proc)."""
        if self.local is not None:
            return []
        import ray

        here = ray.get_runtime_context().get_node_id()
        return [pid for node, pid in self.where() if node == here]

    def _each(self, method: str) -> None:
        if self.local is not None:
            getattr(self.local, method)()
        else:
            self._all([getattr(actor, method).remote() for actor in self.actors])

    def _gather(self, name: str, plus: np.ndarray | None, for_decryption: bool) -> list[bytes]:
        if self.local is not None:
            return self.local.export(name, None if plus is None else pad_to_chunks(plus, self.backend.slots),
                                     for_decryption)
        pluses = self._split(plus) if plus is not None else [None] * len(self.actors)
        parts = self._all([actor.export.remote(name, p, for_decryption) for actor, p in zip(self.actors, pluses)])
        return [data for part in parts for data in part]

    def _stop_actors(self) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
        self.actors = []

    def close(self) -> None:
        """Stop the actors and leave Ray if this object joined it: a local Ray stops with it, a cluster
        at ``ray_address`` keeps running."""
        self._stop_actors()
        self.local = None
        self.ranges = []
        if self.connected:
            import ray

            ray.shutdown()
            self.connected = False

    def __enter__(self) -> ShardedHEAdam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(ref: Any) -> Exception | None:
    """What an actor call raised (its own exception, not Ray's wrapper), or None."""
    import ray

    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        return exc.cause if isinstance(exc.cause, Exception) else exc
    return None
