"""Client-side encryption through the proxy (issue 6): the `annexproxy-objects` extension.

Our client chunks and encrypts in git-annex's format and sends finished objects; the proxy
stores them as they are, then proves each RECORD by reading the objects back, decrypting
them and verifying the key before it logs anything. So the proxy's gpg (a wrapper that
logs every run) only ever decrypts, and it needs the cipher: a shared one is in
remote.log; for hybrid and pubkey the proxy's own keyring is empty, and only sessions
given the secret key (``keyring=True``) can upload there. Without it (and always for
sharedpubkey) uploads are refused and downloads still served. Real git-annex, with the
remotes enabled directly, reads what we stored, and our client reads what it stored.
Against real git-annex-shell (plain, and as a proxy) the client falls back after one
EXTENSIONS line and sends nothing unknown after it.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from clusterbuild import real_shell
from conftest import SshEnv, make_ssh_env
from p2pdriver import CLIENT_UUID, ShellSession, p2pstdio_argv
from test_special import store_files

from git_remote_annexproxy import chunks, p2p
from git_remote_annexproxy.annexlog import location_log_path
from git_remote_annexproxy.crypto import Cipher, encrypted_key, stored_cipher
from git_remote_annexproxy.discovery import BranchLogs
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.objectclient import (
    ObjectError,
    download_key,
    negotiate,
    special_target,
    upload_key,
)
from git_remote_annexproxy.p2pclient import P2PRefused, P2PSession
from git_remote_annexproxy.repologs import parse_remote_log
from git_remote_annexproxy.specialformat import object_key, plan

KiB = 1024
# name: (encryption, chunk)
REMOTES = {
    "shchunk": ("shared", "64KiB"),
    "hychunk": ("hybrid", "100KiB"),
    "shflat": ("shared", None),
    "plainchunk": ("none", "64KiB"),
    "pkchunk": ("pubkey", "64KiB"),
    "spkflat": ("sharedpubkey", None),
}
ENCRYPTED = [n for n, (e, _) in REMOTES.items() if e != "none"]
# Where the proxy needs the secret key to read back what a client stores.
NEEDS_KEY = [n for n, (e, _) in REMOTES.items() if e in ("hybrid", "pubkey")]
# Where the proxy never can (content encrypted to public keys, no secret key needed to
# write): uploads refused.
UNPROVABLE_REMOTES = [n for n, (e, _) in REMOTES.items() if e == "sharedpubkey"]


@dataclass
class World:
    env: SshEnv
    proxy: Path
    client: Path
    direct: Path
    stores: dict[str, Path]
    uuids: dict[str, str]
    gpg_log: Path
    traffic: Path
    keyring: Path  # the client's GNUPGHOME, with the secret key; the proxy's is empty

    def admin(self, *args: str, cwd: Path, check: bool = True) -> str:
        return self.env.run(list(args), cwd=cwd, admin=True, check=check).stdout

    def proxy_branch_file(self, path: str) -> bytes | None:
        proc = subprocess.run(
            ["git", "show", f"git-annex:{path}"], cwd=self.proxy, env=self.env.admin_env(),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None

    def client_fetch(self) -> None:
        self.env.run(["git", "fetch", "-q", "origin"], cwd=self.client)

    def logs(self) -> BranchLogs:
        return BranchLogs(self.client / ".git")

    def argv(self, name: str) -> list[str]:
        words = ["p2pstdio", str(self.proxy), CLIENT_UUID]
        command = " ".join(["git-annex-shell", *map(shlex.quote, words), "--uuid",
                            self.uuids[name]])  # fmt: skip
        return [str(self.env.bin_dir / "ssh"), "localhost", command]

    async def session(
        self, name: str, nursery: trio.Nursery, *, keyring: bool = False
    ) -> P2PSession:
        """A client session over ssh; with ``keyring``, one straight to our shell whose
        gpg has the secret key (the proxy of a hybrid or pubkey remote then holds it)."""
        if not keyring:
            return await P2PSession.spawn(
                self.argv(name), nursery, name=name, expected_uuid=self.uuids[name],
                env=dict(self.env), idle_timeout=120,
            )  # fmt: skip
        argv = p2pstdio_argv(self.env.srvbin_dir / "git-annex-shell", self.proxy,
                             uuid=self.uuids[name])  # fmt: skip
        env = {**self.env.admin_env(), "GNUPGHOME": str(self.keyring)}
        env["PATH"] = f"{self.env.srvbin_dir}{os.pathsep}{env['PATH']}"
        return await P2PSession.spawn(argv, nursery, name=name, expected_uuid=self.uuids[name],
                                      env=env, idle_timeout=120)  # fmt: skip

    def stored_by_git_annex(self, name: str, filename: str, content: bytes) -> Key:
        """`content` added as `filename` in the direct clone and copied to remote `name`
        by git-annex itself; the location logs pushed and fetched by our client."""
        (self.direct / filename).write_bytes(content)
        self.admin("git", "annex", "add", "-q", filename, cwd=self.direct)
        self.admin("git", "commit", "-q", "-m", filename, cwd=self.direct)
        key = Key.parse(self.admin("git", "annex", "lookupkey", filename, cwd=self.direct).strip())
        self.admin("git", "annex", "copy", "-q", "--to", name, filename, cwd=self.direct)
        self.admin("git", "fetch", "-q", "origin", cwd=self.direct)
        self.admin("git", "annex", "merge", "-q", cwd=self.direct)
        self.admin("git", "push", "-q", "origin", "git-annex", cwd=self.direct)
        self.client_fetch()
        return key

    def shell(self, name: str) -> ShellSession:
        """Our shell on the proxy directly, for protocol-level checks."""
        argv = p2pstdio_argv(self.env.srvbin_dir / "git-annex-shell", self.proxy,
                             uuid=self.uuids[name])  # fmt: skip
        env = {**self.env.admin_env(), "GNUPGHOME": str(self.env.root / "empty-gnupg")}
        env["PATH"] = f"{self.env.srvbin_dir}{os.pathsep}{env['PATH']}"
        return ShellSession(argv, env=env, cwd=self.proxy, timeout=120)


@pytest.fixture(autouse=True)
def client_keyring(gnupg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Our client runs gpg in this process: it uses the user's (the test's) keyring."""
    monkeypatch.setenv("GNUPGHOME", str(gnupg[0]))


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    annex_bin: Path,
    our_shell: Path,
    gnupg: tuple[Path, str],
) -> World:
    home, keyid = gnupg
    root = tmp_path_factory.mktemp("objects")
    empty = root / "ssh" / "empty-gnupg"
    empty.mkdir(parents=True, mode=0o700)
    # The proxy's keyring is empty (it cannot open the hybrid cipher), and its gpg is a
    # wrapper that logs every run: client-side encryption must never need either.
    env = make_ssh_env(root / "ssh", annex_bin, our_shell, server_env={"GNUPGHOME": str(empty)})
    env["GNUPGHOME"] = str(home)  # the client's (and the admin's) keyring
    gpg_log = root / "server-gpg.log"
    gpg_log.write_bytes(b"")
    wrapper = env.srvbin_dir / "gpg"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(gpg_log))}\n'
                       'exec /usr/bin/gpg "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    proxy = env.make_server_repo("proxy.git", "proxy")
    traffic = root / "traffic.log"
    env.run(["git", "config", "annexproxy.trafficlog", str(traffic)], cwd=proxy, admin=True)
    stores: dict[str, Path] = {}
    for name, (encryption, chunk) in REMOTES.items():
        stores[name] = root / "stores" / name
        stores[name].mkdir(parents=True)
        args = ["git", "annex", "initremote", "-q", name, "type=directory",
                f"directory={stores[name]}", f"encryption={encryption}"]  # fmt: skip
        if encryption in ("hybrid", "pubkey", "sharedpubkey"):
            args.append(f"keyid={keyid}")
        if chunk:
            args.append(f"chunk={chunk}")
        env.run(args, cwd=proxy, admin=True)
        env.run(["git", "config", f"remote.{name}.annex-proxy", "true"], cwd=proxy, admin=True)
    env.run(["git", "annex", "updateproxy", "-q"], cwd=proxy, admin=True)
    uuids = {
        name: env.run(
            ["git", "config", f"remote.{name}.annex-uuid"], cwd=proxy, admin=True
        ).stdout.strip()
        for name in REMOTES
    }
    client = root / "client"
    env.run(["git", "clone", "-q", f"localhost:{proxy}", str(client)])
    direct = root / "direct"
    env.run(["git", "clone", "-q", str(proxy), str(direct)], admin=True)
    env.run(["git", "annex", "init", "-q", "direct"], cwd=direct, admin=True)
    for name in REMOTES:
        env.run(["git", "annex", "enableremote", "-q", name, f"directory={stores[name]}"],
                cwd=direct, admin=True)  # fmt: skip
        env.run(["git", "config", f"remote.{name}.annex-verified", "verified"],
                cwd=direct, admin=True)  # fmt: skip
    return World(env, proxy, client, direct, stores, uuids, gpg_log, traffic, home)


def make_key(content: bytes, ext: str = ".bin") -> Key:
    return Key.parse(f"SHA256E-s{len(content)}--{hashlib.sha256(content).hexdigest()}{ext}")


async def client_upload(world: World, name: str, content: bytes) -> tuple[Key, str]:
    key = make_key(content)
    path = world.client / f"up-{key.name[:12]}-{name}"
    path.write_bytes(content)
    said: list[str] = []
    keyring = name in NEEDS_KEY
    async with trio.open_nursery() as nursery:
        session = await world.session(name, nursery, keyring=keyring)

        async def reopen() -> P2PSession:
            return await world.session(name, nursery, keyring=keyring)

        session, agreed = await negotiate(session, reopen, said.append)
        assert agreed == {p2p.EXT_OBJECTS} and not said
        target = await special_target(world.logs(), world.uuids[name], name)
        assert target is not None
        try:
            annexdir = world.client / ".git" / "annex"
            with path.open("rb") as source:
                result = await upload_key(
                    session, target, key, source, agreed=agreed, annexdir=annexdir
                )
        finally:
            await session.aclose()
    return key, result


def direct_get(world: World, name: str, key: Key) -> bytes:
    world.admin("git", "fetch", "-q", "origin", cwd=world.direct)
    world.admin("git", "annex", "merge", "-q", cwd=world.direct)
    world.admin("git", "annex", "get", "-q", "--key", str(key), "--from", name, cwd=world.direct)
    where = world.admin("git", "annex", "contentlocation", str(key), cwd=world.direct).strip()
    return (world.direct / where).read_bytes()


# --- negotiation ------------------------------------------------------------------------------


def test_our_server_offers_objects_only_for_special_remotes(world: World) -> None:
    with world.shell("shchunk") as s:
        s.handshake()
        # Not negotiated yet: unknown, and the session goes on.
        assert s.request("CHECKOBJECT GPGHMACSHA1--" + "0" * 40) == "ERROR unknown command"
        assert s.request("EXTENSIONS annexproxy-objects annexproxy-indirect frob") == (
            "EXTENSIONS annexproxy-objects"  # a directory storage cannot presign
        )
        assert s.request("CHECKOBJECT GPGHMACSHA1--" + "0" * 40) == "FAILURE"
    with ShellSession(p2pstdio_argv(world.env.srvbin_dir / "git-annex-shell", world.proxy),
                      env=world.env.admin_env(), cwd=world.proxy) as s:  # fmt: skip
        s.handshake()
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS"


def tee_shell(tmp: Path, log: Path, annex_bin: Path) -> Path:
    """A git-annex-shell that records everything its client sends. The shell script
    itself lets go of stdout, so the client sees EOF when git-annex-shell exits."""
    shell = shlex.quote(str(real_shell(tmp / "real", annex_bin)))
    script = tmp / "teeshell"
    script.write_text(
        "#!/bin/sh\nexec 3<&0\n"
        f'tee -a {shlex.quote(str(log))} <&3 | {shell} "$@" &\n'
        "exec 3<&- >&-\nwait\n"
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("as_proxy", [False, True], ids=["plain", "proxy"])
async def test_fallback_against_real_git_annex(
    world: World, tmp_path: Path, annex_bin: Path, as_proxy: bool
) -> None:
    env = world.env.admin_env()
    repo = tmp_path / "real.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], env=env, check=True, timeout=60)
    subprocess.run(["git", "annex", "init", "-q", "real"], cwd=repo, env=env, check=True,
                   timeout=120)  # fmt: skip
    uuid = subprocess.run(["git", "config", "annex.uuid"], cwd=repo, env=env, check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    if as_proxy:
        store = tmp_path / "store"
        store.mkdir()
        for args in (["git", "annex", "initremote", "-q", "sr", "type=directory",
                      f"directory={store}", "encryption=shared", "chunk=64KiB"],
                     ["git", "config", "remote.sr.annex-proxy", "true"],
                     ["git", "annex", "updateproxy", "-q"]):  # fmt: skip
            subprocess.run(args, cwd=repo, env=env, check=True, timeout=120, capture_output=True)
        uuid = subprocess.run(
            ["git", "config", "remote.sr.annex-uuid"], cwd=repo, env=env, check=True,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    log = tmp_path / "sent.log"
    argv = [
        str(tee_shell(tmp_path, log, annex_bin)),
        "p2pstdio",
        str(repo),
        CLIENT_UUID,
        "--uuid",
        uuid,
    ]
    said: list[str] = []
    opened = 0
    async with trio.open_nursery() as nursery:

        async def spawn() -> P2PSession:
            nonlocal opened
            opened += 1
            return await P2PSession.spawn(argv, nursery, name="real", expected_uuid=uuid,
                                          env=env, idle_timeout=60)  # fmt: skip

        session = await spawn()
        session, agreed = await negotiate(session, spawn, said.append)
        assert agreed == frozenset() and len(said) == 1 and "falling back" in said[0]
        # git-annex-shell said ERROR and went on; a git-annex proxy closed the session.
        assert opened == (2 if as_proxy else 1)
        assert not await session.checkpresent(make_key(b"x"))
        await session.aclose()
    sent = log.read_text()
    assert sent.count("EXTENSIONS") == 1
    for word in ("CHECKOBJECT", "PUTOBJECT", "GETOBJECT", "RECORD", "PUTINDIRECT"):
        assert word not in sent


# --- uploads -----------------------------------------------------------------------------------


SIZES = {"empty": 0, "small": 1000, "multi": 300 * KiB + 17}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("name", sorted(set(REMOTES) - set(UNPROVABLE_REMOTES)))
async def test_client_encrypts_and_git_annex_reads(world: World, name: str, size: str) -> None:
    content = os.urandom(SIZES[size])
    gpg_runs = len(world.gpg_log.read_text().splitlines())
    store = world.stores[name]
    before = store_files(store)
    key, result = await client_upload(world, name, content)
    assert result == "stored"
    # The proxy ran gpg only to decrypt, never to encrypt: the objects are the client's. It
    # reads them back to prove the key, in-process for a passphrase cipher (shared, and the
    # content of hybrid), so gpg runs only where a secret key is needed: a hybrid cipher,
    # pubkey content.
    runs = world.gpg_log.read_text().splitlines()[gpg_runs:]
    assert all("--decrypt" in run for run in runs), runs
    assert bool(runs) == (name in NEEDS_KEY)
    new = store_files(store) - before
    chunk = REMOTES[name][1]
    chunk_size = chunks.parse_size(chunk) if chunk else None
    assert len(new) == (chunks.chunk_count(len(content), chunk_size) if chunk_size else 1)
    # Logged on the proxy: location, and chunks for a chunked remote.
    loc = world.proxy_branch_file(location_log_path(key)) or b""
    assert world.uuids[name].encode() in loc
    if chunk_size:
        log = world.proxy_branch_file(chunks.chunk_log_path(key))
        assert chunks.logged_chunkings(log, world.uuids[name]) == [(chunk_size, len(new))]
    assert direct_get(world, name, key) == content
    # Sending it again stores nothing.
    assert (await client_upload(world, name, content))[1] == "already"


async def test_store_never_holds_plaintext(world: World) -> None:
    content = os.urandom(200 * KiB + 5)
    lines_before = world.traffic.read_text().splitlines() if world.traffic.exists() else []
    uploaded = [n for n in ENCRYPTED if n not in UNPROVABLE_REMOTES]
    keys = {name: (await client_upload(world, name, content))[0] for name in uploaded}
    probes = [content[i : i + 32] for i in range(0, len(content) - 32, 2048)]
    key = keys["shchunk"]
    names = [str(key).encode(), key.name.split(".")[0].encode()]
    for name in uploaded:
        for path in store_files(world.stores[name]):
            assert path.name.startswith("GPGHMACSHA1--"), path
            data = path.read_bytes()
            assert not any(p in data for p in probes), f"plaintext in {path}"
            assert not any(n in data for n in names), f"key name in {path}"
    # One traffic line per session; the upload sessions wrote to storage what they got.
    lines = world.traffic.read_text().splitlines()[len(lines_before) :]
    ours = [dict(w.split("=", 1) for w in ln.split()[1:]) for ln in lines]
    assert {d["uuid"] for d in ours} == {world.uuids[n] for n in uploaded}
    for d in ours:
        assert int(d["storage_written"]) > len(content)  # ciphertext is a bit longer
        assert int(d["client_in"]) >= int(d["storage_written"])
        # Every object read back once, to prove the key before logging it.
        assert int(d["storage_read"]) == int(d["storage_written"])


# --- downloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REMOTES))
async def test_client_decrypts_what_git_annex_stored(world: World, name: str) -> None:
    content = os.urandom(150 * KiB + 3)
    filename = f"theirs-{name}.bin"
    key = world.stored_by_git_annex(name, filename, content)
    got = bytearray()

    async def write(piece: bytes) -> None:
        got.extend(piece)

    async with trio.open_nursery() as nursery:
        session = await world.session(name, nursery)
        agreed = await session.extensions([p2p.EXT_OBJECTS])
        assert agreed == {p2p.EXT_OBJECTS}
        target = await special_target(world.logs(), world.uuids[name], name)
        assert target is not None
        await download_key(session, target, key, logs=world.logs(),
                           annexdir=world.client / ".git" / "annex", write=write)  # fmt: skip
        # From an offset (a resumed download): whole chunks before it are not fetched.
        tail = bytearray()

        async def write_tail(piece: bytes) -> None:
            tail.extend(piece)

        await download_key(session, target, key, logs=world.logs(), offset=70_000,
                           annexdir=world.client / ".git" / "annex", write=write_tail)  # fmt: skip
        assert bytes(tail) == content[70_000:]
        # Absent content is an error, and the session goes on.
        with pytest.raises(ObjectError):
            await download_key(session, target, make_key(b"nope"), logs=world.logs(),
                               annexdir=world.client / ".git" / "annex", write=write)  # fmt: skip
        assert not session.dead
        await session.aclose()
    assert bytes(got) == content


# --- in-process OpenPGP on the client ------------------------------------------------------------

PASSPHRASE_REMOTES = ["hychunk", "shchunk", "shflat"]
# 0 B, 1 B, and a multiple of both chunk sizes (64 KiB and 100 KiB).
EDGE = {"empty": 0, "one": 1, "multiple": 1600 * KiB}


@pytest.fixture
def client_gpg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The client's gpg (first on PATH): a wrapper logging each run's arguments."""
    log = tmp_path / "client-gpg.log"
    log.write_text("")
    wrapdir = tmp_path / "wrap"
    wrapdir.mkdir()
    (wrapdir / "gpg").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\n'
                                 'exec /usr/bin/gpg "$@"\n')  # fmt: skip
    (wrapdir / "gpg").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapdir}{os.pathsep}{os.environ['PATH']}")
    return log


def content_runs(log: Path) -> list[str]:
    """Runs that encrypted or decrypted content (not a hybrid cipher's decryption)."""
    return [line for line in log.read_text().splitlines() if "--passphrase-fd" in line]


def edge_content(size: int) -> bytes:
    return os.urandom(size) if size > 1 else bytes(os.urandom(8)[:size])


@pytest.mark.parametrize("size", sorted(EDGE))
@pytest.mark.parametrize("name", PASSPHRASE_REMOTES)
async def test_client_encrypts_without_gpg_and_git_annex_reads(
    world: World, client_gpg: Path, name: str, size: str
) -> None:
    content = edge_content(EDGE[size])
    if EDGE[size] <= 1:  # one-byte and empty keys recur: remove what earlier tests stored
        key = make_key(content)
        world.admin("git", "annex", "drop", "-q", "--force", "--key", str(key),
                    cwd=world.direct, check=False)  # fmt: skip
        target = await special_target(world.logs(), world.uuids[name], name)
        assert target is not None
        names = {str(object_key(target.encryption, k))
                 for k, _, _ in plan(key, len(content), target.chunk_size)[1]}  # fmt: skip
        for path in store_files(world.stores[name]):
            if path.name in names:
                path.parent.chmod(0o755)
                path.unlink()
    server_runs = len(content_runs(world.gpg_log))
    key, result = await client_upload(world, name, content)
    assert result == "stored"
    # No gpg for content on either side; the proxy may run gpg once to open a hybrid
    # cipher, to read back and prove what the client stored.
    assert content_runs(client_gpg) == [] and len(content_runs(world.gpg_log)) == server_runs
    assert direct_get(world, name, key) == content


@pytest.mark.parametrize("size", sorted(EDGE))
@pytest.mark.parametrize("name", PASSPHRASE_REMOTES)
async def test_client_decrypts_git_annex_objects_without_gpg(
    world: World, client_gpg: Path, name: str, size: str
) -> None:
    content = edge_content(EDGE[size])
    filename = f"edge-{name}-{size}.bin"
    key = world.stored_by_git_annex(name, filename, content)
    got = bytearray()

    async def write(piece: bytes) -> None:
        got.extend(piece)

    async with trio.open_nursery() as nursery:
        session = await world.session(name, nursery)
        assert await session.extensions([p2p.EXT_OBJECTS]) == {p2p.EXT_OBJECTS}
        target = await special_target(world.logs(), world.uuids[name], name)
        assert target is not None
        await download_key(session, target, key, logs=world.logs(),
                           annexdir=world.client / ".git" / "annex", write=write)  # fmt: skip
        await session.aclose()
    assert bytes(got) == content
    assert content_runs(client_gpg) == []


# --- the server's checks -----------------------------------------------------------------------


BAD_NAMES = [
    "../../etc/passwd",
    "GPGHMACSHA1--../../x",
    "GPGHMACSHA1--" + "A" * 40,  # uppercase
    "GPGHMACSHA1--" + "a" * 39,  # short
    "GPGHMACSHA256--" + "a" * 64,  # not the remote's MAC
    "SHA256E-s1--" + "a" * 64,  # a plain key on an encrypted remote
    "/abs",
]


def test_bad_object_names_are_refused(world: World) -> None:
    with world.shell("shchunk") as s:
        s.handshake()
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        for name in BAD_NAMES:
            for req in (f"CHECKOBJECT {name}", f"PUTOBJECT {name} 3", f"GETOBJECT {name}"):
                assert s.request(req) == "ERROR bad object name", req
        assert s.request("CHECKPRESENT SHA256E-s1--" + "a" * 64) == "FAILURE"  # still in step
    with world.shell("plainchunk") as s:
        s.handshake()
        s.request("EXTENSIONS annexproxy-objects")
        for name in ("GPGHMACSHA1--" + "a" * 40, "../x", "SHA256E-s01--ab", "x"):
            assert s.request(f"CHECKOBJECT {name}") == "ERROR bad object name", name
    assert not list((world.stores["shchunk"]).rglob("*passwd*"))


def shared_cipher(world: World, name: str) -> Cipher:
    fields = parse_remote_log(world.proxy_branch_file("remote.log") or b"")[world.uuids[name]]
    stored = stored_cipher(fields)
    assert stored is not None
    return Cipher(stored.data, mac_only=False)


def record(s: ShellSession, key: Key, chunk_size: int, names: list[str]) -> str:
    payload = "".join(n + "\n" for n in names).encode()
    s.send(f"RECORD {chunk_size} {len(names)} {key}")
    s.send_data(payload)
    return s.readline()


def test_record_checks_every_object_before_logging(world: World) -> None:
    content = os.urandom(100 * KiB)
    key = make_key(content)
    cipher = shared_cipher(world, "shchunk")
    names = [str(encrypted_key(cipher, "HMACSHA1", k)) for k in chunks.chunk_keys(key, 65536, 2)]
    with world.shell("shchunk") as s:
        s.handshake()
        s.request("EXTENSIONS annexproxy-objects")
        # Only the first object is sent (any bytes: the proxy cannot tell ciphertext).
        assert s.request(f"PUTOBJECT {names[0]} 5") == "PUT-FROM 0"
        s.send_data(b"12345")
        assert s.request("VALID") == "SUCCESS"
        assert record(s, key, 65536, names) == "FAILURE"  # the second is missing
        assert record(s, key, 65536, names[:1]) == "FAILURE"  # wrong count for the size
        assert record(s, key, 0, names[:1]) == "FAILURE"  # not the unchunked name
        other = chunks.chunk_keys(make_key(b"other"), 65536, 1)[0]
        other_name = str(encrypted_key(cipher, "HMACSHA1", other))
        assert record(s, make_key(b"other"), 65536, [other_name]) == "FAILURE"
        # A size that does not match PUTOBJECT's: nothing stored.
        assert s.request(f"PUTOBJECT {names[1]} 9") == "PUT-FROM 0"
        s.send_data(b"123")
        assert s.request("VALID") == "FAILURE"
        assert s.request(f"CHECKOBJECT {names[1]}") == "FAILURE"
        assert s.request(f"GETOBJECT {names[0]}") == "DATA 5"
        assert s.read_exact(5) == b"12345" and s.readline() == "VALID"
    loc = world.proxy_branch_file(location_log_path(key))
    assert loc is None and world.proxy_branch_file(chunks.chunk_log_path(key)) is None


@pytest.mark.parametrize("name", [*NEEDS_KEY, *UNPROVABLE_REMOTES])
async def test_no_uploads_where_the_proxy_cannot_read_back(world: World, name: str) -> None:
    """Without the secret key the proxy cannot prove what a client stores: it stores
    nothing, says why, and the client says so (and sends no object at all)."""
    content = os.urandom(1000)
    key = make_key(content)
    path = world.client / f"refused-{name}"
    path.write_bytes(content)
    before = store_files(world.stores[name])
    async with trio.open_nursery() as nursery:
        session = await world.session(name, nursery)
        agreed = await session.extensions([p2p.EXT_OBJECTS])
        target = await special_target(world.logs(), world.uuids[name], name)
        assert target is not None
        with pytest.raises(P2PRefused, match="cannot verify objects"), path.open("rb") as f:
            await upload_key(session, target, key, f, agreed=agreed,
                             annexdir=world.client / ".git" / "annex")  # fmt: skip
        await session.aclose()
    assert store_files(world.stores[name]) == before
    assert world.proxy_branch_file(location_log_path(key)) is None


def test_record_on_hybrid_checks_names_with_the_key(world: World) -> None:
    key = make_key(os.urandom(10))
    env = {"GNUPGHOME": str(world.keyring)}
    argv = p2pstdio_argv(world.env.srvbin_dir / "git-annex-shell", world.proxy,
                         uuid=world.uuids["hychunk"])  # fmt: skip
    path = f"{world.env.srvbin_dir}{os.pathsep}{world.env.admin_env()['PATH']}"
    with ShellSession(argv, env={**world.env.admin_env(), **env, "PATH": path},
                      cwd=world.proxy, timeout=120) as s:  # fmt: skip
        s.handshake()
        s.request("EXTENSIONS annexproxy-objects")
        assert record(s, key, 102400, ["GPGHMACSHA1--" + "e" * 40]) == "FAILURE"
        assert record(s, key, 102400, ["../evil"]) == "FAILURE"
        assert s.request("CHECKOBJECT GPGHMACSHA1--" + "e" * 40) == "FAILURE"  # in step
    assert world.proxy_branch_file(location_log_path(key)) is None


def test_readonly_refuses_objects(world: World) -> None:
    name = "GPGHMACSHA1--" + "f" * 40
    argv = p2pstdio_argv(world.env.srvbin_dir / "git-annex-shell", world.proxy,
                         uuid=world.uuids["shchunk"])  # fmt: skip
    env = {**world.env.admin_env(), "GIT_ANNEX_SHELL_READONLY": "1"}
    with ShellSession(argv, env=env, cwd=world.proxy) as s:
        s.handshake()
        s.request("EXTENSIONS annexproxy-objects")
        assert s.request(f"PUTOBJECT {name} 1").startswith("ERROR")
        assert record(s, make_key(b"r"), 0, [name]).startswith("ERROR")
        assert s.request(f"CHECKOBJECT {name}") == "FAILURE"
