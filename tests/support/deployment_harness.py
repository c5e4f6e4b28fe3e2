"""Run a real Flower deployment (SuperLink + N SuperNodes) on loopback for tests.

Test support, not a test file: starts ``flower-superlink`` and N ``flower-supernode`` processes,
runs the app with ``flwr run <app> <connection> --stream`` and reports the outcome (every
process's log tail on failure). Every program comes from this interpreter's environment
(``program``, ``child_env``), so no activated venv is needed. How Flower 1.41 behaves here, the
commands it runs and the gotchas it works around: docs/testing.md, "The deployment harness".
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONNECTION_NAME = "local-test"
_HOST = "127.0.0.1"
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

ConfigValue = bool | int | float | str

try:  # imported as `support.deployment_harness` (pytest's pythonpath) or as a plain module
    from support.credentials import TlsFiles, make_auth_key
except ImportError:  # pragma: no cover
    from credentials import TlsFiles, make_auth_key


class DeploymentError(RuntimeError):
    """Raised when the deployment cannot be started or queried."""


# --------------------------------------------------------------------------- utils
def _scripts_dirs() -> list[Path]:
    """This interpreter's scripts folders: next to ``sys.executable`` (a venv's ``bin``), then
    ``sysconfig``'s (they are the same folder in a venv)."""
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def program(name: str) -> str:
    """Absolute path of the Flower program ``name`` (``flower-superlink``, ``flwr``, ...) in this
    interpreter's environment, so the tests run without an activated venv."""
    for folder in _scripts_dirs():
        cand = folder / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise DeploymentError(f"{name} not found in {', '.join(map(str, _scripts_dirs()))} (is flwr installed?)")


def child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """``os.environ`` plus ``overrides``, with PATH beginning with this interpreter's scripts
    folders: the SuperLink and SuperNodes start ``flower-superexec``, and it starts
    ``flwr-serverapp``/``flwr-clientapp``, by name."""
    env = dict(os.environ)
    env.update(overrides)
    first = [str(d) for d in _scripts_dirs()]
    rest = [d for d in env.get("PATH", "").split(os.pathsep) if d and d not in first]
    env["PATH"] = os.pathsep.join(first + rest)
    return env


def free_ports(n: int, host: str = _HOST) -> list[int]:
    """Return ``n`` distinct free TCP ports (bind to port 0, hold all, release)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int, host: str = _HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def toml_value(value: ConfigValue) -> str:
    """Format a scalar as a TOML value for a Flower ``k=v`` pair."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # Flower's k=v regex does not understand escapes inside quotes.
        if '"' not in value and "\\" not in value and "\n" not in value:
            return f'"{value}"'
        if "'" not in value and "\n" not in value:
            return f"'{value}'"  # TOML literal string, no escapes needed
        raise ValueError(f"cannot pass string {value!r} as a Flower k=v config value")
    raise TypeError(f"unsupported config value type {type(value).__name__}: {value!r}")


def format_config_pairs(config: Mapping[str, ConfigValue]) -> str:
    """``{"key-dir": "/x", "i": 0}`` -> ``'key-dir="/x" i=0'`` (for --node-config)."""
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"invalid config key {key!r}")
        parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


def _write_toml(path: Path, config: Mapping[str, ConfigValue]) -> None:
    lines = [f'"{k}" = {toml_value(v)}' for k, v in config.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return "\n".join(_ANSI_RE.sub("", text).splitlines()[-lines:])


# ----------------------------------------------------------------- process trees
def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(root_pids: Sequence[int]) -> list[tuple[int, str]]:
    """(pid, starttime) of roots and all their descendants (Linux /proc)."""
    if not Path("/proc").is_dir():
        return []
    children = _children_map()
    out, stack, seen = [], list(root_pids), set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        start = _proc_start_time(pid)
        if start is not None:
            out.append((pid, start))
        stack.extend(children.get(pid, []))
    return out


def _signal_tree(members: Sequence[tuple[int, str]], sig: int) -> None:
    for pid, start in members:
        if _proc_start_time(pid) == start:  # guard against pid reuse
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(members: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    alive = []
    for pid, start in members:
        if _proc_start_time(pid) != start:
            continue
        try:  # zombies (reparented to a non-reaping init) count as dead
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append((pid, start))
    return alive


@dataclass
class ManagedProcess:
    """A process started by the harness, with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _terminate_all(procs: Sequence[ManagedProcess], grace: float = 8.0) -> None:
    """SIGTERM every process tree (incl. detached SuperExecs), then SIGKILL."""
    roots = [p.popen.pid for p in procs]
    members = _descendants(roots)
    for p in procs:  # process groups (each started with start_new_session)
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except OSError:
            pass
    _signal_tree(members, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for p in procs:
            p.popen.poll()
        # Pick up children spawned meanwhile (e.g. a SuperExec launching an app).
        members = list({*members, *_descendants(roots)})
        if not _alive(members) and all(p.popen.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        try:
            os.killpg(p.popen.pid, signal.SIGKILL)
        except OSError:
            pass
    _signal_tree(_alive(members), signal.SIGKILL)
    for p in procs:
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# ----------------------------------------------------------------------- results
@dataclass
class RunResult:
    """Outcome of ``LocalDeployment.run_app``."""

    returncode: int | None  # of `flwr run --stream`; None if it timed out
    output: str  # stdout+stderr of `flwr run --stream` (ANSI stripped)
    run_id: int | None
    status: str | None  # e.g. "finished:completed", "finished:failed"
    status_details: str
    duration_s: float
    timed_out: bool
    log_path: Path
    diagnostics: str = field(default="", repr=False)  # tails of all process logs

    @property
    def succeeded(self) -> bool:
        return (
            not self.timed_out
            and self.returncode == 0
            and self.status == "finished:completed"
        )

    def check(self) -> RunResult:
        """Raise ``AssertionError`` with all log tails unless the run succeeded."""
        if not self.succeeded:
            raise AssertionError(self.describe())
        return self

    def describe(self) -> str:
        return (
            f"run_id={self.run_id} status={self.status!r} "
            f"details={self.status_details!r} returncode={self.returncode} "
            f"timed_out={self.timed_out} duration={self.duration_s:.1f}s\n"
            f"--- flwr run output (tail) ---\n"
            + "\n".join(self.output.splitlines()[-60:])
            + "\n"
            + self.diagnostics
        )


# -------------------------------------------------------------------- deployment
class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback, as a context manager."""

    def __init__(
        self,
        num_nodes: int,
        workdir: str | os.PathLike[str],
        node_configs: Sequence[Mapping[str, ConfigValue]] | None = None,
        *,
        startup_timeout: float = 90.0,
        env: Mapping[str, str] | None = None,
        superlink_args: Sequence[str] = (),
        supernode_args: Sequence[str] = (),
        cli_timeout: float = 60.0,
        tls: TlsFiles | None = None,
        auth: bool = False,
    ) -> None:
        """``tls``: serve the SuperLink with these files (else ``--insecure``); ``auth``: SuperNode
        authentication, with a registered key pair per node (``node_keys``)."""
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError("node_configs must have one entry per node")
        self.num_nodes = num_nodes
        self.node_configs = [dict(c) for c in (node_configs or [{}] * num_nodes)]
        self.workdir = Path(workdir).resolve()
        self.startup_timeout = startup_timeout
        self.cli_timeout = cli_timeout
        self.superlink_args = list(superlink_args)
        self.supernode_args = list(supernode_args)
        self.extra_env = dict(env or {})
        self.superlink_port: int | None = None
        self.node_ports: list[int] = []
        self.cli_home = self.workdir / "cli-home"
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self._run_counter = 0
        self.startup_s: float | None = None  # time until all nodes were online
        self.tls, self.auth = tls, auth
        self.node_keys: list[tuple[Path, Path]] = []  # (private, public) per node when ``auth``

    # ------------------------------------------------------------ environment
    def base_env(self, flwr_home: Path) -> dict[str, str]:
        return child_env({
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "NO_COLOR": "1",
            "COLUMNS": "200",
            # SuperExec asks for new work every second by default; 0.5 s shortens every exchange, and
            # costs little CPU (at 0.1 s each idle SuperNode and its SuperExec burn ~6 % of a core)
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5",
            **self.extra_env,
        })

    def _spawn(self, name: str, argv: list[str], home: Path) -> ManagedProcess:
        cwd = home.parent
        cwd.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=self.base_env(home),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return ManagedProcess(name, argv, log_path, popen)

    @property
    def processes(self) -> list[ManagedProcess]:
        return [p for p in [self.superlink, *self.supernodes] if p is not None]

    def diagnostics(self, lines: int = 40) -> str:
        out = []
        for p in self.processes:
            rc = p.popen.poll()
            state = "running" if rc is None else f"exited rc={rc}"
            out.append(f"--- {p.name} ({state}) {p.log_path} ---\n{p.tail(lines)}")
        return "\n".join(out)

    # -------------------------------------------------------------- lifecycle
    def start(self, attempts: int = 2) -> LocalDeployment:
        """Start everything on fresh free ports; a failed start is retried once (a port taken
        between choosing and binding it, on a shared machine), then raises with every log's tail."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except DeploymentError:
                self.stop()
                if attempt == attempts:
                    raise
                self.superlink, self.supernodes = None, []
        return self

    def _start_once(self) -> LocalDeployment:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + self.num_nodes)
        self.superlink_port, self.node_ports = ports[0], ports[1:]
        self._write_cli_config()
        if self.tls is None:
            transport = ["--insecure"]
        else:
            transport = ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                         "--ssl-keyfile", str(self.tls.server_key)]
        try:
            self.superlink = self._spawn(
                "superlink",
                [
                    program("flower-superlink"),
                    *transport,
                    *(["--enable-supernode-auth"] if self.auth else []),
                    "--disable-runtime-dependency-installation",
                    "--host", _HOST,
                    "--port", str(self.superlink_port),
                    *self.superlink_args,
                ],
                self.workdir / "superlink" / "home",
            )
            deadline = time.monotonic() + self.startup_timeout
            self._wait(lambda: _port_open(self.superlink_port), deadline, "SuperLink port")
            if self.auth and not self.node_keys:
                self.node_keys = [make_auth_key(self.workdir / "auth" / f"node-{i}") for i in range(self.num_nodes)]
            for _, public in self.node_keys:
                self.register(public)
            for i in range(self.num_nodes):
                self.supernodes.append(self.spawn_node(i))
            self._wait(
                lambda: len(self.online_nodes()) >= self.num_nodes,
                deadline,
                f"{self.num_nodes} SuperNodes online",
            )
            self.startup_s = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def spawn_node(
        self, i: int, *, root_certificates: Path | None = None, auth_key: Path | None = None, name: str = ""
    ) -> ManagedProcess:
        """Start SuperNode ``i`` (its port, node config and, with ``auth``, its key); the keyword
        arguments override what it trusts and which key it presents, and a ``name`` starts an extra
        process on a port of its own (refusal tests, restarts)."""
        port = self.node_ports[i] if not name else free_ports(1)[0]
        if self.tls is None:
            transport = ["--insecure"]
        else:
            transport = ["--root-certificates", str(root_certificates or self.tls.ca_cert)]
        key = auth_key or (self.node_keys[i][0] if self.auth and i < len(self.node_keys) else None)
        argv = [
            program("flower-supernode"),
            *transport,
            *(["--auth-supernode-private-key", str(key)] if key else []),
            "--superlink", f"{_HOST}:{self.superlink_port}",
            "--host", _HOST,
            "--port", str(port),
            *self.supernode_args,
        ]
        cfg = self.node_configs[i] if i < len(self.node_configs) else {}
        if cfg:
            argv += ["--node-config", format_config_pairs(cfg)]
        label = name or f"supernode-{i}"
        return self._spawn(label, argv, self.workdir / label / "home")

    def kill_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` and everything it started (a crashed machine)."""
        _signal_tree(_descendants([self.supernodes[i].popen.pid]), signal.SIGKILL)
        self.supernodes[i].popen.wait(timeout=10)

    def restart_node(self, i: int) -> None:
        self.supernodes[i] = self.spawn_node(i, name=f"supernode-{i}-restarted")

    def kill_serverapp(self) -> int:
        """SIGKILL the running ServerApp process (the coordinator dying mid-run); returns how many."""
        targets = [(pid, start) for pid, start in _descendants([self.superlink.popen.pid])
                   if "flwr-serverapp" in _cmdline(pid)]
        _signal_tree(targets, signal.SIGKILL)
        return len(targets)

    def register(self, public_key: Path) -> None:
        proc = self.flwr("supernode", "register", str(public_key), CONNECTION_NAME)
        if proc.returncode != 0:
            raise DeploymentError(f"registering {public_key} failed: {proc.stdout}{proc.stderr}")

    def _wait(self, cond: Any, deadline: float, what: str) -> None:
        while True:
            dead = [p for p in self.processes if not p.alive()]
            if dead:
                raise DeploymentError(
                    f"{', '.join(p.name for p in dead)} exited while waiting for {what}\n"
                    + self.diagnostics()
                )
            if cond():
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out waiting for {what}\n" + self.diagnostics())
            time.sleep(0.3)

    def stop(self, grace: float = 8.0) -> None:
        procs = self.processes
        if procs:
            _terminate_all(procs, grace)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------- CLI
    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        transport = "insecure = true\n" if self.tls is None else f'root-certificates = "{self.tls.ca_cert.resolve()}"\n'
        (self.cli_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f'address = "{_HOST}:{self.superlink_port}"\n' + transport,
            encoding="utf-8",
        )

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``flwr <args>`` against this deployment (isolated FLWR_HOME)."""
        return subprocess.run(
            [program("flwr"), *args],
            env=self.base_env(self.cli_home),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout or self.cli_timeout,
            check=False,
        )

    def _flwr_json(self, *args: str) -> dict[str, Any] | None:
        try:
            proc = self.flwr(*args, "--format", "json")
        except subprocess.TimeoutExpired:
            return None
        try:
            start = proc.stdout.index("{")
            data = json.loads(proc.stdout[start:])
        except ValueError:
            return None
        return data if isinstance(data, dict) and data.get("success") else None

    def online_nodes(self) -> list[dict[str, Any]]:
        data = self._flwr_json("supernode", "list", CONNECTION_NAME)
        nodes = (data or {}).get("nodes", [])
        return [n for n in nodes if n.get("status") == "online"]

    def run_info(self, run_id: int) -> dict[str, Any] | None:
        data = self._flwr_json("list", CONNECTION_NAME, "--run-id", str(run_id))
        runs = (data or {}).get("runs") or []
        return runs[0] if runs else None

    # -------------------------------------------------------------------- run
    def run_app(
        self,
        app_dir: str | os.PathLike[str],
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 300.0,
        status_timeout: float = 30.0,
    ) -> RunResult:
        """``flwr run app_dir --stream``; block until the run is finished."""
        if self.superlink is None:
            raise DeploymentError("deployment not started")
        self._run_counter += 1
        k = self._run_counter
        run_dir = self.workdir / "runs"
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / f"run-{k}.log"
        argv = [program("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION_NAME, "--stream"]
        if run_config:
            cfg_path = run_dir / f"run-{k}-config.toml"
            _write_toml(cfg_path, run_config)
            argv += ["--run-config", str(cfg_path)]

        t0 = time.monotonic()
        timed_out = False
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                env=self.base_env(self.cli_home),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                returncode: int | None = popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
                _terminate_all([ManagedProcess("flwr-run", argv, log_path, popen)], 3.0)
        output = _ANSI_RE.sub("", log_path.read_text(encoding="utf-8", errors="replace"))
        match = _RUN_ID_RE.search(output)
        run_id = int(match.group(1)) if match else None

        status, details = None, ""
        if run_id is not None:
            if timed_out:
                self.flwr("stop", str(run_id), CONNECTION_NAME)
            # The log stream may end slightly before the status flips to finished.
            deadline = time.monotonic() + status_timeout
            while True:
                info = self.run_info(run_id)
                if info:
                    status, details = info.get("status"), info.get("status-details") or ""
                if (status or "").startswith("finished") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        return RunResult(
            returncode=returncode,
            output=output,
            run_id=run_id,
            status=status,
            status_details=details,
            duration_s=time.monotonic() - t0,
            timed_out=timed_out,
            log_path=log_path,
            diagnostics=self.diagnostics(),
        )


# ---------------------------------------------------------------------------- FAB
def build_fab(app_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Build the FAB exactly as ``flwr build``/``flwr run`` would; return its path.

    Runs ``flwr build --app app_dir`` with ``cwd=out_dir`` (the CLI writes into
    the current directory and has no output option).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.fab"))
    env = child_env({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "NO_COLOR": "1",
                     "FLWR_HOME": str(out / ".flwr-home")})
    proc = subprocess.run(
        [program("flwr"), "build", "--app", str(Path(app_dir).resolve())],
        cwd=out, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    new = sorted(set(out.glob("*.fab")) - before, key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not new:
        # Same content -> same file name; accept a pre-existing identical FAB.
        m = re.search(r"Successfully built (\S+\.fab)", _ANSI_RE.sub("", proc.stdout))
        if proc.returncode == 0 and m and (out / m.group(1)).exists():
            return out / m.group(1)
        raise DeploymentError(
            f"flwr build failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return new[-1]


def fab_files(fab_path: str | os.PathLike[str]) -> list[str]:
    """Sorted member names of a FAB (a zip), incl. ``pyproject.toml`` and ``.info/CONTENT``."""
    with zipfile.ZipFile(fab_path) as zf:
        return sorted(zf.namelist())
