"""The `fedhe` command line as a user runs it: help, errors, scenario files, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from protos.fedhe.v1 import wire_pb2

FEDHE = [sys.executable, "-m", "fedhe.cli"]


def fedhe(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDHE, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def test_help_teaches_the_commands():
    out = fedhe("--help").stdout
    for command in ("simulate", "evaluate", "keygen", "keys", "bench", "scenarios", "robustness"):
        assert command in out
    assert "--plaintext" in fedhe("simulate", "--help").stdout


def test_scenarios_lists_builtins():
    out = fedhe("scenarios").stdout
    for name in ("cartpole", "acrobot", "lunarlander", "pendulum", "halfcheetah"):
        assert name in out


def test_unknown_scenario_is_a_clear_error(tmp_path):
    run = fedhe("simulate", "no-such-scenario", "--out", str(tmp_path / "x"))
    assert run.returncode == 2
    assert "no-such-scenario" in run.stderr and "cartpole" in run.stderr


def test_masking_where_masks_cannot_cancel_is_a_clear_error(tmp_path):
    run = fedhe("simulate", "--masking", "pairwise", "--plaintext", "--out", str(tmp_path / "x"))
    assert run.returncode == 2 and "no keys and no roster" in run.stderr and "masking off" in run.stderr
    assert "--masking" in fedhe("simulate", "--help").stdout


def test_evaluate_on_a_non_run_directory(tmp_path):
    run = fedhe("evaluate", str(tmp_path))
    assert run.returncode == 2 and "not a fedhe run directory" in run.stderr


SCENARIO_FILE = """
import gymnasium as gym
from scenarios import PPOConfig, Scenario

def make_env(participant_index, seed, gravity=9.8):
    env = gym.make("CartPole-v1")
    env.unwrapped.gravity = gravity
    return env

SCENARIO = Scenario(
    name="gravity-cartpole",
    make_env=make_env,
    env_kwargs=[{"gravity": 9.8}, {"gravity": 11.0}],
    reward_threshold=475.0,
    hidden=(16,),
    ppo=PPOConfig(num_envs=2, steps_per_env=64, epochs=2),
)
"""


@pytest.mark.slow
def test_a_scenario_file_outside_the_repo_trains_and_evaluates(tmp_path):
    path = tmp_path / "elsewhere" / "my_scenario.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(SCENARIO_FILE))
    out = tmp_path / "run"
    # a path relative to where the user stands (the simulated organizations' workers start elsewhere)
    run = fedhe("simulate", "elsewhere/my_scenario.py", "--participants", "2", "--rounds", "2", "--out", str(out),
                cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "gravity-cartpole" and summary["rounds"] == 2
    evaluated = fedhe("evaluate", str(out), "--episodes", "2", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["round"] == 2


def _checkpoint_round(out: Path) -> int:
    try:
        return wire_pb2.Checkpoint.FromString((out / "checkpoint.pb").read_bytes()).round
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_round(tmp_path):
    out = tmp_path / "run"
    cmd = [*FEDHE, "simulate", "cartpole", "--rounds", "60", "--no-stop-on-solve", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(out) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _checkpoint_round(out) >= 3, "the run never reached round 3"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = _checkpoint_round(out)
    assert killed_at < 60
    refused = fedhe("simulate", "cartpole", "--out", str(out))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = fedhe(
        "simulate", "cartpole", "--rounds", str(killed_at + 2), "--no-stop-on-solve", "--resume", "--out", str(out)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, killed_at + 3))
    assert json.loads((out / "summary.json").read_text())["rounds"] == killed_at + 2

    # resuming with another optimizer configuration is refused before anything starts
    changed = tmp_path / "faster.py"
    changed.write_text(
        "from scenarios import load_scenario\n"
        "from scenarios import ServerOptimizer\n"
        "SCENARIO = load_scenario('cartpole').with_overrides(\n"
        "    server=ServerOptimizer(lr=0.05, beta1=0.5, beta2=0.99, clip_bound=1.0))\n"
    )
    other = fedhe("simulate", str(changed), "--rounds", str(killed_at + 3), "--resume", "--out", str(out))
    assert other.returncode == 2
    assert "clip_bound 2.0 -> 1.0, lr 0.2 -> 0.05" in other.stderr and "Traceback" not in other.stderr


def test_robustness_rejects_unknown_attack_and_defense(tmp_path):
    run = fedhe("robustness", "aggregation", "cartpole", "--attack", "bogus", "--out", str(tmp_path / "r"))
    assert run.returncode == 2 and "unknown attack 'bogus'" in run.stderr
    run = fedhe("robustness", "aggregation", "cartpole", "--defense", "krum", "--out", str(tmp_path / "r"))
    assert run.returncode == 2 and "unknown defense 'krum'" in run.stderr


def test_policy_robustness_rejects_unknown_train_attack_and_sigma(tmp_path):
    out = str(tmp_path / "r")
    run = fedhe("robustness", "policy", "cartpole", "--train", "bogus", "--out", out)
    assert run.returncode == 2 and "unknown --train 'bogus'" in run.stderr
    run = fedhe("robustness", "policy", "cartpole", "--train", "vanilla", "--eval-attack", "bogus", "--out", out)
    assert run.returncode == 2 and "unknown --eval-attack 'bogus'" in run.stderr
    run = fedhe("robustness", "policy", "cartpole", "--train", "vanilla", "--std-source", "bogus", "--out", out)
    assert run.returncode == 2 and "reference, random, clean" in run.stderr
    run = fedhe("robustness", "policy", "cartpole", "--eval-attack", "action", "--alpha", "1.5", "--out", out)
    assert run.returncode == 2 and "--alpha is a probability" in run.stderr


@pytest.mark.slow
def test_evaluate_works_on_plaintext_and_robustness_runs(tmp_path):
    """Every run directory the CLI writes can be evaluated: the run records its own profile."""
    plain = tmp_path / "plain"
    run = fedhe("simulate", "--plaintext", "--rounds", "1", "--no-stop-on-solve", "--out", str(plain))
    assert run.returncode == 0, run.stderr[-3000:]
    grid = tmp_path / "grid"
    run = fedhe(
        "robustness",
        "aggregation",
        "cartpole",
        "-n",
        "3",
        "-m",
        "1",
        "--attack",
        "sign-flip",
        "--defense",
        "median-norm",
        "--no-clean",
        "--rounds",
        "1",
        "--out",
        str(grid),
        "--json",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (cell,) = [json.loads(run.stdout)[0]["run_dir"]]
    assert json.loads((Path(cell) / "run.json").read_text())["he_profile"] == "n16k-d7"
    for run_dir in (plain, Path(cell)):
        evaluated = fedhe("evaluate", str(run_dir), "--episodes", "2", "--json")
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads(evaluated.stdout)["round"] == 1


NAN_SCENARIO = """
import gymnasium as gym
from scenarios import Scenario


class NaNReward(gym.Wrapper):
    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, float("nan"), terminated, truncated, info


def make_env(participant_index, seed):
    return NaNReward(gym.make("CartPole-v1"))

SCENARIO = Scenario(name="nan-cartpole", make_env=make_env, reward_threshold=475.0)
"""


@pytest.mark.slow
def test_an_environment_returning_nan_gets_one_line_per_failure_and_a_failing_exit(tmp_path):
    path = tmp_path / "nan_cartpole.py"
    path.write_text(textwrap.dedent(NAN_SCENARIO))
    run = fedhe("simulate", str(path), "--rounds", "2", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "Traceback" not in output
    failures = [line for line in output.splitlines() if "environment failure" in line and line.startswith("WARNING")]
    assert len(failures) == 6  # 3 participants x 2 rounds, one line each
    assert "round 1: participant-0: environment failure" in output
    assert "no round completed: participant-" in run.stderr and ": environment failure (2x)" in run.stderr
    assert "non-finite" not in output  # the cause stays in each participant's own log (--verbose shows it)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 0 and len(summary["failed_rounds"]) == 2


@pytest.mark.slow
def test_bench_round_profiles_both_sides_and_keeps_participant_timings_local(tmp_path):
    """Phases come from the coordinator's metrics and the participants' local files, never from replies."""
    run = fedhe("bench", "round", "--rounds", "3", "--participants", "2", "--out", str(tmp_path), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    enc, plain = result["encrypted"], result["plaintext"]
    assert enc["rounds"] == plain["rounds"] == 2  # round 1 is warm-up
    assert {"he_adam", "read_updates", "checkpoint", "wait"} <= set(enc["coordinator_ms"])
    assert {"train", "mask_encrypt", "decrypt_theta", "refresh"} <= set(enc["participant_ms"])
    assert enc["coordinator_ms"]["he_adam"] > plain["coordinator_ms"]["he_adam"]
    assert result["wall_per_round_ratio"] > 0
    for side in (enc, plain):  # the busy time adds up the phases: participants' for both of them
        work, phases = side["work_ms_per_round"], side["participant_ms"]
        everyone = sum(ms for name, ms in phases.items() if name != "refresh")
        assert work["participants"] == pytest.approx(2 * everyone + phases.get("refresh", 0.0), abs=0.2)
        assert work["total"] == pytest.approx(work["coordinator"] + work["participants"], abs=0.2)
    # encryption's own phases, not the totals: a participant's training time swings with the machine's load
    assert enc["participant_ms"]["mask_encrypt"] > plain["participant_ms"]["mask_encrypt"]
    assert 0 < result["wall_ratio_floor"] and result["cores"] >= 1
    for side in (enc, plain):  # the critical path with one machine per party: its parts add up
        parts = side["deployed_round_parts_s"]
        assert side["deployed_round_estimate_s"] > 0 and parts["participants"] > 0 and parts["transfer"] > 0
        assert side["deployed_round_estimate_s"] == pytest.approx(sum(parts.values()), abs=0.005)
    assert result["deployed_ratio"] > 0 and result["bandwidth_mbps"] == 1000
    assert len(list((tmp_path / "encrypted" / "participant-profiles").glob("participant-*.jsonl"))) == 2
