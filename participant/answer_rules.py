"""What a key holder agrees to decrypt or re-encrypt: only requests that match the round.

Every participant holds the federation's secret key, so a coordinator that deviates could try
to use one as a decryption oracle. These rules bound that (docs/threat-model.md, "A coordinator
that deviates"): a request must name the round of its message and carry exactly the vectors the
protocol defines (masked m, z, w of the model's length; at most one norm ciphertext per participant
of the round; one masked norm and the round's statistics for the integrity check), each kind is
answered at most once per round, a norm ciphertext must decrypt to values that are visibly masked,
and only rounded aggregates are released. With pairwise masking a participant masks one update per
round, over a masking set it accepts (``check_members``), and unmasks only as
``check_unmask_request`` allows.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context

from protos.codec import check_version
from protos.errors import RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import MASK_BOUND, STATE_NAMES

LEDGER = "fedhe.answered"
# A masked slot is uniform in +-MASK_BOUND; 8192 of them all below a quarter of it never happens.
MASKED_MIN_PEAK = MASK_BOUND / 4


class AnswerLedger:
    """Which requests this key holder already answered in this run.

    Kept in Flower's per-run node state (``context.state``), which the SuperNode keeps across
    messages even when each message runs in a fresh ClientApp process.
    """

    def __init__(self, record: ConfigRecord | None = None) -> None:
        self.record = record if record is not None else ConfigRecord({"answered": []})

    @classmethod
    def of(cls, context: Context) -> AnswerLedger:
        if LEDGER not in context.state.config_records:
            context.state[LEDGER] = ConfigRecord({"answered": []})
        return cls(context.state.config_records[LEDGER])

    def claim(self, kind: str, round_: int) -> None:
        key = f"{kind}:{round_}"
        answered = list(self.record["answered"])
        if key in answered:
            raise RequestRefusedError(
                f"already answered a {kind} request for round {round_}; a key holder answers once"
            )
        self.record["answered"] = answered + [key]

    def has(self, kind: str, round_: int) -> bool:
        return f"{kind}:{round_}" in list(self.record["answered"])

    def remember_members(self, round_: int, members: list[int]) -> None:
        """The masking set this participant masked over in ``round_`` (checked again at unmasking)."""
        self.record[f"members:{round_}"] = list(members)

    def members(self, round_: int) -> list[int]:
        return [int(m) for m in self.record.get(f"members:{round_}", [])]


def check_refresh_request(request: wire_pb2.RefreshRequest, round_: int, ledger: AnswerLedger) -> None:
    """The masked state is some of m, z, w (those the next step needs fresh), once per round."""
    check_version(request.protocol_version, "refresh request")
    if request.round != round_:
        raise RequestRefusedError(f"refresh request names round {request.round} inside a round-{round_} message")
    if not set(request.masked_state) <= set(STATE_NAMES):
        raise RequestRefusedError(
            f"refresh request holds state {sorted(request.masked_state)}, expected some of {list(STATE_NAMES)}"
        )
    if request.masked_state:
        ledger.claim("refresh", round_)


def check_integrity_query(query: wire_pb2.IntegrityQuery, round_: int, ledger: AnswerLedger) -> None:
    """The check of this round's aggregate or, riding on the next round's message, of the previous
    round's; one masked norm, one masked vector and the statistics; once per checked round."""
    check_version(query.protocol_version, "integrity query")
    if query.round not in (round_, round_ - 1) or query.round < 1:
        raise RequestRefusedError(f"integrity query names round {query.round} inside a round-{round_} message")
    if query.contributors < 1:
        raise RequestRefusedError("integrity query counts no contributors")
    ledger.claim("integrity", query.round)


def check_norm_query(query: wire_pb2.NormQuery, round_: int, participants: int, ledger: AnswerLedger) -> None:
    """At most one ciphertext per participant of the round, one query per round."""
    check_version(query.protocol_version, "norm query")
    if query.round != round_:
        raise RequestRefusedError(f"norm query names round {query.round} inside a round-{round_} message")
    if not 1 <= len(query.masked) <= participants:
        raise RequestRefusedError(f"norm query holds {len(query.masked)} ciphertexts for {participants} participants")
    ledger.claim("norms", round_)


def check_gradient_query(query: wire_pb2.GradientQuery, round_: int, expected: int, ledger: AnswerLedger,
                         kind: str = "gradient") -> None:
    """Encrypted-rollout mode: exactly the layout's per-slot gradient ciphertexts, one query of each
    ``kind`` per round (``gradient``: the collapse of statistics uploads; ``owner-gradient``: an owner's own).

    What they decrypt to is checked after decryption (masked for a collapse, this owner's own gradient
    for an owner), and only a re-encryption leaves: nothing is released in the clear.
    """
    check_version(query.protocol_version, f"{kind} query")
    if query.round != round_:
        raise RequestRefusedError(f"{kind} query names round {query.round} inside a round-{round_} message")
    if len(query.masked) != expected:
        raise RequestRefusedError(
            f"{kind} query holds {len(query.masked)} ciphertexts, the layout defines {expected}"
        )
    ledger.claim(kind, round_)


def check_members(members: list[int], index: int, roster_size: int, min_members: int) -> list[int]:
    """The round's masking set as the coordinator names it: sorted, distinct, on the roster, with this
    participant, and at least this node's minimum (a sum of fewer updates would expose them)."""
    members = [int(m) for m in members]
    if members != sorted(set(members)) or not all(0 <= m < roster_size for m in members):
        raise RequestRefusedError(f"the round's masking set {members} is not a sorted set of roster indices")
    if index not in members:
        raise RequestRefusedError(f"the round's masking set {members} does not include this participant ({index})")
    if len(members) < min_members:
        raise RequestRefusedError(
            f"the round's masking set has {len(members)} members; this node requires at least {min_members}"
        )
    return members


def check_unmask_request(
    request: wire_pb2.UnmaskRequest, round_: int, index: int, min_members: int, ledger: AnswerLedger
) -> None:
    """Double masking: reveal shares only of survivors' seeds and cancel masks only with the dropped.

    The survivors and the dropped must split exactly the masking set this participant masked over
    in this round, with this participant among at least ``min_members`` survivors; every share must
    come from a survivor and be addressed here; one request per round. So for any one member this
    participant either helps remove its self-mask (a survivor) or cancels its pair mask with it
    (dropped), never both: a coordinator that lies about who dropped learns nothing
    (docs/threat-model.md, "Pairwise masks").
    """
    check_version(request.protocol_version, "unmask request")
    if request.round != round_:
        raise RequestRefusedError(f"unmask request names round {request.round} inside a round-{round_} message")
    if not ledger.has("update", round_):
        raise RequestRefusedError(f"this participant sent no masked update in round {round_}; nothing to unmask")
    survivors, dropped = list(request.survivors), list(request.dropped)
    members = ledger.members(round_)
    if sorted(survivors + dropped) != members:
        raise RequestRefusedError(
            f"unmask request splits {sorted(survivors + dropped)}, but round {round_} was masked over {members}"
        )
    if index not in survivors:
        raise RequestRefusedError(f"unmask request does not count this participant ({index}) as a survivor")
    if len(survivors) < min_members:
        raise RequestRefusedError(
            f"unmask request leaves {len(survivors)} updates in the sum; this node requires at least {min_members}"
        )
    senders = [share.sender for share in request.shares]
    if len(set(senders)) != len(senders) or not set(senders) <= set(survivors) - {index}:
        raise RequestRefusedError(f"unmask request carries shares from {senders}; only other survivors' are opened")
    if any(share.recipient != index for share in request.shares):
        raise RequestRefusedError("unmask request carries shares addressed to another participant")
    ledger.claim("unmask", round_)


def require_masked(values: np.ndarray) -> None:
    """Refuse to sum a norm ciphertext that does not carry the coordinator's mask."""
    peak = float(np.max(np.abs(values)))
    if peak < MASKED_MIN_PEAK:
        raise RequestRefusedError(
            f"a norm-query ciphertext decrypts to values of at most {peak:.3g}, not masked "
            f"(the protocol's masks reach {MASK_BOUND:g}); refusing to release its sum"
        )
