from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_CKKS: _ClassVar[Encoding]
    ENCODING_PLAIN_F64: _ClassVar[Encoding]
ENCODING_UNSPECIFIED: Encoding
ENCODING_CKKS: Encoding
ENCODING_PLAIN_F64: Encoding

class EncryptedVector(_message.Message):
    __slots__ = ("protocol_version", "key_fingerprint", "he_profile", "length", "slots_per_chunk", "chunks", "encoding")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    key_fingerprint: str
    he_profile: str
    length: int
    slots_per_chunk: int
    chunks: _containers.RepeatedScalarFieldContainer[bytes]
    encoding: Encoding
    def __init__(self, protocol_version: _Optional[int] = ..., key_fingerprint: _Optional[str] = ..., he_profile: _Optional[str] = ..., length: _Optional[int] = ..., slots_per_chunk: _Optional[int] = ..., chunks: _Optional[_Iterable[bytes]] = ..., encoding: _Optional[_Union[Encoding, str]] = ...) -> None: ...

class ParticipantUpdate(_message.Message):
    __slots__ = ("protocol_version", "round", "update", "rollout_stats", "masking")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STATS_FIELD_NUMBER: _ClassVar[int]
    MASKING_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    update: EncryptedVector
    rollout_stats: EncryptedVector
    masking: PairwiseMasking
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., update: _Optional[_Union[EncryptedVector, _Mapping]] = ..., rollout_stats: _Optional[_Union[EncryptedVector, _Mapping]] = ..., masking: _Optional[_Union[PairwiseMasking, _Mapping]] = ...) -> None: ...

class PairwiseMasking(_message.Message):
    __slots__ = ("participant_index", "roster_size", "members", "threshold", "commitment", "shares")
    PARTICIPANT_INDEX_FIELD_NUMBER: _ClassVar[int]
    ROSTER_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    participant_index: int
    roster_size: int
    members: _containers.RepeatedScalarFieldContainer[int]
    threshold: int
    commitment: bytes
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, participant_index: _Optional[int] = ..., roster_size: _Optional[int] = ..., members: _Optional[_Iterable[int]] = ..., threshold: _Optional[int] = ..., commitment: _Optional[bytes] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class SealedShare(_message.Message):
    __slots__ = ("sender", "recipient", "nonce", "ciphertext")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes
    def __init__(self, sender: _Optional[int] = ..., recipient: _Optional[int] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("protocol_version", "round", "survivors", "dropped", "shares")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    shares: _containers.RepeatedCompositeFieldContainer[SealedShare]
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ..., shares: _Optional[_Iterable[_Union[SealedShare, _Mapping]]] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("sender", "x", "share")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    sender: int
    x: int
    share: bytes
    def __init__(self, sender: _Optional[int] = ..., x: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskReply(_message.Message):
    __slots__ = ("protocol_version", "round", "shares", "update", "rollout_stats")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STATS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    update: EncryptedVector
    rollout_stats: EncryptedVector
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., update: _Optional[_Union[EncryptedVector, _Mapping]] = ..., rollout_stats: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...

class IntegrityQuery(_message.Message):
    __slots__ = ("protocol_version", "round", "masked_norm", "stats", "contributors", "masked_values")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MASKED_NORM_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    MASKED_VALUES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    masked_norm: EncryptedVector
    stats: EncryptedVector
    contributors: int
    masked_values: EncryptedVector
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., masked_norm: _Optional[_Union[EncryptedVector, _Mapping]] = ..., stats: _Optional[_Union[EncryptedVector, _Mapping]] = ..., contributors: _Optional[int] = ..., masked_values: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...

class IntegrityReply(_message.Message):
    __slots__ = ("protocol_version", "round", "within_bound", "stats_plausible", "released")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WITHIN_BOUND_FIELD_NUMBER: _ClassVar[int]
    STATS_PLAUSIBLE_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    within_bound: bool
    stats_plausible: bool
    released: ReleasedMetrics
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., within_bound: _Optional[bool] = ..., stats_plausible: _Optional[bool] = ..., released: _Optional[_Union[ReleasedMetrics, _Mapping]] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("protocol_version", "round", "theta", "masked_state")
    class MaskedStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EncryptedVector
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    MASKED_STATE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    theta: EncryptedVector
    masked_state: _containers.MessageMap[str, EncryptedVector]
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., theta: _Optional[_Union[EncryptedVector, _Mapping]] = ..., masked_state: _Optional[_Mapping[str, EncryptedVector]] = ...) -> None: ...

class RefreshReply(_message.Message):
    __slots__ = ("protocol_version", "round", "theta", "state", "theta_tiled")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EncryptedVector
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    THETA_TILED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    theta: EncryptedVector
    state: _containers.MessageMap[str, EncryptedVector]
    theta_tiled: EncryptedVector
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., theta: _Optional[_Union[EncryptedVector, _Mapping]] = ..., state: _Optional[_Mapping[str, EncryptedVector]] = ..., theta_tiled: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...

class RolloutUpload(_message.Message):
    __slots__ = ("protocol_version", "round", "blocks", "theta_tiled")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    THETA_TILED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    blocks: _containers.RepeatedCompositeFieldContainer[EncryptedVector]
    theta_tiled: EncryptedVector
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[EncryptedVector, _Mapping]]] = ..., theta_tiled: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...

class GradientQuery(_message.Message):
    __slots__ = ("protocol_version", "round", "masked")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    masked: _containers.RepeatedCompositeFieldContainer[EncryptedVector]
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., masked: _Optional[_Iterable[_Union[EncryptedVector, _Mapping]]] = ...) -> None: ...

class GradientReply(_message.Message):
    __slots__ = ("protocol_version", "round", "gradient")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    gradient: EncryptedVector
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., gradient: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...

class NormQuery(_message.Message):
    __slots__ = ("protocol_version", "round", "masked")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    masked: _containers.RepeatedCompositeFieldContainer[EncryptedVector]
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., masked: _Optional[_Iterable[_Union[EncryptedVector, _Mapping]]] = ...) -> None: ...

class NormReply(_message.Message):
    __slots__ = ("protocol_version", "round", "masked_sums")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MASKED_SUMS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    masked_sums: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., masked_sums: _Optional[_Iterable[float]] = ...) -> None: ...

class ReleasedMetrics(_message.Message):
    __slots__ = ("round", "mean_return", "episodes", "steps", "valid")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MEAN_RETURN_FIELD_NUMBER: _ClassVar[int]
    EPISODES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    round: int
    mean_return: float
    episodes: int
    steps: int
    valid: bool
    def __init__(self, round: _Optional[int] = ..., mean_return: _Optional[float] = ..., episodes: _Optional[int] = ..., steps: _Optional[int] = ..., valid: _Optional[bool] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("protocol_version", "round", "scenario", "key_fingerprint", "he_profile", "theta", "state", "history", "optimizer_config_json", "run_record_json")
    class StateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EncryptedVector
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EncryptedVector, _Mapping]] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SCENARIO_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    THETA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    round: int
    scenario: str
    key_fingerprint: str
    he_profile: str
    theta: EncryptedVector
    state: _containers.MessageMap[str, EncryptedVector]
    history: _containers.RepeatedCompositeFieldContainer[ReleasedMetrics]
    optimizer_config_json: str
    run_record_json: str
    def __init__(self, protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., scenario: _Optional[str] = ..., key_fingerprint: _Optional[str] = ..., he_profile: _Optional[str] = ..., theta: _Optional[_Union[EncryptedVector, _Mapping]] = ..., state: _Optional[_Mapping[str, EncryptedVector]] = ..., history: _Optional[_Iterable[_Union[ReleasedMetrics, _Mapping]]] = ..., optimizer_config_json: _Optional[str] = ..., run_record_json: _Optional[str] = ...) -> None: ...

class KeyFile(_message.Message):
    __slots__ = ("protocol_version", "he_profile", "key_fingerprint", "has_secret_key", "tenseal_context")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HE_PROFILE_FIELD_NUMBER: _ClassVar[int]
    KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HAS_SECRET_KEY_FIELD_NUMBER: _ClassVar[int]
    TENSEAL_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    he_profile: str
    key_fingerprint: str
    has_secret_key: bool
    tenseal_context: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., he_profile: _Optional[str] = ..., key_fingerprint: _Optional[str] = ..., has_secret_key: _Optional[bool] = ..., tenseal_context: _Optional[bytes] = ...) -> None: ...

class SealedFile(_message.Message):
    __slots__ = ("protocol_version", "recipient_fingerprint", "ephemeral_public_key", "nonce", "ciphertext", "original_name")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    recipient_fingerprint: str
    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes
    original_name: str
    def __init__(self, protocol_version: _Optional[int] = ..., recipient_fingerprint: _Optional[str] = ..., ephemeral_public_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ..., original_name: _Optional[str] = ...) -> None: ...
