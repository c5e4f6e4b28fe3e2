"""The egress allowlist: every reply field is a fresh ciphertext or named metadata with its allowed values;
the guard withholds a reply that is not, and an error reply that says more than its category."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from support.node_calls import node_context, request

from participant.audit import ALLOWED_FIELDS, ALLOWED_RECORDS, EgressRules, audit_reply, egress_guard_mod
from participant.node import answer_norm_query, released_metrics
from protos import messages
from protos.codec import PROTOCOL_VERSION, encrypt_vector, to_proto
from protos.fedhe.v1 import wire_pb2
from protos.reply_errors import ENVIRONMENT, INTERNAL, REFUSED, WITHHELD

ROUND = 4


def config(holder, **extra) -> ConfigRecord:
    return ConfigRecord(
        {"round": ROUND, "key-fingerprint": holder.fingerprint, "protocol-version": PROTOCOL_VERSION, **extra}
    )


def update_reply(holder) -> RecordDict:
    update = wire_pb2.ParticipantUpdate(
        protocol_version=PROTOCOL_VERSION,
        round=ROUND,
        update=to_proto(holder, encrypt_vector(holder, np.ones(30))),
        rollout_stats=to_proto(holder, encrypt_vector(holder, np.array([50.0, 2.0, 100.0]))),
    )
    return RecordDict({messages.CONFIG: config(holder), messages.UPDATE: messages.pack(update)})


def refresh_reply(holder) -> RecordDict:
    reply = wire_pb2.RefreshReply(
        protocol_version=PROTOCOL_VERSION,
        round=ROUND,
        theta=to_proto(holder, encrypt_vector(holder, np.ones(30))),
    )
    reply.state["m"].CopyFrom(to_proto(holder, encrypt_vector(holder, np.ones(30))))
    return RecordDict({messages.CONFIG: config(holder), messages.REFRESH_REPLY: messages.pack(reply)})


def integrity_reply(holder) -> RecordDict:
    """The key holder's verdict on the round's aggregate, and the round's statistics released rounded."""
    reply = wire_pb2.IntegrityReply(
        protocol_version=PROTOCOL_VERSION,
        round=ROUND,
        within_bound=True,
        stats_plausible=True,
        released=released_metrics(np.array([85.0, 4.0, 85.0]), ROUND),
    )
    return RecordDict({messages.CONFIG: config(holder), messages.INTEGRITY_REPLY: messages.pack(reply)})


def unmask_reply(holder) -> RecordDict:
    """A survivor's opened shares of two other survivors' seeds and its corrections for the dropped."""
    reply = wire_pb2.UnmaskReply(
        protocol_version=PROTOCOL_VERSION,
        round=ROUND,
        shares=[wire_pb2.RevealedShare(sender=j, x=1, share=bytes(range(16))) for j in (1, 2)],
        update=to_proto(holder, encrypt_vector(holder, np.ones(30))),
        rollout_stats=to_proto(holder, encrypt_vector(holder, np.array([1.0, 2.0, 3.0]))),
    )
    return RecordDict({messages.CONFIG: config(holder), messages.UNMASK_REPLY: messages.pack(reply)})


def identify_reply(holder) -> RecordDict:
    """Who answers: its roster index and organization name (public roster facts)."""
    return RecordDict({messages.CONFIG: config(holder, **{"participant-index": 2, "organization": "clinic-b"})})


def norm_reply(holder) -> RecordDict:
    reply = wire_pb2.NormReply(protocol_version=PROTOCOL_VERSION, round=ROUND, masked_sums=[1234.0, 0.5678])
    return RecordDict({messages.CONFIG: config(holder), messages.NORM_REPLY: messages.pack(reply)})


REPLIES = {"update": update_reply, "refresh": refresh_reply, "norms": norm_reply, "integrity": integrity_reply,
           "unmask": unmask_reply, "identify": identify_reply}


@pytest.mark.parametrize("kind", REPLIES)
def test_protocol_replies_pass(small_holder, kind):
    assert audit_reply(REPLIES[kind](small_holder), ROUND, small_holder) == []


@pytest.mark.parametrize("kind", REPLIES)
def test_a_plaintext_metric_on_any_reply_fails(small_holder, kind):
    content = REPLIES[kind](small_holder)
    content["metrics"] = MetricRecord({"mean_return": 187.3})
    assert any("metric" in p for p in audit_reply(content, ROUND, small_holder))


def extended_update_class():
    """ParticipantUpdate with one more plaintext field, as if someone added it to wire.proto."""
    file = descriptor_pb2.FileDescriptorProto()
    wire_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = "fedhe/v1/wire_extended.proto"
    update = next(m for m in file.message_type if m.name == "ParticipantUpdate")
    update.field.add(
        name="local_mean_return",
        number=15,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fedhe.v1.ParticipantUpdate"))


def test_a_new_plaintext_schema_field_fails(small_holder):
    good = update_reply(small_holder)
    data = good.array_records[messages.UPDATE][wire_pb2.ParticipantUpdate.DESCRIPTOR.full_name].data
    leaky = extended_update_class().FromString(data)
    leaky.local_mean_return = 187.34512
    content = RecordDict({messages.CONFIG: config(small_holder)})
    content[messages.UPDATE] = messages.pack(leaky)
    problems = audit_reply(content, ROUND, small_holder)
    assert problems and "unknown field" in problems[0]


def test_every_schema_field_of_a_reply_has_a_declared_rule():
    """A field added to a reply message must be declared here with its allowed values."""
    nested = [wire_pb2.ReleasedMetrics, wire_pb2.PairwiseMasking, wire_pb2.SealedShare, wire_pb2.RevealedShare]
    for cls in [*ALLOWED_RECORDS.values(), *nested]:
        assert {f.name for f in cls.DESCRIPTOR.fields} == set(ALLOWED_FIELDS[cls.DESCRIPTOR.full_name])


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c, h: c[messages.CONFIG].__setitem__("mean-return", 187.3), "not permitted"),
        (lambda c, h: c[messages.CONFIG].__setitem__("round", ROUND + 1), "allowed value"),
        (lambda c, h: c.__setitem__("extra", ConfigRecord({"x": 1})), "config records"),
    ],
)
def test_config_keys_and_values_are_checked(small_holder, change, expected):
    content = update_reply(small_holder)
    change(content, small_holder)
    assert any(expected in p for p in audit_reply(content, ROUND, small_holder))


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: setattr(r.released, "mean_return", 21.2537), "mean_return"),
        # a check answers this round's aggregate or, riding on a train message, the previous round's
        (lambda r: setattr(r.released, "round", ROUND - 2), "ReleasedMetrics.round"),
        (lambda r: setattr(r.released, "round", ROUND + 1), "ReleasedMetrics.round"),
        (lambda r: setattr(r, "round", ROUND + 1), "IntegrityReply.round"),
        (lambda r: setattr(r, "round", ROUND - 2), "IntegrityReply.round"),
    ],
)
def test_a_release_unrounded_or_of_another_round_fails(small_holder, change, expected):
    content = integrity_reply(small_holder)
    reply = messages.unpack(content, messages.INTEGRITY_REPLY, wire_pb2.IntegrityReply, max_bytes=1 << 30)
    change(reply)
    content[messages.INTEGRITY_REPLY] = messages.pack(reply)
    assert any(expected in p for p in audit_reply(content, ROUND, small_holder))


def test_a_train_reply_may_carry_the_previous_rounds_check_and_release(small_holder):
    """The check of round r rides on round r+1's message to the refresher: its reply answers round r."""
    content = update_reply(small_holder)
    reply = wire_pb2.IntegrityReply(protocol_version=PROTOCOL_VERSION, round=ROUND - 1, within_bound=True,
                                    stats_plausible=True,
                                    released=released_metrics(np.array([85.0, 4.0, 85.0]), ROUND - 1))
    content[messages.INTEGRITY_REPLY] = messages.pack(reply)
    assert audit_reply(content, ROUND, small_holder) == []


def test_a_refresh_reply_releases_nothing(small_holder):
    """Statistics are released by the integrity check only: a refresh reply carrying them (the retired
    field 5) is an unknown field."""
    content = refresh_reply(small_holder)
    data = content.array_records[messages.REFRESH_REPLY][wire_pb2.RefreshReply.DESCRIPTOR.full_name].data
    released = wire_pb2.ReleasedMetrics(round=ROUND, mean_return=21.25, episodes=4, steps=85, valid=True)
    field_5 = bytes([5 << 3 | 2, len(released.SerializeToString())]) + released.SerializeToString()
    content[messages.REFRESH_REPLY] = messages.pack(wire_pb2.RefreshReply.FromString(data + field_5))
    assert any("unknown field" in p for p in audit_reply(content, ROUND, small_holder))


@pytest.mark.parametrize("length", [15, 17, 64])
def test_an_opened_share_must_be_one_share_of_a_seed(small_holder, length):
    content = unmask_reply(small_holder)
    reply = messages.unpack(content, messages.UNMASK_REPLY, wire_pb2.UnmaskReply, max_bytes=1 << 30)
    reply.shares[0].share = bytes(length)
    content[messages.UNMASK_REPLY] = messages.pack(reply)
    assert any("RevealedShare.share" in p for p in audit_reply(content, ROUND, small_holder))


def test_unrounded_norm_sums_fail(small_holder):
    norms = norm_reply(small_holder)
    norms[messages.NORM_REPLY] = messages.pack(
        wire_pb2.NormReply(protocol_version=PROTOCOL_VERSION, round=ROUND, masked_sums=[1234.5678])
    )
    assert any("masked_sums" in p for p in audit_reply(norms, ROUND, small_holder))


def test_a_plaintext_vector_in_place_of_a_ciphertext_fails(small_holder):
    from participant.keyholder import PlainKeyHolder

    content = update_reply(small_holder)
    update = messages.unpack(content, messages.UPDATE, wire_pb2.ParticipantUpdate, max_bytes=1 << 30)
    plain = PlainKeyHolder(small_holder.profile)
    update.update.CopyFrom(to_proto(plain, encrypt_vector(plain, np.ones(30))))
    content[messages.UPDATE] = messages.pack(update)
    assert any("not a fresh ciphertext" in p for p in audit_reply(content, ROUND, small_holder))


def test_what_the_key_holder_releases_passes(small_holder):
    """The participant's own norm answer and statistics release are rounded as the allowlist demands."""
    released = released_metrics(np.array([1234.5678, 7.0, 1999.6]), ROUND)
    assert released.round == ROUND and released.mean_return == 176.37 and released.steps == 2000
    reply = wire_pb2.IntegrityReply(protocol_version=PROTOCOL_VERSION, round=ROUND, released=released)
    content = RecordDict({messages.CONFIG: config(small_holder), messages.INTEGRITY_REPLY: messages.pack(reply)})
    assert audit_reply(content, ROUND, small_holder) == []
    query = wire_pb2.NormQuery(protocol_version=PROTOCOL_VERSION, round=ROUND)
    masked = np.random.default_rng(0).uniform(-(2.0**15), 2.0**15, small_holder.slots)
    query.masked.append(to_proto(small_holder, encrypt_vector(small_holder, masked)))
    reply = RecordDict(
        {
            messages.CONFIG: config(small_holder),
            messages.NORM_REPLY: messages.pack(answer_norm_query(small_holder, query)),
        }
    )
    assert audit_reply(reply, ROUND, small_holder) == []


# -- the egress guard: every reply is checked before it leaves; a violating one is withheld --------------
ORG = "hospital-b"


def guarded(reply_content, rules: EgressRules, error: Error | None = None) -> Message:
    """``reply_content`` (or ``error``) as the handlers produced it, after the guard."""
    msg = request(round_=ROUND)
    produced = Message(error, reply_to=msg) if error else Message(reply_content, reply_to=msg)
    return egress_guard_mod(lambda context: rules)(msg, node_context({}), lambda m, c: produced)


def withheld(reply: Message) -> bool:
    return reply.has_error() and (reply.error.code, reply.error.reason) == (WITHHELD.code, WITHHELD.reason(ORG))


@pytest.mark.parametrize("kind", REPLIES)
def test_the_guard_lets_protocol_replies_leave_unchanged(small_holder, kind):
    content = REPLIES[kind](small_holder)
    reply = guarded(content, EgressRules(ORG, backend=lambda: small_holder))
    assert not reply.has_error() and reply.content is content


def test_the_guard_withholds_a_leaking_reply_and_logs_why(small_holder, caplog):
    content = update_reply(small_holder)
    content["metrics"] = MetricRecord({"mean_return": 187.3})
    assert withheld(guarded(content, EgressRules(ORG, backend=lambda: small_holder)))
    assert "egress audit withheld" in caplog.text and "plaintext metric records" in caplog.text


def test_released_statistics_leave_only_where_node_and_run_release_them(small_holder):
    """Statistics leave only in an integrity reply's release; a node that does not release sends its verdict alone."""
    rules, no_release = (EgressRules(ORG, backend=lambda: small_holder, release=r) for r in (True, False))
    assert not guarded(integrity_reply(small_holder), rules).has_error()
    assert withheld(guarded(integrity_reply(small_holder), no_release))
    content = integrity_reply(small_holder)
    reply = messages.unpack(content, messages.INTEGRITY_REPLY, wire_pb2.IntegrityReply, max_bytes=1 << 30)
    reply.ClearField("released")
    content[messages.INTEGRITY_REPLY] = messages.pack(reply)
    assert not guarded(content, no_release).has_error()
    assert not guarded(refresh_reply(small_holder), no_release).has_error()  # a refresh releases nothing


REFUSAL = f"{ORG} refuses: the run asks masking=off, this node requires pairwise"


@pytest.mark.parametrize("code, reason, rules, leaves", [
    (ENVIRONMENT.code, f"{ORG}: environment failure", EgressRules(ORG), True),
    (ENVIRONMENT.code, f"{ORG}: environment failure: obs [0.013, -0.2]", EgressRules(ORG), False),
    (INTERNAL.code, f"{ORG}: environment failure", EgressRules(ORG), False),  # code and text belong together
    (ENVIRONMENT.code, "participant-1: environment failure", EgressRules(ORG), False),  # another name
    (REFUSED.code, REFUSAL, EgressRules(ORG, refusal=REFUSAL), True),
    (REFUSED.code, REFUSAL, EgressRules(ORG), False),  # this node's policy refuses nothing in this run
    (REFUSED.code, REFUSAL + " (state 0.013)", EgressRules(ORG, refusal=REFUSAL), False),
])
def test_an_error_reply_leaves_only_with_a_category_or_the_nodes_own_refusal(code, reason, rules, leaves):
    reply = guarded(None, rules, Error(code, reason))
    assert (reply.error.reason == reason) is leaves
    assert leaves or withheld(reply)


def test_content_from_a_node_that_could_not_set_itself_up_is_withheld(small_holder):
    assert withheld(guarded(update_reply(small_holder), EgressRules(ORG)))


def test_an_audit_that_cannot_check_lets_nothing_through(small_holder):
    def broken() -> None:
        raise OSError("/srv/fedhe/keys/participant.ctx: permission denied")

    reply = guarded(update_reply(small_holder), EgressRules(ORG, backend=broken))
    assert withheld(reply) and "permission" not in reply.error.reason


def test_bench_egress_guard_times_both_kinds_of_reply():
    from benchmarks.egress_guard import run_egress_guard_bench

    result = run_egress_guard_bench(repeats=1, profile="n8k-d2")
    assert result["num_params"] == 835
    for kind in ("train_reply", "refresh_reply", "integrity_reply"):
        assert result[kind]["guard_ms"] > 0 and result[kind]["bytes"] > 0
