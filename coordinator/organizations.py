"""Who is who: Flower node ids, roster indices and organization names, and how each one fared.

Organizations name themselves once (``query.identify``: roster index and name, public facts);
from then on every log line, failure and summary entry names the organization, not a node id.
A node whose reply says it holds another federation's key, or that its policy refuses the run,
is left out for the rest of the run; a node that went silent is *gone*: later rounds mask over
the others only, and it is asked again (without waiting) at every round until it answers, or a
new node (the organization's restarted SuperNode) names itself as that organization.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ACTIVE, GONE, EXCLUDED = "active", "gone", "excluded"


@dataclass
class Organization:
    node: int
    name: str
    index: int | None = None  # roster index, once identified
    status: str = ACTIVE
    answered: int = 0  # rounds whose training reply was taken
    failed: int = 0  # rounds in which this organization failed (no reply, a refused or bad reply)
    why: Counter = field(default_factory=Counter)  # failure category -> rounds

    def summary(self) -> dict:
        return {"index": self.index, "status": self.status, "rounds_answered": self.answered,
                "rounds_failed": self.failed, "why": dict(self.why)}


class Organizations:
    def __init__(self) -> None:
        self.by_node: dict[int, Organization] = {}

    def of(self, node: int) -> Organization:
        if node not in self.by_node:
            self.by_node[node] = Organization(node, f"node {node}")
        return self.by_node[node]

    def name(self, node: int) -> str:
        return self.of(node).name

    def named_in(self, node: int, reason: str) -> None:
        """A node that never identified itself may still name itself in an error reply ("hospital-c: ..."
        or "hospital-c refuses: ..."): good enough to report it by."""
        org = self.of(node)
        name = reason.split(":", 1)[0].removesuffix(" refuses").strip()
        if org.index is None and ":" in reason and name and len(name) <= 100:
            org.name = name

    def identify(self, node: int, index: int, name: str) -> str | None:
        """Record a node's roster index and name; a problem (a second node claiming an index) as text.

        A gone organization's index may be claimed by a new node: a restarted SuperNode has a new
        node id. It takes over the organization's record (one entry per organization); a false claim
        gains nothing, since it cannot open the shares the roster's keys seal for that organization."""
        for other in list(self.by_node.values()):
            if other.node != node and other.index == index and other.status == GONE:
                del self.by_node[other.node]
                other.node = node
                self.by_node[node] = other
            elif other.node != node and other.index == index and other.status == EXCLUDED:
                return f"{name} claims roster index {index}, which was left out of this run ({other.name})"
            elif other.node != node and other.index == index:
                return f"{name} claims roster index {index}, which {other.name} already holds"
        org = self.of(node)
        org.index, org.name = index, name or f"participant-{index}"
        if org.status == GONE:
            org.status = ACTIVE
        return None

    def identified(self, node: int) -> bool:
        return self.of(node).index is not None

    def active(self, nodes: list[int]) -> list[int]:
        """Identified, present nodes the run still counts on, in node order."""
        return sorted(n for n in nodes if self.identified(n) and self.of(n).status == ACTIVE)

    def all_left_out(self, nodes: list[int]) -> bool:
        """Every present node belongs to an organization this run left out: nobody is left to train."""
        return bool(nodes) and all(n in self.by_node and self.by_node[n].status == EXCLUDED for n in nodes)

    def to_probe(self, nodes: list[int]) -> list[int]:
        """Present nodes to ask who they are: never identified, or gone and perhaps back."""
        return sorted(n for n in nodes if self.of(n).status != EXCLUDED
                      and (not self.identified(n) or self.of(n).status == GONE))

    def failed(self, node: int, category: str) -> None:
        org = self.of(node)
        org.failed += 1
        org.why[category] += 1

    def mark(self, node: int, status: str) -> None:
        self.of(node).status = status

    def summary(self) -> dict[str, dict]:
        return {org.name: org.summary() for org in sorted(self.by_node.values(), key=lambda o: (o.index is None,
                                                                                               o.index or 0))}
