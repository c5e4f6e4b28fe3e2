"""The egress audit: check every reply that leaves this participant against an allowlist.

``egress_guard_mod`` runs in every ClientApp (deployed and simulated): it checks each reply before it
leaves and sends a reply that breaks the allowlist nowhere, replacing it with an error reply
("withheld by this node's egress audit") and logging the violation locally. ``audit_reply`` checks
a reply field by field: every field must be either a valid ciphertext under the federation key
(fresh: full depth, the profile's scale), one under this owner's own key where the protocol puts one
(transition uploads, ``participant.owner_key``), or named metadata with its allowed values. Anything else
(an unknown field, a new schema field no one declared here, a plaintext metric, an unrounded
release) is a violation. An error reply may carry only a fixed category with the organization's
name (``protos.reply_errors``) or the refusal text this node's own policy produces for the run.
Organizations can also enable the recording mod to show their security team exactly what crosses
the boundary.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.unknown_fields import UnknownFieldSet

from protos import messages
from protos.backend import HEBackend
from protos.codec import PROTOCOL_VERSION, from_proto
from protos.errors import WireError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import STATE_NAMES
from protos.reply_errors import REFUSED, WITHHELD, allowed_errors

MANIFEST = "manifest.json"
log = logging.getLogger("fedhe.participant")


@dataclass(frozen=True)
class EgressRules:
    """What may leave this node in reply to one message."""

    organization: str
    backend: Callable[[], HEBackend] | None = None  # the federation key; None: the node could not set itself up
    refusal: str | None = None  # the refusal text this node's policy produces for the run, if it refuses it
    release: bool = True  # whether rounded federation statistics may leave (node policy and run both agree)
    owner: Callable[[], HEBackend] | None = None  # this owner's own key (transition uploads only)


def egress_guard_mod(rules_for: Callable[[Context], EgressRules]) -> Mod:
    """A Flower mod that lets a reply leave only if it passes the allowlist; any other reply is withheld."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        rules = None
        try:
            rules = rules_for(context)
            problems = egress_problems(msg, reply, rules)
        except Exception as exc:  # noqa: BLE001 - an audit that cannot check lets nothing through
            problems = [f"the audit itself failed ({type(exc).__name__})"]
            log.error("egress audit failed", exc_info=True)
        if not problems:
            return reply
        log.error("egress audit withheld the reply to a %s message: %s", msg.metadata.message_type,
                  "; ".join(problems))
        organization = rules.organization if rules else f"node-{context.node_id}"
        return Message(Error(WITHHELD.code, WITHHELD.reason(organization)), reply_to=msg)

    return mod


def egress_problems(msg: Message, reply: Message, rules: EgressRules) -> list[str]:
    """Every reason ``reply`` may not leave (empty: it may)."""
    if reply.has_error():
        allowed = allowed_errors(rules.organization) | ({(REFUSED.code, rules.refusal)} if rules.refusal else set())
        if (reply.error.code, reply.error.reason) in allowed:
            return []
        return [f"error reply (code {reply.error.code}) whose reason is not one of this node's categories"]
    if rules.backend is None:
        return ["a reply with content from a node that could not set itself up"]
    request_round = int(msg.content.config_records.get(messages.CONFIG, {}).get("round", -1))
    owner = rules.owner() if rules.owner and messages.ROLLOUT in reply.content.array_records else None
    return audit_reply(reply.content, request_round, rules.backend(), release=rules.release, owner=owner)


def egress_audit_mod(directory: str | os.PathLike) -> Mod:
    """A Flower mod that writes each reply's records to ``directory`` (one subfolder each)."""
    root = str(directory)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        folder = Path(root) / f"{context.node_id}-{uuid.uuid4().hex[:12]}"
        folder.mkdir(parents=True, exist_ok=True)
        config = msg.content.config_records.get(messages.CONFIG, {})
        manifest: dict[str, Any] = {
            "node_id": context.node_id,
            "run_id": context.run_id,
            "message_type": msg.metadata.message_type,
            "request_round": config.get("round"),
            "error": reply.has_error(),
        }
        if not reply.has_error():
            content = reply.content
            manifest["config_records"] = {name: dict(rec) for name, rec in content.config_records.items()}
            manifest["metric_records"] = {name: dict(rec) for name, rec in content.metric_records.items()}
            manifest["array_records"] = {}
            for name, record in content.array_records.items():
                manifest["array_records"][name] = {}
                for key, array in record.items():
                    file = f"{name}.{key}.bin"
                    (folder / file).write_bytes(array.data)
                    manifest["array_records"][name][key] = {"stype": array.stype, "dtype": array.dtype, "file": file}
        (folder / MANIFEST).write_text(json.dumps(manifest, default=str))
        return reply

    return mod


# -- the allowlist -----------------------------------------------------------------------------------
# Per protobuf field: "vector" (a fresh ciphertext under the federation key), "vector-list" (a list
# of them), "vector-map" (map of state name -> such a ciphertext), "owner-vector" / "owner-vector-list"
# (the same under this owner's own key), "message" / "message-list" (nested messages with their own
# rules) or a check of the plaintext value, given the request's round.
Check = Callable[[Any, int], bool]


def _rounded(value: float, digits: int) -> bool:
    return value == round(value, digits)


def _significant(value: float, digits: int) -> bool:
    return value == float(f"{value:.{digits}g}")


# Every reply message starts with the protocol version and the round of the request it answers.
REPLY_HEADER: dict[str, Check] = {
    "protocol_version": lambda v, r: v == PROTOCOL_VERSION,
    "round": lambda v, r: v == r,
}

ALLOWED_FIELDS: dict[str, dict[str, str | Check]] = {
    "fedhe.v1.ParticipantUpdate": {
        **REPLY_HEADER,
        "update": "vector",
        "rollout_stats": "vector",
        "masking": "message",
    },
    "fedhe.v1.PairwiseMasking": {
        "participant_index": lambda v, r: True,  # public: the coordinator knows who answered
        "roster_size": lambda v, r: v >= 1,
        "members": lambda v, r: list(v) == sorted(set(v)),  # the set the coordinator named
        "threshold": lambda v, r: v >= 2,
        "commitment": lambda v, r: len(v) == 32,  # SHA-256 of a random seed and public context
        "shares": "message-list",
    },
    "fedhe.v1.SealedShare": {  # AES-GCM: opens only for the recipient
        "sender": lambda v, r: True,
        "recipient": lambda v, r: True,
        "nonce": lambda v, r: len(v) == 12,
        "ciphertext": lambda v, r: len(v) == 2 + 16 + 16,
    },
    "fedhe.v1.UnmaskReply": {
        **REPLY_HEADER,
        "shares": "message-list",
        "update": "vector",
        "rollout_stats": "vector",
    },
    "fedhe.v1.RevealedShare": {  # a share of another survivor's random seed
        "sender": lambda v, r: True,
        "x": lambda v, r: v >= 1,
        "share": lambda v, r: len(v) == 16,
    },
    "fedhe.v1.IntegrityReply": {  # answers this round's check or, with a train message, the previous round's
        "protocol_version": lambda v, r: v == PROTOCOL_VERSION,
        "round": lambda v, r: v in (r, r - 1),
        "within_bound": lambda v, r: True,  # one bit about the federation's aggregate
        "stats_plausible": lambda v, r: True,
        "released": "message",
    },
    "fedhe.v1.RefreshReply": {
        **REPLY_HEADER,
        "theta": "vector",
        "state": "vector-map",
        "theta_tiled": "vector",
    },
    "fedhe.v1.RolloutUpload": {
        **REPLY_HEADER,
        "blocks": "owner-vector-list",
        "theta_tiled": "owner-vector",
    },
    "fedhe.v1.GradientReply": {
        **REPLY_HEADER,
        "gradient": "vector",
    },
    "fedhe.v1.ReleasedMetrics": {
        "round": lambda v, r: v in (r, r - 1),  # with the integrity check of its round
        "mean_return": lambda v, r: _rounded(v, 2),
        "episodes": lambda v, r: True,  # a federation-wide integer count
        "steps": lambda v, r: True,
        "valid": lambda v, r: True,
    },
    "fedhe.v1.NormReply": {
        **REPLY_HEADER,
        "masked_sums": lambda v, r: all(_significant(x, 4) for x in v),
    },
}
# The protobuf each record of a reply may hold.
ALLOWED_RECORDS: dict[str, type[ProtoMessage]] = {
    messages.UPDATE: wire_pb2.ParticipantUpdate,
    messages.REFRESH_REPLY: wire_pb2.RefreshReply,
    messages.NORM_REPLY: wire_pb2.NormReply,
    messages.ROLLOUT: wire_pb2.RolloutUpload,
    messages.GRADIENT_REPLY: wire_pb2.GradientReply,
    messages.UNMASK_REPLY: wire_pb2.UnmaskReply,
    messages.INTEGRITY_REPLY: wire_pb2.IntegrityReply,
}
CONFIG_VALUES: dict[str, Check] = {
    "round": lambda v, r: v == r,
    "protocol-version": lambda v, r: v == PROTOCOL_VERSION,
    "key-fingerprint": lambda v, r: True,  # compared with the federation's below
    "participant-index": lambda v, r: isinstance(v, int) and v >= 0,  # identify replies: public roster facts
    "organization": lambda v, r: isinstance(v, str) and len(v) <= 200,
}


def audit_reply(content: RecordDict, request_round: int, backend: HEBackend, release: bool = True,
                owner: HEBackend | None = None) -> list[str]:
    """Every violation of the allowlist in one reply (empty: the reply may leave); ``release`` False: released
    statistics are a violation too; ``owner``: this owner's own key (None: nothing may be under one)."""
    problems: list[str] = []
    if content.metric_records:
        problems.append(f"plaintext metric records {sorted(content.metric_records)}")
    if set(content.config_records) != {messages.CONFIG}:
        problems.append(f"config records {sorted(content.config_records)}, allowed only {messages.CONFIG}")
    for key, value in content.config_records.get(messages.CONFIG, {}).items():
        check = CONFIG_VALUES.get(key)
        if check is None:
            problems.append(f"config key {key!r} is not permitted metadata")
        elif not check(value, request_round):
            problems.append(f"config {key}={value!r} is not an allowed value")
    if content.config_records.get(messages.CONFIG, {}).get("key-fingerprint") != backend.fingerprint:
        problems.append("config key-fingerprint is not the federation's")
    for name, record in content.array_records.items():
        cls = ALLOWED_RECORDS.get(name)
        if cls is None:
            problems.append(f"array record {name!r} is not part of the protocol")
            continue
        arrays = list(record.items())
        if (
            len(arrays) != 1
            or arrays[0][0] != cls.DESCRIPTOR.full_name
            or arrays[0][1].stype != cls.DESCRIPTOR.full_name
        ):
            problems.append(f"record {name!r} must hold exactly one {cls.DESCRIPTOR.full_name}")
            continue
        try:
            proto = cls.FromString(arrays[0][1].data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a violation
            problems.append(f"record {name!r} does not parse: {exc}")
            continue
        problems += [f"{name}: {p}" for p in audit_proto(proto, request_round, backend, owner)]
        if not release and isinstance(proto, wire_pb2.IntegrityReply) and proto.HasField("released"):
            problems.append(f"{name}: released statistics, which this node does not release in this run")
    return problems


def audit_proto(proto: ProtoMessage, request_round: int, backend: HEBackend,
                owner: HEBackend | None = None) -> list[str]:
    """Walk every set field of a reply protobuf against ``ALLOWED_FIELDS``."""
    name = proto.DESCRIPTOR.full_name
    problems = [f"{name} carries {len(UnknownFieldSet(proto))} unknown field(s)"] if len(UnknownFieldSet(proto)) else []
    allowed = ALLOWED_FIELDS.get(name, {})
    for field, value in proto.ListFields():
        rule = allowed.get(field.name)
        where = f"{name}.{field.name}"
        if rule is None:
            problems.append(f"{where} is not in the egress allowlist")
        elif rule == "vector":
            problems += _audit_vector(where, value, backend)
        elif rule == "vector-list":
            for k, vec in enumerate(value):
                problems += _audit_vector(f"{where}[{k}]", vec, backend)
        elif rule in ("owner-vector", "owner-vector-list"):
            vectors = value if rule == "owner-vector-list" else [value]
            if owner is None:
                problems.append(f"{where} must be under this owner's own key, and this run gives it none")
            for k, vec in enumerate(vectors if owner is not None else []):
                problems += _audit_vector(f"{where}[{k}]", vec, owner, "this owner's own key")
        elif rule == "vector-map":
            if not set(value) <= set(STATE_NAMES):
                problems.append(f"{where} has keys {sorted(value)}, allowed {list(STATE_NAMES)}")
            for key, vec in value.items():
                problems += _audit_vector(f"{where}[{key}]", vec, backend)
        elif rule == "message":
            problems += audit_proto(value, request_round, backend, owner)
        elif rule == "message-list":
            for item in value:
                problems += audit_proto(item, request_round, backend, owner)
        elif not rule(value, request_round):
            problems.append(f"{where}={value!r} is not an allowed value")
    return problems


def _audit_vector(where: str, vec: wire_pb2.EncryptedVector, backend: HEBackend,
                  key: str = "the federation key") -> list[str]:
    if len(UnknownFieldSet(vec)):
        return [f"{where} carries unknown fields"]
    try:
        from_proto(backend, vec, fresh=True)
    except WireError as exc:
        return [f"{where} is not a fresh ciphertext under {key}: {exc}"]
    return []


def audit_recorded(directory: str | os.PathLike, backend: HEBackend) -> tuple[int, list[str]]:
    """Check every reply ``egress_audit_mod`` recorded: (replies seen, violations)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    problems: list[str] = []
    manifests = sorted(Path(directory).glob(f"*/{MANIFEST}"))
    for path in manifests:
        manifest = json.loads(path.read_text())
        if manifest["error"]:
            continue  # an error reply carries only Flower's error record
        content = RecordDict()
        for name, values in manifest["config_records"].items():
            content[name] = ConfigRecord(values)
        for name, values in manifest["metric_records"].items():
            content[name] = MetricRecord(values)
        for name, arrays in manifest["array_records"].items():
            data = {key: (path.parent / a["file"]).read_bytes() for key, a in arrays.items()}
            content[name] = ArrayRecord(
                {
                    key: Array(dtype=a["dtype"], shape=(len(data[key]),), stype=a["stype"], data=data[key])
                    for key, a in arrays.items()
                }
            )
        problems += [f"{path.parent.name}: {p}" for p in audit_reply(content, int(manifest["request_round"]), backend)]
    return len(manifests), problems
