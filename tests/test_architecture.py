"""The house rules: who may import whom, and what the audited packages hold (docs/architecture.md).

``participant`` is what an organization runs and audits; ``coordinator`` is the untrusted side and
must be unable to touch a secret key; both stand on ``protos`` and ``scenarios``. The tools sit on
top of both: the ``fedhe`` command line and ``benchmarks``, which ``fedhe bench`` imports lazily
(inside its commands, so no other command loads them). Nothing below the tools imports them. The RL
math in ``scenarios`` imports neither TenSEAL nor Flower. Every module of ``participant``,
``coordinator`` and ``protos`` is part of a running federation or of the ``fedhe`` tools: code only
benchmarks or tests use belongs in ``benchmarks`` (or ``tests/support``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("fedhe", "benchmarks", "participant", "coordinator", "protos", "scenarios")
TOOLS = {"fedhe", "benchmarks"}
NOT_IN_RL_MATH = {"tenseal", "flwr"}  # scenarios stays plain NumPy and Gymnasium


def documented_block(kind: str) -> list[str]:
    """The lines of the ```kind block of docs/architecture.md."""
    text = DOC.read_text()
    return [line for line in text.split(f"```{kind}\n", 1)[1].split("```", 1)[0].splitlines() if line.strip()]


def documented_imports() -> dict[str, set[str]]:
    """package -> the project packages it may import, as docs/architecture.md draws them."""
    allowed = {}
    for line in documented_block("imports"):
        package, _, targets = line.partition("->")
        allowed[package.strip()] = {t.split("(")[0] for t in targets.split()}
    return allowed


FORBIDDEN = {package: set(PACKAGES) - {package} - allowed | (NOT_IN_RL_MATH if package == "scenarios" else set())
             for package, allowed in documented_imports().items()}
AUDITED = ("participant", "coordinator", "protos")
PRODUCTION = (*AUDITED, "scenarios", "fedhe")  # what a federation or the fedhe command runs


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_documented_house_names_every_package():
    assert set(documented_imports()) == set(PACKAGES)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def module_level_roots(path: Path) -> set[str]:
    """The packages ``path`` imports when it is imported (not inside a function or class)."""
    roots = set()
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(stmt):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_fedhe_imports_benchmarks_only_inside_its_commands():
    """``fedhe bench`` imports ``benchmarks`` lazily, so no other command loads it."""
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "fedhe").rglob("*.py")
                 if "benchmarks" in module_level_roots(path)]
    assert offenders == []


@pytest.mark.parametrize("entry, forbidden", [
    ("coordinator.server_app", ("participant", "fedhe", "benchmarks")),
    ("participant.client_app", ("coordinator", "fedhe", "benchmarks")),
    ("participant.worker", ("coordinator", "fedhe", "benchmarks")),
    ("fedhe.cli", ("benchmarks",)),
    ("scenarios", ("tenseal", "flwr", "participant", "coordinator")),
])
def test_no_forbidden_modules_load_transitively(entry, forbidden):
    code = (f"import sys, {entry}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- every audited module runs -------------------------------------------------------------------


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(packages: tuple[str, ...], root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (lazily too), with the packages around them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for target in targets:
        parts = target.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known  # importing a.b.c runs a, a.b
    return found


def entry_points(modules: dict[str, Path], root: Path = ROOT) -> set[str]:
    """What is started rather than imported: the Flower app's components, console scripts, and
    modules production code runs with ``python -m`` (the organization's worker)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    specs = [*project["tool"]["flwr"]["app"]["components"].values(), *project["project"]["scripts"].values()]
    entries = {spec.split(":")[0] for spec in specs}
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.List, ast.Tuple)):
                items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                entries |= {items[i + 1] for i, item in enumerate(items[:-1])
                            if item == "-m" and isinstance(items[i + 1], str)}
    return entries & set(modules)


def unreached_modules(root: Path = ROOT) -> dict[str, list[str]]:
    """Audited modules no entry point reaches through production imports, each with who imports it."""
    modules = modules_under(PRODUCTION, root)
    everything = {**modules_under(("benchmarks", "tests"), root), **modules}
    known = set(everything)
    edges = {name: imported_modules(path, name, known) for name, path in everything.items()}
    reached, todo = set(), list(entry_points(modules, root))
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [m for m in edges[name] if m in modules]
    return {
        name: sorted(user for user, imports in edges.items() if name in imports and user != name)
        for name in modules
        if name.split(".")[0] in AUDITED and name not in reached
    }


def test_audited_packages_hold_only_what_runs():
    """Every module of participant/, coordinator/ and protos/ is reached from an entry point (the
    ServerApp, the ClientApp, the organization's worker, the ``fedhe`` command) through imports in
    production code; a module that only benchmarks or tests import belongs in benchmarks/."""
    assert unreached_modules() == {}


def test_a_module_only_benchmarks_and_tests_import_is_found(tmp_path):
    """The check above on a copy of the tree with one benchmark-only module added to protos/."""
    for item in ("pyproject.toml", *PRODUCTION, "benchmarks"):
        source = ROOT / item
        if source.is_dir():
            for path in source.rglob("*.py"):
                (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / path.relative_to(ROOT)).write_text(path.read_text())
        else:
            (tmp_path / item).write_text(source.read_text())
    (tmp_path / "protos" / "bench_only.py").write_text("VALUE = 1\n")
    (tmp_path / "benchmarks" / "uses_it.py").write_text("from protos.bench_only import VALUE\n")
    assert unreached_modules(tmp_path) == {"protos.bench_only": ["benchmarks.uses_it"]}


def test_the_documented_round_names_real_modules_and_messages():
    """docs/architecture.md's "One round as data" may name only modules and message records that exist."""
    from protos import messages

    records = {value for name, value in vars(messages).items() if name.isupper() and isinstance(value, str)}
    lines = documented_block("round")
    assert lines
    for line in lines:
        module = line.split()[0]
        assert (ROOT / module).is_file(), line
        named = [word for word in line.split() if word.startswith("fedhe.")]
        assert set(named) <= records, line
