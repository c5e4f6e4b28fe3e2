"""The HE-Adam step sharded on Ray gives the in-process step's ciphertexts, byte for byte.

Real CKKS at the default profile (the smallest that fits an HE-Adam step), real Ray: a local Ray
started by ``ShardedHEAdam`` and a two-node cluster on this host started with ``ray start``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.he_adam_states import encrypted_state

from coordinator.he_adam import HEAdamConfig, HEAdamState, he_adam_step, unmask_state
from coordinator.ray_shards import (
    RAY_ADDRESS_ENV,
    SHARDS_ENV,
    ShardedHEAdam,
    ShardError,
    chunk_ranges,
    shard_settings,
)
from participant.keyholder import decrypt_vector, reencrypt
from protos.codec import encrypt_to_proto, from_proto
from protos.errors import WireError

CONFIG = HEAdamConfig(lr=0.01, clip_bound=1.0)


def serialized(state: HEAdamState) -> list[list[bytes]]:
    return [[c.serialize() for c in vec.chunks] for vec in (state.theta, state.m, state.z, state.w)]


def run_both(sharded: ShardedHEAdam, backend, holder, steps: int = 3) -> tuple[HEAdamState, HEAdamState]:
    """``steps`` rounds on a 3-chunk model, in-process and through ``sharded``: step, then a key holder
    refreshes the state the shards masked, and both sides unmask the same reply (so the state each
    returns can take another step)."""
    poly = CONFIG.validate(backend.profile)
    length = 2 * backend.slots + 5  # three chunks, the last one short
    state, _ = encrypted_state(backend, length)
    sharded.set_state(state)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        update = rng.normal(size=length)
        wire = encrypt_to_proto(holder, update / np.linalg.norm(update) * CONFIG.update_scale)  # seeded, as uploaded
        state = he_adam_step(backend, state, from_proto(backend, wire, fresh=True), CONFIG, poly).state
        sharded.accumulate(wire, fresh=True)
        sharded.step(CONFIG, poly)
        request, masks = sharded.masked(("m", "z", "w"))
        reply = {name: reencrypt(holder, from_proto(holder, msg)) for name, msg in request.items()}
        fresh = {name: from_proto(backend, msg, fresh=True) for name, msg in reply.items()}
        state = HEAdamState(state.theta, **unmask_state(backend, fresh, masks), step=state.step)
        sharded.unmask(reply, masks)
    return state, sharded.state()


def test_chunk_ranges_are_contiguous_and_cover_every_chunk():
    assert chunk_ranges(13, 2) == [range(0, 6), range(6, 13)]
    assert chunk_ranges(3, 5) == [range(0, 1), range(1, 2), range(2, 3)]
    assert chunk_ranges(1, 4) == [range(0, 1)]


def test_one_chunk_stays_in_process_without_ray(coordinator_backend, holder):
    poly = CONFIG.validate(coordinator_backend.profile)
    state, aggregate = encrypted_state(coordinator_backend, 835)  # CartPole's size
    expected = he_adam_step(coordinator_backend, state, aggregate, CONFIG, poly).state
    with ShardedHEAdam(coordinator_backend, shards=2) as sharded:
        got = sharded.he_adam_step(state, aggregate, CONFIG, poly).state
        assert not sharded.remote and sharded.where()[0] == ("local", os.getpid())
    assert serialized(got) == serialized(expected) and got.step == expected.step == 1
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.slow
def test_two_local_shards_are_the_in_process_steps_byte_for_byte(coordinator_backend, holder):
    with ShardedHEAdam(coordinator_backend, shards=2) as sharded:
        reference, got = run_both(sharded, coordinator_backend, holder)
        assert sharded.remote and sharded.ranges == [range(0, 1), range(1, 3)]
        assert len({pid for _, pid in sharded.where()} | {os.getpid()}) == 3  # two actor processes
        assert serialized(got) == serialized(reference) and got.step == reference.step == 3

        # a refused update changes no shard's sum: garbage in the second shard's range only
        poly = CONFIG.validate(coordinator_backend.profile)
        length = reference.theta.length
        sharded.keep()
        good = encrypt_to_proto(holder, np.full(length, 0.01))
        bad = encrypt_to_proto(holder, np.full(length, 0.01))
        bad.chunks[2] = b"not a ciphertext"
        sharded.accumulate(good, fresh=True)
        with pytest.raises(WireError):
            sharded.accumulate(bad, fresh=True)
        sharded.step(CONFIG, poly)
        alone = he_adam_step(coordinator_backend, got, from_proto(coordinator_backend, good, fresh=True), CONFIG, poly)
        assert serialized(sharded.state()) == serialized(alone.state)
        np.testing.assert_allclose(decrypt_vector(holder, sharded.vector("theta")),
                                   decrypt_vector(holder, alone.state.theta), atol=1e-9)
        sharded.restore()  # the step undone
        assert serialized(sharded.state()) == serialized(got)

        # the driver's call: a state it keeps, an aggregate summed in its own process
        state, aggregate = encrypted_state(coordinator_backend, length, seed=2)
        expected = he_adam_step(coordinator_backend, state, aggregate, CONFIG, poly).state
        assert serialized(sharded.he_adam_step(state, aggregate, CONFIG, poly).state) == serialized(expected)


def test_the_coordinator_machine_chooses_the_shards_and_run_json_records_them(monkeypatch, tmp_path):
    from coordinator.server_app import RUN_INFO_FILE, write_run_info
    from protos.settings import RunSettings

    monkeypatch.delenv(SHARDS_ENV, raising=False)
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    assert shard_settings() == (1, None)
    monkeypatch.setenv(SHARDS_ENV, "3")
    monkeypatch.setenv(RAY_ADDRESS_ENV, "10.0.0.5:6379")
    assert shard_settings() == (3, "10.0.0.5:6379")
    write_run_info(tmp_path, RunSettings(), "cartpole", 835)
    assert json.loads((tmp_path / RUN_INFO_FILE).read_text())["he_shards"] == 3
    monkeypatch.setenv(SHARDS_ENV, "two")
    with pytest.raises(ValueError, match=SHARDS_ENV):
        shard_settings()


def test_an_unreachable_cluster_is_one_clear_error(coordinator_backend):
    state, _ = encrypted_state(coordinator_backend, 2 * coordinator_backend.slots)
    sharded = ShardedHEAdam(coordinator_backend, shards=2, ray_address=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(ShardError, match="cannot reach the Ray cluster at 127.0.0.1"):
        sharded.set_state(state)
    assert time.monotonic() - started < 30


# -- a two-node Ray cluster on this host ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_node(args: list[str], temp_dir: str, log: Path) -> subprocess.Popen:
    """``ray start --block`` in a session of its own: the node's processes are this test's to stop
    (by that session's process group), and no other Ray on the machine is touched (``ray stop``
    would stop them all). Its own ``--temp-dir`` keeps it out of other runs' ``ray.init()``."""
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block", "--temp-dir", temp_dir,
              "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port())]
    with log.open("w") as out:
        return subprocess.Popen([ray, "start", *args, *common], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(nodes: list[subprocess.Popen]) -> None:
    for node in nodes:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(node.pid, sig)
                node.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # whatever is left of the node's session (workers outlive the raylet by a moment)
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture()
def two_node_cluster(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    temp_dir = tempfile.mkdtemp(prefix="fhr-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    nodes = [ray_node(["--head", "--port", str(port), "--include-dashboard", "false",
                       "--resources", '{"shard_a": 1}'], temp_dir, tmp_path / "head.log")]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while not (tmp_path / "head.log").read_text().count("Ray runtime started"):
            if nodes[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head failed:\n{(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        nodes.append(ray_node(["--address", address, "--resources", '{"shard_b": 1}'], temp_dir,
                              tmp_path / "worker.log"))
        while not (tmp_path / "worker.log").read_text().count("Ray runtime started"):
            if nodes[1].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start (worker) failed:\n{(tmp_path / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield address, nodes
    finally:
        import ray

        ray.shutdown()
        stop(nodes)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_two_node_cluster_is_the_in_process_step_byte_for_byte(two_node_cluster, coordinator_backend, holder):
    placement = [{"shard_a": 1}, {"shard_b": 1}]  # one shard on each node
    address, cluster = two_node_cluster
    sharded = ShardedHEAdam(coordinator_backend, shards=2, ray_address=address, resources=placement)
    import ray

    try:
        reference, got = run_both(sharded, coordinator_backend, holder, steps=2)
        nodes = {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}
        where = [node for node, _ in sharded.where()]
        assert len(nodes) == 2 and len(set(where)) == 2
        assert nodes[where[0]].get("shard_a") == 1 and nodes[where[1]].get("shard_b") == 1
    finally:
        sharded.close()
    assert not ray.is_initialized() and all(node.poll() is None for node in cluster)  # left, still running
    assert serialized(got) == serialized(reference) and got.step == reference.step == 2
