"""Threat lab: attacks, the masked-norm exchange, robust aggregation, DP accounting."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import replace
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
from flwr.app import Message, Metadata, RecordDict

import coordinator.aggregation.robust as robust_path
from benchmarks.numpy_adam import reference_adam
from coordinator.aggregation import NormBound, RoundContext
from coordinator.dp_accounting import effective_noise_multiplier, rdp_epsilon
from coordinator.driver import RoundDriver
from coordinator.exchange import Exchange, RoundOutcome
from coordinator.he_adam import HEAdamState, he_adam_step, initial_optimizer_state
from coordinator.organizations import Organizations
from coordinator.robust_aggregation import (
    DefenseError,
    check_profile_supports,
    clip_factors,
    unmask_squared_norms,
    weighted_sum,
)
from fedhe.lab.aggregation_grid import COLUMNS, GridSpec, add_relative_columns, grid_cells, markdown_table
from fedhe.lab.malicious import (
    Behaviour,
    PartyMixError,
    alie_z,
    attacked_scenario,
    behaviour_for,
    craft_update,
    parse_party_mix,
    party_mix_for,
)
from participant.keyholder import decrypt_vector, generate_keys, load_keyholder
from participant.node import answer_norm_query
from protos import messages
from protos.codec import PROTOCOL_VERSION, encrypt_vector, from_proto, to_proto
from protos.dp import dp_clip_and_noise, dp_clip_bound
from protos.fedhe.v1 import wire_pb2
from protos.keyfile import load_evaluation_backend
from protos.optimizer import HEAdamConfig
from protos.plan import resolve_plan
from protos.settings import RunSettings
from scenarios import load_scenario


# -- DP accounting ---------------------------------------------------------------------------------
def test_rdp_accountant_matches_the_known_vector():
    """Opacus' accountants_test vector: z=1.5, q=0.04, 2250 steps, delta=1e-5 -> eps 7.329."""
    assert rdp_epsilon([1.5] * 2250, 1e-5, sampling_rate=0.04) == pytest.approx(7.3291, abs=2e-3)


def test_full_participation_epsilon_matches_flowers_accountant():
    from flwr.serverapp import RdpAccountant
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )

    config = PrivacyConfig(
        target_delta=1e-5,
        population_size=10,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    flower = RdpAccountant(config)
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=10, population_size=10), 100)
    ours = rdp_epsilon([1.0] * 100, 1e-5)
    assert ours == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)
    assert ours == pytest.approx(96.1, abs=0.1)  # 100 rounds at z=1 (docs/threat-lab.md)


def test_dropouts_lower_the_effective_noise():
    assert effective_noise_multiplier(2.0, 10, 10) == 2.0
    assert effective_noise_multiplier(2.0, 5, 10) == pytest.approx(2.0 * math.sqrt(0.5))
    assert rdp_epsilon([], 1e-5) == 0.0


def test_distributed_noise_sums_to_z_times_c():
    z, clip, n = 2.0, 2.0, 10
    bound = dp_clip_bound(clip, z, n)
    assert bound == pytest.approx(clip / (1 + 8 * z / n))
    rng = np.random.default_rng(0)
    zero = np.zeros(20000)
    total = sum(dp_clip_and_noise(zero, clip, z, n, rng) for _ in range(n))
    assert np.std(total) == pytest.approx(z * bound, rel=0.03)
    big = dp_clip_and_noise(np.full(100, 10.0), clip, z, n, np.random.default_rng(1)) - dp_clip_and_noise(
        np.zeros(100), clip, z, n, np.random.default_rng(1)
    )
    assert np.linalg.norm(big) == pytest.approx(bound)  # clipped to C_dp before the noise


# -- masked-norm exchange ----------------------------------------------------------------------------
class KeyHolderGrid:
    """Flower's Grid in one process: every node is a key holder answering the norm query (recorded)."""

    run = SimpleNamespace(run_id=1)

    def __init__(self, holder) -> None:
        self.holder, self.queries, self.replies = holder, [], {}

    def push_messages(self, outgoing):
        ids = []
        for msg in outgoing:
            mid = uuid.uuid4().hex
            query = messages.unpack(msg.content, messages.NORM_QUERY, wire_pb2.NormQuery, max_bytes=1 << 30)
            self.queries.append(query)
            content = RecordDict({messages.NORM_REPLY: messages.pack(answer_norm_query(self.holder, query))})
            self.replies[mid] = Message(content, metadata=Metadata(
                run_id=1, message_id=uuid.uuid4().hex, src_node_id=msg.metadata.dst_node_id, dst_node_id=0,
                reply_to_message_id=mid, group_id=msg.metadata.group_id, created_at=0.0, ttl=60.0,
                message_type=msg.metadata.message_type))
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def update_reply(holder, values: np.ndarray) -> Message:
    update = wire_pb2.ParticipantUpdate(protocol_version=PROTOCOL_VERSION, round=1,
                                        update=to_proto(holder, encrypt_vector(holder, values)),
                                        rollout_stats=to_proto(holder, encrypt_vector(holder, np.ones(3))))
    return Message(RecordDict({messages.UPDATE: messages.pack(update)}), metadata=Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=0, reply_to_message_id="q", group_id="1",
        created_at=0.0, ttl=60.0, message_type=messages.TRAIN))


def test_masked_norm_exchange_hides_norms_and_updates(holder, coordinator_backend, server_task, monkeypatch):
    """The real coordinator's norm query (the ``norm-bound`` path): the key holder decrypts only masked values."""
    rng = np.random.default_rng(1)
    n, d = 6, 835
    updates = [rng.normal(0, 0.01, d) * (1 + 0.1 * i) for i in range(n)]  # norms within a factor 1.5
    drawn, real = [], robust_path.masked_squared_norms  # the coordinator's secret factors and order, for the test

    def recording(*args):
        drawn.append(real(*args))
        return drawn[-1]

    monkeypatch.setattr(robust_path, "masked_squared_norms", recording)
    plan = resolve_plan(RunSettings(scenario="cartpole", defense="norm-bound", masking="off"), n)
    grid = KeyHolderGrid(holder)
    nodes = list(range(10, 10 + n))
    ctx = RoundContext(plan, coordinator_backend, Exchange(grid, coordinator_backend, Organizations(), 5.0), 1, nodes,
                       {node: i for i, node in enumerate(nodes)}, nodes[0], RoundOutcome(1))
    robust = NormBound(ctx)
    for node, u in zip(nodes, updates):
        robust.add(node, update_reply(holder, u))
    aggregate = robust.finish()
    (received,) = grid.queries  # all the key holder gets
    masks = drawn[0][1]
    assert [f.name for f, _ in received.ListFields()] == ["protocol_version", "round", "masked"]

    true_sq = np.array([u @ u for u in updates])
    seen = [decrypt_vector(holder, from_proto(holder, v)) for v in received.masked]
    for values in seen:
        assert np.abs(values).max() > 1000  # every slot is under a +-2^15 mask
        for u in updates:
            for target in (u, u * u):
                corr = np.corrcoef(values[:d], target)[0, 1]
                assert abs(corr) < 0.2
        total = float(values.sum())
        assert all(abs(total / t - 1) > 0.5 for t in true_sq)  # no slot sum is (close to) a true squared norm
    # ratios are hidden too: masked sums are not in the proportions of the true squared norms
    sums = np.array([float(v.sum()) for v in seen])
    truth_in_query_order = true_sq[masks.order]
    assert np.std(np.log(sums / truth_in_query_order)) > 0.3

    reply = answer_norm_query(holder, received)
    assert all(v == float(f"{v:.4g}") for v in reply.masked_sums)  # rounded before release
    recovered = unmask_squared_norms(list(reply.masked_sums), masks)
    np.testing.assert_allclose(recovered, true_sq, rtol=2e-3)
    # the aggregate: each update clipped to the bound (in update units) by its factor from the masked norm
    bound = plan.units(n).bound(plan.optimizer.clip_bound)
    norms = np.sqrt(true_sq)
    assert ctx.outcome.extras == {"defense": "norm-bound", "clipped": int(sum(norms > bound))}
    total = decrypt_vector(holder, from_proto(holder, to_proto(coordinator_backend, aggregate.update)))
    expected = sum(u * min(1.0, bound / norm) for u, norm in zip(updates, norms))
    assert aggregate.contributors == n and np.allclose(total, expected, atol=1e-4)


def test_clip_factors():
    norms = np.array([1.0, 2.0, 3.0, 10.0, 0.0])
    np.testing.assert_allclose(clip_factors(norms, "median-norm", 100.0), [1, 1, 2 / 3, 0.2, 1])
    np.testing.assert_allclose(clip_factors(norms, "median-norm", 1.5), [1, 0.75, 0.5, 0.15, 1])
    np.testing.assert_allclose(clip_factors(norms, "norm-bound", 2.5), [1, 1, 2.5 / 3, 0.25, 1])
    with pytest.raises(DefenseError):
        clip_factors(norms, "krum", 1.0)


def test_robust_defense_needs_a_spare_level(coordinator_backend, tmp_path):
    settings = RunSettings(scenario="cartpole", masking="off")
    for defense in ("median-norm", "norm-bound"):
        with pytest.raises(DefenseError, match="n16k-d7"):  # the default profile has no level to spare
            RoundDriver(resolve_plan(replace(settings, defense=defense)), coordinator_backend, tmp_path)
    RoundDriver(resolve_plan(replace(settings, defense="dp", dp_noise_multiplier=1.0)), coordinator_backend, tmp_path)
    check_profile_supports("median-norm", 7, 6, "n16k-d7")


def test_defense_dp_without_a_noise_multiplier_is_refused_before_round_1(coordinator_backend, tmp_path):
    settings = RunSettings(scenario="cartpole", masking="off", defense="dp")
    with pytest.raises(ValueError, match="noise multiplier"):
        settings.check()
        RoundDriver(resolve_plan(settings), coordinator_backend, tmp_path)


@pytest.fixture(scope="module")
def d7_keys(tmp_path_factory):
    keys = generate_keys(tmp_path_factory.mktemp("d7"), "n16k-d7")
    return load_keyholder(keys.directory), load_evaluation_backend(keys.coordinator_key)


def test_scaled_aggregate_still_fits_he_adam_on_d7(d7_keys):
    """Factors cost one level of the aggregate; HE-Adam's step still matches NumPy Adam."""
    holder, backend = d7_keys
    config = HEAdamConfig(lr=0.05, beta1=0.5, clip_bound=1.0)
    poly = config.validate(backend.profile)
    rng = np.random.default_rng(3)
    n, d = 4, 300
    raw = [rng.normal(0, 0.3, d) for _ in range(n)]
    raw = [g * min(1.0, 1.0 / np.linalg.norm(g)) for g in raw]
    factors = np.array([1.0, 0.5, 0.8, 1.0])
    enc = [from_proto(backend, to_proto(holder, encrypt_vector(holder, g * config.update_scale / n))) for g in raw]
    aggregate = weighted_sum(backend, enc, factors)
    assert backend.levels_left(aggregate.chunks[0]) == backend.profile.levels - 1
    state = HEAdamState(encrypt_vector(backend, np.zeros(d)), **initial_optimizer_state(backend, d))
    step = he_adam_step(backend, state, aggregate, config, poly)
    expected, _, _ = reference_adam(np.zeros(d), [sum(f * g for f, g in zip(factors, raw)) / n], config)
    np.testing.assert_allclose(decrypt_vector(holder, step.state.theta), expected, atol=1e-3 * config.lr)


# -- attacks -------------------------------------------------------------------------------------------
def test_party_mix_parsing_and_errors():
    mix = parse_party_mix('[{"attack": "sign-flip", "participants": [0, 2], "k": 3}]')
    assert set(mix) == {0, 2} and mix[0].param("k") == 3.0 and mix[2].colluders == (0, 2)
    assert parse_party_mix("") == {}
    with pytest.raises(PartyMixError, match="unknown attack"):
        parse_party_mix([{"attack": "nope", "participants": [0]}])
    with pytest.raises(PartyMixError, match="twice"):
        parse_party_mix([{"attack": "zero", "participants": [0]}, {"attack": "noise", "participants": [0]}])
    with pytest.raises(PartyMixError, match="no parameter"):
        parse_party_mix([{"attack": "zero", "participants": [0], "k": 2}])
    scenario = load_scenario("cartpole").with_overrides(party_mix=[{"attack": "ipm", "participants": [1]}])
    assert behaviour_for(scenario, "", 1).attack == "ipm"
    assert behaviour_for(scenario, json.dumps(party_mix_for("zero", 2)), 1).attack == "zero"
    assert behaviour_for(scenario, "", 0) is None


def test_crafted_updates():
    g = np.array([1.0, -2.0, 0.5])
    craft = lambda name, **kw: craft_update(Behaviour(name, (0, 1, 2)), g, n=10, attacker_seed=0, **kw)  # noqa: E731
    np.testing.assert_allclose(craft("sign-flip"), -2.5 * g)
    np.testing.assert_allclose(craft("zero"), 0 * g)
    assert np.linalg.norm(craft("scale")) == pytest.approx(10 * np.linalg.norm(g))
    assert not np.allclose(craft("noise"), g)
    others = [g, 2 * g, 3 * g]
    np.testing.assert_allclose(craft("ipm", colluder_updates=others), -0.1 * 2 * g)
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-3)  # Phi^-1(0.7)
    np.testing.assert_allclose(
        craft("alie", colluder_updates=others), 2 * g - alie_z(10, 3) * np.std(others, axis=0, ddof=1)
    )


def test_data_attacks_wrap_the_environment():
    scenario = load_scenario("cartpole")
    flipped = attacked_scenario(scenario, Behaviour("reward-flip", (0,))).build_env(0, 0)
    flipped.reset(seed=0)
    assert flipped.step(0)[1] == -1.0
    fixed = attacked_scenario(scenario, Behaviour("random-action", (0,))).build_env(0, 0)
    assert isinstance(fixed, gym.ActionWrapper) and fixed.action(1) == 0
    assert attacked_scenario(scenario, Behaviour("sign-flip", (0,))) is scenario
    assert attacked_scenario(scenario, None) is scenario


# -- robustness grid ---------------------------------------------------------------------------------
def test_grid_cells_and_relative_columns(tmp_path):
    spec = GridSpec(scenario="cartpole", out=tmp_path, attacks=["sign-flip"], defenses=["median-norm"], seeds=1)
    cells = grid_cells(spec)
    assert [(c["attack"], c["defense"]) for c in cells] == [
        ("none", "none"),
        ("none", "median-norm"),
        ("sign-flip", "median-norm"),
    ]
    rows = [
        {
            "scenario": "cartpole",
            "attack": "none",
            "defense": "none",
            "seed": 0,
            "solved": True,
            "rounds_to_solve": 20,
            "final_return": 480.0,
            "dp_epsilon": None,
        },
        {
            "scenario": "cartpole",
            "attack": "sign-flip",
            "defense": "median-norm",
            "seed": 0,
            "solved": True,
            "rounds_to_solve": 50,
            "final_return": 476.0,
            "dp_epsilon": None,
        },
    ]
    add_relative_columns(rows)
    assert rows[1]["slowdown"] == 2.5 and rows[1]["clean_return_pct"] == pytest.approx(99.2)
    table = markdown_table(rows, spec)
    assert "| sign-flip | median-norm | 1/1 | 50 | 476 | 99.2 | 2.5 |" in table
    assert {"attack", "defense", "seed", "solved", "rounds_to_solve", "final_return", "dp_epsilon"} <= set(COLUMNS)


# -- a real encrypted federation ----------------------------------------------------------------------
@pytest.mark.slow
def test_encrypted_federation_with_attacker_median_norm_and_dp(tmp_path_factory):
    """3 participants (one sign-flipper), median-norm on masked norms, distributed DP noise z=1."""
    from coordinator.report import read_metrics
    from fedhe.simulate import simulate
    from participant.audit import egress_audit_mod
    from protos import messages
    from protos.settings import RunSettings

    keys = generate_keys(tmp_path_factory.mktemp("keys-d7"), "n16k-d7")
    out, audit = tmp_path_factory.mktemp("robust-run"), tmp_path_factory.mktemp("robust-audit")
    settings = RunSettings(
        scenario="cartpole",
        num_server_rounds=2,
        out_dir=str(out),
        min_participants=3,
        seed=0,
        he_profile="n16k-d7",
        party_mix=json.dumps(party_mix_for("sign-flip", 1)),
        defense="median-norm",
        dp_noise_multiplier=1.0,
    )
    summary = simulate(settings, 3, keys.directory, client_mods=[egress_audit_mod(audit)])
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["defense"] == "median-norm" and r["clipped"] >= 1 for r in rows)
    assert [r["dp_epsilon"] for r in rows] == [round(rdp_epsilon([1.0] * k, 1e-5), 4) for k in (1, 2)]
    assert summary["dp_epsilon"] == round(rdp_epsilon([1.0, 1.0], 1e-5), 4) and summary["dp_noise_multiplier"] == 1.0
    assert summary["defense"] == "median-norm"
    from participant.audit import audit_recorded

    replies, problems = audit_recorded(audit, load_evaluation_backend(keys.coordinator_key))
    assert replies > 0 and problems == []  # robust defense, DP and an attacker: still only the allowlist
    norm_replies = 0
    for manifest in (json.loads(m.read_text()) for m in audit.glob("*/manifest.json")):
        if messages.NORM_REPLY in manifest["array_records"]:
            norm_replies += 1
            assert set(manifest["array_records"]) == {messages.NORM_REPLY}  # nothing else rides along
    assert norm_replies == 2
