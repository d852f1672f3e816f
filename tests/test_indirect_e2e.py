"""Indirect uploads to S3 end to end: a client without git-annex, our git-annex-shell as the
proxy over the fake ssh, moto's S3 server (tests/s3server.py) as the storage.

An admin sets up, with the real git-annex, two S3 special remotes in the proxy repository
(`s3`: unencrypted; `s3enc`: encryption=shared chunk=1MiB), marks them proxied and turns
the traffic log on. The S3 credentials are given to the proxy only as an admin gives them
to git-annex: the admin's `initremote` with AWS_* set writes them to the proxy's
`annex/creds/<uuid>`; the proxy's sessions run with no AWS_* variable at all (a wrapper
around our git-annex-shell records each session's environment, and the tests check it).

* `git annexproxy add`, commit, push, `git annexproxy copy --to origin-NAME` from a clone
  on a PATH without git-annex: the traffic log shows a few KiB of protocol and nothing
  written to the storage by the proxy; the bucket holds exactly the objects git-annex
  names (unencrypted: the keys; encrypted: as many `GPGHMACSHA1--` objects as chunks, no
  plaintext, no key names, and the real git-annex with the remote enabled directly finds
  every one: `fsck --from`); another clone with the real git-annex gets every file through
  the proxy, byte for byte.
* The same upload from a real git-annex client (`git annex copy --to` through our proxy):
  the traffic log then shows the whole content through the proxy.

Not repeated here (tests/test_indirect.py, at the protocol level against the same server):
a client that claims an upload it did not make, or uploaded other bytes, gets FAILURE and
nothing is logged (`test_claims_are_checked_before_anything_is_logged`); only requested
extensions are served (`test_only_the_extensions_asked_for_are_served`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, make_ssh_env
from s3server import MotoServer, moto_server
from test_annexcopy import client_env, run

from git_remote_annexproxy import chunks
from git_remote_annexproxy.keys import Key

KEY_ID, SECRET = "AKIDANNEXPROXYE2E", "annexproxy/e2e+secret"
KiB, MiB = 1 << 10, 1 << 20
REMOTES: dict[str, dict[str, str]] = {
    "s3": {"encryption": "none"},
    "s3enc": {"encryption": "shared", "chunk": "1MiB"},
}
# Protocol bytes per uploaded object, at most (PUTINDIRECT with its URL, INDIRECTDONE, RECORD).
PROTOCOL_PER_OBJECT = 4 * KiB

WRAPPER = """#!/bin/sh
# The proxy's git-annex-shell, recording the names of its environment variables first.
env | cut -d= -f1 | tr '\\n' ' ' >> '{log}'
echo >> '{log}'
exec '{shell}' "$@"
"""


def bucket(name: str) -> str:
    return f"e2e-{name}"


@dataclass
class World:
    env: SshEnv  # the real git-annex client's (fake ssh, git-annex on PATH)
    client_env: dict[str, str]  # ours: no git-annex on PATH
    server: MotoServer
    proxy: Path
    uuids: dict[str, str]
    traffic: Path
    envlog: Path
    admin_env: dict[str, str]  # the administrator's, with the S3 credentials
    root: Path

    def objects(self, name: str) -> dict[str, int]:
        objects = self.server.list_objects(bucket(name)).items()
        return {k: v for k, v in objects if k != "annex-uuid"}

    def traffic_lines(self) -> list[dict[str, str]]:
        if not self.traffic.exists():
            return []
        return [dict(w.split("=", 1) for w in ln.split()[1:])
                for ln in self.traffic.read_text().splitlines()]  # fmt: skip

    def admin(self, cwd: Path, *args: str) -> str:
        return run(cwd, self.admin_env, *args).stdout

    def session_variables(self) -> list[set[str]]:
        return [set(line.split()) for line in self.envlog.read_text().splitlines()]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path,
    moto: MotoServer,
) -> Iterator[World]:  # fmt: skip
    root = tmp_path_factory.mktemp("indirect-e2e")
    envlog = root / "session-env.log"
    wrapper = root / "wrapper" / "git-annex-shell"
    wrapper.parent.mkdir()
    wrapper.write_text(WRAPPER.format(log=envlog, shell=our_shell))
    wrapper.chmod(0o755)
    env = make_ssh_env(root / "ssh", annex_bin, wrapper)
    gnupghome = root / "gnupg"
    gnupghome.mkdir(mode=0o700)
    env["GNUPGHOME"] = str(gnupghome)
    env["FAKESSH_PASSENV"] = "GNUPGHOME"  # and nothing else: no AWS_* reaches the proxy
    for name in list(env):
        if name.startswith("AWS_"):
            del env[name]
    proxy = env.make_server_repo("proxy.git", "proxy")
    admin_env = {**env.admin_env(), "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    traffic = root / "traffic.log"
    w = World(env, client_env(env), moto, proxy, {}, traffic, envlog, admin_env, root)

    w.admin(proxy, "git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1")
    w.admin(proxy, "git", "config", "annexproxy.trafficlog", str(traffic))
    for name, settings in REMOTES.items():
        w.admin(proxy, "git", "annex", "initremote", "-q", name, "type=S3", "host=127.0.0.1",
                f"port={moto.port}", "protocol=http", "requeststyle=path", "signature=v4",
                "region=us-east-1", f"bucket={bucket(name)}",
                *[f"{k}={v}" for k, v in settings.items()])  # fmt: skip
        w.admin(proxy, "git", "config", f"remote.{name}.annex-proxy", "true")
        w.uuids[name] = w.admin(proxy, "git", "config", f"remote.{name}.annex-uuid").strip()
    w.admin(proxy, "git", "annex", "updateproxy", "-q")
    # A first commit, as any project has.
    seed = root / "seed"
    w.admin(root, "git", "clone", "-q", str(proxy), str(seed))
    (seed / "README").write_text("data\n")
    w.admin(seed, "git", "add", "README")
    w.admin(seed, "git", "commit", "-q", "-m", "start")
    w.admin(seed, "git", "push", "-q", "origin", "main")
    yield w
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(gnupghome)},
                   check=False, capture_output=True, timeout=60)  # fmt: skip


def test_the_proxy_has_the_credentials_only_in_its_creds_files(world: World) -> None:
    """Where the proxy's credentials are: git-annex's creds file of each remote, nowhere in
    git (remote.log has no s3creds=), and not in the environment of any proxy session
    (checked again after each test below)."""
    remote_log = world.admin(world.proxy, "git", "show", "git-annex:remote.log")
    assert "s3creds" not in remote_log and KEY_ID not in remote_log
    for name in REMOTES:
        creds = world.proxy / "annex" / "creds" / world.uuids[name]
        assert creds.read_text().split("\n")[:2] == [KEY_ID, SECRET], name
    assert not any(k.startswith("AWS_") for k in world.env)


def write_files(top: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(data)


def expected_object_count(name: str, keys: list[Key]) -> int:
    chunk = REMOTES[name].get("chunk")
    size = chunks.parse_size(chunk) if chunk else None
    return sum(chunks.chunk_count(k.size or 0, size) if size else 1 for k in keys)


def assert_no_aws_in_sessions(world: World, since: int) -> None:
    sessions = world.session_variables()[since:]
    assert sessions, "no proxy session was recorded"
    for variables in sessions:
        assert not {v for v in variables if v.startswith("AWS_")}, variables


def lookup_keys(cwd: Path, files: dict[str, bytes]) -> dict[str, Key]:
    """Each file's key, from its symlink (as git-annex names it)."""
    return {n: Key.parse(os.path.basename(os.readlink(cwd / n))) for n in files}


@pytest.mark.parametrize("name", sorted(REMOTES))
def test_indirect_copy_from_a_client_without_git_annex(world: World, name: str) -> None:
    w, env = world, world.client_env
    files = {
        f"{name}/big.bin": os.urandom(2 * MiB + 12_345),
        f"{name}/small.txt": f"a small file for {name}\n".encode(),
        f"{name}/sub dir/mid 50%.dat": os.urandom(300_000),
    }
    client = w.root / f"client-{name}"
    run(w.root, env, "git", "clone", "-q", f"annexproxy::ssh://localhost{w.proxy}", str(client))
    write_files(client, files)
    added = run(client, env, "git", "annexproxy", "add", name)
    assert set(added.stdout.splitlines()) == {f"add {n} ok" for n in files}
    run(client, env, "git", "commit", "-q", "-m", f"files for {name}")
    run(client, env, "git", "push", "-q", "origin", "main")
    info = run(client, env, "git", "annexproxy", "info", "--json").stdout
    repos = {r["name"]: r for r in map(json.loads, info.splitlines())}
    target = f"origin-{name}"
    assert repos[target]["uuid"] == w.uuids[name]
    keys = lookup_keys(client, files)

    traffic_before, sessions_before = len(w.traffic_lines()), len(w.session_variables())
    proc = run(client, env, "git", "annexproxy", "copy", "--to", target, name)
    assert set(proc.stdout.splitlines()) == {f"copy {n} (to {target}) ok" for n in files}
    # The bytes sent are the objects': for s3enc, the ciphertext (a little more).
    m = re.fullmatch(r"copy: 3 files, (\d+) bytes, 0 failed", proc.stderr.splitlines()[-1])
    assert m is not None, proc.stderr
    size, sent = sum(map(len, files.values())), int(m.group(1))
    assert sent == size if REMOTES[name]["encryption"] == "none" else size < sent < size + 8 * KiB
    assert "falling back" not in proc.stderr  # the proxy offered indirect uploads

    # The content did not pass through the client's connection: a few KiB of protocol
    # per object, and the proxy wrote nothing to the storage. It read every object back
    # once, to prove the key before logging it (RECORD; moto's checksums are the client's
    # word, and the proxy takes no storage's word for content).
    objects = w.objects(name)
    (line,) = w.traffic_lines()[traffic_before:]  # one pooled session
    assert line["uuid"] == w.uuids[name]
    assert int(line["client_in"]) <= PROTOCOL_PER_OBJECT * len(objects)
    assert int(line["client_in"]) < size // 100
    assert int(line["storage_written"]) == 0
    assert int(line["storage_read"]) == sum(objects.values())
    assert_no_aws_in_sessions(w, sessions_before)

    # The bucket holds exactly the objects git-annex names.
    assert len(objects) == expected_object_count(name, list(keys.values()))
    if REMOTES[name]["encryption"] == "none":
        assert set(objects) == {str(k) for k in keys.values()}
        assert all(objects[str(k)] == len(files[n]) for n, k in keys.items())
    else:
        probes = [
            data[i : i + 32] for data in files.values() for i in range(0, len(data) - 32, 4096)
        ]
        for obj in objects:
            assert obj.startswith("GPGHMACSHA1--"), obj
            assert not any(k.name.split(".")[0] in obj for k in keys.values()), obj
            body = w.server.get_object(bucket(name), obj)
            assert not any(p in body for p in probes), f"plaintext in {obj}"
            assert not any(str(k).encode() in body for k in keys.values()), f"key in {obj}"
        # Real git-annex with the remote enabled directly (no proxy) finds and checks
        # every object of every key under its own names.
        direct = w.root / f"direct-{name}"
        w.admin(w.root, "git", "clone", "-q", str(w.proxy), str(direct))
        w.admin(direct, "git", "annex", "init", "-q", "direct")
        w.admin(direct, "git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1")
        w.admin(direct, "git", "annex", "enableremote", "-q", name)
        w.admin(direct, "git", "config", f"remote.{name}.annex-verified", "verified")
        w.admin(direct, "git", "annex", "fsck", "-q", "--from", name, name)

    # Another clone, with the real git-annex, gets every file through the proxy.
    other = w.root / f"other-{name}"
    run(w.root, dict(w.env), "git", "clone", "-q", f"localhost:{w.proxy}", str(other))
    run(other, dict(w.env), "git", "annex", "init", "-q", "other")
    run(other, dict(w.env), "git", "annex", "get", "-q", "--from", target, name)
    for n, data in files.items():
        assert (other / n).read_bytes() == data, n
    assert_no_aws_in_sessions(w, sessions_before)


@pytest.mark.parametrize("name", sorted(REMOTES))
def test_direct_copy_from_git_annex_goes_through_the_proxy(world: World, name: str) -> None:
    """The real git-annex client knows no extension: its PUT carries the whole content
    through the proxy, which encrypts (s3enc) and writes it to the storage itself."""
    w, env = world, dict(world.env)
    files = {f"annex-{name}/big.bin": os.urandom(2 * MiB + 4321)}
    size = sum(map(len, files.values()))
    clone = w.root / f"annex-client-{name}"
    run(w.root, env, "git", "clone", "-q", f"localhost:{w.proxy}", str(clone))
    run(clone, env, "git", "annex", "init", "-q", "annex-client")
    write_files(clone, files)
    run(clone, env, "git", "annex", "add", "-q", f"annex-{name}")
    keys = lookup_keys(clone, files)
    before, sessions_before = len(w.traffic_lines()), len(w.session_variables())
    objects_before = set(w.objects(name))
    run(clone, env, "git", "annex", "copy", "-q", "--to", f"origin-{name}", f"annex-{name}")
    lines = [ln for ln in w.traffic_lines()[before:] if ln["uuid"] == w.uuids[name]]
    assert len(lines) == 1, lines
    (line,) = lines
    assert size <= int(line["client_in"]) < size + 64 * KiB
    written = int(line["storage_written"])
    if REMOTES[name]["encryption"] == "none":
        assert written == size
    else:
        assert size < written < size + 64 * KiB  # gpg's framing around each chunk
    new = set(w.objects(name)) - objects_before
    assert len(new) == expected_object_count(name, list(keys.values()))
    assert_no_aws_in_sessions(w, sessions_before)
