"""Finding who sends out-of-bound updates without ever reading one: group testing across rounds.

The integrity check says only whether a round's aggregate was within its bound, and pairwise masks
hide which update broke it. But the coordinator chooses each round's participants anyway. After a
refused round, every contributor of it is a suspect; each later round leaves some suspects out
(still at least the masked minimum), and a round that passes clears its contributors. One
suspect left is the offender: it is left out of the run. Only legitimate rounds are run, each over
a set of at least the masked minimum, so no update is exposed on the way. A participant whose
self-mask cannot be rebuilt (its shares do not open) is named at once and left out at its second
such round. Assumes one persistent offender at a time; with several, the search restarts from each
failure and still never leaves out more than it can spare.
"""

from __future__ import annotations

import math
from collections import Counter

SELF_MASK_STRIKES = 2  # rounds whose self-mask could not be rebuilt before a participant is left out


class OffenderSearch:
    def __init__(self) -> None:
        self.suspects: set[int] = set()
        self.strikes: Counter = Counter()  # refused rounds each node was in; self-mask failures

    def refused(self, contributors: list[int]) -> int | None:
        """A round the check refused; returns a node found to be the offender."""
        current = set(contributors)
        self.suspects = (self.suspects & current) or current
        self.strikes.update(current)
        return self._found()

    def passed(self, contributors: list[int]) -> int | None:
        self.suspects -= set(contributors)
        return self._found() if self.strikes else None

    def self_mask_failed(self, node: int) -> int | None:
        """The round could not rebuild ``node``'s self-mask: its shares did not open."""
        self.strikes[("self-mask", node)] += 1
        return node if self.strikes[("self-mask", node)] >= SELF_MASK_STRIKES else None

    def _found(self) -> int | None:
        if len(self.suspects) == 1:
            (node,) = self.suspects
            self.suspects = set()
            return node
        return None

    def sample(self, active: list[int], round_: int, minimum: int) -> list[int]:
        """The round's participants: ``active`` minus up to half of the suspects, rotating, keeping ``minimum``."""
        suspects = sorted(n for n in self.suspects if n in active)
        spare = len(active) - minimum
        if not suspects or spare <= 0:
            return active
        count = min(spare, max(1, math.ceil(len(suspects) / 2)), len(suspects) - 1 or 1)
        start = round_ % len(suspects)
        left_out = {suspects[(start + k) % len(suspects)] for k in range(count)}
        return [n for n in active if n not in left_out]
