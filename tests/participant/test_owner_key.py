"""Transition uploads under each owner's own key: only that owner reads them, and its update is checked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tenseal as ts
from typer.testing import CliRunner

from coordinator.encrypted_gradient import GradientSum
from coordinator.owner_keys import owner_backend
from fedhe.cli import app
from participant.keyholder import load_keyholder
from participant.owner_key import (
    OWNER_EVALUATION_KEY,
    OWNER_KEY,
    OWNERS_DIR,
    create_owner_key,
    load_owner_key,
    simulated_owner_keys,
)
from participant.rollout_owner import RolloutOwner, encrypted_rollout, owner_update
from protos.codec import EncryptedVector, from_proto, to_proto_for_decryption
from protos.errors import KeyFileError, RequestRefusedError
from protos.keyfile import COORDINATOR_KEY, PARTICIPANT_KEY, inspect_key_file, load_evaluation_backend
from protos.optimizer import HEAdamConfig
from protos.rollout_layout import layout_for_round
from protos.update_units import UpdateUnits
from scenarios import load_scenario


@pytest.fixture(scope="module")
def owner(tmp_path_factory, keys):
    """One owner's key pair, beside the federation's."""
    directory = tmp_path_factory.mktemp("owner")
    secret, evaluation, _ = create_owner_key(directory, keys.profile.name)
    return load_keyholder(secret), load_evaluation_backend(evaluation)


def test_an_owner_key_is_its_own_and_its_evaluation_half_cannot_decrypt(tmp_path, keys, owner):
    own, evaluation = owner
    assert own.fingerprint == evaluation.fingerprint != keys.fingerprint
    assert not evaluation.context.is_private()
    secret, _, _ = create_owner_key(tmp_path, keys.profile.name)
    assert inspect_key_file(secret).has_secret_key
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        create_owner_key(tmp_path, keys.profile.name)
    with pytest.raises(KeyFileError, match="fedhe keys owner"):
        load_owner_key(tmp_path / "elsewhere", 0, keys.profile.name)
    with pytest.raises(KeyFileError, match="profile"):
        load_owner_key(tmp_path, 0, "n8k-d2")  # the owner.ctx just made, for another profile


def test_keys_owner_makes_the_pair_on_the_organizations_node_with_the_federations_profile(tmp_path, small_keys):
    (tmp_path / PARTICIPANT_KEY).write_bytes((small_keys.directory / PARTICIPANT_KEY).read_bytes())
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "owner", "--key-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    secret, evaluation = inspect_key_file(tmp_path / OWNER_KEY), inspect_key_file(tmp_path / OWNER_EVALUATION_KEY)
    assert secret.has_secret_key and not evaluation.has_secret_key and evaluation.has_relin_keys
    assert secret.profile.name == small_keys.profile.name and secret.fingerprint != small_keys.fingerprint
    assert secret.fingerprint in result.output and "owners/<organization>.ctx" in result.output
    again = runner.invoke(app, ["keys", "owner", "--key-dir", str(tmp_path)])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output


def test_the_coordinator_uses_the_key_registered_for_the_organization(tmp_path, keys, coordinator_backend):
    (tmp_path / COORDINATOR_KEY).write_bytes(keys.coordinator_key.read_bytes())
    simulated_owner_keys(tmp_path, ("hospital-a", "hospital-b"), keys.profile.name)
    first = owner_backend(coordinator_backend, str(tmp_path / COORDINATOR_KEY), "hospital-a")
    second = owner_backend(coordinator_backend, str(tmp_path / COORDINATOR_KEY), "hospital-b")
    assert len({first.fingerprint, second.fingerprint, coordinator_backend.fingerprint}) == 3
    assert load_owner_key(tmp_path, 0, keys.profile.name).fingerprint == first.fingerprint
    with pytest.raises(KeyFileError, match="no evaluation key is registered for hospital-c"):
        owner_backend(coordinator_backend, str(tmp_path / COORDINATOR_KEY), "hospital-c")
    (tmp_path / OWNERS_DIR / "hospital-c.ctx").write_bytes(keys.coordinator_key.read_bytes())
    with pytest.raises(KeyFileError, match="federation key"):
        owner_backend(coordinator_backend, str(tmp_path / COORDINATOR_KEY), "hospital-c")


def test_only_the_owner_reads_its_rollouts_and_it_sends_on_only_its_own_gradient(owner, holder):
    """The coordinator's sums under the owner's evaluation keys collapse to the owner's own clipped
    gradient; altered sums are refused; the federation key decrypts an upload to noise (collusion check)."""
    own, evaluation = owner
    scenario = load_scenario("cartpole")
    scenario = scenario.with_overrides(rollout=dataclasses.replace(scenario.rollout, num_envs=2, steps_per_env=64))
    spec, units = scenario.poly_spec(), UpdateUnits.of(HEAdamConfig.of(scenario.rollout.server), 3)
    layout = layout_for_round(scenario, own.slots, 3)
    rollout_owner = RolloutOwner(scenario, 0, seed=0)
    theta = spec.init(0)
    owned = rollout_owner.contribute(theta, units)
    rollout_owner.close()
    upload = encrypted_rollout(own, 1, owned, layout, theta)

    tiled = from_proto(evaluation, upload.theta_tiled, fresh=True)
    gradient = GradientSum(evaluation, layout)
    for block in upload.blocks:
        gradient.add_block(tiled.chunks, from_proto(evaluation, block, fresh=True).chunks)
    sums = [from_proto(own, to_proto_for_decryption(evaluation, EncryptedVector([c], own.slots)))
            for c in gradient.result()]
    bound = units.clip * units.factor
    update = owner_update(own, sums, layout, owned, theta, spec, bound)
    expected = spec.gradient(theta, owned.obs, owned.d_actor, owned.d_critic)
    assert np.max(np.abs(update - expected)) <= 1e-4 * np.max(np.abs(expected))
    assert np.max(np.abs(update)) <= bound
    with pytest.raises(RequestRefusedError, match="differs from this owner's own"):
        altered = EncryptedVector([own.add_scalar(sums[0].chunks[0], 1e-3)], own.slots)
        owner_update(own, [altered, *sums[1:]], layout, owned, theta, spec, bound)

    # A key holder of the federation key (say, colluding with the coordinator) loads the raw ciphertext
    # of the first block, states included, and decrypts it with its key: noise, uncorrelated with them.
    raw = ts.ckks_vector_from(holder.context, upload.blocks[0].chunks[0])
    read = np.asarray(raw.decrypt(holder.context.secret_key()))
    truth = np.concatenate(owned.blocks(layout)[0])[: own.slots]
    used = np.flatnonzero(truth)
    assert abs(np.corrcoef(read[used], truth[used])[0, 1]) < 0.05
    assert np.max(np.abs(read[used] - truth[used])) > 1e3 * np.max(np.abs(truth))


def test_keygen_makes_and_registers_simulated_organizations_owner_keys(tmp_path):
    result = CliRunner().invoke(app, ["keygen", "--out", str(tmp_path), "--profile", "n8k-d2",
                                      "--simulated-organizations", "3", "--owner-keys"])
    assert result.exit_code == 0, result.output
    for index in range(3):
        registered = inspect_key_file(tmp_path / OWNERS_DIR / f"participant-{index}.ctx")
        assert not registered.has_secret_key
        assert load_owner_key(tmp_path, index, "n8k-d2").fingerprint == registered.fingerprint
