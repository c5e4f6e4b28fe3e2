"""Who is who across node ids: claims of roster indices, gone organizations and restarted SuperNodes."""

from __future__ import annotations

from coordinator.organizations import ACTIVE, EXCLUDED, GONE, Organizations


def test_a_second_node_claiming_an_active_organizations_index_is_refused():
    orgs = Organizations()
    assert orgs.identify(1, 3, "hospital-d") is None
    assert orgs.identify(2, 3, "hospital-x") == "hospital-x claims roster index 3, which hospital-d already holds"
    assert orgs.of(1).status == ACTIVE and orgs.name(1) == "hospital-d"


def test_a_run_with_every_present_organization_left_out_has_nobody_to_wait_for():
    orgs = Organizations()
    for node in (1, 2):
        orgs.identify(node, node, f"org-{node}")
    assert not orgs.all_left_out([1, 2]) and not orgs.all_left_out([])  # no node yet: wait for them
    orgs.mark(1, EXCLUDED)
    assert not orgs.all_left_out([1, 2])
    orgs.mark(2, EXCLUDED)
    assert orgs.all_left_out([1, 2]) and not orgs.all_left_out([1, 2, 3])  # node 3 is new: ask it first
    assert 3 not in orgs.by_node  # asking records nothing


def test_a_restarted_supernode_takes_over_its_gone_organization():
    """A restarted SuperNode has a new node id; the organization keeps one record and its counts."""
    orgs = Organizations()
    orgs.identify(1, 3, "hospital-d")
    orgs.of(1).answered = 2
    orgs.failed(1, "timeout")
    orgs.mark(1, GONE)
    assert orgs.identify(7, 3, "hospital-d") is None
    assert orgs.active([7]) == [7] and 1 not in orgs.by_node
    assert orgs.summary() == {"hospital-d": {"index": 3, "status": ACTIVE, "rounds_answered": 2, "rounds_failed": 1,
                                             "why": {"timeout": 1}}}


def test_an_organization_left_out_stays_out_when_its_supernode_restarts():
    orgs = Organizations()
    orgs.identify(1, 0, "hospital-a")
    orgs.mark(1, EXCLUDED)
    assert "left out of this run" in orgs.identify(2, 0, "hospital-a")
    assert orgs.active([1, 2]) == []
