"""The participant as a Flower ClientApp.

Node config (``flower-supernode --node-config``): ``key-dir`` (directory with participant.ctx),
``participant-index`` (which organization; picks its env kwargs), optional ``env-variant``.
In simulation Flower sets ``partition-id`` instead, and the key directory comes from the run
settings (everything runs on one machine there).
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from participant.answer_rules import AnswerLedger
from participant.local_update import NodeIdentity
from participant.node import handle
from protos.settings import RunSettings
from scenarios import Scenario, resolve_run


@lru_cache(maxsize=4)
def resolved(settings: RunSettings) -> tuple[Scenario, RunSettings]:
    """The run's scenario and settings with defaults filled in (loaded once per process)."""
    return resolve_run(settings)


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
        scenario, run = resolved(settings or RunSettings.from_run_config(context.run_config))
        identity = identity_from(context, run)
        content = handle(msg.content, scenario, identity, context.run_id, training, AnswerLedger.of(context))
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=True)

    @app.query("refresh")
    def refresh(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=False)

    @app.query("norms")
    def norms(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=False)

    @app.query("gradient")
    def gradient(msg: Message, context: Context) -> Message:
        return respond(msg, context, training=False)

    return app


app = build_client_app()

__all__ = ["app", "build_client_app"]
