"""The app as Flower ships it: the FAB built from the repository carries no key file.

Organizations leave key material in the app directory (keys/, run outputs, TLS files); Flower's
include list and ``.gitignore`` keep all of it out of the FAB that every SuperNode and the
SuperLink unpack. The deployments themselves are in ``test_deployed_runs.py``;
docs/testing.md ("The deployment harness") says how Flower 1.41
deployments behave (and cost) here.
"""

from __future__ import annotations

import shutil

import pytest
from support.deployment_harness import build_fab
from support.federation_setup import KEY_SUFFIXES, REPO_ROOT, key_files_under, shipped_files

from participant.keyholder import generate_keys
from participant.sealing import create_recipient, seal_file

pytestmark = pytest.mark.deployment

FAB_MAX_BYTES = 10 * 1024 * 1024  # Flower's FAB limit


@pytest.mark.parametrize("gitignore", [True, False], ids=["with-gitignore", "without-gitignore"])
def test_fab_from_repo_has_no_key_files_even_with_keys_in_app_dir(tmp_path, gitignore):
    """Without ``.gitignore`` (which lists ``*.ctx``), Flower's include list alone keeps keys out."""
    repo_fab = build_fab(REPO_ROOT, tmp_path / "fab-repo")
    repo_files = shipped_files(repo_fab)
    assert repo_fab.stat().st_size < FAB_MAX_BYTES
    for component in ("coordinator/server_app.py", "participant/client_app.py", "pyproject.toml"):
        assert component in repo_files
    assert not [f for f in repo_files if f.endswith(KEY_SUFFIXES)], repo_files

    # A copy of the app dir (not the repo itself) with key material where people leave it.
    app = tmp_path / "fedhe-rl"
    shutil.copytree(
        REPO_ROOT, app,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info",
            "runs", "fedhe-run", "build",  # run outputs (may hold keys/) are re-created below
        ),
    )
    if not gitignore:
        (app / ".gitignore").unlink(missing_ok=True)
    key_dirs = [app / "keys", app / "participant" / "org-keys", app / "runs" / "quickstart" / "keys"]
    for d in key_dirs:
        generate_keys(d, "n8k-d2")  # cheap profile; real key files
        create_recipient(d / "org")  # an organization's X25519 key pair ...
        seal_file(d / "participant.ctx", d / "org.x25519.pub", d / "org.sealed")  # ... and a sealed key
    tls = app / "certificates"
    tls.mkdir()
    for name in ("ca.pem", "server.pem", "server.key", "ca.key"):
        (tls / name).write_text("-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n")
    assert len(key_files_under(app)) == 5 * len(key_dirs) + 4

    fab = build_fab(app, tmp_path / "fab-copy")
    files = shipped_files(fab)
    assert not [f for f in files if f.endswith(KEY_SUFFIXES)], files
    key_prefixes = tuple(str(d.relative_to(app)) + "/" for d in [*key_dirs, tls])
    assert not [f for f in files if f.startswith(key_prefixes)], files
    # The key directories added nothing: the copy ships a subset of what the repo ships.
    assert set(files) <= set(repo_files), sorted(set(files) - set(repo_files))
    assert fab.stat().st_size < FAB_MAX_BYTES
