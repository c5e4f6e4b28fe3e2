"""An egress audit: record every payload that leaves this participant, byte for byte.

Organizations can enable it to show their security team exactly what crosses the boundary;
the privacy test uses it to prove that only ciphertexts and permitted metadata leave.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable, Mod


def egress_audit_mod(directory: str | os.PathLike) -> Mod:
    """A Flower mod that writes each reply's records to ``directory`` (one subfolder each)."""
    root = str(directory)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        folder = Path(root) / f"{context.node_id}-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True, exist_ok=True)
        content = reply.content if not reply.has_error() else None
        manifest = {"node_id": context.node_id, "message_type": msg.metadata.message_type, "error": reply.has_error()}
        if content is not None:
            manifest["config_records"] = {name: dict(rec) for name, rec in content.config_records.items()}
            manifest["metric_records"] = {name: dict(rec) for name, rec in content.metric_records.items()}
            manifest["array_records"] = {}
            for name, record in content.array_records.items():
                manifest["array_records"][name] = {}
                for key, array in record.items():
                    file = f"{name}.{key}.bin"
                    (folder / file).write_bytes(array.data)
                    manifest["array_records"][name][key] = {"stype": array.stype, "dtype": array.dtype, "file": file}
        (folder / "manifest.json").write_text(json.dumps(manifest, default=str))
        return reply

    return mod
