"""Hostile clients of `git-annex-shell noderpc` (shell/noderpc.py): what the holder of an ssh
key could do with the node worker, one test per row below.

noderpc serves annexproxy's proxy. The proxy starts the worker of a local node itself (no
forced command, no restriction: nodelink.child_env); an ssh node runs it under a forced
command only if its admin set ANNEXPROXY_ALLOW_NODERPC for the proxy's key (git-annex-shell(1)).
Rows N2-N9 are such a key in someone else's hands: the worker must keep the key's
restrictions and bound what it spends. Every session goes through the fake ssh
(tests/fakessh.py) as sshd would run it; the client is tests/rpcdriver.py, which writes
frames and reads only when told.

Rows (probe -> expected):

- N1  noderpc without the opt-in from a forced command, git-annex-shell as login shell,
      READONLY / APPENDONLY / LIMITED / DIRECTORY keys, `-c` with separate words, or the
      argv form under SSH_ORIGINAL_COMMAND or a restriction -> one line, exit 1, nothing on
      stdout, the directory not even looked at. An ordinary shell account (sh -c, no
      restriction), like the proxy's own spawn, still runs it.
- N2  READONLY + opt-in: put_begin, remove -> `readonly`; checkpresent, get served
- N3  APPENDONLY + opt-in: remove -> `appendonly`; an upload begins
- N4  DIRECTORY + opt-in: another repository -> "Only allowed to access"
- N5  a HELLO offering a 1 GiB window -> the link ends at once (one line, exit 1)
- N6  100 gets of a 4 MiB object under the largest window, nothing read -> peak RSS < 64 MiB
- N7  36 MB of small requests, nothing read -> the worker stops reading; peak RSS < 64 MiB;
      every answer still comes, in order, once read
- N8  more than MAX_STREAMS streams or MAX_LOCKS locks -> `protocol` for the extra ones;
      a slot freed is usable again
- N9  silence, a lock then silence, a lock held while pinging -> the link ends after
      annexproxy.idletimeout, the lock released
- N10 --uuid naming a node behind a proxy -> "Cannot proxy noderpc command."
      (tests/test_noderpc.py::test_worker_is_not_proxyable)

bench/noderpc_abuse.py measures N6 and N7 at full size (and 30 gets of a 64 MB object).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import SshEnv, SshEnvFactory, shell_error
from rpcdriver import RpcSession, hello, request

from git_remote_annexproxy import rpc
from git_remote_annexproxy.lockfile import others_hold
from git_remote_annexproxy.rpcmethods import MAX_LOCKS, MAX_STREAMS
from shell import restrict

ALLOW = {restrict.ALLOW_NODERPC: "1"}
PEAK_LIMIT_KIB = 64 * 1024

BIG = hashlib.shake_256(b"noderpc big").digest(4 << 20)
SMALL = b"small content\n"


def key_of(data: bytes) -> str:
    return f"SHA256E-s{len(data)}--{hashlib.sha256(data).hexdigest()}.bin"


K_BIG, K_SMALL, K_NEW = key_of(BIG), key_of(SMALL), key_of(b"new content\n")


@dataclass
class Node:
    env: SshEnv
    repo: Path

    def command(self, directory: Path | None = None) -> str:
        return f"git-annex-shell 'noderpc' '{directory or self.repo}'"

    def client_env(self, server_env: Mapping[str, str], mode: str = "forced") -> dict[str, str]:
        return dict(self.env.with_server(mode, **server_env))

    def session(self, server_env: Mapping[str, str] = ALLOW, *, mode: str = "forced") -> RpcSession:
        """The worker as the holder of this key reaches it: ssh, then the forced command."""
        argv = ["ssh", "localhost", self.command()]
        return RpcSession(argv, env=self.client_env(server_env, mode), cwd=self.env.client_home)

    def object(self, key: str) -> Path:
        out = self.env.run(["git", "annex", "contentlocation", key], cwd=self.repo, admin=True)
        return self.repo / out.stdout.strip()

    def lock_file(self, key: str) -> Path:
        obj = self.object(key)
        return obj.parent / (obj.name + ".lck")

    def tree(self) -> set[str]:
        return {str(p.relative_to(self.repo)) for p in self.repo.rglob("*")}


@pytest.fixture
def node(ssh_env: SshEnvFactory, tmp_path: Path) -> Node:
    env = ssh_env()
    repo = env.make_server_repo("node.git", "node")
    for data in (BIG, SMALL):
        seed = tmp_path / "seed"
        seed.write_bytes(data)
        env.run(["git", "annex", "setkey", key_of(data), str(seed)], cwd=repo, admin=True)
    return Node(env, repo)


def start(s: RpcSession, window: int = 64 << 10) -> None:
    """HELLO both ways and the proxy's first call."""
    s.push(hello(window) + request(1, "info", {}))
    assert s.frame()[0] == 5
    assert call_answer(s, 1)[2] is None


def call_answer(s: RpcSession, rid: int) -> list[Any]:
    """The answer to request `rid` (frames of other kinds before it are skipped)."""
    while True:
        frame = s.frame()
        if frame[0] == 1:
            assert frame[1] == rid, frame
            return list(frame)


def call(s: RpcSession, rid: int, method: str, params: dict[str, Any]) -> list[Any]:
    s.push(request(rid, method, params))
    return call_answer(s, rid)


def error_type(answer: list[Any]) -> str | None:
    return None if answer[2] is None else str(answer[2]["type"])


# --- N1: noderpc is the proxy's, not the users' ------------------------------------------------


def _ssh_noderpc(node: Node, server_env: Mapping[str, str], mode: str, directory: Path | None
                 ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        ["ssh", "localhost", node.command(directory)],
        env=node.client_env(server_env, mode), cwd=node.env.client_home,
        input="", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "server_env"),
    [
        ("forced", {}),
        ("login", {}),  # git-annex-shell as the account's login shell
        ("forced", {restrict.READONLY: "1"}),
        ("forced", {restrict.APPENDONLY: "1"}),
        ("forced", {restrict.LIMITED: "1"}),
        ("forced", {restrict.DIRECTORY: "DIR"}),
        ("shell", {restrict.READONLY: "1"}),  # sh -c, argv form, a restricted key
        ("forced", {restrict.ALLOW_NODERPC: ""}),  # empty is unset, as for GIT_ANNEX_SHELL_*
    ],
)
@pytest.mark.parametrize("where", ["repo", "missing"])
def test_n1_refused_to_forced_commands(
    node: Node, mode: str, server_env: dict[str, str], where: str
) -> None:
    server_env = {k: str(node.repo) if v == "DIR" else v for k, v in server_env.items()}
    directory = node.repo if where == "repo" else node.env.srv / "missing.git"
    before = node.tree()
    proc = _ssh_noderpc(node, server_env, mode, directory)
    refused = shell_error(restrict.NODERPC_REFUSED)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", refused)
    assert node.tree() == before


@pytest.mark.parametrize(
    ("argv_tail", "env"),
    [
        (["-c", "noderpc", "DIR"], {}),  # -c with separate words
        (["noderpc", "DIR"], {"SSH_ORIGINAL_COMMAND": "noderpc DIR"}),  # some forced command
        (["noderpc", "DIR"], {restrict.APPENDONLY: "1"}),
    ],
)
def test_n1_refused_in_every_form(
    node: Node, our_shell: Path, argv_tail: list[str], env: dict[str, str]
) -> None:
    argv = [str(our_shell), *(str(node.repo) if w == "DIR" else w for w in argv_tail)]
    server = {**node.env.admin_env(), **env}
    proc = subprocess.run(argv, env=server, input="", capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    refused = shell_error(restrict.NODERPC_REFUSED)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", refused)


@pytest.mark.parametrize(("mode", "server_env"), [("shell", {}), ("forced", ALLOW)])
def test_n1_runs_for_a_shell_account_or_with_the_opt_in(
    node: Node, mode: str, server_env: dict[str, str]
) -> None:
    with node.session(server_env, mode=mode) as s:
        start(s)
        assert call(s, 2, "checkpresent", {"keys": [K_SMALL]})[3] == {"present": [True]}
        result = s.finish()
    assert (result.code, result.stderr) == (0, "")


# --- N2-N4: the key's restrictions hold inside noderpc ------------------------------------------


def test_n2_readonly_key(node: Node) -> None:
    with node.session({**ALLOW, restrict.READONLY: "1"}) as s:
        start(s)
        put = call(s, 2, "put_begin", {"key": K_NEW, "af": None})
        remove = call(s, 3, "remove", {"key": K_SMALL, "before": None})
        assert (error_type(put), error_type(remove)) == ("readonly", "readonly")
        assert put[2]["message"] == restrict.READONLY_DENIED
        assert call(s, 4, "checkpresent", {"keys": [K_SMALL]})[3] == {"present": [True]}
        assert call(s, 5, "get", {"key": K_SMALL, "offset": 0, "af": None})[3] == {
            "length": len(SMALL)
        }
        assert s.frame() == [3, 5, SMALL, False]
        assert s.frame() == [3, 5, b"", True]
        assert s.finish().code == 0
    assert not any(K_NEW in path for path in node.tree())


def test_n3_appendonly_key(node: Node) -> None:
    with node.session({**ALLOW, restrict.APPENDONLY: "1"}) as s:
        start(s)
        remove = call(s, 2, "remove", {"key": K_SMALL, "before": None})
        assert error_type(remove) == "appendonly"
        assert remove[2]["message"] == restrict.APPENDONLY_DENIED
        assert call(s, 3, "put_begin", {"key": K_NEW, "af": None})[3] == {"offset": 0}
        assert s.finish().code == 0
    assert node.object(K_SMALL).read_bytes() == SMALL


def test_n4_directory_key(node: Node) -> None:
    other = node.env.make_server_repo("other.git", "other")
    server_env = {**ALLOW, restrict.DIRECTORY: str(node.repo)}
    proc = _ssh_noderpc(node, server_env, "forced", other)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == shell_error(f"Only allowed to access {node.repo} not {other}")


# --- N5-N8: bounded whatever the client does -----------------------------------------------------


def test_n5_huge_window_ends_the_link(node: Node) -> None:
    with node.session() as s:
        s.push(hello(1 << 30) + request(1, "get", {"key": K_BIG, "offset": 0, "af": None}))
        assert s.frame()[0] == 5
        with pytest.raises(EOFError):
            s.frame()
        result = s.finish()
    assert result.code == 1
    assert result.stderr == (
        "git-annex-shell: noderpc: protocol error: "
        f"HELLO window {1 << 30} over the limit {rpc.MAX_CREDIT}\n"
    )


def test_n6_gets_nobody_reads_are_bounded(node: Node) -> None:
    """The largest window the worker accepts, 100 downloads of 4 MiB, nothing read."""
    gets = b"".join(
        request(rid, "get", {"key": K_BIG, "offset": 0, "af": None}) for rid in range(2, 102)
    )
    with node.session() as s:
        first = hello(rpc.MAX_CREDIT) + request(1, "info", {})
        assert s.push(first + gets) == len(first + gets)
        peak = s.settle(quiet=3)
        assert s.alive()
        assert peak < PEAK_LIMIT_KIB, f"peak RSS {peak} KiB"
        assert s.frame()[0] == 5  # and it serves what it took, once read
        assert call_answer(s, 1)[2] is None
        assert call_answer(s, 2)[3] == {"length": len(BIG)}


def test_n7_small_requests_nobody_reads_are_bounded(node: Node) -> None:
    payload, rid = bytearray(), 2
    while len(payload) < 36_000_000:
        payload += request(rid, "timestamp", {})
        rid += 1
    with node.session() as s:
        taken = s.push(hello(64 << 10) + request(1, "info", {}) + payload, stall=3)
        peak = s.settle(quiet=3)
        assert taken < len(payload) // 2  # it stopped reading
        assert peak < PEAK_LIMIT_KIB, f"peak RSS {peak} KiB"
        assert s.alive()
        assert s.frame()[0] == 5
        for rid in range(1, 20_000):  # every answer, in order
            assert call_answer(s, rid)[2] is None


def test_n8_streams_are_capped(node: Node) -> None:
    """A one-byte window keeps every download open, waiting for credit."""
    with node.session() as s:
        start(s, window=1)
        answers = [call(s, rid, "get", {"key": K_BIG, "offset": 0, "af": None})
                   for rid in range(2, MAX_STREAMS + 5)]  # fmt: skip
        kinds = [error_type(a) for a in answers]
        assert kinds == [None] * MAX_STREAMS + ["protocol"] * 3
        assert "streams open" in answers[-1][2]["message"]
        # Cancel one: its stream ends, and a new one may open.
        s.push(msgpack.packb([6, 2]))
        while s.frame()[1:] != [2, b"", True]:
            pass
        assert error_type(call(s, 100, "get", {"key": K_SMALL, "offset": 0, "af": None})) is None


def test_n8_locks_are_capped(node: Node) -> None:
    with node.session() as s:
        start(s)
        answers = [call(s, rid, "lock", {"key": K_SMALL}) for rid in range(2, MAX_LOCKS + 4)]
        assert [error_type(a) for a in answers] == [None] * MAX_LOCKS + ["protocol"] * 2
        assert error_type(call(s, 200, "unlock", {"lock": answers[0][3]["lock"]})) is None
        assert error_type(call(s, 201, "lock", {"key": K_SMALL})) is None
        assert s.finish().code == 0


# --- N9: annexproxy.idletimeout ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["silent", "lock then silent", "lock while pinging"])
def test_n9_idle_timeout_ends_the_link(node: Node, how: str) -> None:
    node.env.run(["git", "config", "annexproxy.idletimeout", "2"], cwd=node.repo, admin=True)
    lck = node.lock_file(K_SMALL)
    with node.session() as s:
        start(s)
        began = time.monotonic()
        if how != "silent":
            assert error_type(call(s, 2, "lock", {"key": K_SMALL})) is None
            fd = os.open(lck, os.O_RDONLY)
            try:
                assert others_hold(fd)
            finally:
                os.close(fd)
        rid = 3
        while how == "lock while pinging" and s.alive() and time.monotonic() - began < 15:
            s.push(request(rid, "timestamp", {}))
            rid += 1
            time.sleep(0.3)
        code = s.wait(15)
        took = time.monotonic() - began
        stderr = s.stderr()
    assert 1.5 < took < 12, took  # the idle timeout, then the exit (a commit) on a busy machine
    assert code == 1
    expected = ("nothing from or to the proxy for 2s" if how == "silent"
                else "the proxy held a content lock past the idle timeout (2s)")  # fmt: skip
    assert stderr == f"git-annex-shell: noderpc: {expected}\n"
    if lck.exists():  # released (the retention file stays, as after p2pstdio's LOCKCONTENT)
        fd = os.open(lck, os.O_RDONLY)
        try:
            assert not others_hold(fd)
        finally:
            os.close(fd)
