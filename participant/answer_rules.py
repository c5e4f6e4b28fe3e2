"""What a key holder agrees to decrypt or re-encrypt: only requests that match the round.

Every participant holds the federation's secret key, so a coordinator that deviates could try
to use one as a decryption oracle. These rules bound that (docs/threat-model.md, "A coordinator
that deviates"): a request must name the round of its message and carry exactly the vectors the
protocol defines (masked m, v, w of the model's length; a length-3 statistics vector of an earlier
round; at most one norm ciphertext per participant of the round), each kind is answered at most
once per round (statistics once per statistics round), a norm ciphertext must decrypt to values
that are visibly masked, and only rounded aggregates are released. With pairwise masking a
participant masks one update per round and cancels masks only as ``check_mask_correction_request``
allows.
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


def check_refresh_request(request: wire_pb2.RefreshRequest, round_: int, ledger: AnswerLedger) -> None:
    """The masked state is some of m, v, w (those the next step needs fresh); statistics are an
    earlier round's, once."""
    check_version(request.protocol_version, "refresh request")
    if request.round != round_:
        raise RequestRefusedError(f"refresh request names round {request.round} inside a round-{round_} message")
    if not set(request.masked_state) <= set(STATE_NAMES):
        raise RequestRefusedError(
            f"refresh request holds state {sorted(request.masked_state)}, expected some of {list(STATE_NAMES)}"
        )
    if request.masked_state:
        ledger.claim("refresh", round_)
    if request.HasField("stats_to_release"):
        if not 1 <= request.stats_round < round_:
            raise RequestRefusedError(f"statistics of round {request.stats_round} cannot be released in round {round_}")
        ledger.claim("release", request.stats_round)


def check_norm_query(query: wire_pb2.NormQuery, round_: int, participants: int, ledger: AnswerLedger) -> None:
    """At most one ciphertext per participant of the round, one query per round."""
    check_version(query.protocol_version, "norm query")
    if query.round != round_:
        raise RequestRefusedError(f"norm query names round {query.round} inside a round-{round_} message")
    if not 1 <= len(query.masked) <= participants:
        raise RequestRefusedError(f"norm query holds {len(query.masked)} ciphertexts for {participants} participants")
    ledger.claim("norms", round_)


def check_gradient_query(query: wire_pb2.GradientQuery, round_: int, expected: int, ledger: AnswerLedger) -> None:
    """Encrypted-rollout mode: exactly the layout's per-slot gradient ciphertexts, one query per round.

    That they are masked is checked after decryption (``participant.gradient_collapse``), and only
    a re-encryption leaves: nothing is released in the clear.
    """
    check_version(query.protocol_version, "gradient query")
    if query.round != round_:
        raise RequestRefusedError(f"gradient query names round {query.round} inside a round-{round_} message")
    if len(query.masked) != expected:
        raise RequestRefusedError(
            f"gradient query holds {len(query.masked)} ciphertexts, the layout defines {expected}"
        )
    ledger.claim("gradient", round_)


def check_mask_correction_request(
    request: wire_pb2.MaskCorrectionRequest, round_: int, index: int, roster_size: int, ledger: AnswerLedger
) -> None:
    """Pairwise masking: cancel masks only with roster members the coordinator names as missing.

    The request must name the round of its message and distinct roster members other than this
    participant; this participant must have sent its own masked update in that round; at least two
    updates must remain in the sum (else the corrected sum would be one participant's update); one
    request per round. The coordinator's word on who is missing cannot be checked here
    (docs/threat-model.md, "Pairwise masks").
    """
    check_version(request.protocol_version, "mask correction request")
    if request.round != round_:
        raise RequestRefusedError(
            f"mask correction request names round {request.round} inside a round-{round_} message"
        )
    dropped = list(request.dropped)
    if not dropped or len(set(dropped)) != len(dropped):
        raise RequestRefusedError(f"mask correction request must name distinct missing participants, got {dropped}")
    if not all(0 <= j < roster_size for j in dropped):
        raise RequestRefusedError(f"mask correction request names {dropped}, the roster has 0..{roster_size - 1}")
    if index in dropped:
        raise RequestRefusedError(f"mask correction request names this participant ({index}) as missing")
    if roster_size - len(dropped) < 2:
        raise RequestRefusedError(
            f"mask correction request leaves {roster_size - len(dropped)} of {roster_size} updates in the sum; "
            "a corrected sum of one update would be that update"
        )
    if not ledger.has("update", round_):
        raise RequestRefusedError(f"this participant sent no masked update in round {round_}; nothing to correct")
    ledger.claim("unmask", round_)


def require_masked(values: np.ndarray) -> None:
    """Refuse to sum a norm ciphertext that does not carry the coordinator's mask."""
    peak = float(np.max(np.abs(values)))
    if peak < MASKED_MIN_PEAK:
        raise RequestRefusedError(
            f"a norm-query ciphertext decrypts to values of at most {peak:.3g}, not masked "
            f"(the protocol's masks reach {MASK_BOUND:g}); refusing to release its sum"
        )
