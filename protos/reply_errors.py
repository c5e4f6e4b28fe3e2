"""What a participant's error reply may say: a fixed category and the organization's name, nothing else.

An exception's text can hold an environment's observation, a data-dependent step number or a local
file path, and an error reply goes to the coordinator. So a participant maps every failure to one of
these categories (``participant.failures``), keeps the details in its own log, and its egress guard
(``participant.audit``) lets no other reason leave. The reason of a policy refusal is the refusal's
own text (``participant.policy``): the setting the run asked for and the node's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.messages import WRONG_FEDERATION


@dataclass(frozen=True)
class ErrorCategory:
    code: int  # the Flower error code of the reply
    name: str  # short, for summaries
    text: str
    excludes: bool = False  # the coordinator leaves the node out for the rest of the run: it would fail every round

    def reason(self, organization: str) -> str:
        return f"{organization}: {self.text}"


WRONG_KEY = ErrorCategory(WRONG_FEDERATION, "wrong-key", "wrong federation key", excludes=True)
KEY_FILES = ErrorCategory(1002, "key-files", "key files missing or not matching", excludes=True)
REFUSED = ErrorCategory(1003, "refused", "refused by policy", excludes=True)
PROTOCOL = ErrorCategory(1004, "protocol", "the request broke the protocol")
MALFORMED = ErrorCategory(1005, "malformed", "malformed message")
ENVIRONMENT = ErrorCategory(1006, "environment", "environment failure")
NON_FINITE = ErrorCategory(1007, "non-finite", "non-finite value")
INTERNAL = ErrorCategory(1008, "internal", "internal error")
NODE_CONFIG = ErrorCategory(1009, "node-config", "invalid node configuration", excludes=True)
RUN_SETTINGS = ErrorCategory(1010, "run-settings", "invalid run settings", excludes=True)
WITHHELD = ErrorCategory(1011, "withheld", "reply withheld by this node's egress audit")

CATEGORIES = (WRONG_KEY, KEY_FILES, REFUSED, PROTOCOL, MALFORMED, ENVIRONMENT, NON_FINITE, INTERNAL, NODE_CONFIG,
              RUN_SETTINGS, WITHHELD)


def category_of_code(code: int) -> ErrorCategory | None:
    """The category of an error reply's code (None: one of Flower's own codes)."""
    return next((category for category in CATEGORIES if category.code == code), None)


def allowed_errors(organization: str) -> set[tuple[int, str]]:
    """Every (code, reason) an error reply of ``organization`` may carry, refusals aside."""
    return {(category.code, category.reason(organization)) for category in CATEGORIES}
