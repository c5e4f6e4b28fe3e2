"""A long-lived local process per organization, so a deployment trains as a simulation does.

A deployed SuperNode starts a fresh ClientApp process for every message (Flower 1.41, with either
``--isolation``), so anything a process holds, its environments, their episodes in progress, the
running statistics, the loaded keys, would start over every round: episodes would be cut at the
round's step budget and training would be a different algorithm than in simulation. So the
deployed ClientApp forwards each message to this worker and returns its answer. The worker lives
on the organization's own machine, runs the same code as the ClientApp (the app bundle's directory
is on its path) and holds everything a participant keeps between rounds.

* One worker per code directory and key directory, with a private state directory (mode 0700;
  node config ``state-dir``, default under the system's temp directory) and a Unix socket (a short
  path in the temp directory, named after the state directory).
  The first message of a run starts it; it exits after ``IDLE_S`` without a message, when the
  SuperNode's process that started it is gone, or when asked to (a new app bundle gets a new
  worker).
* Connections are authenticated (``multiprocessing.connection``: HMAC challenge with a random
  32-byte key in a 0600 file), so only this organization's user can talk to it. Nothing it
  receives or returns leaves the machine except the reply the ClientApp then sends, through the
  same egress guard as always.
* Its own log (details, tracebacks) is ``worker.log`` in the state directory, its process id
  ``worker.pid``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from protos.files import write_atomic

log = logging.getLogger("fedhe.participant")
AUTHKEY, LOG, PID = "worker.key", "worker.log", "worker.pid"
IDLE_S = 1800.0  # a worker nobody talked to for 30 minutes exits
START_S = 60.0  # how long a ClientApp waits for a worker it started (TenSEAL and Gymnasium imports)


def socket_path(directory: Path) -> str:
    """The worker's socket: a short path of its own (a Unix socket path holds at most 107 bytes, a
    state directory may be longer), named after the state directory, in the temp directory."""
    digest = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:20]
    return os.path.join(tempfile.gettempdir(), f"fedhe-{digest}.sock")


def state_dir(tag: str, code_dir: Path, configured: str = "") -> Path:
    """The worker's private directory: ``configured`` or one per (code, ``tag``) under the temp directory."""
    if configured:
        return Path(configured)
    digest = hashlib.sha256(f"{Path(code_dir).resolve()}\0{tag}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedhe-worker-{os.getuid()}-{digest}"


class WorkerClient:
    """The ClientApp's side: hand one message to the organization's worker, starting it if needed."""

    def __init__(self, directory: Path, code_dir: Path, factory: str, factory_kwargs: dict | None = None) -> None:
        self.directory, self.code_dir = Path(directory), Path(code_dir)
        self.factory, self.factory_kwargs = factory, factory_kwargs or {}

    def forward(self, msg: Message, context: Context) -> Message:
        """The worker's reply to ``msg``; ``context.state`` (the per-run node state) comes back updated."""
        answer = self.call({"message": message_to_proto(msg).SerializeToString(),
                            "context": context_to_proto(context).SerializeToString(),
                            "factory": self.factory, "kwargs": self.factory_kwargs})
        state = recorddict_from_proto(ProtoRecordDict.FromString(answer["state"]))
        for name in list(context.state):
            del context.state[name]
        for name, record in state.items():
            context.state[name] = record
        return message_from_proto(ProtoMessage.FromString(answer["message"]))

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._connect() as conn:
            conn.send(request)
            return conn.recv()


    def _connect(self) -> Connection:
        try:
            return self._open()
        except (FileNotFoundError, ConnectionRefusedError, OSError):
            started = self._start()
        deadline = time.monotonic() + START_S
        while True:
            try:
                return self._open()
            except (FileNotFoundError, ConnectionRefusedError, OSError):
                if started is not None and started.poll() is not None:
                    raise RuntimeError(f"the participant worker exited at start; see {self.directory / LOG}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the participant worker did not start within {START_S:g} s; see {self.directory / LOG}"
                    ) from None
                time.sleep(0.1)

    def _open(self) -> Connection:
        key = (self.directory / AUTHKEY).read_bytes()
        return Client(socket_path(self.directory), family="AF_UNIX", authkey=key)

    def _start(self) -> subprocess.Popen | None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        remove_traces(self.directory)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(self.code_dir), os.environ.get("PYTHONPATH", "")]))
        with open(self.directory / LOG, "ab") as out:
            # it watches the process that started this ClientApp (the SuperNode's SuperExec): gone with it
            return subprocess.Popen(
                [sys.executable, "-m", "participant.worker", str(self.directory), str(os.getppid())],
                cwd=self.code_dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)


@lru_cache(maxsize=8)
def _app_from(factory: str, kwargs: bytes) -> ClientApp:
    module, name = factory.split(":")
    return getattr(importlib.import_module(module), name)(**pickle.loads(kwargs))


def app_from(factory: str, kwargs: dict[str, Any] | None = None) -> ClientApp:
    """The ClientApp a factory ("module:function") builds from ``kwargs``, built once per process."""
    return _app_from(factory, pickle.dumps(kwargs or {}))


def stop_worker(directory: Path) -> None:
    """Ask the worker of ``directory`` to exit now (a simulation that ended, a test), and clear what a
    worker that died without exiting left behind."""
    directory = Path(directory)
    try:
        key = (directory / AUTHKEY).read_bytes()
        with Client(socket_path(directory), family="AF_UNIX", authkey=key) as conn:
            conn.send({"stop": True})
    except (FileNotFoundError, ConnectionRefusedError, OSError):
        pass
    try:
        pid = int((directory / PID).read_text())
    except (FileNotFoundError, ValueError):
        return
    deadline = time.monotonic() + 5.0
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not alive(pid):
        remove_traces(directory)


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """Run the organization's ClientApp on one forwarded message, here, where its state lives."""
    t0 = time.perf_counter()
    msg = message_from_proto(ProtoMessage.FromString(request["message"]))
    context = context_from_proto(ProtoContext.FromString(request["context"]))
    reply = app_from(request["factory"], request["kwargs"])(msg, context)
    log.info("answered a %s message of round %s in %.0f ms%s", msg.metadata.message_type, msg.metadata.group_id,
             (time.perf_counter() - t0) * 1e3, " (an error reply)" if reply.has_error() else "")
    return {"message": message_to_proto(reply).SerializeToString(),
            "state": recorddict_to_proto(context.state).SerializeToString()}


def remove_traces(directory: Path) -> None:
    """An exiting worker leaves only its log."""
    for name in (AUTHKEY, PID):
        (directory / name).unlink(missing_ok=True)
    Path(socket_path(directory)).unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(directory: Path, watch_pid: int, idle_s: float = IDLE_S) -> None:
    """The worker's loop: one request at a time, until idle for ``idle_s`` or ``watch_pid`` is gone."""

    directory = Path(directory)
    key = os.urandom(32)
    os.umask(0o077)  # the socket, like the key, only for this organization's user
    listener = Listener(socket_path(directory), family="AF_UNIX", authkey=key)
    write_atomic(directory / PID, f"{os.getpid()}\n".encode())
    write_atomic(directory / AUTHKEY, key, 0o600)  # only now can a ClientApp connect
    last = [time.monotonic()]

    def exit_when_idle_or_orphaned() -> None:
        while time.monotonic() - last[0] < idle_s and alive(watch_pid):
            time.sleep(min(idle_s, 1.0))
        log.info("participant worker idle for %g s or its SuperNode is gone: exiting", idle_s)
        remove_traces(directory)
        os._exit(0)

    threading.Thread(target=exit_when_idle_or_orphaned, daemon=True).start()
    log.info("participant worker serving on %s (pid %d)", socket_path(directory), os.getpid())
    while True:
        try:
            conn = listener.accept()
        except Exception:  # a client that failed authentication: not ours
            log.warning("refused a connection that did not authenticate", exc_info=True)
            continue
        with conn:
            request = conn.recv()
            if request.get("stop"):
                log.info("participant worker asked to stop")
                remove_traces(directory)
                return
            last[0] = time.monotonic()
            conn.send(answer(request))
            last[0] = time.monotonic()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(Path(sys.argv[1]), int(sys.argv[2]))
