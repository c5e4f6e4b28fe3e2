"""Tests for ``tests/support/deployment_harness.py`` with a tiny real Flower app (Message API).

Starts a real SuperLink and 3 SuperNodes on loopback (no Ray, no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.deployment_harness import LocalDeployment, build_fab, fab_files, format_config_pairs

pytestmark = pytest.mark.deployment

NUM_NODES = 3
ECHO_PREFIX = "ECHO-RESULT "

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "echoapp"
version = "1.0.0"
description = "deployment harness smoke app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedhe-test"

[tool.flwr.app.components]
serverapp = "echoapp.server_app:app"
clientapp = "echoapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 1
expected-nodes = 3
fail = false
"""

SERVER_APP = '''\
"""ServerApp: one QUERY message per round to every node; checks the replies."""
import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise RuntimeError("ServerApp asked to fail")
    rounds = int(context.run_config["num-server-rounds"])
    expected = int(context.run_config["expected-nodes"])
    deadline = time.monotonic() + 30
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
    assert len(node_ids) == expected, f"only {len(node_ids)} nodes"

    summary = {"rounds": [], "run_config": dict(context.run_config)}
    for server_round in range(1, rounds + 1):
        msgs = [
            Message(
                RecordDict({"config": ConfigRecord({"server-round": server_round})}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in node_ids
        ]
        replies = list(grid.send_and_receive(msgs, timeout=60))
        errors = [r.error.reason for r in replies if r.has_error()]
        assert not errors, errors
        assert len(replies) == expected, len(replies)
        echoed = []
        for rep in replies:
            cfg = rep.content["echo"]
            assert cfg["server-round"] == server_round
            assert cfg["node-id"] == rep.metadata.src_node_id
            echoed.append({k: cfg[k] for k in cfg.keys()})
        assert len({e["node-id"] for e in echoed}) == expected
        summary["rounds"].append(echoed)
        print(f"round {server_round}: {len(replies)} replies")
    print("ECHO-RESULT " + json.dumps(summary, sort_keys=True), flush=True)
'''

CLIENT_APP = '''\
"""ClientApp: echo context.node_config (values and Python types) back."""
import json
import os
import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    node_config = dict(context.node_config)
    echo = ConfigRecord(
        {
            "server-round": msg.content["config"]["server-round"],
            "node-id": context.node_id,
            "node-config": json.dumps(node_config, sort_keys=True),
            "node-config-types": json.dumps(
                {k: type(v).__name__ for k, v in node_config.items()}, sort_keys=True
            ),
            "module-file": __file__,
            "flwr-home": os.environ.get("FLWR_HOME", ""),
            "cwd": os.getcwd(),
            "pid": os.getpid(),
        }
    )
    return Message(RecordDict({"echo": echo}), reply_to=msg)
'''


def write_echo_app(root: Path) -> Path:
    """Generate the tiny app into ``root/echoapp`` (dir name must be a valid app name)."""
    app_dir = root / "echoapp"
    pkg = app_dir / "echoapp"
    pkg.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "server_app.py").write_text(SERVER_APP)
    (pkg / "client_app.py").write_text(CLIENT_APP)
    # Things that must never be shipped in the FAB:
    (pkg / "secret.ctx").write_bytes(b"\x00secret-key-context")
    (pkg / "test_local.py").write_text("def test_x():\n    pass\n")
    return app_dir


def parse_echo(output: str) -> dict:
    lines = [line for line in output.splitlines() if ECHO_PREFIX in line]
    assert lines, f"no {ECHO_PREFIX!r} line in run output:\n{output[-3000:]}"
    return json.loads(lines[-1].split(ECHO_PREFIX, 1)[1])


def test_node_config_formatting_round_trips_through_flower_parser():
    from flwr.common.config import parse_config_args

    cfg = {
        "key-dir": "/x/k 0",
        "participant-index": 0,
        "lr": 0.5,
        "plaintext": True,
        "note": 'say "hi"',
    }
    s = format_config_pairs(cfg)
    assert parse_config_args([s]) == cfg


def test_build_fab_excludes_key_files_and_tests(tmp_path):
    app_dir = write_echo_app(tmp_path)
    fab = build_fab(app_dir, tmp_path / "fabs")
    assert fab.suffix == ".fab" and fab.exists()
    files = fab_files(fab)
    assert "pyproject.toml" in files
    assert ".info/CONTENT" in files
    assert "echoapp/server_app.py" in files
    assert "echoapp/client_app.py" in files
    assert not any(f.endswith(".ctx") for f in files), files
    assert "echoapp/test_local.py" not in files


@pytest.mark.timeout(300)
def test_local_deployment_runs_message_api_app(tmp_path):
    app_dir = write_echo_app(tmp_path)
    key_dirs = [tmp_path / "keys" / f"k{i}" for i in range(NUM_NODES)]
    node_configs = [
        {"key-dir": str(d), "participant-index": i, "weight": 0.5 + i, "plaintext": i == 1}
        for i, d in enumerate(key_dirs)
    ]
    with LocalDeployment(
        num_nodes=NUM_NODES, node_configs=node_configs, workdir=tmp_path / "dep"
    ) as dep:
        result = dep.run_app(app_dir, run_config={"num-server-rounds": 1}, timeout=120)
        result.check()
        assert result.returncode == 0
        assert result.status == "finished:completed"
        assert isinstance(result.run_id, int)

        summary = parse_echo(result.output)
        assert summary["run_config"]["num-server-rounds"] == 1  # override applied
        assert len(summary["rounds"]) == 1
        seen_configs = {}
        for echoed in summary["rounds"]:
            assert len({e["node-id"] for e in echoed}) == NUM_NODES
            for e in echoed:
                seen_configs.setdefault(e["node-id"], set()).add(e["node-config"])
                types = json.loads(e["node-config-types"])
                assert types == {
                    "key-dir": "str",
                    "participant-index": "int",
                    "plaintext": "bool",
                    "weight": "float",
                }
                # App code comes from the FAB unpacked under the node's FLWR_HOME.
                assert e["module-file"].startswith(e["flwr-home"] + "/apps/")
        assert len(seen_configs) == NUM_NODES
        # Each node saw exactly its own node config.
        got = sorted(
            (json.loads(next(iter(v))) for v in seen_configs.values()),
            key=lambda c: c["participant-index"],
        )
        assert all(len(v) == 1 for v in seen_configs.values())
        assert got == node_configs

        # A failing ServerApp: `flwr run --stream` still exits 0, the status says failed.
        bad = dep.run_app(app_dir, run_config={"fail": True}, timeout=120)
        assert bad.returncode == 0
        assert bad.status == "finished:failed", bad.describe()
        assert not bad.succeeded
        with pytest.raises(AssertionError, match="finished:failed"):
            bad.check()

    # Teardown left nothing running.
    assert all(p.popen.poll() is not None for p in dep.processes)
