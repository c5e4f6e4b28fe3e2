"""`fedhe bench round`'s deployed round estimate: the critical path with one machine per party."""

from __future__ import annotations

import pytest

from benchmarks.round_profile import deployed_round_estimate

COORDINATOR_MS = {"messages_out": 40.0, "push": 5.0, "wait": 900.0, "read_updates": 30.0, "sum": 10.0,
                  "refresh_in": 20.0, "checkpoint": 2.0, "unmask": 60.0, "integrity": 8.0, "he_adam": 180.0}
PARTICIPANT_MS = {"decrypt_theta": 15.0, "train": 250.0, "mask_encrypt": 60.0, "refresh": 90.0}


def test_the_path_is_work_before_sending_the_refresher_then_work_after_the_replies():
    parts = deployed_round_estimate(COORDINATOR_MS, PARTICIPANT_MS)
    assert parts["before"] == pytest.approx(0.040)
    assert parts["participants"] == pytest.approx(0.415)  # 15 + 250 + 60, plus the refresh
    assert parts["after"] == pytest.approx(0.310)  # everything but messages_out, push and wait
    assert parts["transfer"] == 0.0  # no bandwidth given: transfer left out
    assert parts["total"] == pytest.approx(0.040 + 0.415 + 0.310)


def test_waiting_on_the_runtime_is_not_on_the_path():
    idle = deployed_round_estimate({**COORDINATOR_MS, "wait": 10_000.0, "push": 500.0}, PARTICIPANT_MS)
    assert idle == deployed_round_estimate(COORDINATOR_MS, PARTICIPANT_MS)


def test_without_a_refresh_the_participants_part_is_one_participants_work():
    parts = deployed_round_estimate(COORDINATOR_MS, {k: v for k, v in PARTICIPANT_MS.items() if k != "refresh"})
    assert parts["participants"] == pytest.approx(0.325)


def test_transfer_is_every_byte_through_the_coordinators_link():
    parts = deployed_round_estimate(COORDINATOR_MS, PARTICIPANT_MS, bytes_per_round=12_500_000, bandwidth_mbps=1000)
    assert parts["transfer"] == pytest.approx(0.1)  # 100 Mbit at 1 Gbit/s
    assert parts["total"] == pytest.approx(0.040 + 0.415 + 0.310 + 0.1)
    assert deployed_round_estimate(COORDINATOR_MS, PARTICIPANT_MS, 12_500_000, 0.0)["transfer"] == 0.0
