"""The participant as a Flower ClientApp.

The run config is the untrusted coordinator's voice: it says what to train. What this organization
reveals is decided by its node (``participant.policy``): node config (``flower-supernode
--node-config``) keys such as ``key-dir``, ``participant-index``, ``env-variant``, ``masking`` or a
``policy-file``. A run the policy refuses gets one error reply saying which setting and which rule.

The module-level ``app`` is what organizations deploy: the node's own policy, encryption mandatory,
honest updates only. `fedhe simulate` and the threat lab build theirs with ``build_client_app``,
passing a permissive policy per simulated node and the lab's update source. Either way every reply
passes the egress guard (``participant.audit.egress_guard_mod``) and an error reply says only a
fixed category (``participant.failures``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from participant.answer_rules import AnswerLedger
from participant.audit import EgressRules, egress_guard_mod
from participant.failures import RunSettingsError, error_reply, log_to_stderr
from participant.local_update import NodeIdentity, UpdateSource
from participant.node import cached_keyholder, cached_owner_key, handle
from participant.policy import NodePolicy, organization_of
from participant.worker import WorkerClient, app_from, state_dir
from protos import messages
from protos.plan import RunPlan, resolve_plan
from protos.settings import RunSettings

# The "query.<name>" message types a participant answers without training.
QUERIES = tuple(kind.split(".", 1)[1] for kind in messages.QUERIES)
PolicyFactory = Callable[[Context], NodePolicy]


def deployed_policy(context: Context) -> NodePolicy:
    """An organization's node: its policy is its node config (and the policy file that names)."""
    return NodePolicy.from_node_config(context.node_config)


@lru_cache(maxsize=4)
def planned(settings: RunSettings) -> RunPlan:
    """The run's plan (``protos.plan``), resolved once per process."""
    try:
        return resolve_plan(settings)
    except ValueError as exc:
        raise RunSettingsError(str(exc)) from exc


def run_settings(context: Context) -> RunSettings:
    try:
        return RunSettings.from_run_config(context.run_config)
    except ValueError as exc:
        raise RunSettingsError(str(exc)) from exc


def build_client_app(
    settings: RunSettings | None = None,
    mods: list[Mod] | None = None,
    *,
    policy_for: PolicyFactory = deployed_policy,
    update_source: UpdateSource | None = None,
) -> ClientApp:
    """With no arguments: the deployed participant. `fedhe simulate` passes fixed ``settings``, each simulated
    node's ``policy_for`` and the lab's ``update_source`` (None: honest updates only)."""

    def setup(context: Context) -> tuple[NodePolicy, RunSettings]:
        return policy_for(context), settings or run_settings(context)

    def respond(msg: Message, context: Context, training: bool) -> Message:
        """A failure or refusal becomes one error reply of a fixed category; the details stay in this node's log."""
        organization = organization_of(context.node_config, context.node_id)
        try:
            policy, run = setup(context)
            organization = policy.organization
            policy.check(run)  # before anything the run names is loaded
            plan = planned(run)
            identity = NodeIdentity(policy.participant_index, policy.key_dir_for(run), policy.env_variant, plan,
                                    policy.seed, update_source, policy.organization, policy.min_masking_set,
                                    policy.self_mask_threshold, policy.release_statistics and run.release_metrics)
            content = handle(msg.content, identity, context.run_id, training, AnswerLedger.of(context))
        except Exception as exc:  # every failure is reported to the coordinator, none crashes the node
            return error_reply(msg, organization, exc)
        return Message(content, reply_to=msg)

    def egress_rules(context: Context) -> EgressRules:
        try:
            policy, run = setup(context)
        except Exception:  # noqa: BLE001 - only a fixed error category may leave such a node
            return EgressRules(organization_of(context.node_config, context.node_id))
        try:
            refusal = policy.refusal(run)
        except Exception:  # noqa: BLE001 - e.g. an allowed scenario that does not load: no refusal text
            refusal = None
        return EgressRules(
            policy.organization,
            backend=lambda: cached_keyholder(policy.key_dir_for(run), run.plaintext, planned(run).settings.he_profile),
            refusal=str(refusal) if refusal else None,
            release=policy.release_statistics and run.release_metrics,
            owner=lambda: cached_owner_key(policy.key_dir_for(run), policy.participant_index, run.plaintext,
                                           planned(run).settings.he_profile),
        )

    # The guard wraps the handlers directly: whatever other mods do, no reply leaves the handlers unchecked.
    app = ClientApp(mods=[*(mods or []), egress_guard_mod(egress_rules)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=True)

    def answer(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=False)

    for query in QUERIES:  # key-holder requests: the message's records say what is asked
        app.query(query)(answer)
    return app


log = logging.getLogger("fedhe.participant")
DEPLOYED = "participant.client_app:build_client_app"  # the app a deployed node's worker runs


def forwarding_app(
    mods: list[Mod] | None = None,
    *,
    policy_for: PolicyFactory = deployed_policy,
    factory: str = DEPLOYED,
    factory_kwargs: dict[str, Any] | None = None,
) -> ClientApp:
    """The participant as organizations deploy it (and as `fedhe simulate` runs it): every message is
    answered by the organization's long-lived worker (``participant.worker``), so environments,
    episodes in progress and loaded keys persist across rounds, although a SuperNode starts a fresh
    ClientApp process per message and a simulation hands a node's messages to any of its workers.
    The worker runs ``factory(**factory_kwargs)``; with ``worker=false`` in the node's policy, this
    process does. ``mods`` wrap the forwarding (the egress guard is inside the app the worker runs)."""
    app = ClientApp(mods=mods or [])
    code_dir = Path(__file__).resolve().parents[1]

    def forward(msg: Message, context: Context) -> Message:
        local = app_from(factory, factory_kwargs)
        try:
            policy = policy_for(context)
        except Exception:  # noqa: BLE001 - the app turns it into the right error reply
            return local(msg, context)
        if not policy.worker:
            return local(msg, context)
        tag = f"{policy.key_dir}\0{policy.participant_index}\0{factory}\0{factory_kwargs!r}"
        client = WorkerClient(state_dir(tag, code_dir, policy.state_dir), code_dir, factory, factory_kwargs)
        try:
            reply = client.forward(msg, context)
        except Exception as exc:  # the worker could not answer: a fixed category, details in this log
            return error_reply(msg, policy.organization, exc)
        if reply.has_error():  # the node's own log says what it told the coordinator (details: worker.log)
            log.warning("%s message, round %s: replied %r (details in %s)", msg.metadata.message_type,
                        msg.metadata.group_id, reply.error.reason, client.directory / "worker.log")
        return reply

    app.train()(forward)
    for query in QUERIES:
        app.query(query)(forward)
    return app


log_to_stderr()
app = forwarding_app()

__all__ = ["app", "app_from", "build_client_app", "deployed_policy", "forwarding_app"]
