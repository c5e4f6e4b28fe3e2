"""The federation's roster: which organization, under which X25519 key, stands behind each participant index.

Pairwise masks (``participant.pairwise_masks``) need every pair of participants to share a secret
without ever talking to each other: each derives it from its own X25519 private key and the
other's public key. The roster binds participant index -> X25519 public key (the key pair
`fedhe keys recipient` creates for sealing) and the federation's key fingerprint. The key-ceremony
holder builds it (`fedhe keys roster`) and it travels with ``participant.ctx``, sealed like it;
the coordinator never needs it. Indices are 0 .. size-1, the ``participant-index`` of each
organization's SuperNode; each entry also holds the organization's name, which its node uses in
every reply, log line and error, so that failures and summaries name organizations.

A key directory of a masking participant holds ``participant.ctx``, ``roster.json`` and the
organization's own private key ``org.x25519``. `fedhe simulate` keeps one key directory for all
simulated organizations, with their key pairs under ``organizations/participant-<i>.x25519``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from participant.sealing import create_recipient, load_private_key, load_public_key, raw_public_key
from protos.errors import KeyFileError
from protos.files import write_atomic

ROSTER_FILE = "roster.json"
ORG_KEY_FILE = "org.x25519"  # this organization's X25519 private key, in its key directory
SIMULATED_DIR = "organizations"  # `fedhe simulate`: one key pair per simulated organization
FORMAT = "fedhe-roster-v2"  # v2: each entry names its organization
FORMATS = ("fedhe-roster-v1", FORMAT)  # a v1 roster's organizations are named participant-<index>
MAX_ROSTER_BYTES = 1 << 20


class RosterError(KeyFileError):
    """A roster is missing, malformed, for another federation, or does not list this participant."""


@dataclass(frozen=True)
class Roster:
    fingerprint: str  # the federation key's fingerprint (fingerprint.txt)
    public_keys: tuple[bytes, ...]  # raw 32-byte X25519 public keys; the position is the participant index
    names: tuple[str, ...] = ()  # organization names by index (empty: participant-<index>)

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", tuple(f"participant-{i}" for i in range(len(self.public_keys))))
        if len(self.names) != len(self.public_keys) or len(set(self.names)) != len(self.names):
            raise RosterError("a roster needs one distinct organization name per entry")
        if not all(name and len(name) <= 100 and name.isprintable() for name in self.names):
            raise RosterError("organization names must be printable and at most 100 characters")
        if not self.public_keys:
            raise RosterError("a roster needs at least one participant")
        if any(len(k) != 32 for k in self.public_keys):
            raise RosterError("every roster entry must be a raw 32-byte X25519 public key")
        if len(set(self.public_keys)) != len(self.public_keys):
            raise RosterError("two roster entries share one X25519 key; every organization needs its own")

    @property
    def size(self) -> int:
        return len(self.public_keys)

    def public_key(self, index: int) -> X25519PublicKey:
        if not 0 <= index < self.size:
            raise RosterError(f"participant {index} is not on the roster (indices 0..{self.size - 1})")
        return X25519PublicKey.from_public_bytes(self.public_keys[index])

    def name(self, index: int) -> str:
        self.public_key(index)  # on the roster, or a RosterError
        return self.names[index]

    def to_json(self) -> str:
        entries = {str(i): {"organization": name, "x25519": key.hex()}
                   for i, (name, key) in enumerate(zip(self.names, self.public_keys))}
        return json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "participants": entries}, indent=2)

    @property
    def digest(self) -> str:
        """Compare it over a second channel, like fingerprint.txt: every organization must hold the same roster."""
        return hashlib.sha256(json.dumps(json.loads(self.to_json()), sort_keys=True).encode()).hexdigest()[:32]

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> Roster:
        try:
            data = json.loads(text)
            if data.get("format") not in FORMATS:
                raise RosterError(f"{source} is not a fedhe roster (format {data.get('format')!r}, expected {FORMAT})")
            if data["format"] == FORMAT:
                entries = {int(i): (str(e["organization"]), bytes.fromhex(e["x25519"]))
                           for i, e in data["participants"].items()}
            else:
                entries = {int(i): (f"participant-{i}", bytes.fromhex(key)) for i, key in data["participants"].items()}
            fingerprint = str(data["fingerprint"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, RosterError):
                raise
            raise RosterError(f"{source} is not a readable roster ({type(exc).__name__}: {exc})") from None
        if entries and min(entries) < 0:
            raise RosterError(f"{source} lists a negative participant index {min(entries)}")
        missing = sorted(set(range(max(entries, default=-1) + 1)) - set(entries))
        if missing:
            raise RosterError(
                f"{source} has no entry for participant {missing[0]}; a roster lists every participant 0..n-1"
            )
        ordered = [entries[i] for i in range(len(entries))]
        return cls(fingerprint, tuple(key for _, key in ordered), tuple(name for name, _ in ordered))

    def write(self, path: Path) -> None:
        write_atomic(Path(path), (self.to_json() + "\n").encode())


def build_roster(fingerprint: str, public_key_files: Sequence[Path], names: Sequence[str] = ()) -> Roster:
    """The roster of organizations whose ``.x25519.pub`` files are given in participant-index order,
    named ``names`` (default: each file's name without ``.x25519.pub`` if they differ, else
    ``participant-<index>``)."""
    files = [Path(p) for p in public_key_files]
    if names and len(names) != len(files):
        raise RosterError(f"{len(names)} names for {len(files)} organizations; give one name per public key")
    stems = tuple(f.name.removesuffix(".pub").removesuffix(".x25519") for f in files)
    names = tuple(names) or (stems if len(set(stems)) == len(stems) else ())  # (): participant-<index>
    return Roster(fingerprint, tuple(raw_public_key(load_public_key(p)) for p in files), names)


def read_roster(path: Path) -> Roster:
    path = Path(path)
    if not path.is_file():
        raise RosterError(f"no roster at {path}")
    if path.stat().st_size > MAX_ROSTER_BYTES:
        raise RosterError(f"{path} is larger than any roster")
    return Roster.from_json(path.read_text(), str(path))


def load_roster(key_dir: Path, fingerprint: str) -> Roster:
    """This federation's roster from a key directory; a roster for another federation is refused."""
    path = Path(key_dir) / ROSTER_FILE
    if not path.is_file():
        raise RosterError(
            f"masking is on but {Path(key_dir)} has no {ROSTER_FILE}; the key ceremony makes it "
            "(`fedhe keys roster`) and it travels with participant.ctx (or run with masking off)"
        )
    roster = read_roster(path)
    if roster.fingerprint != fingerprint:
        raise RosterError(
            f"{path} is the roster of federation {roster.fingerprint[:12]}…, this participant's key is "
            f"{fingerprint[:12]}…: the roster belongs to another key ceremony"
        )
    return roster


def own_key_path(key_dir: Path, index: int) -> Path:
    """``org.x25519`` in a deployed organization's key directory, else the simulated organization's key."""
    key_dir = Path(key_dir)
    simulated = key_dir / SIMULATED_DIR / f"participant-{index}.x25519"
    return key_dir / ORG_KEY_FILE if (key_dir / ORG_KEY_FILE).is_file() or not simulated.is_file() else simulated


def load_own_key(key_dir: Path, index: int, roster: Roster) -> X25519PrivateKey:
    """This organization's private key; it must be the one the roster lists for ``index``."""
    expected = roster.public_key(index)  # raises if the index is not on the roster
    path = own_key_path(key_dir, index)
    if not path.is_file():
        raise RosterError(
            f"participant {index} has no X25519 private key: put this organization's key in "
            f"{Path(key_dir) / ORG_KEY_FILE} (`fedhe keys recipient --out {Path(key_dir) / 'org'}`)"
        )
    private = load_private_key(path)
    if raw_public_key(private.public_key()) != raw_public_key(expected):
        raise RosterError(
            f"{path} is not the key the roster lists for participant {index}: "
            "wrong participant-index, or the roster was built from another organization's key"
        )
    return private


def simulated_organizations(key_dir: Path, fingerprint: str, count: int) -> Roster:
    """`fedhe simulate`: key pairs and a roster for organizations 0..count-1 in one key directory.

    An existing roster of this federation is kept and extended; its entries are never replaced.
    """
    key_dir = Path(key_dir)
    path = key_dir / ROSTER_FILE
    existing = load_roster(key_dir, fingerprint) if path.is_file() else None
    keys = list(existing.public_keys) if existing else []
    if existing and len(keys) >= count:
        return existing
    for index in range(len(keys), count):
        prefix = key_dir / SIMULATED_DIR / f"participant-{index}"
        if Path(f"{prefix}.x25519").is_file():  # left over from an interrupted run: reuse it
            private = load_private_key(Path(f"{prefix}.x25519"))
        else:
            private = load_private_key(create_recipient(prefix)[0])
        keys.append(raw_public_key(private.public_key()))
    known = existing.names if existing else ()
    names = known + tuple(f"participant-{i}" for i in range(len(known), count))
    roster = Roster(fingerprint, tuple(keys), names)
    roster.write(path)
    return roster
