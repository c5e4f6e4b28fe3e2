"""The coordinator's secrets, seen from the key holder that receives them (ingress tests).

Each test drives the real coordinator's message builders and decrypts what a key holder would
receive with the federation's secret key.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from coordinator.checkpoint import load_checkpoint
from coordinator.he_adam import HEAdamState
from coordinator.rounds import HEAdamCoordinator
from participant.answer_rules import AnswerLedger, check_norm_query, check_refresh_request
from participant.keyholder import decrypt_vector
from participant.node import answer_norm_query
from protos import messages
from protos.codec import PROTOCOL_VERSION, decode_vector, encode_vector, encrypt_vector, from_proto, to_proto
from protos.errors import RequestRefusedError
from protos.fedhe.v1 import wire_pb2
from protos.optimizer import MASK_BOUND, STATE_NAMES, HEAdamConfig

D = 835  # CartPole's policy size
pytestmark = pytest.mark.usefixtures("server_task")


@pytest.fixture()
def state_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "theta": rng.normal(0, 0.3, D),
        "m": rng.normal(0, 0.5, D),
        "v": 1 + rng.random(D),
        "w": 0.5 + 0.5 * rng.random(D),
    }


def coordinator_with_state(backend, holder, values, out) -> HEAdamCoordinator:
    coordinator = HEAdamCoordinator(backend, HEAdamConfig(), "cartpole", D, out)
    enc = {k: decode_vector(backend, encode_vector(holder, encrypt_vector(holder, v))) for k, v in values.items()}
    coordinator.state.optimizer = HEAdamState(enc["theta"], enc["m"], enc["v"], enc["w"], step=3)
    coordinator.state.round = 3
    return coordinator


def received_refresh(coordinator: HEAdamCoordinator, round_: int) -> wire_pb2.RefreshRequest:
    """What the refresher receives in this round's train message."""
    outgoing, _ = coordinator.train_messages(round_, [11, 12, 13], refresher=12)
    (msg,) = [m for m in outgoing if messages.REFRESH_REQUEST in m.content.array_records]
    assert msg.metadata.dst_node_id == 12
    return messages.unpack(msg.content, messages.REFRESH_REQUEST, wire_pb2.RefreshRequest, max_bytes=1 << 30)


def test_refresher_sees_only_masked_state_of_the_stated_magnitude(coordinator_backend, holder, state_values, tmp_path):
    request = received_refresh(coordinator_with_state(coordinator_backend, holder, state_values, tmp_path), 4)
    assert set(request.masked_state) == set(STATE_NAMES)
    for name in STATE_NAMES:
        seen = decrypt_vector(holder, from_proto(holder, request.masked_state[name]))
        mask = seen - state_values[name]
        assert np.max(np.abs(mask)) <= MASK_BOUND * (1 + 1e-6)
        assert abs(np.std(mask) / (MASK_BOUND / np.sqrt(3)) - 1) < 0.1  # uniform on +-2^15
        assert abs(np.corrcoef(seen, state_values[name])[0, 1]) < 0.15  # nothing of the state shows
        assert not np.allclose(seen, state_values[name], atol=1.0)


def test_two_coordinators_with_identical_settings_draw_different_masks(
    coordinator_backend, holder, state_values, tmp_path
):
    """Same settings, same checkpoint: the masks still differ (OS entropy, nothing to replay)."""
    first = coordinator_with_state(coordinator_backend, holder, state_values, tmp_path / "a")
    first.out_dir.mkdir()
    first._save()
    second = HEAdamCoordinator(coordinator_backend, HEAdamConfig(), "cartpole", D, tmp_path / "a")
    second.state = load_checkpoint(second.out_dir, coordinator_backend, "cartpole", D, HEAdamConfig().to_json())
    seen = [
        decrypt_vector(holder, from_proto(holder, received_refresh(c, 4).masked_state["m"])) for c in (first, second)
    ]
    assert abs(np.corrcoef(*seen)[0, 1]) < 0.15
    updates = [first.state.optimizer.theta] * 3
    _, masks_a = first.norm_query(4, updates)
    _, masks_b = second.norm_query(4, updates)
    assert not np.allclose(masks_a.factors, masks_b.factors)


def test_norm_query_carries_no_raw_update(coordinator_backend, holder, tmp_path):
    """Every ciphertext of the real query decrypts to mask-dominated slots; the key holder checks it too."""
    rng = np.random.default_rng(2)
    updates = [rng.normal(0, 0.01, D) for _ in range(3)]
    encrypted = [decode_vector(coordinator_backend, encode_vector(holder, encrypt_vector(holder, u))) for u in updates]
    coordinator = HEAdamCoordinator(coordinator_backend, HEAdamConfig(), "cartpole", D, tmp_path)
    packed, _ = coordinator.norm_query(2, encrypted)
    query = messages.unpack(
        RecordDict({messages.NORM_QUERY: packed}), messages.NORM_QUERY, wire_pb2.NormQuery, max_bytes=1 << 30
    )
    for vec in query.masked:
        values = decrypt_vector(holder, from_proto(holder, vec))
        assert np.max(np.abs(values)) > MASK_BOUND / 2
        assert all(abs(np.corrcoef(values[:D], u * u)[0, 1]) < 0.15 for u in updates)
    raw = wire_pb2.NormQuery(protocol_version=PROTOCOL_VERSION, round=2)
    raw.masked.append(to_proto(holder, encrypt_vector(holder, np.pad(updates[0] ** 2, (0, holder.slots - D)))))
    with pytest.raises(RequestRefusedError, match="not masked"):
        answer_norm_query(holder, raw)


def test_key_holder_answers_each_request_once_per_round(coordinator_backend, holder, state_values, tmp_path):
    coordinator = coordinator_with_state(coordinator_backend, holder, state_values, tmp_path)
    coordinator.state.pending_stats = decode_vector(
        coordinator_backend, encode_vector(holder, encrypt_vector(holder, np.ones(3)))
    )
    coordinator.state.pending_round = {"round": 3}
    request = received_refresh(coordinator, 4)
    ledger = AnswerLedger()
    check_refresh_request(request, 4, ledger)
    with pytest.raises(RequestRefusedError, match="once"):
        check_refresh_request(request, 4, ledger)
    with pytest.raises(RequestRefusedError, match="round 4 inside a round-5"):
        check_refresh_request(request, 5, AnswerLedger())
    request.stats_round = 4
    with pytest.raises(RequestRefusedError, match="cannot be released"):
        check_refresh_request(request, 4, AnswerLedger())
    request.stats_round = 3
    del request.masked_state["v"]  # some of the state: what the next step needs fresh
    check_refresh_request(request, 4, AnswerLedger())
    request.masked_state["theta"].CopyFrom(request.masked_state["m"])  # theta is never refreshed
    with pytest.raises(RequestRefusedError, match="expected some of"):
        check_refresh_request(request, 4, AnswerLedger())


def test_norm_query_with_more_ciphertexts_than_participants_is_refused(coordinator_backend, holder, tmp_path):
    coordinator = HEAdamCoordinator(coordinator_backend, HEAdamConfig(), "cartpole", D, tmp_path)
    vec = decode_vector(coordinator_backend, encode_vector(holder, encrypt_vector(holder, np.ones(D))))
    packed, _ = coordinator.norm_query(1, [vec] * 4)
    query = messages.unpack(
        RecordDict({messages.NORM_QUERY: packed}), messages.NORM_QUERY, wire_pb2.NormQuery, max_bytes=1 << 30
    )
    with pytest.raises(RequestRefusedError, match="4 ciphertexts for 3 participants"):
        check_norm_query(query, 1, 3, AnswerLedger())
    ledger = AnswerLedger()
    check_norm_query(query, 1, 4, ledger)
    with pytest.raises(RequestRefusedError, match="once"):
        check_norm_query(query, 1, 4, ledger)
