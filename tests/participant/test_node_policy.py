"""A node's own rules: built from its node config and policy file, never widened by the run config."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from participant.policy import (
    ALL_PERMITS,
    COORDINATOR_MAY_SET,
    NODE_DECIDES,
    NODE_KEYS,
    NodeConfigError,
    NodePolicy,
    PolicyRefusal,
)
from protos.errors import WireError
from protos.settings import RunSettings

NON_DEFAULT = {bool: True, str: "/anything/the/coordinator/says", float: 1.0, int: 7}


def deployed(**node_config) -> NodePolicy:
    return NodePolicy.from_node_config({"participant-index": 1, "key-dir": "/srv/keys", **node_config})


def refusal(policy: NodePolicy, **run) -> str:
    with pytest.raises(PolicyRefusal) as caught:
        policy.check(RunSettings(**run))
    return str(caught.value)


def test_every_run_setting_is_classified_exactly_once():
    """A new RunSettings field fails here until someone decides who sets it."""
    names = [f.name for f in dataclasses.fields(RunSettings)]
    unclassified = [n for n in names if (n in COORDINATOR_MAY_SET) == (n in NODE_DECIDES)]
    assert unclassified == []
    assert set(COORDINATOR_MAY_SET) | set(NODE_DECIDES) == set(names)


@pytest.mark.parametrize("name", sorted(NODE_DECIDES))
def test_a_deployed_node_refuses_any_node_decided_setting_the_run_sets(name):
    field = next(f for f in dataclasses.fields(RunSettings) if f.name == name)
    value = NON_DEFAULT[type(field.default)]
    text = refusal(deployed(), **{name: value})
    assert text.startswith("participant-1 refuses: the run asks " + name.replace("_", "-") + "=")
    assert NODE_DECIDES[name] in text
    # ... and only code lets a run decide it (fedhe simulate, the threat lab)
    dataclasses.replace(deployed(masking="optional"), permits=ALL_PERMITS).check(RunSettings(**{name: value}))


def test_the_refusal_names_the_organization_the_setting_the_value_and_the_rule():
    policy = deployed(organization="hospital-b")
    assert refusal(policy, masking="off") == "hospital-b refuses: the run asks masking=off, this node requires pairwise"
    assert isinstance(PolicyRefusal("x", ["y"]), WireError)


def test_one_reason_per_violated_rule():
    policy = deployed(organization="hospital-b", **{"min-dp-noise-multiplier": 1.0, "release-statistics": False})
    with pytest.raises(PolicyRefusal) as caught:
        policy.check(RunSettings(plaintext=True, dp_noise_multiplier=0.5, mode="encrypted-rollouts"))
    assert caught.value.reasons == (
        "the run asks plaintext=true, this node requires encryption",
        "the run asks masking=auto (resolves to off), this node requires pairwise",
        "the run asks dp-noise-multiplier=0.5, this node requires at least 1",
        "the run asks release-metrics=true, this node never releases statistics",
    )
    assert str(caught.value) == "hospital-b refuses: " + "; ".join(caught.value.reasons)


def test_a_default_node_takes_part_in_a_default_run():
    deployed().check(RunSettings())
    deployed().check(RunSettings(scenario="acrobot", dp_noise_multiplier=2.0, release_metrics=False))


@pytest.mark.parametrize("run, node, expected", [
    ({"mode": "encrypted-rollouts"}, {"masking": "optional", "allowed-modes": "local-ppo"},
     "the run asks mode=encrypted-rollouts, this node allows local-ppo"),
    ({"he_profile": "n16k-d7"}, {"allowed-profiles": "n16k-d6"},
     "the run asks he-profile=n16k-d7, this node allows n16k-d6"),
    ({"scenario": "acrobot"}, {"allowed-scenarios": "cartpole, pendulum"},
     "the run asks scenario=acrobot, this node allows cartpole, pendulum"),
    ({"defense": "median-norm"}, {}, "the run asks masking=auto (resolves to off), this node requires pairwise"),
    ({"dp_noise_multiplier": 0.0}, {"min-dp-noise-multiplier": 0.8},
     "dp-noise-multiplier=0, this node requires at least 0.8"),
])
def test_what_the_coordinator_sets_is_checked_against_the_nodes_rule(run, node, expected):
    assert expected in refusal(deployed(**node), **run)


def test_asking_for_more_than_the_rule_is_fine():
    deployed(**{"min-dp-noise-multiplier": 0.8}).check(RunSettings(dp_noise_multiplier=1.5, defense="dp"))
    deployed(masking="optional").check(RunSettings(mode="encrypted-rollouts"))
    deployed().check(RunSettings(mode="encrypted-rollouts"))  # statistics: masked like any update
    deployed().check(RunSettings(mode="encrypted-rollouts", rollout_upload="transitions"))  # owners' updates too
    with pytest.raises(PolicyRefusal, match="masking=off, this node requires pairwise"):
        deployed().check(RunSettings(mode="encrypted-rollouts", rollout_upload="transitions", masking="off"))
    deployed(**{"release-statistics": False}).check(RunSettings(release_metrics=False))


def test_a_scenario_file_the_run_names_is_never_imported(tmp_path):
    marker = tmp_path / "imported"
    path = tmp_path / "evil.py"
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    text = refusal(deployed(), scenario=str(path))
    assert f"scenario={path}" in text and "never a file a run names" in text
    assert not marker.exists()


SCENARIO_WITH_ATTACKERS = """
from scenarios import Scenario
SCENARIO = Scenario(name="poisoned", env_id="CartPole-v1", party_mix=[{"attack": "sign-flip", "participants": [1]}])
"""


def test_a_scenario_file_the_node_allows_loads_and_its_party_mix_is_refused(tmp_path):
    path = tmp_path / "poisoned.py"
    path.write_text(textwrap.dedent(SCENARIO_WITH_ATTACKERS))
    text = refusal(deployed(**{"allowed-scenarios": str(path)}), scenario=str(path))
    assert "with a party_mix, this node never misbehaves on a run's orders" in text


def test_the_policy_file_and_node_config_overrides(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent("""
        organization = "hospital-b"
        participant-index = 1
        key-dir = "/srv/fedhe/keys"
        masking = "optional"
        min-dp-noise-multiplier = 0.5
        allowed-scenarios = ["cartpole", "acrobot"]
        allowed-profiles = ["n16k-d6"]
        release-statistics = false
        seed = 42
        self-mask-threshold = 2
        min-masking-set = 4
    """))
    node_config = {"policy-file": str(path), "key-dir": "/elsewhere", "env-variant": "long-pole"}
    policy = NodePolicy.from_node_config(node_config)
    assert policy == NodePolicy(
        participant_index=1, key_dir="/elsewhere", organization="hospital-b", env_variant="long-pole",
        masking="optional", min_dp_noise_multiplier=0.5, allowed_scenarios=("cartpole", "acrobot"),
        allowed_profiles=("n16k-d6",), release_statistics=False, seed=42, self_mask_threshold=2, min_masking_set=4,
    )


def test_defaults():
    policy = NodePolicy.from_node_config({"participant-index": 2})
    assert (policy.organization, policy.masking, policy.min_dp_noise_multiplier, policy.release_statistics) == (
        "participant-2", "required", 0.0, True)
    assert policy.seed is None and policy.permits == frozenset() and policy.allowed_scenarios is None
    assert (policy.self_mask_threshold, policy.min_masking_set) == (0, 3)


@pytest.mark.parametrize("node_config, expected", [
    ({"participant-index": 0, "alowed-modes": "local-ppo"}, "unknown key 'alowed-modes' in the node config; did you "
                                                            "mean 'allowed-modes'?"),
    ({"participant-index": 0, "plaintext": True}, "unknown key 'plaintext'"),
    ({"participant-index": "0"}, "'participant-index' must be a whole number"),
    ({"participant-index": 0, "release-statistics": "no"}, "'release-statistics' must be true or false"),
    ({"participant-index": 0, "masking": "sometimes"}, "'masking' must be"),
    ({"participant-index": 0, "allowed-modes": "local-ppo,fast"}, "unknown mode(s) ['fast']"),
    ({"key-dir": "/srv/keys"}, "needs participant-index"),
])
def test_a_bad_node_config_is_a_clear_error(node_config, expected):
    with pytest.raises(NodeConfigError) as caught:
        NodePolicy.from_node_config(node_config)
    assert expected in str(caught.value)


def test_an_unknown_policy_file_key_names_the_closest(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('participant-index = 0\nmin-dp-noise = 1.0\n')
    closest = "'min-dp-noise' in the policy file .*did you mean 'min-dp-noise-multiplier'"
    with pytest.raises(NodeConfigError, match=closest):
        NodePolicy.from_node_config({"policy-file": str(path)})
    with pytest.raises(NodeConfigError, match="policy file .*missing.toml"):
        NodePolicy.from_node_config({"participant-index": 0, "policy-file": str(tmp_path / "missing.toml")})


def test_on_flowers_simulation_runtime_the_run_names_the_key_directory():
    """One person runs every party there: Flower's own keys are no error, the partition is the index."""
    simulated = NodePolicy.from_node_config({"partition-id": 2, "num-partitions": 3})
    run = RunSettings(participant_key_dir="/tmp/fedhe-keys")
    simulated.check(run)
    assert (simulated.participant_index, simulated.key_dir_for(run)) == (2, "/tmp/fedhe-keys")
    assert "participant-key-dir" in refusal(deployed(), participant_key_dir="/tmp/fedhe-keys")
    assert deployed().key_dir_for(run) == "/srv/keys"
    assert "plaintext=true" in refusal(simulated, plaintext=True)  # still encrypted there


def test_the_threat_model_says_who_decides_every_run_setting():
    text = (Path(__file__).resolve().parents[2] / "docs" / "threat-model.md").read_text()
    section = text.split("## Who decides what", 1)[1].split("\n## ", 1)[0]
    keys = [f.name.replace("_", "-") for f in dataclasses.fields(RunSettings)]
    assert [key for key in keys if f"`{key}`" not in section] == []
    assert [key for key in NODE_KEYS if f"`{key}`" not in section] == []
