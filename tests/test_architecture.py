"""The house rules: who may import whom (docs/architecture.md).

``participant`` is what an organization runs and audits; ``coordinator`` is the untrusted side and
must be unable to touch a secret key; both stand on ``protos`` and ``scenarios``. The ``fedhe``
tools drive whole federations on one machine, on top of both. The RL math in ``scenarios``
imports neither TenSEAL nor Flower.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "participant": {"coordinator", "fedhe"},
    "coordinator": {"participant", "fedhe"},
    "protos": {"participant", "coordinator", "fedhe"},
    "scenarios": {"participant", "coordinator", "fedhe", "protos", "tenseal", "flwr"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("entry, forbidden", [
    ("coordinator.server_app", ("participant", "fedhe")),
    ("participant.client_app", ("coordinator", "fedhe")),
    ("scenarios", ("tenseal", "flwr", "participant", "coordinator")),
])
def test_no_forbidden_modules_load_transitively(entry, forbidden):
    code = (f"import sys, {entry}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
