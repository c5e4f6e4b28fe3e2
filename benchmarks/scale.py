"""`fedhe bench scale`: how one round's HE work grows with the model and the federation.

Each row (``params`` P, ``participants`` n) is one round's HE work on real ciphertexts and
synthetic updates, run in a fresh subprocess so its ``peak_rss_mb`` is its own (the largest
worker process's peak is ``worker_peak_rss_mb``, 0 when the model fits one chunk and no worker
starts). It goes through the wire format and the functions a round uses, with the worker pools
of ``coordinator.chunk_workers`` on both sides (a federation's participants run in-process; the
refresher's pools here are ``benchmarks.parallel_keyholder`` and ``benchmarks.parallel_encryption``):

* coordinator (``coordinator_ms``): parse and validate each of the n updates and add it to the
  running sum (``coordinator.aggregation.base.add_vectors``, as ``PlainSum`` adds each reply as it
  arrives: one update held at a time), the HE-Adam step
  (``parallel_he_adam_step``), masking and serializing the optimizer state for the refresh,
  checking the refresher's fresh ciphertexts and unmasking them (in-process, as a round does;
  ``benchmarks.parallel_unmask_step`` unmasks in the step's workers), and serializing theta once. The
  row refreshes all three state vectors: the heaviest round, as every third one is (a federation
  refreshes ``m~`` only then, ``he_adam.refresh_due``);
* participant (``participant_ms``, the busiest one, the refresher): encrypt and serialize its
  update (``encrypt_message``), decrypt theta (``decrypt_message``) and re-encrypt the masked
  state (``reencrypt_message``).

With ``shards`` > 1 the coordinator's side runs on Ray actors that own the state and the running
sum (``coordinator.ray_shards``): each upload goes to them as its wire bytes (``read_updates`` is
then forwarding, validating and adding, in the actors), they step, mask the state for the refresh
and unmask the reply themselves, and theta comes back as wire bytes; the coordinator process holds
no ciphertext of the model. Its CPU time counts the actors' (local actors only).

The n uploads are n copies of one encrypted update: validating a chunk costs the same whatever
it holds, and encrypting n distinct updates would only time the same encryption n times.
``bytes_up`` counts the n update vectors and the refresher's fresh state, ``bytes_down`` theta
sent to n participants and the masked state sent to the refresher (the 3-value statistics
vectors and message headers are left out).

The fit is least squares over the rows, on wall time and on CPU time (the workers' included; a
shared machine moves wall time far more than CPU time), part by part:

    coordinator, per round:        c0 + a * P'       (step, refresh, theta out)
    coordinator, per participant:  c1 + b * P' * n   (validating and adding the n updates)
    participant (the refresher):   d0 + e * P'

with P' = chunks * slots, the parameters actually encrypted (a chunk is the unit of work, so a
1,000-parameter model costs what an 8,192-parameter one does). ``a``, ``b`` and ``e`` are reported
in microseconds per parameter. Growth is called linear when every part explains the rows
(R^2 >= 0.98) and no row of ten chunks or more is off by more than 25%.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from benchmarks.proc_stats import cpu_seconds

DEFAULT_PARAMS = (1_000, 10_000, 100_000, 1_000_000)
DEFAULT_PARTICIPANTS = (3, 10, 30)
R2_LINEAR = 0.98
RESIDUAL_LINEAR = 0.25
MODEL = ("coordinator_ms = (c0 + a*P') + (c1 + b*P'*n); participant_ms = d0 + e*P'; "
         "P' = chunks * slots, n = participants; a, b, e in microseconds per parameter")


def run_scale_bench(
    params: Sequence[int] = DEFAULT_PARAMS,
    participants: Sequence[int] = DEFAULT_PARTICIPANTS,
    profile: str | None = None,
    workers: int | None = None,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
    shards: int = 0,
    ray_address: str | None = None,
) -> dict:
    """Every (params, participants) row in its own subprocess, then the fit."""
    from coordinator.chunk_workers import default_workers
    from participant.keyholder import generate_keys
    from protos.profiles import DEFAULT_PROFILE

    if not params or not participants or min(*params, *participants) < 1:
        raise ValueError("--params and --participants need positive values")
    workers = default_workers() if workers is None else max(1, workers)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedhe-scale-") as tmp:
        keys = generate_keys(Path(tmp), profile or DEFAULT_PROFILE)
        for p in params:
            for n in participants:
                row = _row_in_subprocess(keys.directory, p, n, workers, seed, shards, ray_address)
                rows.append(row)
                if on_row:
                    on_row(row)
    return {"profile": keys.profile.name, "slots": keys.profile.slots, "workers": workers,
            "shards": max(1, shards), "rows": rows,
            "fit": fit(rows, keys.profile.slots)}


def _row_in_subprocess(key_dir: Path, params: int, participants: int, workers: int, seed: int,
                       shards: int = 0, ray_address: str | None = None) -> dict:
    args = json.dumps({"key_dir": str(key_dir), "params": params, "participants": participants,
                       "workers": workers, "seed": seed, "shards": shards, "ray_address": ray_address})
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scale row params={params} participants={participants} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_row(key_dir: Path, params: int, participants: int, workers: int, seed: int = 0, shards: int = 0,
            ray_address: str | None = None) -> dict:
    """One round's HE work at this size (call it in a fresh process: ``peak_rss_mb`` is the process's)."""
    from benchmarks.he_adam import reencrypt_request
    from benchmarks.parallel_encryption import encrypt_message
    from benchmarks.parallel_keyholder import decrypt_message, keyholder_workers
    from benchmarks.proc_stats import peak_rss_mb
    from coordinator.aggregation.base import add_vectors
    from coordinator.chunk_workers import ChunkWorkers
    from coordinator.he_adam import HEAdamConfig, HEAdamState, initial_optimizer_state, mask_state, unmask_state
    from coordinator.parallel_step import parallel_he_adam_step
    from coordinator.ray_shards import ShardedHEAdam
    from participant.keyholder import load_keyholder
    from protos import messages
    from protos.codec import chunk_count, encrypt_vector, from_proto, parse_message, to_proto
    from protos.fedhe.v1 import wire_pb2
    from protos.keyfile import load_evaluation_backend
    from protos.optimizer import STATE_NAMES
    from protos.update_units import UpdateUnits

    coordinator = load_evaluation_backend(Path(key_dir) / "coordinator.ctx")
    holder = load_keyholder(Path(key_dir))
    config = HEAdamConfig(lr=0.01, clip_bound=1.0)
    poly = config.validate(coordinator.profile)
    rng = np.random.default_rng(seed)
    units = UpdateUnits.of(config, participants)
    chunks = chunk_count(params, coordinator.slots)
    sharded = ShardedHEAdam(coordinator, shards, ray_address) if shards > 1 else None
    with (sharded or nullcontext(), ChunkWorkers(coordinator, 1 if sharded else workers) as coordinator_workers,
          keyholder_workers(holder, workers) as own):
        if chunks > 1:  # start-up is once per run, not per round: keep it out of the timings
            coordinator_workers.warm()
            own.warm()
        shard_pids: list[int] = []
        coordinator_pids = (lambda: shard_pids) if sharded else coordinator_workers.pids
        timer = _Timer({"coordinator": coordinator_pids, "participant": own.pids})
        theta = from_proto(coordinator, encrypt_message(own, rng.normal(scale=0.1, size=params)), fresh=True)
        state = HEAdamState(theta, **initial_optimizer_state(coordinator, params))
        stats = encrypt_vector(coordinator, np.zeros(messages.STATS_LENGTH))
        if sharded is not None:  # Ray's start and the actors' loading are once per run, too
            sharded.set_state(state)
            shard_pids += sharded.local_pids()

        with timer("participant", "encrypt_update"):
            upload = encrypt_message(own, units.encode(rng.normal(size=params))).SerializeToString()
        total = total_stats = None
        for _ in range(participants):
            if sharded is not None:  # the shards validate and add their chunks
                with timer("coordinator", "read_updates"):
                    sharded.accumulate(parse_message(wire_pb2.EncryptedVector, upload), fresh=True)
                with timer("coordinator", "sum"):
                    total_stats = add_vectors(coordinator, total_stats, stats)
                continue
            with timer("coordinator", "read_updates"):
                update = from_proto(coordinator, parse_message(wire_pb2.EncryptedVector, upload),
                                    expected_length=params, fresh=True)
            with timer("coordinator", "sum"):
                total = add_vectors(coordinator, total, update)
                total_stats = add_vectors(coordinator, total_stats, stats)
            del update
        with timer("coordinator", "he_adam"):
            if sharded is not None:
                sharded.step(config, poly)
            else:
                step = parallel_he_adam_step(coordinator_workers, state, total, config, poly)
        del total, total_stats, state
        with timer("coordinator", "refresh_out"):
            if sharded is not None:
                masked_wire, masks = sharded.masked(STATE_NAMES)
                request = {name: msg.SerializeToString() for name, msg in masked_wire.items()}
            else:
                masked, masks = mask_state(coordinator, step.state.named())
                request = {name: to_proto(coordinator, vec).SerializeToString() for name, vec in masked.items()}
                del masked
        with timer("participant", "reencrypt_state"):
            reply = reencrypt_request(own, request, params)
        with timer("coordinator", "refresh_in"):  # a round may unmask in the next step's workers instead
            if sharded is not None:
                sharded.unmask({name: parse_message(wire_pb2.EncryptedVector, data) for name, data in reply.items()},
                               masks)
            else:
                fresh = {name: from_proto(coordinator, parse_message(wire_pb2.EncryptedVector, data),
                                          expected_length=params, fresh=True) for name, data in reply.items()}
                unmask_state(coordinator, fresh, masks)
                del fresh
        with timer("coordinator", "theta_out"):
            if sharded is not None:
                theta_bytes = sharded.export("theta").SerializeToString()
            else:
                theta_bytes = to_proto(coordinator, step.state.theta).SerializeToString()
        with timer("participant", "decrypt_theta"):
            decrypt_message(own, parse_message(wire_pb2.EncryptedVector, theta_bytes), expected_length=params)
        worker_peak = max((peak_rss_mb(pid) for pid in coordinator_pids() + own.pids()), default=0.0)
    return {
        "params": params,
        "participants": participants,
        "chunks": chunks,
        "coordinator_ms": timer.total("coordinator"),
        "participant_ms": timer.total("participant"),
        "bytes_up": participants * len(upload) + sum(len(data) for data in reply.values()),
        "bytes_down": participants * len(theta_bytes) + sum(len(data) for data in request.values()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "worker_peak_rss_mb": round(worker_peak, 1),
        "shard_processes": len(shard_pids),  # Ray actors on this machine, measured here
        "coordinator_cpu_ms": timer.total("coordinator", cpu=True),
        "participant_cpu_ms": timer.total("participant", cpu=True),
        "coordinator_split_ms": timer.split("coordinator"),
        "coordinator_split_cpu_ms": timer.split("coordinator", cpu=True),
        "participant_split_ms": timer.split("participant"),
    }


class _Timer:
    """Wall and CPU milliseconds per side and phase; CPU time includes that side's worker processes."""

    def __init__(self, worker_pids: dict[str, Callable[[], list[int]]]) -> None:
        self.worker_pids = worker_pids
        self.wall: dict[str, dict[str, float]] = {side: {} for side in worker_pids}
        self.cpu: dict[str, dict[str, float]] = {side: {} for side in worker_pids}

    @contextmanager
    def __call__(self, side: str, phase: str) -> Iterator[None]:
        pids = self.worker_pids[side]()
        t0, cpu0 = time.perf_counter(), cpu_seconds(pids)
        yield
        for table, value in ((self.wall, time.perf_counter() - t0), (self.cpu, cpu_seconds(pids) - cpu0)):
            table[side][phase] = table[side].get(phase, 0.0) + value * 1e3

    def split(self, side: str, cpu: bool = False) -> dict[str, float]:
        return {phase: round(ms, 1) for phase, ms in (self.cpu if cpu else self.wall)[side].items()}

    def total(self, side: str, cpu: bool = False) -> float:
        return round(sum((self.cpu if cpu else self.wall)[side].values()), 1)


PER_PARTICIPANT_PHASES = ("read_updates", "sum")


def fit(rows: list[dict], slots: int) -> dict:
    """The models of the module docstring, on wall time and on CPU time."""
    return {"model": MODEL, "wall": _fit(rows, slots, cpu=False), "cpu": _fit(rows, slots, cpu=True)}


def _fit(rows: list[dict], slots: int, cpu: bool) -> dict:
    """Least squares per part; ``linear`` is None when the rows cannot tell (fewer sizes than unknowns)."""
    suffix = "_cpu_ms" if cpu else "_ms"
    padded = np.array([r["chunks"] * slots for r in rows], dtype=float)
    n = np.array([r["participants"] for r in rows], dtype=float)
    per_participant = np.array([sum(r["coordinator_split" + suffix].get(k, 0.0) for k in PER_PARTICIPANT_PHASES)
                                for r in rows])
    fixed = np.array([r["coordinator" + suffix] for r in rows]) - per_participant
    ones = np.ones_like(padded)
    parts = {
        "coordinator_per_round": _least_squares(np.column_stack([ones, padded]), fixed, rows),
        "coordinator_per_participant": _least_squares(np.column_stack([ones, padded * n]), per_participant, rows),
        "participant": _least_squares(np.column_stack([ones, padded]),
                                      np.array([r["participant" + suffix] for r in rows]), rows),
    }
    out: dict = {
        "coordinator_us_per_param": parts["coordinator_per_round"]["coef"][1] * 1e3,
        "coordinator_us_per_param_per_participant": parts["coordinator_per_participant"]["coef"][1] * 1e3,
        "participant_us_per_param": parts["participant"]["coef"][1] * 1e3,
        "r2": {name: part["r2"] for name, part in parts.items()},
        "max_relative_residual": {name: part["residual"] for name, part in parts.items()},
    }
    if all(part["determined"] for part in parts.values()):
        out["linear"] = all(part["r2"] >= R2_LINEAR and part["residual"] <= RESIDUAL_LINEAR for part in parts.values())
    else:
        out["linear"] = None
    return out


def _least_squares(design: np.ndarray, y: np.ndarray, rows: list[dict]) -> dict:
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    predicted = design @ coef
    spread = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - predicted) ** 2)) / spread if spread > 0 else 1.0
    big = [i for i, r in enumerate(rows) if r["chunks"] >= 10]
    residual = max((abs(predicted[i] / y[i] - 1) for i in big if y[i] > 0), default=0.0)
    distinct = len({tuple(row) for row in design.tolist()})
    return {"coef": [float(c) for c in coef], "r2": round(r2, 4), "residual": round(float(residual), 3),
            "determined": distinct > design.shape[1]}


def _main() -> None:
    args = json.loads(sys.argv[1])
    print(json.dumps(run_row(Path(args["key_dir"]), args["params"], args["participants"], args["workers"],
                             args["seed"], args.get("shards", 0), args.get("ray_address"))))


if __name__ == "__main__":
    _main()
