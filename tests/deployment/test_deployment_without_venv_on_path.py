"""The harness works without an activated venv (issue 23): `<venv>/bin/python -m pytest`.

The SuperLink and SuperNodes start ``flower-superexec`` by name, so the harness must put this
interpreter's scripts folder on its children's PATH; without it the SuperLink exits at start-up
with ``FileNotFoundError: ... 'flower-superexec'``.
"""

from __future__ import annotations

import shutil

import pytest
from support.deployment_harness import LocalDeployment, _cmdline, _descendants

pytestmark = pytest.mark.deployment


@pytest.mark.timeout(240)
def test_superlink_and_supernode_find_superexec_with_the_venv_off_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # as if the venv was never activated
    if shutil.which("flower-superexec"):
        pytest.skip("flower-superexec is installed system-wide; nothing to prove here")

    with LocalDeployment(num_nodes=1, workdir=tmp_path / "dep") as dep:
        # start() returned: the SuperLink stayed up and the node is online. Each keeps a
        # running SuperExec it found on PATH.
        for proc in dep.processes:
            assert proc.alive(), dep.diagnostics()
            superexecs = [pid for pid, _ in _descendants([proc.popen.pid]) if "flower-superexec" in _cmdline(pid)]
            assert superexecs, f"{proc.name} has no flower-superexec child\n{dep.diagnostics()}"
