"""The participant as a Flower ClientApp.

Node config (``flower-supernode --node-config``): ``key-dir`` (directory with participant.ctx and,
with pairwise masking, roster.json and this organization's org.x25519), ``participant-index``
(which organization: its roster entry and env kwargs), optional ``env-variant``.
In simulation Flower sets ``partition-id`` instead, and the key directory comes from the run
settings (everything runs on one machine there).
"""

from __future__ import annotations

import logging
from functools import lru_cache

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common.constant import ErrorCode

from participant.answer_rules import AnswerLedger
from participant.local_update import NodeIdentity
from participant.node import handle
from protos import messages
from protos.errors import FingerprintMismatchError
from protos.settings import RunSettings
from scenarios import Scenario, resolve_run

log = logging.getLogger("fedhe.participant")
# The "query.<name>" message types a participant answers without training.
QUERIES = tuple(kind.split(".", 1)[1] for kind in messages.QUERIES)


@lru_cache(maxsize=4)
def resolved(settings: RunSettings) -> tuple[Scenario, RunSettings]:
    """The run's scenario and settings with defaults filled in (loaded once per process)."""
    return resolve_run(settings)


def failure_line(msg: Message, context: Context, exc: Exception) -> str:
    """'participant 1, round 3: the environment returned a non-finite reward (step 7)'."""
    node = context.node_config
    who = node.get("participant-index", node.get("partition-id", f"node {context.node_id}"))
    round_ = msg.content.config_records.get(messages.CONFIG, {}).get("round", "?")
    cause = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
    return f"participant {who}, round {round_}: {cause}"


def identity_from(context: Context, run: RunSettings) -> NodeIdentity:
    node = context.node_config
    index = node.get("participant-index", node.get("partition-id"))
    if index is None:
        raise ValueError("node config needs participant-index (e.g. --node-config 'participant-index=0')")
    variant = node.get("env-variant") or None
    return NodeIdentity(
        participant_index=int(index),
        key_dir=str(node.get("key-dir", run.participant_key_dir)),
        variant=str(variant) if variant else None,
        run=run,
    )


def build_client_app(settings: RunSettings | None = None, mods: list[Mod] | None = None) -> ClientApp:
    """``settings`` fixed by `fedhe simulate`; None reads them from each run's config."""
    app = ClientApp(mods=mods or [])

    def respond(msg: Message, context: Context, training: bool) -> Message:
        """A failure becomes one error reply naming this participant, the round and the cause; the
        traceback stays in this node's own log."""
        try:
            scenario, run = resolved(settings or RunSettings.from_run_config(context.run_config))
            identity = identity_from(context, run)
            content = handle(msg.content, scenario, identity, context.run_id, training, AnswerLedger.of(context))
        except Exception as exc:  # every failure is reported to the coordinator, none crashes the node
            log.debug("message handling failed", exc_info=True)
            wrong_key = isinstance(exc, FingerprintMismatchError)
            code = messages.WRONG_FEDERATION if wrong_key else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            return Message(Error(code, failure_line(msg, context, exc)), reply_to=msg)
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=True)

    def answer(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=False)

    for query in QUERIES:  # key-holder requests: the message's records say what is asked
        app.query(query)(answer)
    return app


app = build_client_app()

__all__ = ["app", "build_client_app"]
