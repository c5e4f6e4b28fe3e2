"""Shared fixtures: federation keys are expensive (~1 s each), so tests share them per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from participant.keyholder import KeySet, TensealKeyHolder, generate_keys, load_keyholder
from protos.backend import TensealBackend
from protos.keyfile import load_evaluation_backend


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    """A federation key with the default (HE-Adam capable) profile."""
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def small_keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    """A cheap N=8192 key for codec and fuzz tests."""
    return generate_keys(tmp_path_factory.mktemp("small-keys"), "n8k-d2")


@pytest.fixture(scope="session")
def holder(keys: KeySet) -> TensealKeyHolder:
    return load_keyholder(keys.directory)


@pytest.fixture(scope="session")
def coordinator_backend(keys: KeySet) -> TensealBackend:
    return load_evaluation_backend(keys.coordinator_key)


@pytest.fixture(scope="session")
def small_holder(small_keys: KeySet) -> TensealKeyHolder:
    return load_keyholder(small_keys.directory)


@pytest.fixture(scope="session")
def small_coordinator(small_keys: KeySet) -> TensealBackend:
    return load_evaluation_backend(small_keys.coordinator_key)


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated federation key (same profile as small_keys)."""
    return generate_keys(tmp_path_factory.mktemp("other-keys"), "n8k-d2").directory


@pytest.fixture()
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the running task's run id; unit tests run outside a task."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order for parallel workers (pytest-xdist ``--dist loadfile --no-loadscope-reorder``: one file
    per worker, in this order, each worker holding the next file in reserve): the long deployments
    (``timeout`` of 10 min or more) first, then the fast tests (so that the file a worker holds in
    reserve behind the deployments is a short one), then the slow federations and short deployments."""
    def rank(item: pytest.Item) -> int:
        mark = item.get_closest_marker("timeout")
        if mark and mark.args and float(mark.args[0]) >= 600:
            return 0
        return 2 if item.get_closest_marker("slow") or item.get_closest_marker("deployment") else 1

    items.sort(key=rank)
