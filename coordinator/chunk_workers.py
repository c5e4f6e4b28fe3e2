"""Per-chunk HE work in worker processes, so a multi-chunk model uses every core.

TenSEAL holds the GIL for the whole of every operation, so threads cannot share the cores; a
model of more than one chunk (8192 values at the default profile) runs its chunks in worker
processes instead. Every element-wise operation on an ``EncryptedVector`` (an HE-Adam step,
decryption, encryption, re-encryption) is independent per chunk, so ``ChunkWorkers.map`` sends
one *group* per chunk index (the i-th chunk of each vector involved) to a worker and collects
the results in order.

Why it is shaped this way:

* Each worker loads the TenSEAL context once, in its initializer, from the context bytes; the
  coordinator's workers get the evaluation keys only, a key holder's workers its secret key
  (they are that organization's own processes, nothing leaves the machine).
* Chunks cross the process boundary serialized: TenSEAL cannot pickle. A full-depth chunk costs
  about 10 ms to serialize (its 40-bit primes are compressed) against 2.7 ms to load, and a
  chunk at the last level well under 1 ms, so callers keep serialization rare: wire bytes are
  passed as they are (the worker validates them), and a function returns wire bytes when the
  result goes on the wire anyway.
* The main process pipelines: it serializes group i+1 while the workers compute group i, with
  at most two groups per worker in flight (memory stays bounded for any model size).
* A single chunk, one worker, or the plaintext backend run in-process with no process started
  and no copy made: a CartPole run (835 parameters, one chunk) pays nothing.
* Workers come from a forkserver (never a fork of a process running gRPC or Ray threads), so, as
  with any spawned process, a script that uses them must guard its entry point with
  ``if __name__ == "__main__":`` (``fedhe``, pytest and Flower's entry points do).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import tenseal as ts

from protos.backend import HEBackend, TensealBackend
from protos.profiles import get_profile

WORKERS_ENV = "FEDHE_WORKERS"
INFLIGHT_PER_WORKER = 2

BackendFactory = Callable[[bytes, str, str], HEBackend]
ChunkFunction = Callable[..., tuple]


def default_workers() -> int:
    """``FEDHE_WORKERS`` if set, else the cores this process may run on."""
    configured = os.environ.get(WORKERS_ENV, "").strip()
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be a whole number of processes, got {configured!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tensealbackend_from(context_bytes: bytes, profile_name: str, fingerprint: str) -> TensealBackend:
    """A worker's evaluation backend, set up as ``protos.keyfile.load_evaluation_backend`` does."""
    context = ts.context_from(context_bytes)
    context.auto_relin = context.auto_rescale = context.auto_mod_switch = True
    profile = get_profile(profile_name)
    context.global_scale = 2.0**profile.scale_bits
    return TensealBackend(context, profile, fingerprint)


@dataclass(frozen=True)
class Packed:
    """A chunk serialized only to cross the process boundary (trusted: loaded without checks)."""

    data: bytes


_WORKER_BACKEND: HEBackend | None = None


def _start_worker(factory: BackendFactory, context_bytes: bytes, profile_name: str, fingerprint: str) -> None:
    global _WORKER_BACKEND
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _WORKER_BACKEND = factory(context_bytes, profile_name, fingerprint)


def _pack(item: Any) -> Any:
    return Packed(item.serialize()) if isinstance(item, ts.CKKSVector) else item


def _unpack(backend: HEBackend, item: Any) -> Any:
    if isinstance(item, Packed):
        return ts.ckks_vector_from(backend.context, item.data)
    return item


def _run_group(fn: ChunkFunction, group: tuple, static: tuple) -> tuple:
    backend = _WORKER_BACKEND
    if backend is None:
        raise RuntimeError("chunk worker started without a backend")
    result = fn(backend, *(_unpack(backend, item) for item in group), *static)
    return tuple(_pack(item) for item in result)


def _ready() -> int:
    return os.getpid()


class ChunkWorkers:
    """A lazily started pool of processes holding one backend's context.

    ``fn(backend, *group, *static)`` is a module-level function (workers import it by name)
    returning a tuple; its inputs and outputs may be chunks, bytes, arrays or numbers.
    """

    def __init__(self, backend: HEBackend, workers: int | None = None, factory: BackendFactory = tensealbackend_from):
        self.backend = backend
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.factory = factory
        self._pool: ProcessPoolExecutor | None = None

    @property
    def parallel(self) -> bool:
        """Whether ``map`` may use processes at all (plaintext chunks are cheaper to add than to copy)."""
        return self.workers > 1 and isinstance(self.backend, TensealBackend)

    def map(self, fn: ChunkFunction, groups: Sequence[tuple], *static: Any) -> list[tuple]:
        """``fn`` over every group, results in order; in-process for fewer than two groups."""
        if not self.parallel or len(groups) < 2:
            return [fn(self.backend, *group, *static) for group in groups]
        pool = self._executor()
        pending: deque[Future] = deque()
        results: list[tuple] = []
        try:
            for group in groups:
                pending.append(pool.submit(_run_group, fn, tuple(_pack(item) for item in group), static))
                if len(pending) >= INFLIGHT_PER_WORKER * self.workers:
                    results.append(self._collect(pending.popleft()))
            while pending:
                results.append(self._collect(pending.popleft()))
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)  # a worker died (killed, out of memory)
            self._pool = None  # start afresh next time
            raise
        finally:
            for future in pending:
                future.cancel()
        return results

    def warm(self) -> None:
        """Start every worker and load its context now (benchmarks: keep start-up out of timings)."""
        if self.parallel:
            pool = self._executor()
            for future in [pool.submit(_ready) for _ in range(self.workers)]:
                future.result()

    def pids(self) -> list[int]:
        """The worker processes now running (none before the first parallel ``map`` or ``warm``)."""
        processes = getattr(self._pool, "_processes", None) or {}  # ProcessPoolExecutor keeps no public list
        return sorted(processes)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ChunkWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _collect(self, future: Future) -> tuple:
        return tuple(_unpack(self.backend, item) for item in future.result())

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            backend = self.backend
            context = backend.context
            context_bytes = context.serialize(
                save_public_key=True,
                save_secret_key=context.is_private(),
                save_relin_keys=context.has_relin_keys(),
                save_galois_keys=False,
            )
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=_process_context(),
                initializer=_start_worker,
                initargs=(self.factory, context_bytes, backend.profile.name, backend.fingerprint),
            )
        return self._pool


def _process_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one: never fork a process that may run gRPC or Ray threads, and
    fork workers from a server that has TenSEAL imported already."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
