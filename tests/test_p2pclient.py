"""The P2P client session against a scripted server on in-memory streams, and spawned:
against scripted programs, and against git-annex's own git-annex-shell and ours (plain and
through a proxy).

The scripted server checks every line the client sends, so a client that sends the wrong
message, or one too many, fails the test rather than passing by accident.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import make_ssh_env
from test_e2e_proxy import Site

from git_remote_annexproxy import p2p
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pclient import P2PRefused, P2PSession, P2PSessionError

U = "11111111-2222-3333-4444-555555555555"
KEY = Key.parse("SHA256E-s5--2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")


class Server:
    """The far end: reads what the client sends, writes raw answers."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self.conn = p2p.P2PConnection()

    async def expect(self, msg: p2p.Message) -> None:
        while True:
            event = self.conn.next_event()
            if event is not p2p.NEED_DATA:
                assert event == msg
                return
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)


Script = Callable[[Server], Awaitable[None]]


async def greet(server: Server, uuid: str = U, version: int = 4) -> None:
    await server.send(f"AUTH-SUCCESS {uuid}\n".encode())
    await server.expect(p2p.Version(4))
    await server.send(f"VERSION {version}\n".encode())


async def run_with(script: Script, body: Callable[[P2PSession], Awaitable[None]],
                   *, expected: str | None = U, idle: float = 10) -> None:  # fmt: skip
    """Run `script` as the server while `body` uses a session attached to it; then the
    client end is closed and the script must finish (its checks all run)."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script, Server(server_end))
        session = P2PSession("test", idle_timeout=idle)
        try:
            await session.attach(client_end, client_end, expected)
            await body(session)
        finally:
            await client_end.aclose()


async def test_greeting_checks_the_uuid_and_negotiates_the_version() -> None:
    async def script(s: Server) -> None:
        await greet(s, version=2)

    async def body(session: P2PSession) -> None:
        assert (session.uuid, session.version) == (U, 2)

    await run_with(script, body)


async def test_a_server_for_another_repository_is_refused() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    await server_end.send_all(b"AUTH-SUCCESS 99999999-2222-3333-4444-555555555555\n")
    session = P2PSession("origin-node1", idle_timeout=10)
    with pytest.raises(P2PSessionError) as info:
        await session.attach(client_end, client_end, U)
    assert str(info.value) == (
        f"origin-node1: expected repository UUID {U} but found 99999999-2222-3333-4444-555555555555"
    )
    assert session.dead


async def test_get_streams_the_data_then_sends_the_verdict() -> None:
    async def script(s: Server) -> None:
        await greet(s)
        await s.expect(p2p.Get(2, "a_b.txt", KEY))  # the lossy decoding of "a%b.txt"
        await s.send(b"DATA 3\nlloVALID\n")
        await s.expect(p2p.Success())
        await s.expect(p2p.CheckPresent(KEY))
        await s.send(b"FAILURE\n")

    async def body(session: P2PSession) -> None:
        download = await session.get(KEY, 2, "a b.txt")
        assert download.length == 3
        assert b"".join([piece async for piece in download]) == b"llo"
        assert download.valid is True
        await download.verdict(True)
        assert await session.checkpresent(KEY) is False

    await run_with(script, body)


async def test_absent_content_is_data_0_invalid() -> None:
    async def script(s: Server) -> None:
        await greet(s)
        await s.expect(p2p.Get(0, None, KEY))
        await s.send(b"DATA 0\nINVALID\n")
        await s.expect(p2p.Failure())

    async def body(session: P2PSession) -> None:
        download = await session.get(KEY)
        assert [piece async for piece in download] == []
        assert (download.length, download.valid) == (0, False)
        await download.verdict(False)

    await run_with(script, body)


async def test_error_reply_leaves_the_session_usable() -> None:
    async def script(s: Server) -> None:
        await greet(s)
        await s.expect(p2p.CheckPresent(KEY))
        await s.send(b"ERROR proxied special remote reports: nope\n")
        await s.expect(p2p.CheckPresent(KEY))
        await s.send(b"SUCCESS\n")

    async def body(session: P2PSession) -> None:
        with pytest.raises(P2PRefused) as info:
            await session.checkpresent(KEY)
        assert info.value.text == "proxied special remote reports: nope"
        assert not session.dead
        assert await session.checkpresent(KEY) is True

    await run_with(script, body)


async def test_an_abandoned_download_kills_the_session() -> None:
    async def script(s: Server) -> None:
        await greet(s)
        await s.expect(p2p.Get(0, None, KEY))
        await s.send(b"DATA 5\nhe")

    async def body(session: P2PSession) -> None:
        download = await session.get(KEY)
        assert await download.__anext__() == b"he"
        with pytest.raises(P2PSessionError, match="before the data was read"):
            await download.verdict(True)
        with pytest.raises(P2PSessionError, match="abandoned"):
            await session.checkpresent(KEY)
        assert session.dead

    await run_with(script, body)


async def test_a_connection_closed_mid_body_fails_the_download() -> None:
    async def script(s: Server) -> None:
        await greet(s)
        await s.expect(p2p.Get(0, None, KEY))
        await s.send(b"DATA 5\nhe")
        await s.stream.aclose()

    async def body(session: P2PSession) -> None:
        download = await session.get(KEY)
        with pytest.raises(P2PSessionError, match="connection closed"):
            async for _ in download:
                pass
        assert session.dead

    await run_with(script, body)


async def test_a_silent_server_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async def script(s: Server) -> None:
        await greet(s)
        await s.expect(p2p.CheckPresent(KEY))
        assert await s.stream.receive_some(100) == b""  # no answer, until the client gives up

    async def body(session: P2PSession) -> None:
        with pytest.raises(P2PSessionError, match="no data from peer for 7s"):
            await session.checkpresent(KEY)
        assert session.dead

    await run_with(script, body, idle=7)


# --- spawned -----------------------------------------------------------------------------------


async def test_spawn_reports_the_servers_last_words() -> None:
    argv = [
        sys.executable, "-c",
        "import sys; print('noise', file=sys.stderr); "
        "print('git-annex-shell: not configured to proxy for repository x', file=sys.stderr); "
        "sys.exit(1)",
    ]  # fmt: skip
    async with trio.open_nursery() as nursery:
        with pytest.raises(P2PSessionError) as info:
            await P2PSession.spawn(argv, nursery, name="origin-x", expected_uuid=U)
    assert str(info.value) == "origin-x: git-annex-shell: not configured to proxy for repository x"


async def test_spawn_of_a_missing_program() -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(P2PSessionError, match="origin: cannot run /nonexistent/ssh"):
            await P2PSession.spawn(["/nonexistent/ssh"], nursery, name="origin", expected_uuid=U)


async def test_spawned_session_closes_cleanly() -> None:
    # A server that greets, answers one CHECKPRESENT and exits 0 at EOF, like p2pstdio.
    server = (
        "import sys\n"
        f"sys.stdout.write('AUTH-SUCCESS {U}\\n'); sys.stdout.flush()\n"
        "assert sys.stdin.readline() == 'VERSION 4\\n'\n"
        "sys.stdout.write('VERSION 3\\n'); sys.stdout.flush()\n"
        "assert sys.stdin.readline().startswith('CHECKPRESENT ')\n"
        "sys.stdout.write('SUCCESS\\n'); sys.stdout.flush()\n"
        "assert sys.stdin.readline() == ''\n"
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            session = await P2PSession.spawn(
                [sys.executable, "-c", server], nursery, name="n", expected_uuid=U
            )
            assert session.version == 3
            assert await session.checkpresent(KEY) is True
            await session.aclose()
        assert session._process is not None and session._process.returncode == 0


# --- against real servers: git-annex's own git-annex-shell, and ours ----------------------------
#
# The same session, spawned on the same repositories, once with each git-annex-shell. What
# the client observes with git-annex's is the expectation; ours must give the same.

HELLO = b"hello, real server\n"
HELLO_KEY = Key.parse(f"SHA256E-s{len(HELLO)}--{hashlib.sha256(HELLO).hexdigest()}.txt")
ABSENT = Key.parse(f"SHA256E-s3--{hashlib.sha256(b'nah').hexdigest()}.txt")
CLIENT = "c1e70000-0000-4000-8000-0000000000c1"


@dataclass(frozen=True)
class Servers:
    site: Site
    plain: Path
    proxy: Path
    node1: str  # its UUID


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path) -> Servers:
    """A plain repository and a proxy with a node, each holding HELLO (set up by git-annex)."""
    site = Site(make_ssh_env(tmp_path_factory.mktemp("p2pclient"), annex_bin, our_shell))
    plain = site.bare("plain")
    px = site.proxy(nodes=("node1",))
    seed = site.env.root / "hello.txt"
    seed.write_bytes(HELLO)
    for repo in (plain, px.nodes["node1"]):
        site.admin(repo, "git", "annex", "setkey", str(HELLO_KEY), str(seed))
        seed.write_bytes(HELLO)  # setkey moved it in
    return Servers(site, plain, px.gateway, site.uuid(px.nodes["node1"]))


async def observe(servers: Servers, shell: Path, repo: Path, uuid: str | None) -> list[object]:
    """What a client session sees of `shell` serving `repo` (as `--uuid uuid` if given)."""
    argv = [str(shell), "p2pstdio", str(repo), CLIENT]
    expected = uuid or servers.site.uuid(repo)
    if uuid is not None:
        argv += ["--uuid", uuid]
    env = servers.site.env.admin_env()
    # A proxy runs its nodes' git-annex-shell from PATH: the same one.
    env["PATH"] = f"{shell.parent}:{env['PATH']}"
    seen: list[object] = []
    async with trio.open_nursery() as nursery:
        with trio.fail_after(120):
            session = await P2PSession.spawn(
                argv, nursery, name="real", expected_uuid=expected, env=env
            )
            seen.append(("version", session.version))
            seen.append(("present", await session.checkpresent(HELLO_KEY)))
            seen.append(("absent", await session.checkpresent(ABSENT)))
            for key, offset in ((HELLO_KEY, 0), (HELLO_KEY, 7), (ABSENT, 0)):
                download = await session.get(key, offset, "hello.txt")
                data = b"".join([piece async for piece in download])
                seen.append(("get", str(key), offset, download.length, data, download.valid))
                await download.verdict(download.valid is True)
            seen.append(("after", await session.checkpresent(HELLO_KEY)))
            await session.aclose()
    return seen


@pytest.mark.parametrize("through", ["plain", "proxy"])
async def test_session_against_git_annex_shell_and_ours(
    servers: Servers, our_shell: Path, real_annex_shell: Path, through: str
) -> None:
    repo, uuid = (servers.plain, None) if through == "plain" else (servers.proxy, servers.node1)
    theirs = await observe(servers, real_annex_shell, repo, uuid)
    # The content itself, as git-annex's server gave it.
    assert ("get", str(HELLO_KEY), 0, len(HELLO), HELLO, True) in theirs
    assert ("get", str(HELLO_KEY), 7, len(HELLO) - 7, HELLO[7:], True) in theirs
    assert await observe(servers, our_shell, repo, uuid) == theirs
