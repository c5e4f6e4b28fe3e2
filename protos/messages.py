"""How fedhe protobufs ride inside Flower messages.

Each protobuf travels as one Flower ``Array`` of raw bytes (Flower chunks large arrays for
transport), in an ``ArrayRecord`` under a fixed record name. The only other content is one
``ConfigRecord`` of plaintext protocol metadata; ``participant.audit`` lists what a participant
may put there (and every field's allowed values), and the privacy tests check every reply against it.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from google.protobuf.message import Message as ProtoMessage

from protos.codec import parse_message
from protos.errors import MalformedMessageError

P = TypeVar("P", bound=ProtoMessage)

# Record names.
THETA = "fedhe.theta"  # coordinator -> participants: EncryptedVector of theta
UPDATE = "fedhe.update"  # participant -> coordinator: ParticipantUpdate
REFRESH_REQUEST = "fedhe.refresh-request"  # coordinator -> refresher: RefreshRequest
REFRESH_REPLY = "fedhe.refresh-reply"  # refresher -> coordinator: RefreshReply
CONFIG = "fedhe.config"  # plaintext protocol metadata, both directions
NORM_QUERY = "fedhe.norm-query"  # coordinator -> key holder: NormQuery (masked squared norms)
NORM_REPLY = "fedhe.norm-reply"  # key holder -> coordinator: NormReply (rounded masked sums)
ROLLOUT = "fedhe.rollout"  # owner -> coordinator (encrypted-rollout mode): RolloutUpload
GRADIENT_QUERY = "fedhe.gradient-query"  # coordinator -> key holder: GradientQuery (masked per-slot sums)
GRADIENT_REPLY = "fedhe.gradient-reply"  # key holder -> coordinator: GradientReply (dense, fresh)
OWNER_GRADIENT_QUERY = "fedhe.owner-gradient-query"  # coordinator -> owner: GradientQuery under its own key
UNMASK_REQUEST = "fedhe.unmask-request"  # coordinator -> survivor: UnmaskRequest (pairwise masking)
UNMASK_REPLY = "fedhe.unmask-reply"  # survivor -> coordinator: UnmaskReply (opened shares, corrections)
INTEGRITY_QUERY = "fedhe.integrity-query"  # coordinator -> key holder: IntegrityQuery
INTEGRITY_REPLY = "fedhe.integrity-reply"  # key holder -> coordinator: IntegrityReply

# Message types.
TRAIN = "train"
REFRESH = "query.refresh"  # refresh/release only, no training (fallback refresher, last round)
NORMS = "query.norms"  # robust aggregation: a key holder sums masked squared norms
GRADIENT = "query.gradient"  # encrypted-rollout mode: a key holder collapses masked per-slot gradients
OWNER_GRADIENT = "query.owner_gradient"  # transition uploads: an owner turns its own gradient into an update
UNMASK = "query.unmask"  # pairwise masking: reveal survivors' seed shares, cancel masks with the missing
INTEGRITY = "query.integrity"  # every round: is the aggregate within its bound; release the statistics
IDENTIFY = "query.identify"  # once per node: its roster index and organization name (public)
QUERIES = (REFRESH, NORMS, GRADIENT, OWNER_GRADIENT, UNMASK, INTEGRITY, IDENTIFY)

# Flower error code of a participant's reply when it holds another federation's key
# (``protos.reply_errors``: every category of a data-free error reply).
WRONG_FEDERATION = 1001

# Encrypted rollout statistics: [sum of episode returns, episodes, env steps].
STATS_LENGTH = 3


def pack(proto: ProtoMessage) -> ArrayRecord:
    data = proto.SerializeToString()
    name = proto.DESCRIPTOR.full_name
    return ArrayRecord({name: Array(dtype="bytes", shape=(len(data),), stype=name, data=data)})


def unpack(content: RecordDict, record: str, cls: type[P], *, max_bytes: int) -> P:
    """The protobuf stored under ``record``, refused before parsing if it exceeds ``max_bytes``.

    Every caller states the limit its layout allows (``protos.codec.max_bytes_for``).
    """
    if record not in content.array_records:
        raise MalformedMessageError(f"message has no {record!r} record")
    arrays = content.array_records[record]
    name = cls.DESCRIPTOR.full_name
    if list(arrays.keys()) != [name]:
        raise MalformedMessageError(f"record {record!r} must hold exactly one {name}")
    array = arrays[name]
    if array.stype != name:
        raise MalformedMessageError(f"record {record!r} holds {array.stype!r}, expected {name}")
    return parse_message(cls, array.data, max_bytes=max_bytes)


def detached(part: P) -> P:
    """A copy of a parsed message's part that owns its memory.

    A part of a parsed protobuf message keeps the whole parsed message alive (upb allocates them
    in one arena): keeping a refresh reply's few-byte ``released`` record for the run's history
    kept its megabytes of ciphertexts too, and memory grew every round.
    """
    copy = type(part)()
    copy.CopyFrom(part)
    return copy


def config_of(content: RecordDict) -> ConfigRecord:
    if CONFIG not in content.config_records:
        raise MalformedMessageError(f"message has no {CONFIG!r} record")
    return content.config_records[CONFIG]


def payload_bytes(content: RecordDict) -> int:
    """Bytes of all arrays in a message (what dominates the wire size)."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
