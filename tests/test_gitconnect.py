"""CONNECT in p2pstdio (shell/gitconnect.py, shell/pushguard.py): the server's side of
git-remote-annexproxy, driven byte by byte with tests/p2pdriver.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import SshEnv, SshEnvFactory
from hypothesis import given
from hypothesis import strategies as st
from p2pdriver import ShellSession, p2pstdio_argv

from shell.pushguard import PushRefused, ReceivePackGuard

ZERO = "0" * 40
READONLY_DENIED = "ERROR this repository is read-only; write access denied"


def pkt(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return b"%04x" % (len(data) + 4) + data


def session(env: SshEnv, repo: Path, our_shell: Path, **server_env: str) -> ShellSession:
    values = dict(env.admin_env(), **server_env)
    return ShellSession(p2pstdio_argv(our_shell, repo), env=values, cwd=env.server_home)


def read_until_connectdone(s: ShellSession) -> tuple[bytes, int]:
    """Everything the service said, and the CONNECTDONE code."""
    out = bytearray()
    while True:
        line = s.readline()
        if line.startswith("CONNECTDONE "):
            return bytes(out), int(line.split()[1])
        assert line.startswith("DATA "), line
        out += s.read_exact(int(line[5:]))


def read_advertisement(s: ShellSession) -> bytes:
    """DATA frames up to the end of git's ref advertisement (a flush-pkt)."""
    out = bytearray()
    while not out.endswith(b"0000"):
        out += s.read_data()
    return bytes(out)


@pytest.fixture
def env(ssh_env: SshEnvFactory) -> SshEnv:
    return ssh_env()


@pytest.fixture
def repo(env: SshEnv) -> Path:
    repo = env.make_server_repo("repo.git")
    seed = env.root / "seed"
    env.run(["git", "clone", "-q", str(repo), str(seed)], admin=True)
    (seed / "a").write_text("a\n")
    env.run(["git", "add", "a"], cwd=seed, admin=True)
    env.run(["git", "commit", "-q", "-m", "a"], cwd=seed, admin=True)
    env.run(["git", "push", "-q", "origin", "main"], cwd=seed, admin=True)
    return repo


def ref(env: SshEnv, repo: Path, name: str) -> str | None:
    proc = env.run(["git", "rev-parse", "-q", "--verify", name], cwd=repo, admin=True, check=False)
    return proc.stdout.strip() or None


def test_upload_pack_then_connectdone(env: SshEnv, repo: Path, our_shell: Path) -> None:
    with session(env, repo, our_shell) as s:
        s.handshake()
        s.send("CONNECT git-upload-pack")
        advert = read_advertisement(s)
        assert f"{ref(env, repo, 'main')} refs/heads/main".encode() in advert
        s.send_data(b"0000")  # no wants: upload-pack is done
        rest, code = read_until_connectdone(s)
        assert (rest, code) == (b"", 0)
        assert s.at_eof()  # the session ends after CONNECTDONE
        assert s.finish().code == 0


def test_v2_serves_until_the_end_of_input_marker(env: SshEnv, repo: Path, our_shell: Path) -> None:
    with session(env, repo, our_shell, GIT_PROTOCOL="version=2") as s:
        s.handshake()
        s.send("CONNECT git-upload-pack")
        assert read_advertisement(s).startswith(pkt("version 2\n"))
        s.send_data(pkt("command=ls-refs\n") + b"0000")
        refs = read_advertisement(s)
        assert b" refs/heads/main\n" in refs
        # v2 waits for another command: nothing more until the client's input ends.
        with pytest.raises(TimeoutError):
            s.readline(timeout=0.5)
        s.send_raw(b"DATA 0\n")
        assert read_until_connectdone(s) == (b"", 0)
        assert s.finish().code == 0


@pytest.mark.parametrize("variable", ["GIT_ANNEX_SHELL_READONLY", "GIT_ANNEX_SHELL_APPENDONLY"])
def test_restricted_push_is_refused_and_the_session_goes_on(
    env: SshEnv, repo: Path, our_shell: Path, variable: str
) -> None:
    with session(env, repo, our_shell, **{variable: "1"}) as s:
        s.handshake()
        assert s.request("CONNECT git-receive-pack") == READONLY_DENIED
        assert s.request("CHECKPRESENT SHA256E-s1--" + "0" * 64) == "FAILURE"
        s.send("CONNECT git-upload-pack")  # fetching stays allowed
        assert b"refs/heads/main" in read_advertisement(s)
        s.send_data(b"0000")
        assert read_until_connectdone(s)[1] == 0


def test_limited_refuses_git(env: SshEnv, repo: Path, our_shell: Path) -> None:
    with session(env, repo, our_shell, GIT_ANNEX_SHELL_LIMITED="1") as s:
        s.handshake()
        for service in ("git-upload-pack", "git-receive-pack"):
            assert s.request(f"CONNECT {service}") == (
                "ERROR Action blocked by GIT_ANNEX_SHELL_LIMITED"
            )
        assert s.finish().code == 0


def test_unknown_service_is_not_run(env: SshEnv, repo: Path, our_shell: Path) -> None:
    with session(env, repo, our_shell) as s:
        s.handshake()
        assert s.request("CONNECT git-upload-archive") == "ERROR unknown command"
        assert s.request("CONNECT git-upload-pack --help") == "ERROR unknown command"


def test_option_like_ref_is_refused_before_git_sees_it(
    env: SshEnv, repo: Path, our_shell: Path
) -> None:
    head = ref(env, repo, "main")
    with session(env, repo, our_shell) as s:
        s.handshake()
        s.send("CONNECT git-receive-pack")
        read_advertisement(s)
        s.send_data(pkt(f"{ZERO} {head} refs/heads/-x\0report-status\n") + b"0000")
        _, code = read_until_connectdone(s)
        assert code != 0
        assert "looks like an option: refs/heads/-x" in s.finish().stderr
    assert ref(env, repo, "refs/heads/-x") is None


def test_malformed_pack_fails_and_leaves_the_repository_intact(
    env: SshEnv, repo: Path, our_shell: Path
) -> None:
    with session(env, repo, our_shell) as s:
        s.handshake()
        s.send("CONNECT git-receive-pack")
        read_advertisement(s)
        commands = pkt(f"{ZERO} {'1' * 40} refs/heads/evil\0report-status side-band-64k\n")
        s.send_data(commands + b"0000" + b"PACK\0\0\0\2\0\0\0\1garbage, not a pack")
        s.send_raw(b"DATA 0\n")
        report, code = read_until_connectdone(s)
        # receive-pack itself exits 0 here; its report says otherwise, and so do we.
        assert b"unpack " in report and b"unpack ok" not in report
        assert code != 0
    assert ref(env, repo, "refs/heads/evil") is None
    env.run(["git", "fsck", "--no-progress"], cwd=repo, admin=True)


def test_idle_relay_is_cut_off(env: SshEnv, repo: Path, our_shell: Path) -> None:
    env.run(["git", "config", "annexproxy.idletimeout", "1"], cwd=repo, admin=True)
    with session(env, repo, our_shell) as s:
        s.handshake()
        s.send("CONNECT git-upload-pack")
        read_advertisement(s)
        start = time.monotonic()
        assert s.at_eof(timeout=15)  # upload-pack waits for wants; nobody sends any
        result = s.finish(timeout=15)
        assert time.monotonic() - start < 10
        assert result.code == 1 and "idle" in result.stderr


def test_client_gone_mid_relay_ends_the_session(env: SshEnv, repo: Path, our_shell: Path) -> None:
    with session(env, repo, our_shell) as s:
        s.handshake()
        s.send("CONNECT git-receive-pack")
        s.send_raw(b"DATA 4\n00")  # cut inside the command list
        s.close_stdin()
        assert s.wait(timeout=15) == 0
    assert ref(env, repo, "main") is not None


def test_proxy_serves_git_from_its_own_repository(env: SshEnv, our_shell: Path) -> None:
    proxy = env.make_server_repo("proxy.git", "proxy")
    node1 = env.make_server_repo("node1.git", "node1")
    env.run(["git", "remote", "add", "node1", str(node1)], cwd=proxy, admin=True)
    env.run(["git", "annex", "sync", "-q", "--no-content", "node1"], cwd=proxy, admin=True)
    env.run(["git", "config", "remote.node1.annex-proxy", "true"], cwd=proxy, admin=True)
    env.run(["git", "annex", "updateproxy"], cwd=proxy, admin=True)
    node_uuid = env.run(["git", "config", "annex.uuid"], cwd=node1, admin=True).stdout.strip()
    argv = p2pstdio_argv(our_shell, proxy, uuid=node_uuid)
    with ShellSession(argv, env=env.admin_env(), cwd=env.server_home) as s:
        assert s.handshake() == node_uuid
        s.send("CONNECT git-upload-pack")
        advert = read_advertisement(s)
        assert f"{ref(env, proxy, 'git-annex')} refs/heads/git-annex".encode() in advert
        s.send_data(b"0000")
        assert read_until_connectdone(s)[1] == 0


# --- the push guard alone (sans-IO) ----------------------------------------------------------

SHA = "ab" * 20
COMMANDS = pkt(f"{ZERO} {SHA} refs/heads/main\0report-status side-band-64k\n") + pkt(
    f"{SHA} {ZERO} refs/tags/v1\n"
)
PACK = b"0000PACK\0\0\0\2 this is not pkt-line framed \xff\xff"


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30))
def test_guard_holds_commands_until_flush_however_split(cuts: list[int]) -> None:
    stream = COMMANDS + PACK
    guard = ReceivePackGuard()
    out, pos = bytearray(), 0
    for cut in [*cuts, len(stream)]:
        piece = stream[pos : pos + cut]
        pos += len(piece)
        forwarded = guard.from_client(piece)
        out += forwarded
        if pos < len(COMMANDS) + 4:
            assert forwarded == b""
    assert bytes(out) == stream
    assert guard.caps == {b"report-status", b"side-band-64k"}


@pytest.mark.parametrize(
    "name", ["refs/heads/-x", "refs/heads/a/-b", "-refs/heads/x", "refs/tags/--upload-pack=x"]
)
def test_guard_refuses_option_like_names(name: str) -> None:
    with pytest.raises(PushRefused, match="looks like an option"):
        ReceivePackGuard().from_client(pkt(f"{ZERO} {SHA} {name}\0report-status\n") + b"0000")


@pytest.mark.parametrize("bad", [b"zzzz", b"0003", b"fff4" + b"x" * 70000])
def test_guard_refuses_unframed_commands(bad: bytes) -> None:
    with pytest.raises(PushRefused, match="malformed"):
        ReceivePackGuard().from_client(bad)


def test_guard_reads_the_framing_as_git_does() -> None:
    """The guard parses exactly as receive-pack (git_remote_annexproxy/pktline.py): upper-case
    length digits are a command, not a malformed list; an empty `0004` line does not end the
    command list, so a ref name after it is still checked. Both failed before pktline.py
    (the first was refused as malformed, the second passed the option-like name through)."""
    line = pkt(f"{ZERO} {SHA} refs/heads/{'m' * 14}\0report-status\n")
    assert line[:4].upper() != line[:4]
    upper = line[:4].upper() + line[4:] + b"0000"
    assert ReceivePackGuard().from_client(upper) == upper
    evil = b"0004" + pkt(f"{ZERO} {SHA} refs/heads/-x\n") + b"0000"
    with pytest.raises(PushRefused, match="looks like an option"):
        ReceivePackGuard().from_client(evil)


ADVERT = pkt(f"{SHA} refs/heads/main\0report-status\n") + b"0000"


@pytest.mark.parametrize(
    ("report", "failed"),
    [
        ([b"unpack ok\n", b"ok refs/heads/main\n"], False),
        ([b"unpack ok\n", b"ng refs/heads/main non-fast-forward\n"], True),
        ([b"unpack index-pack abnormal exit\n", b"ng refs/heads/main unpacker error\n"], True),
    ],
)
@pytest.mark.parametrize("sideband", [False, True])
def test_guard_reads_the_report(report: list[bytes], failed: bool, sideband: bool) -> None:
    guard = ReceivePackGuard()
    caps = "report-status side-band-64k" if sideband else "report-status"
    guard.from_client(pkt(f"{ZERO} {SHA} refs/heads/main\0{caps}\n") + b"0000")
    inner = b"".join(pkt(line) for line in report) + b"0000"
    if sideband:
        # Progress on band 2, the report on band 1, split across two band packets.
        out = pkt(b"\2unpacking...\n") + pkt(b"\1" + inner[:7]) + pkt(b"\1" + inner[7:])
        out += b"0000"
    else:
        out = inner
    stream = ADVERT + out
    for i in range(len(stream)):  # one byte at a time
        guard.from_service(stream[i : i + 1])
    assert guard.failed is failed
