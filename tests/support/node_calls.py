"""Calling a participant's ClientApp as Flower does: a real ``Context`` and a real ``Message``."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from protos import messages
from protos.codec import PROTOCOL_VERSION

_ids = itertools.count()


def request(fingerprint: str = "", round_: int = 1, message_type: str = messages.TRAIN, **config: Any) -> Message:
    """A coordinator message of round ``round_``; round 1 carries ``init`` (the public initial policy, no theta)."""
    values = {"round": round_, "participants": 3, "key-fingerprint": fingerprint, "protocol-version": PROTOCOL_VERSION,
              "init": round_ == 1, **config}
    mid = next(_ids)
    metadata = Metadata(run_id=1, message_id=f"m{mid}", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=str(round_), created_at=0.0, ttl=600.0, message_type=message_type)
    return Message(RecordDict({messages.CONFIG: ConfigRecord(values)}), metadata=metadata)


def node_context(node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(),
                   run_config=dict(run_config or {}))


def call(app: ClientApp, node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None,
         msg: Message | None = None) -> Message:
    """One message through the whole app, its mods included: the reply as it would leave the node."""
    return app(msg or request(), node_context(node_config, run_config))
