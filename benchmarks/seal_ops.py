"""`fedhe bench seal-ops`: what seeded uploads and last-level downloads save, per HE profile.

For one full chunk (``slots`` values) under a fresh federation key per profile, median ms over
``repeats`` runs, the operations interleaved (one of each per repeat, so machine load hits them
alike), and the bytes each produces:

* upload, participant side: TenSEAL's public-key encrypt+serialize vs ``encrypt_seeded``;
* download, coordinator side: serializing a full-depth ciphertext vs ``switch_to_last``;
* deserializing each form (full depth and seeded as the coordinator does, fresh; last level as
  a participant does).

Key generation is left out of the timings. Also: ``python -m benchmarks.seal_ops --json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from participant.keyholder import TensealKeyHolder, generate_keys, load_keyholder
from protos.backend import TensealBackend
from protos.keyfile import load_evaluation_backend
from protos.profiles import PROFILES, get_profile
from protos.seal_ops import encrypt_seeded, switch_to_last


def _profile_bench(holder: TensealKeyHolder, coordinator: TensealBackend, repeats: int) -> dict:
    slots = holder.slots
    values = np.random.default_rng(0).uniform(-1.0, 1.0, slots)
    public = holder.serialize(holder.encrypt(values))
    seeded = encrypt_seeded(holder.context, values)
    full = coordinator.deserialize(public, slots, fresh=True)
    last = switch_to_last(coordinator.context, full)
    ops: dict[str, Callable[[], object]] = {
        "public_key_encrypt_serialize": lambda: holder.serialize(holder.encrypt(values)),
        "seeded_encrypt_serialize": lambda: encrypt_seeded(holder.context, values),
        "serialize_full_depth": lambda: coordinator.serialize(full),
        "switch_to_last_serialize": lambda: switch_to_last(coordinator.context, full),
        "deserialize_full_depth": lambda: coordinator.deserialize(public, slots, fresh=True),
        "deserialize_seeded": lambda: coordinator.deserialize(seeded, slots, fresh=True),
        "deserialize_last": lambda: holder.deserialize(last, slots),
    }
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            t0 = time.perf_counter()
            op()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        "slots": slots,
        "median_ms": {name: round(statistics.median(t), 2) for name, t in times.items()},
        "bytes": {"public_key": len(public), "seeded": len(seeded), "last_level": len(last)},
        "seeded_over_public": round(len(seeded) / len(public), 4),
        "last_over_full": round(len(last) / len(public), 4),
    }


def run_seal_ops_bench(repeats: int = 9, profiles: Sequence[str] | None = None) -> dict:
    names = list(profiles or PROFILES)
    for name in names:
        get_profile(name)  # refuse an unknown name before any key is generated
    result: dict = {"repeats": repeats, "loadavg_1m_before": round(os.getloadavg()[0], 2), "profiles": {}}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            keyset = generate_keys(Path(tmp), name)
            holder = load_keyholder(keyset.directory)
            coordinator = load_evaluation_backend(keyset.coordinator_key)
        result["profiles"][name] = _profile_bench(holder, coordinator, repeats)
    result["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--profile", action="append", help="repeatable; default: every profile")
    parser.add_argument("--json", action="store_true", help="one line of JSON")
    args = parser.parse_args(argv)
    print(json.dumps(run_seal_ops_bench(args.repeats, args.profile), indent=None if args.json else 2))


if __name__ == "__main__":
    main()
