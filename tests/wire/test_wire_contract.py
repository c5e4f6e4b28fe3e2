"""The committed protobuf bindings match wire.proto, and the coordinator cannot reach key-holder code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from protos.fedhe.v1 import wire_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_generated_bindings_are_not_stale(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "wire.desc"
    code = grpc_tools.main(
        ["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}", str(ROOT / "protos/fedhe/v1/wire.proto")]
    )
    assert code == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(compiled.message_type)  # protoc adds them; generated code strips them
    committed = descriptor_pb2.FileDescriptorProto.FromString(wire_pb2.DESCRIPTOR.serialized_pb)
    assert compiled == committed, (
        "protos/fedhe/v1/wire_pb2.py is stale; regenerate with: python -m grpc_tools.protoc "
        "-Iprotos --python_out=protos --pyi_out=protos protos/fedhe/v1/wire.proto"
    )


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_proto_package_is_versioned():
    assert wire_pb2.DESCRIPTOR.package == "fedhe.v1"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_coordinator_package_never_imports_participant():
    offenders = [p for p in (ROOT / "coordinator").rglob("*.py") if "participant" in _imports(p)]
    assert not offenders, f"coordinator modules import participant: {offenders}"


def test_importing_the_coordinator_loads_no_key_holder_code():
    code = (
        "import sys, pkgutil, importlib, coordinator\n"
        "for m in pkgutil.walk_packages(coordinator.__path__, 'coordinator.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'participant'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
