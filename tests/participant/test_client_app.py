"""The deployed ClientApp, called as Flower calls it: the node's policy decides, errors say only a category."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from support.node_calls import call, request

import participant.client_app as client_app
from participant.client_app import build_client_app
from participant.failures import RunSettingsError, category_of
from participant.policy import NodeConfigError, PolicyRefusal
from participant.roster import RosterError
from protos import messages, reply_errors
from protos.codec import PROTOCOL_VERSION
from protos.errors import (
    ChunkLayoutError,
    FingerprintMismatchError,
    KeyFileError,
    NonFiniteValueError,
    RequestRefusedError,
)
from scenarios import UnknownScenarioError
from scenarios.rollout import EnvironmentFailure, NonFiniteEnvironmentError

ROOT = Path(__file__).resolve().parents[2]
ORG = "hospital-b"
DEPLOYED_APPS = {"module app": lambda: client_app.app, "build_client_app()": lambda: build_client_app()}


def node(key_dir: str = "/srv/fedhe/keys", **extra) -> dict:
    """A deployed node's config; it answers in the test's process (``worker=false``) so its log is caplog
    (tests/participant/test_worker.py covers the worker)."""
    return {"participant-index": 1, "key-dir": key_dir, "organization": ORG, "worker": False, **extra}


# run config, extra node config, what the refusal names
REFUSED = {
    "plaintext": ({"plaintext": True}, {}, "plaintext=true, this node requires encryption"),
    "masking off": ({"masking": "off"}, {}, "masking=off, this node requires pairwise"),
    "too little DP noise": ({"dp-noise-multiplier": 0.5}, {"min-dp-noise-multiplier": 1.0},
                            "dp-noise-multiplier=0.5, this node requires at least 1"),
    "party-mix": ({"party-mix": json.dumps([{"attack": "sign-flip", "participants": [1]}])}, {},
                  "party-mix=[{\"attack\": \"sign-flip\""),
    "collusion-dir": ({"collusion-dir": "/tmp/collude"}, {}, "collusion-dir=/tmp/collude, this node writes nothing"),
    "robust-training": ({"robust-training": '{"mode": "sa-ppo"}'}, {}, 'robust-training={"mode": "sa-ppo"}'),
    "participant-key-dir": ({"participant-key-dir": "/tmp/keys"}, {},
                            "participant-key-dir=/tmp/keys, this node uses its own key-dir"),
    "scenario file": ({"scenario": "/tmp/coordinator_code.py"}, {}, "scenario=/tmp/coordinator_code.py"),
    "mode": ({"mode": "encrypted-rollouts"}, {"masking": "optional", "allowed-modes": "local-ppo"},
             "mode=encrypted-rollouts, this node allows local-ppo"),
    "profile": ({"he-profile": "n16k-d7"}, {"allowed-profiles": "n16k-d6"}, "he-profile=n16k-d7"),
    "release": ({"release-metrics": True}, {"release-statistics": False},
                "release-metrics=true, this node never releases statistics"),
}


@pytest.mark.parametrize("app", DEPLOYED_APPS)
@pytest.mark.parametrize("case", REFUSED)
def test_a_deployed_node_refuses_downgrades_and_lab_orders_in_the_run_config(app, case, caplog):
    run_config, node_config, named = REFUSED[case]
    reply = call(DEPLOYED_APPS[app](), node(**node_config), run_config)
    assert reply.has_error() and reply.error.code == reply_errors.REFUSED.code
    assert reply.error.reason.startswith(f"{ORG} refuses: the run asks ") and named in reply.error.reason
    assert reply.error.reason in caplog.text  # the node's own log says it too


FAILING_ENV = """
import gymnasium as gym
from scenarios import Scenario

class Leaky(gym.Wrapper):
    def step(self, action):
        obs, *_ = self.env.step(action)
        raise RuntimeError(f"simulator crashed at state {{list(obs)}} reading {path!r}")

SCENARIO = Scenario(name="leaky", make_env=lambda index, seed: Leaky(gym.make("CartPole-v1")))
"""


def test_an_environment_failure_reaches_the_coordinator_as_its_category_only(tmp_path, keys, holder, caplog):
    """The exception holds the environment's observation and a local path; the reply holds neither."""
    path = tmp_path / "leaky.py"
    path.write_text(textwrap.dedent(FAILING_ENV.format(path=str(tmp_path / "patient-records.db"))))
    node_config = node(str(keys.directory), masking="optional", **{"allowed-scenarios": str(path)})
    reply = call(client_app.app, node_config, {"scenario": str(path), "masking": "off"}, request(holder.fingerprint))
    assert (reply.error.code, reply.error.reason) == (reply_errors.ENVIRONMENT.code, f"{ORG}: environment failure")
    assert "simulator crashed at state [" in caplog.text and "patient-records.db" in caplog.text  # kept locally
    assert any(r.exc_info for r in caplog.records if r.name == "fedhe.participant")


@pytest.mark.parametrize("node_config, run_config, fingerprint, category", [
    (node(), {}, "", reply_errors.KEY_FILES),  # no such key directory
    ({"participant-index": 1, "organization": ORG, "alowed-modes": "local-ppo"}, {}, "", reply_errors.NODE_CONFIG),
    (node(), {"stop-on-solve": "perhaps"}, "", reply_errors.RUN_SETTINGS),
    (node(), {"masking": "pairwise", "defense": "median-norm"}, "", reply_errors.RUN_SETTINGS),  # contradictory
])
def test_every_failure_is_one_fixed_category_with_the_organization(node_config, run_config, fingerprint, category):
    reply = call(client_app.app, node_config, run_config, request(fingerprint))
    assert (reply.error.code, reply.error.reason) == (category.code, f"{ORG}: {category.text}")


def test_another_federations_key_is_the_wrong_key_category(small_keys):
    reply = call(client_app.app, node(str(small_keys.directory), masking="optional"), {"masking": "off"},
                 request("0123456789abcdef"))
    assert (reply.error.code, reply.error.reason) == (reply_errors.WRONG_KEY.code, f"{ORG}: wrong federation key")


def test_the_deployed_app_withholds_a_reply_that_breaks_the_allowlist(small_keys, small_holder, monkeypatch, caplog):
    """Whatever the handlers produce passes the egress guard: here one that leaks a plaintext metric."""

    def leaky_handle(content, *args):
        config = ConfigRecord({"round": 1, "key-fingerprint": small_holder.fingerprint,
                               "protocol-version": PROTOCOL_VERSION})
        return RecordDict({messages.CONFIG: config, "metrics": MetricRecord({"local_mean_return": 187.3})})

    monkeypatch.setattr(client_app, "handle", leaky_handle)
    reply = call(build_client_app(), node(str(small_keys.directory), masking="optional"), {"masking": "off"},
                 request(small_holder.fingerprint))
    withheld = reply_errors.WITHHELD
    assert (reply.error.code, reply.error.reason) == (withheld.code, f"{ORG}: {withheld.text}")
    assert "plaintext metric records ['metrics']" in caplog.text


@pytest.mark.parametrize("exc, category", [
    (PolicyRefusal(ORG, ["the run asks plaintext=true, this node requires encryption"]), reply_errors.REFUSED),
    (NodeConfigError("x"), reply_errors.NODE_CONFIG),
    (RunSettingsError("x"), reply_errors.RUN_SETTINGS),
    (UnknownScenarioError("x"), reply_errors.RUN_SETTINGS),
    (EnvironmentFailure("x"), reply_errors.ENVIRONMENT),
    (NonFiniteEnvironmentError("x"), reply_errors.ENVIRONMENT),
    (NonFiniteValueError("x"), reply_errors.NON_FINITE),
    (FingerprintMismatchError("x"), reply_errors.WRONG_KEY),
    (KeyFileError("x"), reply_errors.KEY_FILES),
    (RosterError("x"), reply_errors.KEY_FILES),
    (RequestRefusedError("x"), reply_errors.PROTOCOL),
    (ChunkLayoutError("x"), reply_errors.MALFORMED),
    (ZeroDivisionError("x"), reply_errors.INTERNAL),
    (OSError("/srv/fedhe/keys/participant.ctx"), reply_errors.INTERNAL),
])
def test_exceptions_map_to_categories(exc, category):
    assert category_of(exc) is category


def test_a_deployed_clientapp_process_prints_its_own_log():
    """flwr-clientapp configures no logging; the node's failure details must not vanish."""
    code = "import logging, participant.client_app; logging.getLogger('participant.node').error('details stay here')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "ERROR participant.node: details stay here" in out.stderr
    assert logging.getLogger("fedhe.participant").hasHandlers()
