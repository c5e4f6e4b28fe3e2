"""Policy robustness runner: report rendering (fast) and one encrypted run end to end (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedhe.lab.policy_grid import (
    REWARD_ATTACK,
    evaluate_policy_robustness,
    render_markdown,
    robust_config,
    run_policy_robustness,
    summarize,
)
from protos.plan import resolve_plan
from protos.settings import RunSettings
from scenarios import load_scenario


def with_robust(robust: dict):
    """The scenario every side resolves from run settings carrying ``robust-training``."""
    return resolve_plan(RunSettings(scenario="cartpole", robust_training=json.dumps(robust))).scenario


def test_robust_training_travels_as_data():
    sc = with_robust(robust_config("cartpole", "sa-ppo"))
    assert sc.name == "cartpole" and sc.ppo.robust.mode == "sa-ppo" and sc.ppo.robust.kappa > 0
    with pytest.raises(ValueError, match="RobustConfig"):
        with_robust({"bogus": 1})
    with pytest.raises(ValueError):
        robust_config("cartpole", "bogus")


def test_training_and_evaluation_share_sigma(tmp_path):
    """sa-ppo / noise-injection train in the same sigma units the evaluation's default budget uses."""
    from fedhe.lab.policy_attacks import reference_std
    from fedhe.lab.policy_grid import state_std
    from scenarios import Policy

    sc = load_scenario("cartpole")
    sigma = reference_std(sc)
    for train in ("sa-ppo", "noise-injection"):
        robust = robust_config("cartpole", train, sigma)
        np.testing.assert_allclose(with_robust(robust).ppo.robust.obs_std, sigma)
    assert "obs_std" not in robust_config("cartpole", "vanilla", sigma)
    pol = Policy(sc.policy_spec(), sc.policy_spec().init(0))
    np.testing.assert_array_equal(state_std(sc, pol, "reference", 0), state_std(sc, pol, "reference", 2))  # fixed
    np.testing.assert_array_equal(state_std(sc, pol, "reference", 0), sigma)
    assert state_std(sc, pol, "clean", 0).shape == (4,)
    with pytest.raises(ValueError):
        state_std(sc, pol, "bogus", 0)


def test_evaluate_and_render(tmp_path):
    sc = load_scenario("cartpole")
    theta = sc.policy_spec().init(0)
    res = evaluate_policy_robustness(sc, theta, ["fgsm", "gaussian", "action"], 0.5, 2, 0)
    rows = [{"scenario": "cartpole", "train": t, "seed": 0, **r} for t in ("vanilla", "sa-ppo", REWARD_ATTACK,
                                                                         "reward-defense") for r in res["rows"]]
    for key in ("train", "eval_attack", "epsilon", "clean_return", "attacked_return", "crr", "pd_tv", "pd_kl",
                "pd_flip", "asr"):
        assert key in rows[0]
    runs = [{"train": "vanilla", "rounds_to_solve": 20}, {"train": REWARD_ATTACK, "rounds_to_solve": None}]
    report = {"scenario": "cartpole", "reward_threshold": 475.0, "epsilon": 0.5, "std_source": "reference",
              "episodes": 2, "seeds": 1, "encrypted": True, "runs": runs, "rows": rows, "summary": summarize(rows)}
    md = render_markdown(report)
    assert "% drop" in md and "Restored (%)" in md and "Reward channel" in md
    assert "| 1/1 | 20.0 |" in md and "| 0/1 | n/a |" in md  # solved runs and mean rounds to solve
    assert "no threshold" in render_markdown({**report, "reward_threshold": None})
    json.dumps(report)


@pytest.mark.slow
def test_encrypted_policy_robustness_end_to_end(tmp_path):
    report = run_policy_robustness("cartpole", ["vanilla", "sa-ppo"], ["fgsm", "gaussian"], 0.5, 1, tmp_path,
                                   episodes=2, rounds=2)
    assert report["encrypted"] and len(report["rows"]) == 4
    assert (tmp_path / "policy_robustness.md").exists()
    assert all(np.isfinite(r["attacked_return"]) for r in report["rows"])
    assert report["explanations"] and (tmp_path / "attributions" / "vanilla-fgsm.png").exists()
