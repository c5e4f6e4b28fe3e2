"""A node's own rules: what this organization reveals is decided here, never by the run config.

The coordinator is untrusted and the Flower run config is its voice. A participant follows it for
*what* to train (scenario, rounds, mode, optimizer) and never for how much it reveals: encryption,
masking, DP noise, what it releases, where its keys are, its randomness and any misbehaviour are set
by the organization on its own node, in the Flower node config (``flower-supernode --node-config``)
or in a TOML policy file the node config names (``policy-file``; node-config keys override it).
``NodePolicy.check`` refuses a run that asks for less than the node's rules. Only code can widen a
policy (``permits``): `fedhe simulate` and the threat lab, where one person runs every party.
docs/threat-model.md ("Who decides what") tabulates every run setting.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from participant.roster import ROSTER_FILE, RosterError, read_roster
from protos.errors import WireError
from protos.plan import resolve_masking
from protos.settings import RunSettings
from scenarios import load_scenario
from scenarios.registry import installed_scenarios
from scenarios.scenario import MODES

# Every RunSettings field, by who decides it. The coordinator may set what to train; "checked" ones
# may only ask for at least the node's rule. The node decides the rest: a deployed node refuses a run
# that sets one of them to anything but its default (the text is the node's rule, as refusals say it).
COORDINATOR_MAY_SET: dict[str, str] = {
    "scenario": "what to train; checked: a built-in or installed scenario (or one in allowed-scenarios), never a "
                "file the run names",
    "mode": "how to train; checked: one of allowed-modes",
    "rollout_upload": "what encrypted-rollout owners send (transitions: under each owner's own key)",
    "server_optimizer": "the coordinator's optimizer",
    "num_server_rounds": "how long to train",
    "coordinator_key": "a path on the coordinator's own machine",
    "out_dir": "the coordinator's output directory",
    "resume": "the coordinator continues from its checkpoint",
    "participants": "how many nodes the coordinator samples per round",
    "min_participants": "when the coordinator's round completes",
    "round_timeout": "how long the coordinator waits",
    "seed": "the public initial policy only; no participant's randomness derives from it",
    "stop_on_solve": "when the coordinator stops",
    "release_metrics": "checked: may only ask less than release-statistics",
    "he_profile": "checked: one of allowed-profiles",
    "defense": "the coordinator's aggregation rule (the masked-norm defenses turn masking off: see masking)",
    "defense_bound": "the coordinator's norm bound",
    "dp_noise_multiplier": "checked: at least min-dp-noise-multiplier",
    "dp_delta": "the coordinator's privacy accounting",
    "masking": "checked: pairwise wherever the node's masking is required",
    "pipeline_rollouts": "when participants collect rollouts (with the theta they already hold)",
}
NODE_DECIDES: dict[str, str] = {
    "plaintext": "this node requires encryption",
    "participant_key_dir": "this node uses its own key-dir",
    "party_mix": "this node never misbehaves on a run's orders",
    "collusion_dir": "this node writes nothing where a run says",
    "robust_training": "this node trains as its own scenario says",
}
SCENARIO_FILES = "scenario-file"  # a permit: import a scenario file the run names
ALL_PERMITS = frozenset({name.replace("_", "-") for name in NODE_DECIDES} | {SCENARIO_FILES})
SIMULATION_RUNTIME_KEYS = frozenset({"partition-id", "num-partitions"})  # Flower's own, on simulated nodes
_DEFAULTS = {f.name: f.default for f in fields(RunSettings)}


class NodeConfigError(ValueError):
    """The node config or policy file is unusable: an unknown key, a wrong type, a missing index."""


class PolicyRefusal(WireError):
    """The run asks for something this node's policy does not allow; one reason per violated rule."""

    def __init__(self, organization: str, reasons: list[str]) -> None:
        super().__init__(f"{organization} refuses: {'; '.join(reasons)}")
        self.organization, self.reasons = organization, tuple(reasons)


def _whole(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NodeConfigError(f"node policy {key!r} must be a whole number, got {value!r}")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NodeConfigError(f"node policy {key!r} must be a number, got {value!r}")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise NodeConfigError(f"node policy {key!r} must be true or false, got {value!r}")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise NodeConfigError(f"node policy {key!r} must be a string, got {value!r}")
    return value


def _names(key: str, value: Any) -> tuple[str, ...]:
    """A TOML list (policy file) or a comma-separated string (Flower's node config has no lists)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise NodeConfigError(f"node policy {key!r} must be a list of names, got {value!r}")
    return tuple(item.strip() for item in items if item.strip())


# kebab-case key -> (NodePolicy field, parser)
NODE_KEYS: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "participant-index": ("participant_index", _whole),
    "key-dir": ("key_dir", _text),
    "organization": ("organization", _text),
    "env-variant": ("env_variant", _text),
    "masking": ("masking", _text),
    "min-dp-noise-multiplier": ("min_dp_noise_multiplier", _number),
    "allowed-scenarios": ("allowed_scenarios", _names),
    "allowed-modes": ("allowed_modes", _names),
    "allowed-profiles": ("allowed_profiles", _names),
    "release-statistics": ("release_statistics", _flag),
    "seed": ("seed", _whole),
    "self-mask-threshold": ("self_mask_threshold", _whole),
    "min-masking-set": ("min_masking_set", _whole),
    "worker": ("worker", _flag),
    "state-dir": ("state_dir", _text),
}
POLICY_FILE = "policy-file"  # node config only: a TOML file with any of NODE_KEYS


@dataclass(frozen=True)
class NodePolicy:
    """One organization's rules for its node; ``from_node_config`` builds it, ``check`` applies it to a run."""

    participant_index: int  # which organization: its roster entry and env kwargs
    key_dir: str = ""  # participant.ctx, roster.json, org.x25519
    organization: str = ""  # the name its error replies carry; "": participant-<index>
    env_variant: str | None = None  # a named variant of the scenario's env_variants
    masking: str = "required"  # required: only runs with pairwise masks; optional: also runs without
    min_dp_noise_multiplier: float = 0.0
    allowed_scenarios: tuple[str, ...] | None = None  # None: built-ins and installed entry points
    allowed_modes: tuple[str, ...] = MODES
    allowed_profiles: tuple[str, ...] | None = None  # None: any
    release_statistics: bool = True  # whether this node ever decrypts and releases rounded federation statistics
    seed: int | None = None  # opt-in reproducibility of its private randomness; None: OS entropy
    self_mask_threshold: int = 0  # 0: automatic
    min_masking_set: int = 3
    worker: bool = True  # a deployed node answers through its long-lived worker (participant.worker)
    state_dir: str = ""  # the worker's private directory; "": one under the system's temp directory
    permits: frozenset[str] = field(default=frozenset())  # code only: run settings the node lets the run decide

    def __post_init__(self) -> None:
        if not self.organization:
            object.__setattr__(self, "organization", f"participant-{self.participant_index}")
        if self.masking not in ("required", "optional"):
            raise NodeConfigError(f"node policy 'masking' must be \"required\" or \"optional\", got {self.masking!r}")
        unknown = set(self.allowed_modes) - set(MODES)
        if unknown:
            raise NodeConfigError(f"node policy 'allowed-modes' names unknown mode(s) {sorted(unknown)}; "
                                  f"known: {', '.join(MODES)}")
        if self.min_dp_noise_multiplier < 0:
            raise NodeConfigError("node policy 'min-dp-noise-multiplier' must be at least 0")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """From Flower's node config and the policy file it names (node-config keys win).

        On Flower's simulation runtime (``partition-id`` in the node config) one person runs every
        party: the partition id is the participant index unless given, and the run's
        ``participant-key-dir`` is the key directory unless the node names one.
        """
        config = dict(node_config)
        simulated = "partition-id" in config
        values: dict[str, Any] = {}
        if POLICY_FILE in config:
            values.update(_read_policy_file(_text(POLICY_FILE, config.pop(POLICY_FILE))))
        own = {key: value for key, value in config.items() if key not in SIMULATION_RUNTIME_KEYS}
        _check_known(own, "node config", (*NODE_KEYS, POLICY_FILE))
        values.update(own)
        if "participant-index" not in values and simulated:
            values["participant-index"] = config["partition-id"]
        if "participant-index" not in values:
            raise NodeConfigError("the node config needs participant-index (e.g. --node-config 'participant-index=0')")
        kwargs = {NODE_KEYS[key][0]: NODE_KEYS[key][1](key, value) for key, value in values.items()}
        if not kwargs.get("organization") and kwargs.get("key_dir"):
            kwargs["organization"] = roster_name(Path(kwargs["key_dir"]), kwargs["participant_index"])
        return cls(**kwargs, permits=frozenset({"participant-key-dir"}) if simulated else frozenset())

    def key_dir_for(self, run: RunSettings) -> str:
        """Where this node's keys are: its own key-dir; the run's only where the node permits it (simulation)."""
        if self.key_dir or "participant-key-dir" not in self.permits:
            return self.key_dir
        return run.participant_key_dir

    def check(self, run: RunSettings) -> None:
        """Raise ``PolicyRefusal`` unless this node may take part in ``run``. Nothing the run names is
        imported before its scenario reference is allowed."""
        refusal = self.refusal(run)
        if refusal is not None:
            raise refusal

    def refusal(self, run: RunSettings) -> PolicyRefusal | None:
        reasons = [*self._node_decided(run), *self._checked(run)]
        return PolicyRefusal(self.organization, reasons) if reasons else None

    def _node_decided(self, run: RunSettings) -> Iterator[str]:
        for name, rule in NODE_DECIDES.items():
            key, value = name.replace("_", "-"), getattr(run, name)
            if value != _DEFAULTS[name] and key not in self.permits:
                yield _asks(key, value, rule)

    def _checked(self, run: RunSettings) -> Iterator[str]:
        scenario = None
        refused = self._scenario_refusal(run.scenario)
        if refused:
            yield refused
        elif "party-mix" not in self.permits or (self.allowed_profiles is not None and not run.he_profile):
            scenario = load_scenario(run.scenario)  # allowed: only now may it be loaded
            if scenario.party_mix and "party-mix" not in self.permits:
                yield f"the run asks scenario={_shown(run.scenario)} with a party_mix, {NODE_DECIDES['party_mix']}"
        if run.mode not in self.allowed_modes:
            yield _asks("mode", run.mode, f"this node allows {', '.join(self.allowed_modes)}")
        profile = run.he_profile or (scenario.he_profile if scenario else "")
        if profile and self.allowed_profiles is not None and profile not in self.allowed_profiles:
            yield _asks("he-profile", profile, f"this node allows {', '.join(self.allowed_profiles) or 'none'}")
        try:
            masking = resolve_masking(run)
        except ValueError:  # a contradiction the run's resolution reports; the node needs only what was asked
            masking = run.masking
        if self.masking == "required" and masking != "pairwise":
            asked = masking if masking == run.masking else f"{run.masking} (resolves to {masking})"
            yield _asks("masking", asked, "this node requires pairwise")
        if run.dp_noise_multiplier < self.min_dp_noise_multiplier:
            yield _asks("dp-noise-multiplier", run.dp_noise_multiplier,
                        f"this node requires at least {self.min_dp_noise_multiplier:g}")
        if run.release_metrics and not self.release_statistics:
            yield _asks("release-metrics", True, "this node never releases statistics")

    def _scenario_refusal(self, ref: str) -> str | None:
        if self.allowed_scenarios is not None:
            allowed = ref in self.allowed_scenarios
            rule = f"this node allows {', '.join(self.allowed_scenarios) or 'none'}"
        else:
            allowed = ref in installed_scenarios() or SCENARIO_FILES in self.permits
            rule = "this node runs only built-in and installed scenarios, never a file a run names"
        return None if allowed else _asks("scenario", ref, rule)


def roster_name(key_dir: Path, index: int) -> str:
    """This organization's name in the roster of its key directory ("" without one)."""
    try:
        roster = read_roster(key_dir / ROSTER_FILE)
        return roster.names[index] if 0 <= index < roster.size else ""
    except RosterError:
        return ""


def organization_of(node_config: Mapping[str, Any], node_id: int) -> str:
    """The name an error reply carries when the node's policy itself is unusable."""
    name = node_config.get("organization")
    if isinstance(name, str) and name:
        return name
    index = node_config.get("participant-index", node_config.get("partition-id"))
    return f"participant-{index}" if isinstance(index, int) else f"node-{node_id}"


def _asks(key: str, value: Any, rule: str) -> str:
    return f"the run asks {key}={_shown(value)}, {rule}"


def _shown(value: Any, limit: int = 80) -> str:
    text = str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_known(values: Mapping[str, Any], where: str, known: tuple[str, ...]) -> None:
    for key in values:
        if key not in known:
            closest = difflib.get_close_matches(key, known, n=1, cutoff=0.0)
            hint = f"; did you mean {closest[0]!r}?" if closest else ""
            raise NodeConfigError(f"unknown key {key!r} in the {where}{hint} (known: {', '.join(known)})")


def _read_policy_file(path: str) -> dict[str, Any]:
    try:
        values = tomllib.loads(Path(path).expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise NodeConfigError(f"policy file {path}: {exc}") from None
    _check_known(values, f"policy file {path}", tuple(NODE_KEYS))
    return values
