"""Well-formed but wrong updates (threat lab): what a malicious key holder can send under masks.

Each attack rewrites a participant's own masked train reply after it was built, as a key holder
could: the reply still parses, every ciphertext is fresh and at the profile's scale, and the
header names the federation. The integrity check (``coordinator.integrity``) and the self-mask
commitments (``coordinator.aggregation.masked_sum``) must keep each of them from changing the model.

* ``other-key``: the update re-encrypted under another federation's key, header unchanged;
* ``replay``: an earlier round's reply of the same participant, relabelled to this round;
* ``inflate-50`` / ``inflate-1000``: the masked update plus 50 (or 1000) per coordinate.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from participant.keyholder import KeyHolder, decrypt_vector, load_keyholder
from protos import messages
from protos.codec import encrypt_vector, from_proto, to_proto
from protos.fedhe.v1 import wire_pb2

WIRE_ATTACKS = ("other-key", "replay", "inflate-50", "inflate-1000")


def reencrypted(holder: KeyHolder, vec: wire_pb2.EncryptedVector, change, under: KeyHolder | None = None
                ) -> wire_pb2.EncryptedVector:
    """``vec`` decrypted, changed and encrypted again (under ``under``'s key), header kept."""
    values = change(decrypt_vector(holder, from_proto(holder, vec, expected_length=int(vec.length))))
    target = under or holder
    out = to_proto(target, encrypt_vector(target, values))
    out.key_fingerprint = vec.key_fingerprint  # claim the federation's key
    return out


class HostileUpdates:
    """Rewrites participant ``index``'s train replies in the rounds of ``attacks`` (round -> attack)."""

    def __init__(self, index: int, attacks: Mapping[int, str], key_dir: Path, store: Path,
                 other_key_dir: Path | None = None) -> None:
        """``store``: a directory for this participant's honest replies (simulated participants may
        run in another process each round), from which ``replay`` takes the earliest."""
        unknown = set(attacks.values()) - set(WIRE_ATTACKS)
        if unknown:
            raise ValueError(f"unknown wire attacks {sorted(unknown)}; known: {', '.join(WIRE_ATTACKS)}")
        self.index, self.attacks = index, dict(attacks)
        self.key_dir, self.store, self.other_key_dir = Path(key_dir), Path(store), other_key_dir

    def rewrite(self, content: RecordDict, round_: int) -> RecordDict:
        if messages.UPDATE not in content.array_records:
            return content
        update = messages.unpack(content, messages.UPDATE, wire_pb2.ParticipantUpdate, max_bytes=1 << 31)
        attack = self.attacks.get(round_)
        if attack is None:
            self.store.mkdir(parents=True, exist_ok=True)
            (self.store / f"round-{round_:06d}.pb").write_bytes(update.SerializeToString())
            return content
        self.store.mkdir(parents=True, exist_ok=True)
        (self.store / f"attacked-{round_:06d}").write_text(attack)  # the offender search may leave it out
        holder = load_keyholder(self.key_dir)
        if attack == "replay":
            earlier = wire_pb2.ParticipantUpdate.FromString(min(self.store.glob("round-*.pb")).read_bytes())
            earlier.round = round_
            update = earlier
        elif attack == "other-key":
            other = load_keyholder(self.other_key_dir)
            update.update.CopyFrom(reencrypted(holder, update.update, lambda v: v, under=other))
        else:
            delta = float(attack.split("-")[1])
            update.update.CopyFrom(reencrypted(holder, update.update, lambda v: v + delta))
        content[messages.UPDATE] = messages.pack(update)
        return content

    def mod(self) -> Mod:
        """As a Flower client mod of a simulated federation (``fedhe simulate`` client mods)."""

        def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
            reply = call_next(msg, context)
            if reply.has_error() or int(context.node_config.get("partition-id", -1)) != self.index:
                return reply
            round_ = int(msg.content.config_records[messages.CONFIG]["round"])
            return Message(self.rewrite(reply.content, round_), reply_to=msg)

        return mod


__all__ = ["HostileUpdates", "WIRE_ATTACKS"]
