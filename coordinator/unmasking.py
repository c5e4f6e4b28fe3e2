"""Pairwise masking as the coordinator sees it: whose masked update it took, and who is missing.

Participants add pairwise masks to their update and statistics ciphertexts (docs/threat-model.md,
"Pairwise masks"); the masks cancel in the sum, so the coordinator sums and runs HE-Adam exactly
as without them and never learns a mask. Masks span the whole roster, so it only has to know, per
round, which roster members' updates went into the sum: every masked update names its sender's
roster index and the roster size (``wire_pb2.PairwiseMasking``, public metadata).

In a round where roster members are missing (they failed, timed out, were not sampled, or sent a
reply that did not validate), the coordinator fixes the set it took and asks each of its senders
for an encrypted correction that cancels its masks with the missing ones (``query.unmask``, one
extra exchange in such rounds only). Replies that arrive after the set is fixed are never read.
A sender that does not answer leaves its masks with the missing in the sum, so the round then
fails and changes nothing.
"""

from __future__ import annotations

from protos.codec import PROTOCOL_VERSION
from protos.errors import MalformedMessageError
from protos.fedhe.v1 import wire_pb2


class MaskedRound:
    """The roster indices whose masked updates this round's sum holds, and the node each came from."""

    def __init__(self) -> None:
        self.roster_size: int | None = None
        self.nodes: dict[int, int] = {}  # roster index -> node id

    def admit(self, node: int, masking: wire_pb2.PairwiseMasking) -> None:
        """Record one update before it is summed; a reply that cannot be part of this round raises."""
        index, size = int(masking.participant_index), int(masking.roster_size)
        if not 0 <= index < size:
            raise MalformedMessageError(f"masked update names roster index {index} of a roster of {size}")
        if self.roster_size is not None and size != self.roster_size:
            raise MalformedMessageError(
                f"update is masked over a roster of {size}, this round's other updates over {self.roster_size}: "
                "the participants hold different rosters"
            )
        if index in self.nodes:
            raise MalformedMessageError(f"roster index {index} already answered this round (node {self.nodes[index]})")
        self.roster_size = size
        self.nodes[index] = node

    @property
    def dropped(self) -> list[int]:
        """Roster members whose masks with the senders are still in the sum."""
        return [i for i in range(self.roster_size or 0) if i not in self.nodes]

    def correction_request(self, round_: int) -> wire_pb2.MaskCorrectionRequest:
        return wire_pb2.MaskCorrectionRequest(protocol_version=PROTOCOL_VERSION, round=round_, dropped=self.dropped)


def check_masking(masking: str, defense: str, robust_defenses: tuple[str, ...], rollouts: bool) -> None:
    """The coordinator's side of ``scenarios.resolve_masking``: refuse what masks cannot combine with."""
    if masking not in ("off", "pairwise"):
        raise ValueError(f"masking must be resolved to pairwise or off, got {masking!r}")
    if masking == "pairwise" and defense in robust_defenses:
        raise ValueError(
            f"masking pairwise does not combine with defense {defense}: it needs each update's own norm, and "
            "under pairwise masks no ciphertext holds one participant's update; use masking off"
        )
    if masking == "pairwise" and rollouts:
        raise ValueError("masking pairwise does not combine with mode encrypted-rollouts; use masking off")
