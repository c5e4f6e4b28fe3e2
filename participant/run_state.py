"""What a participant keeps between a run's rounds: its environments, held per process and run.

In simulation the process is Flower's; in a deployment it is the organization's worker
(``participant.worker``), since a SuperNode starts a fresh ClientApp process per message. Either
way episodes in progress, running statistics and random streams continue from round to round, and
each finished episode is counted once, in the round it ends. A new run replaces the old run's
objects (their environments closed), so a long-lived worker does not grow run after run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar


class Closable(Protocol):
    def close(self) -> None: ...


T = TypeVar("T", bound=Closable)


def kept_for_run(cache: dict[tuple, T], key: tuple, make: Callable[[], T]) -> T:
    """The object for ``key`` (the run id first), made once; a new run id drops every other run's."""
    if key not in cache:
        for old in [k for k in cache if k[0] != key[0]]:
            cache.pop(old).close()
        cache[key] = make()
    return cache[key]
