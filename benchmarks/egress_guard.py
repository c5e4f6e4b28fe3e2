"""`fedhe bench egress-guard`: what checking every reply before it leaves costs a participant.

Times ``participant.audit.egress_guard_mod`` (the mod every ClientApp runs) around real replies of a
CartPole participant under a fresh federation key: a train reply (update and statistics
ciphertexts), the refresher's heaviest reply (m, z and w re-encrypted) and a key holder's integrity
reply releasing the round's statistics (rounded; the guard also checks the node may release them).
The guard parses every record and deserializes every ciphertext to check it is fresh under the
federation key. Medians over ``repeats``; ``build_ms`` is what producing the reply costs
(encrypting, re-encrypting), for scale.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from participant.audit import EgressRules, egress_guard_mod
from participant.keyholder import generate_keys, load_keyholder
from participant.node import encrypted_update, refresh, released_metrics
from protos import messages
from protos.codec import PROTOCOL_VERSION, encrypt_vector, to_proto
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import STATE_NAMES
from protos.profiles import DEFAULT_PROFILE
from scenarios import load_scenario

ROUND = 4


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 2), result


def run_egress_guard_bench(repeats: int = 20, profile: str = DEFAULT_PROFILE, scenario: str = "cartpole") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        holder = load_keyholder(generate_keys(Path(tmp), profile).directory)
    num_params = load_scenario(scenario).network("local-ppo").num_params
    rng = np.random.default_rng(0)
    config = ConfigRecord({"round": ROUND, "key-fingerprint": holder.fingerprint, "protocol-version": PROTOCOL_VERSION})
    metadata = Metadata(run_id=1, message_id="bench", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=str(ROUND), created_at=0.0, ttl=600.0, message_type=messages.TRAIN)
    request = Message(RecordDict({messages.CONFIG: config}), metadata=metadata)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    guard = egress_guard_mod(lambda _: EgressRules("bench", backend=lambda: holder))

    def train_reply() -> RecordDict:
        update = encrypted_update(holder, ROUND, rng.normal(0, 0.01, num_params), np.array([200.0, 10.0, 2048.0]))
        return RecordDict({messages.CONFIG: config, messages.UPDATE: messages.pack(update)})

    def encrypted(values: np.ndarray) -> wire_pb2.EncryptedVector:
        return to_proto(holder, encrypt_vector(holder, values))

    masked = wire_pb2.RefreshRequest(protocol_version=PROTOCOL_VERSION, round=ROUND)
    for name in STATE_NAMES:  # the coordinator's masked optimizer state
        masked.masked_state[name].CopyFrom(encrypted(rng.uniform(-(2.0**15), 2.0**15, num_params)))

    def refresh_reply() -> RecordDict:
        reply = refresh(holder, masked, None, num_params)
        return RecordDict({messages.CONFIG: config, messages.REFRESH_REPLY: messages.pack(reply)})

    def integrity_reply() -> RecordDict:
        reply = wire_pb2.IntegrityReply(protocol_version=PROTOCOL_VERSION, round=ROUND, within_bound=True,
                                        stats_plausible=True,
                                        released=released_metrics(np.array([600.0, 30.0, 6144.0]), ROUND))
        return RecordDict({messages.CONFIG: config, messages.INTEGRITY_REPLY: messages.pack(reply)})

    result: dict = {"scenario": scenario, "num_params": num_params, "profile": profile, "repeats": repeats}
    kinds = (("train_reply", train_reply), ("refresh_reply", refresh_reply), ("integrity_reply", integrity_reply))
    for kind, build in kinds:
        build_ms, content = _timed(build, repeats)
        reply = Message(content, reply_to=request)
        guard_ms, checked = _timed(lambda reply=reply: guard(request, context, lambda m, c: reply), repeats)
        if checked.has_error():
            raise RuntimeError(f"the guard withheld a valid {kind}: see the fedhe.participant log")
        result[kind] = {"guard_ms": guard_ms, "build_ms": build_ms, "bytes": messages.payload_bytes(content)}
    return result
