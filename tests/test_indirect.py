"""Indirect uploads (issue 6): the client PUTs objects straight to S3 at URLs the proxy
presigned, then the proxy checks the stored object before it logs anything.

Against moto's standalone S3 server (tests/s3server.py). The proxy's traffic log shows the
content did not pass through it; real git-annex with the remote enabled directly gets
what was uploaded that way. A client that claims an upload it did not make, or uploaded
something else, gets FAILURE and nothing is logged (moto stores whatever checksum the
client claims, so the size check is what catches a wrong body here; real S3 also refuses
a body whose SHA-256 is not the signed x-amz-checksum-sha256).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import SshEnv, make_ssh_env
from p2pdriver import CLIENT_UUID, ShellSession, p2pstdio_argv
from s3server import MotoServer, moto_server

from git_remote_annexproxy import chunks, p2p
from git_remote_annexproxy.annexlog import location_log_path
from git_remote_annexproxy.discovery import BranchLogs
from git_remote_annexproxy.httpput import http_put
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.objectclient import negotiate, special_target, upload_key
from git_remote_annexproxy.p2pclient import P2PSession

KEY_ID, SECRET = "AKIDANNEXPROXYTEST", "annexproxy/test+secret"
KiB = 1024
REMOTES = {
    "s3chunk": {"encryption": "none", "chunk": "64KiB", "fileprefix": "annex/"},
    "s3enc": {"encryption": "shared", "chunk": "100KiB"},
    "s3flat": {"encryption": "none"},
}


@dataclass
class World:
    env: SshEnv
    server: MotoServer
    proxy: Path
    client: Path
    direct: Path
    uuids: dict[str, str]
    traffic: Path
    admin_env: dict[str, str]  # the server administrator's, with the S3 credentials

    def objects(self, name: str) -> dict[str, int]:
        prefix = REMOTES[name].get("fileprefix", "")
        return {k: v for k, v in self.server.list_objects(name).items()
                if k != prefix + "annex-uuid"}  # fmt: skip

    def proxy_branch_file(self, path: str) -> bytes | None:
        proc = subprocess.run(
            ["git", "show", f"git-annex:{path}"], cwd=self.proxy, env=self.admin_env,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None

    def argv(self, name: str) -> list[str]:
        words = ["git-annex-shell", "p2pstdio", str(self.proxy), CLIENT_UUID]
        command = " ".join([*map(shlex.quote, words), "--uuid", self.uuids[name]])
        return [str(self.env.bin_dir / "ssh"), "localhost", command]

    def shell(self, name: str) -> ShellSession:
        argv = p2pstdio_argv(self.env.srvbin_dir / "git-annex-shell", self.proxy,
                             uuid=self.uuids[name])  # fmt: skip
        return ShellSession(argv, env=self.admin_env, cwd=self.proxy, timeout=120)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path,
    moto: MotoServer,
) -> Iterator[World]:  # fmt: skip
    root = tmp_path_factory.mktemp("indirect")
    env = make_ssh_env(root / "ssh", annex_bin, our_shell)
    gnupghome = root / "gnupg"
    gnupghome.mkdir(mode=0o700)
    env["GNUPGHOME"] = str(gnupghome)
    # Only the proxy (and the admin) hold the S3 credentials; the client never does.
    server_env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    env = env.with_server(**server_env, GNUPGHOME=str(gnupghome))
    proxy = env.make_server_repo("proxy.git", "proxy")
    admin_env = {**env.admin_env(), **server_env}

    def admin(args: list[str], cwd: Path) -> str:
        return subprocess.run(args, cwd=cwd, env=admin_env, check=True, capture_output=True,
                              text=True, timeout=300).stdout  # fmt: skip

    allow = ["git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1"]
    admin(allow, proxy)
    traffic = root / "traffic.log"
    admin(["git", "config", "annexproxy.trafficlog", str(traffic)], proxy)
    for name, settings in REMOTES.items():
        args = ["git", "annex", "initremote", "-q", name, "type=S3", "host=127.0.0.1",
                f"port={moto.port}", "protocol=http", "requeststyle=path", "signature=v4",
                "region=us-east-1", f"bucket={name}"]  # fmt: skip
        args += [f"{k}={v}" for k, v in settings.items()]
        admin(args, proxy)
        admin(["git", "config", f"remote.{name}.annex-proxy", "true"], proxy)
    admin(["git", "annex", "updateproxy", "-q"], proxy)
    uuids = {name: admin(["git", "config", f"remote.{name}.annex-uuid"], proxy).strip()
             for name in REMOTES}  # fmt: skip
    client = root / "client"
    env.run(["git", "clone", "-q", f"localhost:{proxy}", str(client)])
    direct = root / "direct"
    admin(["git", "clone", "-q", str(proxy), str(direct)], root)
    admin(["git", "annex", "init", "-q", "direct"], direct)
    admin(allow, direct)
    for name in REMOTES:
        admin(["git", "annex", "enableremote", "-q", name], direct)
        admin(["git", "config", f"remote.{name}.annex-verified", "verified"], direct)
    yield World(env, moto, proxy, client, direct, uuids, traffic, admin_env)
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(gnupghome)},
                   check=False, capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture(autouse=True)
def no_client_credentials(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GNUPGHOME", world.env["GNUPGHOME"])


def make_key(content: bytes) -> Key:
    return Key.parse(f"SHA256E-s{len(content)}--{hashlib.sha256(content).hexdigest()}.bin")


def traffic_lines(world: World) -> list[dict[str, str]]:
    if not world.traffic.exists():
        return []
    return [dict(w.split("=", 1) for w in ln.split()[1:])
            for ln in world.traffic.read_text().splitlines()]  # fmt: skip


async def client_upload(world: World, name: str, key: Key, content: bytes) -> str:
    path = world.client / f"in-{name}-{key.name[:12]}.bin"
    path.write_bytes(content)
    said: list[str] = []
    async with trio.open_nursery() as nursery:

        async def spawn() -> P2PSession:
            return await P2PSession.spawn(world.argv(name), nursery, name=name,
                                          expected_uuid=world.uuids[name], env=dict(world.env),
                                          idle_timeout=120)  # fmt: skip

        session, agreed = await negotiate(await spawn(), spawn, said.append)
        assert agreed == {p2p.EXT_OBJECTS, p2p.EXT_INDIRECT} and not said
        target = await special_target(BranchLogs(world.client / ".git"), world.uuids[name], name)
        assert target is not None
        annexdir = world.client / ".git" / "annex"
        with path.open("rb") as source:
            result = await upload_key(
                session, target, key, source, agreed=agreed, annexdir=annexdir
            )
        await session.aclose()
    return result


@pytest.mark.parametrize("name", sorted(REMOTES))
async def test_indirect_upload_bypasses_the_proxy(world: World, name: str) -> None:
    content = os.urandom(230 * KiB + 7)
    key = make_key(content)
    before = len(traffic_lines(world))
    assert await client_upload(world, name, key, content) == "stored"
    chunk = REMOTES[name].get("chunk")
    size = chunks.parse_size(chunk) if chunk else None
    assert len(world.objects(name)) >= (chunks.chunk_count(len(content), size) if size else 1)
    assert world.uuids[name].encode() in (world.proxy_branch_file(location_log_path(key)) or b"")
    # The content never went through the proxy: a few lines of protocol only.
    (line,) = traffic_lines(world)[before:]
    assert line["uuid"] == world.uuids[name]
    assert int(line["client_in"]) < 16 * KiB and int(line["client_out"]) < 16 * KiB
    assert int(line["storage_written"]) == 0
    # Real git-annex with the remote enabled directly gets it.
    env = world.admin_env
    for args in (["git", "fetch", "-q", "origin"], ["git", "annex", "merge", "-q"],
                 ["git", "annex", "get", "-q", "--key", str(key), "--from", name]):  # fmt: skip
        subprocess.run(args, cwd=world.direct, env=env, check=True, capture_output=True,
                       timeout=300)  # fmt: skip
    where = subprocess.run(
        ["git", "annex", "contentlocation", str(key)], cwd=world.direct, env=env, check=True,
        capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert (world.direct / where).read_bytes() == content


async def test_objects_of_a_key_without_size_go_through_the_proxy(world: World) -> None:
    """No URL binds their length (the proxy refuses to presign them): the client sends
    those objects with PUTOBJECT, which the proxy checks as they pass."""
    content = os.urandom(100 * KiB)
    key = Key.parse(f"SHA256E--{hashlib.sha256(content).hexdigest()}.bin")
    before = len(traffic_lines(world))
    assert await client_upload(world, "s3chunk", key, content) == "stored"
    (line,) = traffic_lines(world)[before:]
    assert int(line["client_in"]) > len(content) and int(line["storage_written"]) == len(content)
    assert world.uuids["s3chunk"].encode() in (
        world.proxy_branch_file(location_log_path(key)) or b"")  # fmt: skip
    log = world.proxy_branch_file(chunks.chunk_log_path(key))
    assert chunks.logged_chunkings(log, world.uuids["s3chunk"]) == [(64 * KiB, 2)]


def presign(s: ShellSession, name: str, size: int, sha: str) -> p2p.Indirect:
    s.send(f"PUTINDIRECT {name} {size} {sha}")
    line = s.readline()
    conn = p2p.P2PConnection()
    conn.receive_data(line.encode() + b"\n")
    reply = conn.next_event()
    assert isinstance(reply, p2p.Indirect), line
    return reply


def test_claims_are_checked_before_anything_is_logged(world: World, tmp_path: Path) -> None:
    key = make_key(b"claimed")
    name = str(key)  # s3flat: an unencrypted, unchunked object is named by its key
    sha = hashlib.sha256(b"claimed").hexdigest()
    with world.shell("s3flat") as s:
        s.handshake()
        assert s.request("EXTENSIONS annexproxy-indirect annexproxy-objects") == (
            "EXTENSIONS annexproxy-objects annexproxy-indirect"
        )
        assert s.request(f"INDIRECTDONE {name}").startswith("ERROR")  # never presigned
        reply = presign(s, name, 7, sha)
        url = urllib.parse.urlsplit(reply.url)
        query = dict(urllib.parse.parse_qsl(url.query))
        # Scoped to this one object, and short-lived.
        assert url.path == f"/s3flat/{urllib.parse.quote(name)}" or url.path.endswith(name)
        assert query["X-Amz-Expires"] == "900"
        # Claimed, but not uploaded: FAILURE, and RECORD finds nothing.
        assert s.request(f"INDIRECTDONE {name}") == "FAILURE"
        s.send(f"RECORD 0 1 {key}")
        s.send_data((name + "\n").encode())
        assert s.readline() == "FAILURE"
        # Uploaded, but not what was presigned (5 bytes for 7): FAILURE, and removed.
        reply = presign(s, name, 7, sha)
        body = tmp_path / "body"
        body.write_bytes(b"other")
        headers = {k: v for k, v in reply.headers if k.lower() != "content-length"}
        fd = os.open(body, os.O_RDONLY)
        try:
            trio.run(http_put, reply.url, headers, fd, 0, 5)
        finally:
            os.close(fd)
        assert name in world.server.list_objects("s3flat")
        assert s.request(f"INDIRECTDONE {name}") == "FAILURE"
        assert name not in world.server.list_objects("s3flat")
        s.send(f"RECORD 0 1 {key}")
        s.send_data((name + "\n").encode())
        assert s.readline() == "FAILURE"
    assert world.proxy_branch_file(location_log_path(key)) is None


def test_only_the_extensions_asked_for_are_served(world: World) -> None:
    with world.shell("s3enc") as s:
        s.handshake()
        # Extensions are only what was asked for.
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert s.request("PUTINDIRECT GPGHMACSHA1--" + "a" * 40 + " 1 " + "0" * 64) == (
            "ERROR unknown command"
        )
