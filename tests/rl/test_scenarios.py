"""Scenario validation, environment construction and the scenario registry."""

from __future__ import annotations

import importlib.metadata
import textwrap

import gymnasium as gym
import numpy as np
import pytest

import scenarios
from scenarios import (
    PPOConfig,
    Scenario,
    ScenarioFileError,
    ServerOptimizer,
    UnknownScenarioError,
    list_scenarios,
    load_scenario,
)
from scenarios.builtin import BUILTIN_SCENARIOS


# ----- validation ----------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "exactly one of env_id or make_env"),
        (dict(env_id="CartPole-v1", make_env=lambda i, s: gym.make("CartPole-v1")), "exactly one"),
        (dict(env_id="NoSuchEnv-v0"), "not a registered Gymnasium id"),
        (dict(env_id="CartPole-v1", num_participants=0), "num_participants"),
        (dict(env_id="CartPole-v1", rounds=0), "rounds"),
        (dict(env_id="CartPole-v1", hidden=()), "hidden"),
        (dict(env_id="CartPole-v1", hidden=(8, -1)), "hidden"),
        (dict(env_id="CartPole-v1", update="sign"), "update"),
        (dict(env_id="CartPole-v1", server=lambda: ServerOptimizer(lr=0.2, beta1=0.5, beta2=0.99, clip_bound=0.0)),
         "clip_bound"),
        (dict(env_id="CartPole-v1", server=lambda: ServerOptimizer(lr=float("nan"), beta1=0.5, beta2=0.99,
                                                                    clip_bound=2.0)), "lr"),
        (dict(env_id="CartPole-v1", server=lambda: ServerOptimizer(lr=0.2, beta1=1.0, beta2=0.99, clip_bound=2.0)),
         "beta1"),
        (dict(env_id="CartPole-v1", server=lambda: ServerOptimizer(lr=0.2, beta1=0.5, beta2=0.0, clip_bound=2.0)),
         "beta2"),
        (dict(env_id="CartPole-v1", server=lambda: ServerOptimizer(lr=0.2, beta1=0.5, beta2=0.99, clip_bound=2.0,
                                                                    interval_upper=1.0)), "interval_upper"),
        (dict(env_id="CartPole-v1", server=(0.2, 0.5)), "ServerOptimizer"),
        (dict(env_id="CartPole-v1", env_kwargs="length=1"), "env_kwargs"),
        (dict(env_id="CartPole-v1", env_variants={"x": 3}), "env_variants"),
        (dict(env_id="CartPole-v1", make_env=None, name=" "), "name"),
    ],
)
def test_invalid_scenarios_are_rejected(kwargs, message):
    kwargs.setdefault("name", "bad")
    with pytest.raises(ValueError, match=message):  # a bad ServerOptimizer fails as it is built
        Scenario(**{k: v() if k == "server" and callable(v) else v for k, v in kwargs.items()})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_envs=0), "num_envs"),
        (dict(steps_per_env=0), "steps_per_env"),
        (dict(lr=0.0), "lr"),
        (dict(gamma=1.5), "gamma"),
        (dict(ent_coef=-0.1), "ent_coef"),
        (dict(num_envs=1, steps_per_env=2, minibatches=4), "minibatches"),
    ],
)
def test_invalid_ppo_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_reward_threshold_defaults_to_env_spec():
    assert Scenario(name="a", env_id="Acrobot-v1").reward_threshold == -100.0
    assert Scenario(name="p", env_id="Pendulum-v1").reward_threshold is None
    assert Scenario(name="c", env_id="CartPole-v1", reward_threshold=300.0).reward_threshold == 300.0


def test_with_overrides_revalidates_and_resets_spec_cache():
    base = Scenario(name="c", env_id="CartPole-v1", hidden=(8,))
    assert base.policy_spec().hidden == (8,)
    wider = base.with_overrides(hidden=(16, 16))
    assert wider.policy_spec().hidden == (16, 16) and base.policy_spec().hidden == (8,)
    with pytest.raises(ValueError, match="rounds"):
        base.with_overrides(rounds=0)


# ----- environments --------------------------------------------------------
def test_env_kwargs_per_participant_and_variants():
    sc = BUILTIN_SCENARIOS["cartpole"]
    lengths = [sc.build_env(i, 0).unwrapped.length for i in range(4)]
    assert lengths == [0.5, 0.6, 0.45, 0.5]  # indexed modulo the sequence length
    assert sc.build_env(1, 0, variant="long-pole").unwrapped.length == 0.75
    with pytest.raises(ValueError, match="no env variant 'huge'.*long-pole"):
        sc.build_env(0, 0, variant="huge")


def test_single_mapping_env_kwargs_apply_to_everyone():
    sc = Scenario(name="moon", env_id="LunarLander-v3", env_kwargs={"gravity": -5.0},
                  env_variants={"windy": {"enable_wind": True}})
    assert sc.env_kwargs_for(7) == {"gravity": -5.0}
    assert sc.env_kwargs_for(0, "windy") == {"gravity": -5.0, "enable_wind": True}
    assert sc.build_env(2, 0).unwrapped.gravity == -5.0


def test_make_env_receives_index_seed_and_kwargs():
    calls = []

    def make(index: int, seed: int, **kwargs):
        calls.append((index, seed, kwargs))
        return gym.make("CartPole-v1")

    sc = Scenario(name="custom", make_env=make, env_kwargs=({"a": 1}, {"a": 2}))
    sc.build_env(1, 42)
    assert calls == [(1, 42, {"a": 2})]


def test_vector_env_uses_same_step_autoreset_and_records_returns():
    sc = Scenario(name="c", env_id="CartPole-v1", ppo=PPOConfig(num_envs=3))
    env = sc.build_vector_env(0, 5)
    assert env.num_envs == 3
    assert env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    env.reset(seed=5)
    returns = []
    for _ in range(200):
        _, _, _, _, info = env.step(np.zeros(3, dtype=np.int64))  # always push left: short episodes
        if "_episode" in info:
            returns.extend(info["episode"]["r"][info["_episode"]])
    env.close()
    assert returns and all(5 <= r <= 20 for r in returns)


def test_policy_spec_from_spaces():
    cart = BUILTIN_SCENARIOS["cartpole"].policy_spec()
    assert (cart.obs_dim, cart.action_kind, cart.action_dim) == (4, "discrete", 2)
    pend = BUILTIN_SCENARIOS["pendulum"].policy_spec()
    assert (pend.obs_dim, pend.action_kind, pend.action_dim) == (3, "continuous", 1)
    assert pend.action_low == (-2.0,) and pend.action_high == (2.0,)


def test_builtins_fit_in_one_ciphertext_chunk_where_required():
    for name in ("cartpole", "acrobot"):
        assert BUILTIN_SCENARIOS[name].policy_spec().num_params < 8192


# ----- registry ------------------------------------------------------------
def test_builtins_load_by_name():
    for name in ("cartpole", "acrobot", "lunarlander", "pendulum"):
        assert load_scenario(name).name == name
    assert {n for n, _ in list_scenarios()} >= {"cartpole", "acrobot", "lunarlander", "pendulum"}


def test_unknown_name_lists_known_and_explains_how_to_add():
    with pytest.raises(UnknownScenarioError) as err:
        load_scenario("no-such-scenario")
    assert isinstance(err.value, ValueError)
    text = str(err.value)
    assert "cartpole" in text and "SCENARIO = Scenario(...)" in text and "fedhe.scenarios" in text


SCENARIO_FILE = textwrap.dedent(
    """
    from scenarios import Scenario
    SCENARIO = Scenario(name="{name}", env_id="Acrobot-v1", rounds=7)
    """
)


def test_load_from_file_outside_repo(tmp_path):
    a = tmp_path / "a" / "mine.py"
    b = tmp_path / "b" / "mine.py"
    for path, name in ((a, "first"), (b, "second")):
        path.parent.mkdir()
        path.write_text(SCENARIO_FILE.format(name=name))
    # same file stem in two folders must not collide in sys.modules
    assert load_scenario(str(a)).name == "first"
    assert load_scenario(str(b)).name == "second"
    assert load_scenario(str(a)).rounds == 7


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("X = 1\n", "does not define SCENARIO"),
        ("SCENARIO = {'name': 'x'}\n", "SCENARIO in .* is a dict"),
        ("raise RuntimeError('boom')\n", "failed to import.*boom"),
    ],
)
def test_bad_scenario_files_name_the_file(tmp_path, body, message):
    path = tmp_path / "broken.py"
    path.write_text(body)
    with pytest.raises(ScenarioFileError, match=message) as err:
        load_scenario(str(path))
    assert "broken.py" in str(err.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ScenarioFileError, match="does not exist"):
        load_scenario(str(tmp_path / "nope.py"))


@pytest.fixture
def plugin_entry_points(tmp_path, monkeypatch):
    (tmp_path / "fedhe_plugin_mod.py").write_text(textwrap.dedent(
        """
        from scenarios import Scenario
        OBJECT = Scenario(name="plugin-object", env_id="CartPole-v1")
        def factory():
            return Scenario(name="plugin-factory", env_id="Acrobot-v1")
        NOT_A_SCENARIO = 3
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    group = scenarios.ENTRY_POINT_GROUP
    eps = importlib.metadata.EntryPoints([
        importlib.metadata.EntryPoint("plugin-object", "fedhe_plugin_mod:OBJECT", group),
        importlib.metadata.EntryPoint("plugin-factory", "fedhe_plugin_mod:factory", group),
        importlib.metadata.EntryPoint("plugin-bad", "fedhe_plugin_mod:NOT_A_SCENARIO", group),
    ])
    real = importlib.metadata.entry_points

    def fake(**params):
        return eps.select(**params) if params.get("group") == group else real(**params)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_entry_points(plugin_entry_points):
    assert load_scenario("plugin-object").env_id == "CartPole-v1"
    assert load_scenario("plugin-factory").env_id == "Acrobot-v1"
    with pytest.raises(TypeError, match="plugin-bad.*expected a Scenario"):
        load_scenario("plugin-bad")
    listed = dict(list_scenarios())
    assert listed["plugin-object"] == "entry point: fedhe_plugin_mod:OBJECT"
    with pytest.raises(UnknownScenarioError, match="plugin-factory"):
        load_scenario("still-unknown")
