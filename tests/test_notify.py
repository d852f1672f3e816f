"""`git-annex-shell notifychanges`: READY, then CHANGED <sha> when a ref moves."""

from __future__ import annotations

import selectors
import subprocess
from pathlib import Path

import pytest


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        pytest.fail(f"no line from notifychanges within {timeout}s")
    return proc.stdout.readline()


def test_notifychanges_reports_new_ref_shas(tmp_path: Path, our_shell: Path) -> None:
    repo = tmp_path / "r.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    work = tmp_path / "w"
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "one",
        ],
        cwd=work,
        check=True,
    )
    proc = subprocess.Popen(
        [str(our_shell), "notifychanges", str(repo)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert _readline(proc, 10) == b"READY\n"
        subprocess.run(
            ["git", "push", "-q", str(repo), "HEAD:refs/heads/topic"], cwd=work, check=True
        )
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=work, check=True, capture_output=True, text=True
        ).stdout.strip()
        assert _readline(proc, 10) == f"CHANGED {sha}\n".encode()
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        code = proc.wait(timeout=10)
    # Closing stdin is the normal end of the session.
    assert code == 0
