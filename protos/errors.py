"""Typed errors for everything that crosses the wire or the disk.

Every decoding problem is a ``WireError`` subclass with a message that names the problem and
says what to do, so a bad message from one participant is logged and dropped instead of
crashing the coordinator.
"""

from __future__ import annotations


class WireError(ValueError):
    """Base class: a message, key file or checkpoint is unusable."""


class MalformedMessageError(WireError):
    """The bytes are not a valid protobuf message of the expected type."""


class UnsupportedVersionError(WireError):
    """The message was produced by an incompatible protocol version."""


class FingerprintMismatchError(WireError):
    """The message was encrypted under another federation key."""


class ProfileMismatchError(WireError):
    """The message uses another HE profile (CKKS parameter set)."""


class ChunkLayoutError(WireError):
    """Chunk count, chunk sizes or the declared length do not add up."""


class PayloadTooLargeError(WireError):
    """The payload exceeds the configured size limit."""


class InvalidCiphertextError(WireError):
    """A chunk does not deserialize to a valid ciphertext for this context."""


class NonFiniteValueError(WireError):
    """A vector to encrypt (or a decrypted vector) holds NaN or infinity."""


class KeyFileError(WireError):
    """A key file is missing, corrupt, or of the wrong kind."""


class CheckpointError(WireError):
    """A checkpoint is missing, corrupt, or belongs to another federation."""


class RequestRefusedError(WireError):
    """A key holder refuses a request that does not match the round's protocol."""
