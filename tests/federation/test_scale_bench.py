"""`fedhe bench scale`: rows with the fields the issue asks for, and a fit that tells linear growth."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from benchmarks.scale import fit
from fedhe.cli import app

ROW_KEYS = ("params", "participants", "coordinator_ms", "participant_ms", "bytes_up", "bytes_down", "peak_rss_mb",
            "coordinator_cpu_ms", "participant_cpu_ms")


def test_bench_scale_prints_one_row_per_size_and_a_fit():
    result = CliRunner().invoke(app, ["bench", "scale", "--params", "1000", "--participants", "2,3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert [(r["params"], r["participants"]) for r in report["rows"]] == [(1000, 2), (1000, 3)]
    for row in report["rows"]:
        assert all(key in row for key in ROW_KEYS)
        assert row["coordinator_ms"] > 0 and row["participant_ms"] > 0 and row["peak_rss_mb"] > 0
    up = [r["bytes_up"] for r in report["rows"]]
    assert up[1] > up[0]  # one more update to upload
    assert report["fit"]["wall"]["linear"] is None  # one model size cannot tell growth in parameters


@pytest.mark.slow
def test_bench_scale_shards_runs_the_coordinator_on_ray_actors():
    """Two chunks on two local Ray actors: the same row, the actors' memory and CPU counted."""
    result = CliRunner().invoke(app, ["bench", "scale", "--params", "9000", "--participants", "2", "--shards", "2",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    (row,) = report["rows"]
    assert report["shards"] == 2 and row["chunks"] == 2 and all(key in row for key in ROW_KEYS)
    assert row["shard_processes"] == 2 and row["worker_peak_rss_mb"] > 0  # two actor processes, measured


def test_bench_scale_refuses_a_bad_list():
    result = CliRunner().invoke(app, ["bench", "scale", "--params", "1k", "--json"])
    assert result.exit_code != 0 and "--params" in result.output


def _rows(per_round, per_participant) -> list[dict]:
    rows = []
    for k in (1, 12, 122):
        for n in (3, 10, 30):
            p = k * 8192
            split = {"read_updates": 0.75 * per_participant(p, n), "sum": 0.25 * per_participant(p, n),
                     "he_adam": per_round(p)}
            total = sum(split.values())
            rows.append({"params": p, "participants": n, "chunks": k, "coordinator_ms": total,
                         "coordinator_cpu_ms": total, "coordinator_split_ms": split,
                         "coordinator_split_cpu_ms": split, "participant_ms": 5.0 + 0.02 * p,
                         "participant_cpu_ms": 5.0 + 0.02 * p})
    return rows


def test_fit_recovers_a_linear_cost_and_flags_a_quadratic_one():
    report = fit(_rows(lambda p: 40.0 + 0.03 * p, lambda p, n: 0.004 * p * n), 8192)
    for linear in (report["wall"], report["cpu"]):
        assert linear["linear"] is True and min(linear["r2"].values()) > 0.999
        assert abs(linear["coordinator_us_per_param"] - 30.0) < 1e-6
        assert abs(linear["coordinator_us_per_param_per_participant"] - 4.0) < 1e-6
        assert abs(linear["participant_us_per_param"] - 20.0) < 1e-6
    quadratic = fit(_rows(lambda p: 1e-6 * p * p, lambda p, n: 0.004 * p * n), 8192)
    assert quadratic["wall"]["linear"] is False
