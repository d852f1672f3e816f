"""The repository service (shell/service/repository.py): the rules p2pstdio's plain session
and the node RPC worker share, on a real git-annex repository."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import P2PChannel
from shell import restrict
from shell.p2pserver import PlainSession
from shell.repo import Repo, open_repo
from shell.service.repository import (
    NotPresent,
    Refused,
    RemoveOutcome,
    RepositoryService,
)

CLIENT = "d21e0000-0000-4000-8000-00000000d21e"


@pytest.fixture
def annexed(tmp_path: Path, annex_bin: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Repo, Key]:
    """A git-annex repository holding one annexed file; its key."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = t\n\temail = t@annexproxy.invalid\n")
    monkeypatch.setenv("HOME", str(home))
    env = {**os.environ, "PATH": f"{annex_bin}:{os.environ['PATH']}"}
    path = tmp_path / "repo"

    def run(*args: str) -> str:
        return subprocess.run(
            args, cwd=path, env=env, check=True, capture_output=True, text=True, timeout=120
        ).stdout

    subprocess.run(["git", "init", "-q", str(path)], env=env, check=True)
    run("git", "annex", "init", "-q", "test")
    (path / "file").write_bytes(os.urandom(1000))
    run("git", "annex", "add", "-q", "file")
    run("git", "commit", "-qm", "add")
    key = Key.parse(run("git", "annex", "lookupkey", "file").strip())
    return open_repo(str(path)), key


def _clock(readings: list[int]) -> Iterator[int]:
    yield from readings
    while True:
        yield readings[-1]


async def test_plain_remove_before_checks_the_deadline_under_the_lock(
    annexed: tuple[Repo, Key], monkeypatch: pytest.MonkeyPatch
) -> None:
    """REMOVE-BEFORE: time passes between the first check and the exclusive lock; the
    removal must not happen. Fails on the plain session before the repository service (it
    checked only before locking; the node worker already checked again under the lock)."""
    repo, key = annexed
    deadline = 1_000_000
    ticks = _clock([deadline - 1, deadline + 1])
    monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))  # trio uses perf_counter
    to_server_send, to_server_recv = trio.testing.memory_stream_one_way_pair()
    to_client_send, to_client_recv = trio.testing.memory_stream_one_way_pair()
    session = PlainSession(repo, P2PChannel(to_server_recv, to_client_send), CLIENT)
    with trio.fail_after(30):
        await session.remove(key, deadline)
        reply = await to_client_recv.receive_some(100)
    assert reply == b"FAILURE\n"
    assert RepositoryService(repo, client_uuid=None).has(key)
    del to_server_send


def test_remove_outcomes_and_restrictions(annexed: tuple[Repo, Key]) -> None:
    repo, key = annexed
    with pytest.raises(Refused) as readonly:
        RepositoryService(repo, client_uuid=None, mode=restrict.Mode.READONLY).remove(key)
    assert readonly.value.readonly and str(readonly.value) == restrict.READONLY_DENIED
    with pytest.raises(Refused) as appendonly:
        RepositoryService(repo, client_uuid=None, mode=restrict.Mode.APPENDONLY).remove(key)
    assert not appendonly.value.readonly and str(appendonly.value) == restrict.APPENDONLY_DENIED
    with pytest.raises(Refused):
        RepositoryService(repo, client_uuid=None, mode=restrict.Mode.READONLY).begin_put(
            key, None
        )

    service = RepositoryService(repo, client_uuid=CLIENT, clock=lambda: 100)
    assert service.remove(key, before=100) == RemoveOutcome.TOO_LATE
    hold = service.hold(key)
    assert service.remove(key) == RemoveOutcome.LOCKED  # held by a client
    hold.release()
    assert service.remove(key, before=101) == RemoveOutcome.REMOVED
    assert not service.has(key)
    assert service.remove(key) == RemoveOutcome.ABSENT
    with pytest.raises(NotPresent):
        service.hold(key)
    with pytest.raises(NotPresent):
        service.open_get(key, 0, None)
    service.commit()
    log = subprocess.run(
        ["git", "-C", str(repo.path), "show", f"git-annex:{_location_log(key)}"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert log.splitlines()[-1].split()[1:] == ["0", service.uuid]


def test_abandoned_hold_keeps_the_retention(annexed: tuple[Repo, Key]) -> None:
    """A client that vanishes while holding a lock leaves the retention file: a drop proof
    made with that lock stays true for its 10 minutes."""
    repo, key = annexed
    service = RepositoryService(repo, client_uuid=None)
    service.hold(key).abandon()
    assert service.remove(key) == RemoveOutcome.LOCKED
    service.hold(key).release()
    assert service.remove(key) == RemoveOutcome.REMOVED


def _location_log(key: Key) -> str:
    return f"{key.hashdir_lower().rstrip('/')}/{key.keyfile()}.log"
