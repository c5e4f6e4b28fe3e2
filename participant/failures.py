"""What an organization tells the coordinator when it cannot answer: a fixed category, never the details.

An exception's text may hold an environment's observation, a data-dependent step number or a
local file path. The reply carries only ``protos.reply_errors``' category and the organization's
name (a policy refusal: its own text, which names only run settings and the node's rule); the
exception, its traceback and the round go to this node's own log.
"""

from __future__ import annotations

import logging
import sys

from flwr.app import Error, Message

from participant.policy import NodeConfigError, PolicyRefusal
from protos import messages
from protos.errors import FingerprintMismatchError, KeyFileError, NonFiniteValueError, RequestRefusedError, WireError
from protos.reply_errors import (
    ENVIRONMENT,
    INTERNAL,
    KEY_FILES,
    MALFORMED,
    NODE_CONFIG,
    NON_FINITE,
    PROTOCOL,
    REFUSED,
    RUN_SETTINGS,
    WRONG_KEY,
    ErrorCategory,
)
from scenarios import ScenarioFileError, UnknownScenarioError
from scenarios.rollout import EnvironmentFailure

log = logging.getLogger("fedhe.participant")


class RunSettingsError(ValueError):
    """The run's settings cannot be used (they failed to parse or to resolve)."""


# First match wins: PolicyRefusal is a WireError, RosterError a KeyFileError.
CATEGORY_OF: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], ErrorCategory], ...] = (
    (PolicyRefusal, REFUSED),
    (NodeConfigError, NODE_CONFIG),
    ((RunSettingsError, UnknownScenarioError, ScenarioFileError), RUN_SETTINGS),
    (EnvironmentFailure, ENVIRONMENT),
    (NonFiniteValueError, NON_FINITE),
    (FingerprintMismatchError, WRONG_KEY),
    (KeyFileError, KEY_FILES),
    (RequestRefusedError, PROTOCOL),
    (WireError, MALFORMED),
)


def category_of(exc: BaseException) -> ErrorCategory:
    """The one mapping from a failure to what the coordinator may be told."""
    return next((category for kinds, category in CATEGORY_OF if isinstance(exc, kinds)), INTERNAL)


def error_reply(msg: Message, organization: str, exc: Exception) -> Message:
    """One error reply of a fixed category; the details stay in this node's log."""
    category = category_of(exc)
    round_ = msg.content.config_records.get(messages.CONFIG, {}).get("round", "?")
    where = f"{organization}, {msg.metadata.message_type} round {round_}"
    if category is REFUSED:
        log.error("%s: %s", where, exc)
        return Message(Error(category.code, str(exc)), reply_to=msg)
    log.error("%s failed (%s): %s", where, category.text, exc, exc_info=exc)
    return Message(Error(category.code, category.reason(organization)), reply_to=msg)


def log_to_stderr() -> None:
    """A deployed flwr-clientapp process configures no logging: without a handler, this node's own record of
    its failures (the only place their details go) would be lost."""
    for name in ("fedhe.participant", "participant"):  # participant.node logs under its module name
        logger = logging.getLogger(name)
        if not logger.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
