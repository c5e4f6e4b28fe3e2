"""The run summary: what "solved" means for a run that reached its threshold and then slipped."""

from __future__ import annotations

import json

from coordinator.report import append_metrics, write_summary


def test_a_run_that_reached_its_threshold_is_solved_at_that_round_whatever_it_ends_at(tmp_path):
    returns = [100.0, 300.0, 480.0, 490.0, 200.0]  # 50 episodes a round: the mean of 100 crosses 475 at round 4
    for round_, mean in enumerate(returns, start=1):
        append_metrics(tmp_path, {"round": round_, "mean_return": mean, "episodes": 50, "participants": 3,
                                  "bytes_up": 3000, "he_ms": 1.0})
    summary = write_summary(tmp_path, scenario="cartpole", encrypted=True, participants=3, threshold=475.0,
                            num_params=10, wall_s=1.0)
    assert summary["solved"] is True and summary["rounds_to_solve"] == 4
    assert summary["final_return"] == 345.0  # where it ended: rounds 4 and 5
    assert json.loads((tmp_path / "summary.json").read_text())["solved"] is True
    never = tmp_path / "never"
    never.mkdir()
    append_metrics(never, {"round": 1, "mean_return": 100.0, "episodes": 200, "participants": 3, "bytes_up": 1,
                           "he_ms": 1.0})
    assert write_summary(never, scenario="cartpole", encrypted=True, participants=3, threshold=475.0,
                         num_params=10, wall_s=1.0)["solved"] is False
