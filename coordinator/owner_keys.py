"""The owners' registered evaluation keys, for transition uploads (docs/encrypted-rollouts.md).

Each owner encrypts its rollouts under a key pair of its own; the coordinator computes that owner's
gradient terms with the owner's evaluation keys (public and relinearization: nothing that decrypts),
registered as ``owners/<organization>.ctx`` next to ``coordinator.ctx`` under the name the
organization's node answers with. Only that owner can decrypt the result.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from protos.backend import HEBackend, TensealBackend
from protos.errors import KeyFileError
from protos.keyfile import load_evaluation_backend

OWNERS_DIR = "owners"


@lru_cache(maxsize=64)
def _registered(path: str) -> TensealBackend:
    return load_evaluation_backend(Path(path))


def owner_backend(federation: HEBackend, coordinator_key: str, organization: str) -> HEBackend:
    """The evaluation keys registered for ``organization``; the plaintext baseline has none (its own backend)."""
    if not isinstance(federation, TensealBackend):
        return federation
    path = Path(coordinator_key).parent / OWNERS_DIR / f"{organization}.ctx"
    if not path.is_file():
        raise KeyFileError(
            f"no evaluation key is registered for {organization}: transition uploads need its owner-eval.ctx "
            f"(`fedhe keys owner` on its node) at {path}")
    backend = _registered(str(path))
    if backend.profile.name != federation.profile.name:
        raise KeyFileError(f"{path} uses HE profile {backend.profile.name}, the federation {federation.profile.name}")
    if backend.fingerprint == federation.fingerprint:
        raise KeyFileError(f"{path} holds the federation key; an owner's key must be its own")
    return backend
