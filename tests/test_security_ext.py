"""Security review of our P2P extensions on the server (shell/objectserve.py), as a client
with a valid ssh key would probe them: one test per row of the catalogue below.

Each test drives our `git-annex-shell p2pstdio` byte-exactly (tests/p2pdriver.py) against a
proxy whose special remotes are directory remotes (`dirworld`) or S3 buckets on moto's
standalone server (`s3world`), and asserts the answer and that nothing was stored, removed
or logged that should not be.

Rows (probe -> expected):

- X1  READONLY: PUTOBJECT, RECORD, PUTINDIRECT, INDIRECTDONE -> the ERROR text of PUT;
      CHECKOBJECT and GETOBJECT served
- X2  APPENDONLY: objects in, REMOVE, a failed INDIRECTDONE -> adding works, removal
      denied, nothing removed at all; with full write access only the client's own bad
      upload (the one carrying the presign's upload tag) is removed
- X3  INDIRECTDONE with a wrong claim for an object another writer stored after the
      presign -> FAILURE, the good object kept (any mode)
- X4  GIT_ANNEX_SHELL_DIRECTORY -> extensions served for the allowed directory only
- X5  bad names: traversal, absolute, `..` segments, NUL, newline, long, uppercase, wrong
      MAC, a key on an encrypted remote, a GPG name on a plain one -> `ERROR bad object
      name`, in step
- X6  RECORD's DATA: spaces, CR, over-long names, oversized payload, count, duplicates ->
      FAILURE, memory bounded, in step, nothing logged
- X7  RECORD naming another key's objects (unencrypted, shared cipher) -> FAILURE
- X8  RECORD with objects present at the wrong size (unencrypted) -> FAILURE
- X9  unencrypted PUTOBJECT/PUTINDIRECT of content that is not the key's -> FAILURE
- X10 PUTOBJECT with an enormous size, DATA longer/shorter than announced -> FAILURE,
      nothing spooled or stored
- X11 a client that stops mid-DATA -> the idle timeout ends the session, nothing left
- X12 requests not negotiated, EXTENSIONS twice / after a request -> ERROR unknown
      command; each EXTENSIONS answers afresh and forgets presigned names
- X13 extensions in a plain repository, a proxied git repository, a cluster gateway ->
      EXTENSIONS (none), requests refused
- X14 presigned URL: one object, size and checksum signed, expiry bounded, configured
      endpoint -> no secret anywhere
- X15 INDIRECTDONE for a name presigned in another session -> ERROR
- X16 deletion through INDIRECTDONE: a presign whose checksum matches what another writer
      then stores (its size does not) -> FAILURE, the object kept (a checksum is no proof
      of authorship); an unencrypted object whose size its key does not bind (a key
      without -s, or its chunks) -> no URL at all, and the plain PUT's chunks survive
- X17 plain PUT/GET/CHECKPRESENT/REMOVE of a URL key with `.`/`..` segments on S3 ->
      ERROR before any request names it (the extension's object-name rule)
- X18 poisoned content: PUTOBJECT of each chunk name with the wrong content of the right
      length (zeros; on a shared-cipher remote well-encrypted zeros, or no gpg at all),
      then RECORD -> FAILURE, no location or chunk log, never served VALID; the session's
      own objects removed with full write access, kept (append-only) but overwritten by
      a later plain PUT; another session's objects never removed
- X19 keys without a hash (WORM) -> proven by size (and decryption) only, as a plain PUT
- X20 hybrid remote, proxy without the secret key -> uploads refused (ERROR), reads
      served; with the key, RECORD decrypts and verifies
- X21 GET of objects that are not the key's (put there by any means), from an offset
      too -> INVALID

Known limits, by design (HACKING.md "P2P extensions"): RECORD reads every object back
(for S3 indirect uploads the proxy downloads what it never uploaded), except an
unencrypted whole key this session hashed itself. An append-only client can leave objects
the proxy never proves under names of keys it knows (never logged, never served VALID);
a later RECORD of those keys fails until a plain PUT overwrites them. A presigned URL stays
usable until it expires; `If-None-Match: *` (signed) keeps it from overwriting anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import SshEnv, gpg_home_with_key, make_ssh_env, stop_gpg_agent
from p2pdriver import ShellSession, p2pstdio_argv
from s3server import MotoServer, moto_server

from git_remote_annexproxy import chunks, p2p
from git_remote_annexproxy.annexlog import location_log_path
from git_remote_annexproxy.crypto import Cipher, Gpg, encrypted_key, stored_cipher
from git_remote_annexproxy.httpput import http_put
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.repologs import parse_remote_log
from git_remote_annexproxy.specialformat import Encryption, write_object
from shell.objectserve import MAX_RECORD_DATA, UNPROVABLE
from shell.restrict import APPENDONLY_DENIED, READONLY_DENIED

KiB = 1024
CHUNK = 64 * KiB
READONLY_ERROR = f"ERROR {READONLY_DENIED}"
APPENDONLY_ERROR = f"ERROR {APPENDONLY_DENIED}"
KEY_ID, SECRET = "AKIDANNEXPROXYSEC", "annexproxy/sec+secret/KEY"


def make_key(content: bytes, ext: str = ".bin") -> Key:
    return Key.parse(f"SHA256E-s{len(content)}--{hashlib.sha256(content).hexdigest()}{ext}")


def gpg_name(hexchar: str) -> str:
    return "GPGHMACSHA1--" + hexchar * 40


def gpg_label(label: str) -> str:
    """A well-formed object name of an encrypted remote, one per test label."""
    return "GPGHMACSHA1--" + hashlib.sha1(label.encode(), usedforsecurity=False).hexdigest()


def record(s: ShellSession, key: Key | str, chunk_size: int, names: list[str],
           count: int | None = None) -> str:  # fmt: skip
    s.send(f"RECORD {chunk_size} {len(names) if count is None else count} {key}")
    s.send_data("".join(n + "\n" for n in names).encode("utf-8", "surrogateescape"))
    return s.readline()


def put_object(s: ShellSession, name: str, data: bytes, size: int | None = None) -> str:
    answer = s.request(f"PUTOBJECT {name} {len(data) if size is None else size}")
    if answer != "PUT-FROM 0":
        return answer
    s.send_data(data)
    return s.request("VALID")


def in_step(s: ShellSession) -> None:
    """The session still answers requests in order."""
    assert s.request("GETTIMESTAMP").startswith("TIMESTAMP ")


# --- directory remotes ------------------------------------------------------------------------


@dataclass
class DirWorld:
    env: SshEnv
    proxy: Path
    stores: dict[str, Path]
    uuids: dict[str, str]  # the special remotes, "node1" (a git repo) and "cluster"
    keyring: Path  # a GNUPGHOME with the secret key of "hybrid" (the proxy's has none)

    def admin(self, *args: str) -> str:
        return self.env.run(list(args), cwd=self.proxy, admin=True).stdout

    def branch_file(self, path: str) -> bytes | None:
        proc = subprocess.run(["git", "show", f"git-annex:{path}"], cwd=self.proxy,
                              env=self.env.admin_env(), capture_output=True, timeout=60,
                              check=False)  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None

    def shell(self, name: str | None, **env: str) -> ShellSession:
        uuid = None if name is None else self.uuids[name]
        argv = p2pstdio_argv(self.env.srvbin_dir / "git-annex-shell", self.proxy, uuid=uuid)
        full = {**self.env.admin_env(), "GNUPGHOME": str(self.env.root / "empty-gnupg"), **env}
        full["PATH"] = f"{self.env.srvbin_dir}{os.pathsep}{full['PATH']}"
        return ShellSession(argv, env=full, cwd=self.proxy, timeout=60)

    def session(self, name: str | None, **env: str) -> ShellSession:
        s = self.shell(name, **env)
        s.handshake()
        return s

    def objects(self, name: str) -> set[Path]:
        return {p for p in self.stores[name].rglob("*") if p.is_file()}

    def shared_cipher(self, name: str) -> Cipher:
        """The remote's cipher (hybrid: decrypted with the secret key the proxy lacks)."""
        fields = parse_remote_log(self.branch_file("remote.log") or b"")[self.uuids[name]]
        stored = stored_cipher(fields)
        assert stored is not None
        if not stored.encrypted:
            return Cipher(stored.data, mac_only=False)
        done = subprocess.run(["gpg", "--batch", "--quiet", "--decrypt"], input=stored.data,
                              env={**os.environ, "GNUPGHOME": str(self.keyring)}, check=True,
                              capture_output=True, timeout=60)  # fmt: skip
        return Cipher(done.stdout, mac_only=False)

    def encrypt(self, name: str, plain: bytes) -> bytes:
        """``plain`` encrypted as git-annex encrypts content for remote ``name``: what a
        client that knows the cipher (a shared one is in remote.log) can always make."""
        enc = Encryption(self.shared_cipher(name), "HMACSHA1", Gpg(), ())
        out = bytearray()

        async def feed() -> AsyncGenerator[bytes, None]:
            yield plain

        async def collect(_key: Key, data: AsyncIterator[bytes]) -> None:
            async for piece in data:
                out.extend(piece)

        trio.run(write_object, enc, Key.parse(gpg_name("0")), feed(), collect, 60.0)
        return bytes(out)


# name: (encryption, chunk)
DIR_REMOTES = {"enc": ("shared", "64KiB"), "plain": ("none", None), "plainchunk": ("none", "64KiB"),
               "encflat": ("shared", None), "hybrid": ("hybrid", "64KiB")}  # fmt: skip


@pytest.fixture(scope="module")
def dirworld(
    tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path
) -> Iterator[DirWorld]:
    root = tmp_path_factory.mktemp("secext")
    gnupg = root / "ssh" / "empty-gnupg"
    gnupg.mkdir(parents=True, mode=0o700)
    # The proxy's (and the admin's) keyring holds only the public key of "hybrid".
    keyring = root / "keyring"
    keyid = gpg_home_with_key(keyring)
    public = subprocess.run(["gpg", "--export", keyid], check=True, capture_output=True,
                            env={**os.environ, "GNUPGHOME": str(keyring)},
                            timeout=60).stdout  # fmt: skip
    subprocess.run(["gpg", "--batch", "--import"], input=public, check=True, capture_output=True,
                   env={**os.environ, "GNUPGHOME": str(gnupg)}, timeout=60)  # fmt: skip
    env = make_ssh_env(root / "ssh", annex_bin, our_shell, server_env={"GNUPGHOME": str(gnupg)})
    env["GNUPGHOME"] = str(gnupg)
    proxy = env.make_server_repo("proxy.git", "proxy")

    def admin(*args: str, cwd: Path = proxy) -> str:
        return env.run(list(args), cwd=cwd, admin=True).stdout

    stores: dict[str, Path] = {}
    for name, (encryption, chunk) in DIR_REMOTES.items():
        stores[name] = root / "stores" / name
        stores[name].mkdir(parents=True)
        args = ["git", "annex", "initremote", "-q", name, "type=directory",
                f"directory={stores[name]}", f"encryption={encryption}"]  # fmt: skip
        args += [f"keyid={keyid}"] if encryption == "hybrid" else []
        admin(*args, *([f"chunk={chunk}"] if chunk else []))
        admin("git", "config", f"remote.{name}.annex-proxy", "true")
    # A git repository behind the proxy, also the one node of a cluster.
    node = env.make_server_repo("node1.git", "node1")
    admin("git", "remote", "add", "node1", str(node))
    admin("git", "annex", "sync", "--quiet", "--no-content", "node1")
    admin("git", "config", "remote.node1.annex-proxy", "true")
    admin("git", "annex", "initcluster", "mycluster")
    admin("git", "config", "remote.node1.annex-cluster-node", "mycluster")
    admin("git", "annex", "updatecluster")
    admin("git", "annex", "updateproxy", "-q")
    uuids = {n: admin("git", "config", f"remote.{n}.annex-uuid").strip()
             for n in (*DIR_REMOTES, "node1")}  # fmt: skip
    uuids["cluster"] = admin("git", "config", "annex.cluster.mycluster").strip()
    yield DirWorld(env, proxy, stores, uuids, keyring)
    for home in (keyring, gnupg):
        stop_gpg_agent(home)


# X1 ------------------------------------------------------------------------------------------


def test_x1_readonly_refuses_object_writes_as_put(dirworld: DirWorld) -> None:
    name = gpg_name("1")
    with dirworld.session("enc") as s:  # an object to read back, stored read-write
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert put_object(s, name, b"cipher") == "SUCCESS"
    before = dirworld.objects("enc")
    key = make_key(b"ro")
    with dirworld.session("enc", GIT_ANNEX_SHELL_READONLY="1") as s:
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert s.request(f"PUT ro.bin {key}") == READONLY_ERROR  # the reference text
        assert s.request(f"PUTOBJECT {gpg_name('2')} 3") == READONLY_ERROR
        # RECORD's DATA is read whole first, so the session stays in step.
        assert record(s, key, 0, [name]) == READONLY_ERROR
        in_step(s)
        assert s.request(f"CHECKOBJECT {name}") == "SUCCESS"
        assert s.request(f"GETOBJECT {name}") == "DATA 6"
        assert s.read_exact(6) == b"cipher" and s.readline() == "VALID"
        assert s.request(f"CHECKOBJECT {gpg_name('2')}") == "FAILURE"
    assert dirworld.objects("enc") == before
    assert dirworld.branch_file(location_log_path(key)) is None


# X2 ------------------------------------------------------------------------------------------


def test_x2_appendonly_adds_objects_but_never_removes(dirworld: DirWorld) -> None:
    content = b"append only"
    key = make_key(content)
    with dirworld.session("plain", GIT_ANNEX_SHELL_APPENDONLY="1") as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, str(key), content) == "SUCCESS"
        assert record(s, key, 0, [str(key)]) == "SUCCESS"
        assert s.request(f"REMOVE {key}") == APPENDONLY_ERROR
        assert s.request(f"CHECKOBJECT {key}") == "SUCCESS"
        assert s.finish().code == 0
    assert dirworld.uuids["plain"].encode() in (dirworld.branch_file(location_log_path(key)) or b"")


# X4 ------------------------------------------------------------------------------------------


def test_x4_directory_restriction_is_unaffected(dirworld: DirWorld) -> None:
    with dirworld.session("enc", GIT_ANNEX_SHELL_DIRECTORY=str(dirworld.proxy)) as s:
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert s.request(f"CHECKOBJECT {gpg_name('3')}") == "FAILURE"
    with dirworld.shell("enc", GIT_ANNEX_SHELL_DIRECTORY="/elsewhere") as s:
        result = s.finish()
    assert result.code != 0 and "Only allowed to access" in result.stderr
    assert b"AUTH-SUCCESS" not in result.stdout


# X5 ------------------------------------------------------------------------------------------

ENC_BAD = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "GPGHMACSHA1--../../x",
    "GPGHMACSHA1--" + "A" * 40,  # uppercase hex
    "GPGHMACSHA1--" + "a" * 41,
    "GPGHMACSHA1--" + "a" * 39 + "\x00",  # NUL
    "GPGHMACSHA256--" + "a" * 64,  # another MAC than the remote's
    "SHA256E-s1--" + "a" * 64,  # a key on an encrypted remote
    "GPGHMACSHA1--" + "a" * 4000,  # very long
]
PLAIN_BAD = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    gpg_name("a"),  # a GPG name on an unencrypted remote
    "SHA256E-s1--../../x",  # a `..` segment: an S3 URL path would hold it as is
    "URL--http://example.com/../../other/x",
    "URL--http://example.com/./x",
    "SHA256E-s01--" + "a" * 64,  # not canonical
    "SHA256E-s1--a\x00b",
    "SHA256E-s1--" + "a" * 4000,
]


@pytest.mark.parametrize(("remote", "bad"), [("enc", ENC_BAD), ("plain", PLAIN_BAD)])
def test_x5_bad_object_names(dirworld: DirWorld, remote: str, bad: list[str]) -> None:
    before = {n: dirworld.objects(n) for n in DIR_REMOTES}
    with dirworld.session(remote) as s:
        s.request("EXTENSIONS annexproxy-objects")
        for name in bad:
            for req in (f"CHECKOBJECT {name}", f"PUTOBJECT {name} 3", f"GETOBJECT {name}"):
                answer = s.request(req)
                # A name the line grammar refuses (NUL) is not even a request.
                assert answer in ("ERROR bad object name", "ERROR unknown command"), req
                assert answer == "ERROR bad object name" or "\x00" in name, req
            assert record(s, make_key(b"n"), 0, [name]) == "FAILURE", name
        in_step(s)
        # A newline ends the request line: the rest is a line of its own.
        s.send(f"CHECKOBJECT {gpg_name('a')[:20]}\n{gpg_name('a')[20:]}")
        assert s.readline() == "ERROR bad object name"
        assert s.readline() == "ERROR unknown command"
        in_step(s)
    assert {n: dirworld.objects(n) for n in DIR_REMOTES} == before
    assert not list(dirworld.env.root.rglob("*passwd*"))


# X6 ------------------------------------------------------------------------------------------


def test_x6_record_data_is_checked_and_bounded(dirworld: DirWorld) -> None:
    content = os.urandom(100)
    key = make_key(content)
    cipher = dirworld.shared_cipher("enc")
    (piece,) = chunks.chunk_keys(key, CHUNK, 1)
    name = str(encrypted_key(cipher, "HMACSHA1", piece))
    with dirworld.session("enc") as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, name, b"ciphertext") == "SUCCESS"
        assert record(s, key, CHUNK, [name + " " + name], count=1) == "FAILURE"  # a space
        assert record(s, key, CHUNK, [name + "\r"]) == "FAILURE"  # CRLF
        assert record(s, key, CHUNK, [name], count=2) == "FAILURE"  # count mismatch
        assert record(s, key, CHUNK, [name, name]) == "FAILURE"  # duplicates
        assert record(s, key, CHUNK, []) == "FAILURE"  # no objects at all
        assert record(s, key, CHUNK, [name + "a" * 600], count=1) == "FAILURE"  # too long
        s.send(f"RECORD {CHUNK} 1 {key}")  # not newline-terminated
        s.send_data(name.encode())
        assert s.readline() == "FAILURE"
        # A payload past the bound is read to its end (in step) but never kept whole.
        s.send(f"RECORD {CHUNK} 1000000000 {key}")
        s.send_raw(b"DATA %d\n" % (MAX_RECORD_DATA + 1))
        line = (name + "\n").encode()
        block = line * (1 << 20 // len(line))
        left = MAX_RECORD_DATA + 1
        while left:
            n = min(left, len(block))
            s.send_raw(block[:n])
            left -= n
        assert s.readline(timeout=120) == "FAILURE"
        in_step(s)
        assert s.request("CHECKPRESENT " + str(key)) == "FAILURE"
        result = s.finish()
    assert result.code == 0
    assert result.rusage is not None and result.rusage.ru_maxrss < 400 * 1024  # KiB
    assert dirworld.branch_file(location_log_path(key)) is None
    assert dirworld.branch_file(chunks.chunk_log_path(key)) is None


# X7 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remote", ["enc", "plainchunk", "plain"])
def test_x7_record_cannot_claim_another_keys_objects(
    dirworld: DirWorld, remote: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GNUPGHOME", str(dirworld.keyring))
    theirs, mine = os.urandom(1000), os.urandom(1000)
    their_key, my_key = make_key(theirs), make_key(mine)
    encryption, chunk = DIR_REMOTES[remote]
    chunk_size = CHUNK if chunk else 0
    piece = chunks.chunk_keys(their_key, CHUNK, 1)[0] if chunk else their_key
    if encryption == "shared":
        name = str(encrypted_key(dirworld.shared_cipher(remote), "HMACSHA1", piece))
    else:
        name = str(piece)
    obj = dirworld.encrypt(remote, theirs) if encryption == "shared" else theirs
    with dirworld.session(remote) as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, name, obj) == "SUCCESS"
        assert record(s, my_key, chunk_size, [name]) == "FAILURE"
        assert record(s, their_key, chunk_size, [name]) == "SUCCESS"
    assert dirworld.branch_file(location_log_path(my_key)) is None
    assert dirworld.branch_file(chunks.chunk_log_path(my_key)) is None


# X8 ------------------------------------------------------------------------------------------


def test_x8_record_checks_sizes_of_unencrypted_objects(dirworld: DirWorld) -> None:
    content = os.urandom(3000)
    key = make_key(content)
    # Put there by something else than the extension (which checks): the size is wrong.
    path = dirworld.stores["plain"] / key.hashdir_lower() / key.keyfile() / key.keyfile()
    path.parent.mkdir(parents=True)
    path.write_bytes(content[:-1])
    with dirworld.shell("plain") as s:
        s.handshake()
        s.request("EXTENSIONS annexproxy-objects")
        assert s.request(f"CHECKOBJECT {key}") == "SUCCESS"
        assert record(s, key, 0, [str(key)]) == "FAILURE"
        result = s.finish()
    assert "has size 2999, not 3000" in result.stderr
    assert dirworld.branch_file(location_log_path(key)) is None


# X9 ------------------------------------------------------------------------------------------


def test_x9_unencrypted_objects_are_the_keys_content(dirworld: DirWorld) -> None:
    content = os.urandom(CHUNK + 10)
    key = make_key(content)
    c1, c2 = chunks.chunk_keys(key, CHUNK, 2)
    with dirworld.session("plain") as s:
        s.request("EXTENSIONS annexproxy-objects")
        forged = bytes(len(content))  # the right size, not the content
        assert put_object(s, str(key), forged) == "FAILURE"
        assert s.request(f"CHECKOBJECT {key}") == "FAILURE"
        assert record(s, key, 0, [str(key)]) == "FAILURE"
    with dirworld.session("plainchunk") as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, str(c2), content[CHUNK:] + b"x") == "FAILURE"  # 11 bytes for 10
        assert put_object(s, str(c1), content[:100]) == "FAILURE"
        assert put_object(s, str(c1), content[:CHUNK]) == "SUCCESS"
        assert put_object(s, str(c2), content[CHUNK:]) == "SUCCESS"
        assert record(s, key, CHUNK, [str(c1), str(c2)]) == "SUCCESS"
        assert s.finish().code == 0
    assert dirworld.branch_file(location_log_path(key)) is not None


# X10 -----------------------------------------------------------------------------------------


def test_x10_sizes_never_preallocated_and_data_must_match(dirworld: DirWorld) -> None:
    before = dirworld.objects("enc")
    name = gpg_name("4")
    with dirworld.session("enc") as s:
        s.request("EXTENSIONS annexproxy-objects")
        # Enormous: nothing happens before DATA, and a DATA of another length is drained.
        assert s.request(f"PUTOBJECT {name} {10**30}") == "PUT-FROM 0"
        s.send_data(b"abc")
        assert s.request("VALID") == "FAILURE"
        assert put_object(s, name, b"12345", size=3) == "FAILURE"  # longer than announced
        assert put_object(s, name, b"1", size=3) == "FAILURE"  # shorter
        assert put_object(s, name, b"123", size=3) == "SUCCESS"
        s.send(f"PUTOBJECT {gpg_name('5')} 3")
        assert s.readline() == "PUT-FROM 0"
        s.send(f"CHECKOBJECT {name}")  # not a DATA: the session ends
        assert s.readline() == "ERROR expected DATA"
        assert s.at_eof()
    assert len(dirworld.objects("enc") - before) == 1
    assert not [p for p in (dirworld.proxy / "annex" / "othertmp").glob("*") if p.is_file()]


# X18 -----------------------------------------------------------------------------------------


def get_key(s: ShellSession, key: Key, offset: int = 0) -> tuple[str, bytes | None, str | None]:
    """A plain GET of ``key``: the answer line, the bytes and the verdict (if DATA)."""
    answer = s.request(f"GET {offset} x.bin {key}")
    if not answer.startswith("DATA "):
        return answer, None, None
    data = s.read_exact(int(answer.split()[1]))
    verdict = s.readline()
    s.send("SUCCESS" if verdict == "VALID" else "FAILURE")
    return answer, data, verdict


def plain_put(dirworld: DirWorld, remote: str, key: Key, content: bytes) -> None:
    with dirworld.session(remote) as s:
        assert s.request(f"PUT x.bin {key}") == "PUT-FROM 0"
        s.send_data(content)
        assert s.request("VALID") == "SUCCESS"
        assert s.finish().code == 0


@pytest.mark.parametrize("mode", ["readwrite", "appendonly"])
def test_x18_poisoned_chunks_are_never_recorded(dirworld: DirWorld, mode: str) -> None:
    """The issue's case: zeros of the right length under each chunk name, then RECORD."""
    env = {"GIT_ANNEX_SHELL_APPENDONLY": "1"} if mode == "appendonly" else {}
    content = os.urandom(CHUNK + 1000)
    key = make_key(content)
    c1, c2 = chunks.chunk_keys(key, CHUNK, 2)
    before = dirworld.objects("plainchunk")
    with dirworld.session("plainchunk", **env) as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, str(c1), bytes(CHUNK)) == "SUCCESS"  # sizes are all it checks
        assert put_object(s, str(c2), bytes(1000)) == "SUCCESS"
        assert record(s, key, CHUNK, [str(c1), str(c2)]) == "FAILURE"
        assert s.request(f"CHECKPRESENT {key}") == "FAILURE"
        answer, _, verdict = get_key(s, key)
        assert answer.startswith("ERROR") and verdict is None
        result = s.finish()
    assert result.code == 0 and "content is not the key's" in result.stderr
    assert dirworld.branch_file(location_log_path(key)) is None
    assert dirworld.branch_file(chunks.chunk_log_path(key)) is None
    # What the session stored and failed to prove: removed with full write access only.
    left = dirworld.objects("plainchunk") - before
    assert len(left) == (2 if mode == "appendonly" else 0)
    # Left behind, the zeros are no head start for the real content: a plain PUT writes
    # every chunk (git-annex's seekResume would keep the present ones).
    plain_put(dirworld, "plainchunk", key, content)
    with dirworld.session("plainchunk") as s:
        assert get_key(s, key)[1:] == (content, "VALID")


@pytest.mark.parametrize("remote", ["enc", "encflat"])
@pytest.mark.parametrize("mode", ["readwrite", "appendonly"])
def test_x18_poisoned_encrypted_objects_are_never_recorded(
    dirworld: DirWorld, remote: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared cipher is in remote.log: any client can encrypt the wrong content well.
    The proxy decrypts what was stored and verifies the key before it logs anything."""
    monkeypatch.setenv("GNUPGHOME", str(dirworld.keyring))
    env = {"GIT_ANNEX_SHELL_APPENDONLY": "1"} if mode == "appendonly" else {}
    content = os.urandom(1000)
    key = make_key(content)
    chunk_size = CHUNK if DIR_REMOTES[remote][1] else 0
    piece = chunks.chunk_keys(key, CHUNK, 1)[0] if chunk_size else key
    name = str(encrypted_key(dirworld.shared_cipher(remote), "HMACSHA1", piece))
    forged = dirworld.encrypt(remote, bytes(1000))
    before = dirworld.objects(remote)
    with dirworld.session(remote, **env) as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, name, forged) == "SUCCESS"
        assert record(s, key, chunk_size, [name]) == "FAILURE"  # decrypts to zeros
        if mode == "readwrite":  # removed: the name is free again
            assert put_object(s, name, b"not even gpg") == "SUCCESS"
            assert record(s, key, chunk_size, [name]) == "FAILURE"  # does not decrypt
        # Never served as the key's content, whatever is stored (unchunked and kept: the
        # forgery decrypts fine, to zeros).
        answer, _, verdict = get_key(s, key)
        if remote == "encflat" and mode == "appendonly":
            assert (answer, verdict) == ("DATA 1000", "INVALID")
        else:
            assert answer.startswith("ERROR")
        assert s.finish().code == 0
    assert dirworld.branch_file(location_log_path(key)) is None
    assert len(dirworld.objects(remote) - before) == (1 if mode == "appendonly" else 0)


def test_x18_a_failed_record_removes_only_what_the_session_stored(dirworld: DirWorld) -> None:
    content = os.urandom(CHUNK + 10)
    key = make_key(content)
    c1, c2 = map(str, chunks.chunk_keys(key, CHUNK, 2))
    store = dirworld.stores["plainchunk"]
    with dirworld.session("plainchunk", GIT_ANNEX_SHELL_APPENDONLY="1") as other:
        other.request("EXTENSIONS annexproxy-objects")
        assert put_object(other, c1, bytes(CHUNK)) == "SUCCESS"  # never recorded
    with dirworld.session("plainchunk") as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, c1, content[:CHUNK]) == "ALREADY-HAVE"
        assert put_object(s, c2, content[CHUNK:]) == "SUCCESS"
        assert record(s, key, CHUNK, [c1, c2]) == "FAILURE"
        assert s.request(f"CHECKOBJECT {c2}") == "FAILURE"  # its own: removed
        assert s.request(f"CHECKOBJECT {c1}") == "SUCCESS"  # the other session's: kept
    assert {p.name for p in store.rglob("*") if p.is_file()} >= {Key.parse(c1).keyfile()}
    assert dirworld.branch_file(location_log_path(key)) is None


# X19 -----------------------------------------------------------------------------------------


def test_x19_keys_without_a_hash_are_proven_by_size(
    dirworld: DirWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WORM (and URL) keys carry no hash: nothing can prove their content, and a plain PUT
    accepts any content of their size too (git-annex as well). The extension gives no
    more: their objects must have the key's size (and decrypt, encrypted)."""
    monkeypatch.setenv("GNUPGHOME", str(dirworld.keyring))
    key = Key.parse(f"WORM-s{CHUNK + 5}-m1700000000--x19.bin")
    c1, c2 = map(str, chunks.chunk_keys(key, CHUNK, 2))
    with dirworld.session("plainchunk") as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, c2, bytes(6)) == "FAILURE"  # the chunk's size is known
        assert put_object(s, c1, bytes(CHUNK)) == "SUCCESS"
        assert put_object(s, c2, bytes(5)) == "SUCCESS"
        assert record(s, key, CHUNK, [c1, c2]) == "SUCCESS"
    small = Key.parse("WORM-s5-m1700000000--x19small.bin")
    name = str(encrypted_key(dirworld.shared_cipher("encflat"), "HMACSHA1", small))
    with dirworld.session("encflat") as s:
        s.request("EXTENSIONS annexproxy-objects")
        assert put_object(s, name, dirworld.encrypt("encflat", b"123456")) == "SUCCESS"
        assert record(s, small, 0, [name]) == "FAILURE"  # decrypts to 6 bytes, not 5
        assert put_object(s, name, dirworld.encrypt("encflat", b"12345")) == "SUCCESS"
        assert record(s, small, 0, [name]) == "SUCCESS"


# X20 -----------------------------------------------------------------------------------------


def test_x20_no_uploads_where_the_proxy_cannot_read_back(
    dirworld: DirWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hybrid: the proxy proves a RECORD only with the secret key. Without it (its keyring
    has the public key only) it stores nothing a client sends (a client's word alone never
    makes a location log); objects are still served. With it, every RECORD is decrypted
    and verified."""
    name = gpg_label("x20")
    key = make_key(b"x20")
    before = dirworld.objects("hybrid")
    with dirworld.session("hybrid") as s:
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert s.request(f"CHECKOBJECT {name}") == "FAILURE"
        assert s.request(f"PUTOBJECT {name} 3") == f"ERROR {UNPROVABLE}"
        assert record(s, key, CHUNK, [name]) == f"ERROR {UNPROVABLE}"
        assert s.request(f"PUTOBJECT {name} 3") == f"ERROR {UNPROVABLE}"  # asked once
        in_step(s)
        result = s.finish()
    assert result.code == 0
    assert dirworld.objects("hybrid") == before
    assert dirworld.branch_file(location_log_path(key)) is None
    monkeypatch.setenv("GNUPGHOME", str(dirworld.keyring))
    content = os.urandom(500)
    key = make_key(content)
    piece = chunks.chunk_keys(key, CHUNK, 1)[0]
    obj = str(encrypted_key(dirworld.shared_cipher("hybrid"), "HMACSHA1", piece))
    with dirworld.session("hybrid", GNUPGHOME=str(dirworld.keyring)) as s:
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert put_object(s, obj, dirworld.encrypt("hybrid", bytes(500))) == "SUCCESS"
        assert record(s, key, CHUNK, [obj]) == "FAILURE"
        assert put_object(s, obj, dirworld.encrypt("hybrid", content)) == "SUCCESS"
        assert record(s, key, CHUNK, [obj]) == "SUCCESS"
        assert get_key(s, key)[1:] == (content, "VALID")


# X21 -----------------------------------------------------------------------------------------


def test_x21_get_never_calls_bad_content_valid(dirworld: DirWorld) -> None:
    """However objects got into the storage (here: written there directly), a GET says
    VALID only for content that is the key's; from an offset too."""
    content = os.urandom(3000)
    key = make_key(content)
    path = dirworld.stores["plain"] / key.hashdir_lower() / key.keyfile() / key.keyfile()
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(3000))
    with dirworld.session("plain") as s:
        assert get_key(s, key) == ("DATA 3000", bytes(3000), "INVALID")
        assert get_key(s, key, 1000) == ("DATA 2000", bytes(2000), "INVALID")
        in_step(s)
    path.write_bytes(content)
    with dirworld.session("plain") as s:
        assert get_key(s, key, 1000) == ("DATA 2000", content[1000:], "VALID")


# X11 -----------------------------------------------------------------------------------------


def test_x11_client_stopping_mid_data_is_timed_out(dirworld: DirWorld) -> None:
    name = gpg_name("6")
    before = dirworld.objects("enc")
    dirworld.admin("git", "config", "annexproxy.idletimeout", "2")
    try:
        with dirworld.session("enc") as s:
            s.request("EXTENSIONS annexproxy-objects")
            assert s.request(f"PUTOBJECT {name} 100000") == "PUT-FROM 0"
            s.send_raw(b"DATA 100000\n" + b"x" * 4000)
            start = time.monotonic()
            assert s.at_eof(timeout=30)  # closed without another word
            assert time.monotonic() - start < 20
            assert s.wait() != 0
    finally:
        dirworld.admin("git", "config", "--unset", "annexproxy.idletimeout")
    assert dirworld.objects("enc") == before
    assert not [p for p in (dirworld.proxy / "annex" / "othertmp").glob("*") if p.is_file()]


# X12 -----------------------------------------------------------------------------------------


def test_x12_negotiation(dirworld: DirWorld) -> None:
    name = gpg_name("7")
    with dirworld.session("enc") as s:
        for req in (f"CHECKOBJECT {name}", f"GETOBJECT {name}", f"PUTOBJECT {name} 3",
                    f"PUTINDIRECT {name} 3 {'0' * 64}", f"INDIRECTDONE {name}"):  # fmt: skip
            assert s.request(req) == "ERROR unknown command", req
        in_step(s)
        # After a request, and twice: each answer is the subset of what this one asked
        # for (an empty answer leaves what was agreed before: nothing a client could not
        # get again by asking; shell/proxy.py).
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert s.request(f"CHECKOBJECT {name}") == "FAILURE"
        assert s.request("EXTENSIONS annexproxy-indirect") == "EXTENSIONS"
        assert s.request(f"PUTINDIRECT {name} 3 {'0' * 64}") == "ERROR unknown command"
        assert s.request("EXTENSIONS annexproxy-objects") == "EXTENSIONS annexproxy-objects"
        assert s.request(f"CHECKOBJECT {name}") == "FAILURE"
    with dirworld.session("enc") as s:  # a RECORD not negotiated: refused, DATA unwanted
        assert s.request(f"RECORD 0 1 {make_key(b'r')}") == "ERROR unknown command"
        s.send_data(name.encode() + b"\n")
        assert s.readline().startswith("ERROR")
    assert dirworld.branch_file(location_log_path(make_key(b"r"))) is None


# X13 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [None, "node1", "cluster"], ids=["plain", "proxied", "gateway"])
def test_x13_no_extensions_outside_special_remotes(dirworld: DirWorld, target: str | None) -> None:
    key = make_key(b"x13")
    with dirworld.session(target) as s:
        assert s.request("EXTENSIONS annexproxy-objects annexproxy-indirect") == "EXTENSIONS"
        for req in (f"CHECKOBJECT {key}", f"GETOBJECT {key}", f"PUTOBJECT {key} 3",
                    f"PUTINDIRECT {key} 3 {'0' * 64}", f"INDIRECTDONE {key}"):  # fmt: skip
            assert s.request(req).startswith("ERROR"), req
        assert s.request(f"CHECKPRESENT {key}").startswith(("FAILURE", "SUCCESS"))


# --- S3 remotes ---------------------------------------------------------------------------------


S3_REMOTES = {
    "s3flat": {"encryption": "none"},
    "s3enc": {"encryption": "shared", "fileprefix": "pre/"},
    "s3chunk": {"encryption": "none", "chunk": "64KiB"},
}


@dataclass
class S3World:
    env: SshEnv
    server: MotoServer
    proxy: Path
    uuids: dict[str, str]
    admin_env: dict[str, str]

    def shell(self, name: str, **env: str) -> ShellSession:
        argv = p2pstdio_argv(self.env.srvbin_dir / "git-annex-shell", self.proxy,
                             uuid=self.uuids[name])  # fmt: skip
        return ShellSession(argv, env={**self.admin_env, **env}, cwd=self.proxy, timeout=60)

    def session(self, name: str, **env: str) -> ShellSession:
        s = self.shell(name, **env)
        s.handshake()
        agreed = s.request("EXTENSIONS annexproxy-objects annexproxy-indirect")
        assert agreed == "EXTENSIONS annexproxy-objects annexproxy-indirect"
        return s

    def config(self, *args: str) -> None:
        subprocess.run(["git", "config", *args], cwd=self.proxy, env=self.admin_env,
                       check=True, timeout=60)  # fmt: skip

    def get(self, name: str, obj: str) -> bytes:
        return self.server.get_object(name, S3_REMOTES[name].get("fileprefix", "") + obj)

    def branch_file(self, path: str) -> bytes | None:
        proc = subprocess.run(["git", "show", f"git-annex:{path}"], cwd=self.proxy,
                              env=self.admin_env, capture_output=True, timeout=60,
                              check=False)  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None

    def has(self, name: str, obj: str) -> bool:
        prefix = S3_REMOTES[name].get("fileprefix", "")
        return prefix + obj in self.server.list_objects(name)


@pytest.fixture(scope="module")
def s3world(
    tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path
) -> Iterator[S3World]:
    root = tmp_path_factory.mktemp("secext-s3")
    with moto_server(root / "moto.log") as server:
        env = make_ssh_env(root / "ssh", annex_bin, our_shell)
        gnupghome = root / "gnupg"
        gnupghome.mkdir(mode=0o700)
        server_env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                      "GNUPGHOME": str(gnupghome)}  # fmt: skip
        env = env.with_server(**server_env)
        proxy = env.make_server_repo("proxy.git", "proxy")
        admin_env = {**env.admin_env(), **server_env}

        def admin(*args: str) -> str:
            return subprocess.run(list(args), cwd=proxy, env=admin_env, check=True,
                                  capture_output=True, text=True, timeout=300).stdout  # fmt: skip

        admin("git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1")
        for name, settings in S3_REMOTES.items():
            admin("git", "annex", "initremote", "-q", name, "type=S3", "host=127.0.0.1",
                  f"port={server.port}", "protocol=http", "requeststyle=path", "signature=v4",
                  "region=us-east-1", f"bucket={name}",
                  *[f"{k}={v}" for k, v in settings.items()])  # fmt: skip
            admin("git", "config", f"remote.{name}.annex-proxy", "true")
        admin("git", "annex", "updateproxy", "-q")
        uuids = {n: admin("git", "config", f"remote.{n}.annex-uuid").strip() for n in S3_REMOTES}
        yield S3World(env, server, proxy, uuids, admin_env)
        subprocess.run(["gpgconf", "--kill", "all"], check=False, capture_output=True,
                       env={**os.environ, "GNUPGHOME": str(gnupghome)}, timeout=60)  # fmt: skip


def presign(s: ShellSession, name: str, size: int, sha: str) -> p2p.Indirect:
    s.send(f"PUTINDIRECT {name} {size} {sha}")
    line = s.readline()
    conn = p2p.P2PConnection()
    conn.receive_data(line.encode() + b"\n")
    reply = conn.next_event()
    assert isinstance(reply, p2p.Indirect), line
    return reply


def upload(reply: p2p.Indirect, body: bytes, tmp: Path) -> None:
    path = tmp / "body"
    path.write_bytes(body)
    headers = {k: v for k, v in reply.headers if k.lower() != "content-length"}
    fd = os.open(path, os.O_RDONLY)
    try:
        trio.run(http_put, reply.url, headers, fd, 0, len(body))
    finally:
        os.close(fd)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# X1 (indirect) ---------------------------------------------------------------------------------


def test_x1_readonly_refuses_indirect_uploads(s3world: S3World) -> None:
    name = gpg_name("b")
    with s3world.session("s3enc", GIT_ANNEX_SHELL_READONLY="1") as s:
        assert s.request(f"PUTINDIRECT {name} 3 {sha(b'abc')}") == READONLY_ERROR
        assert s.request(f"INDIRECTDONE {name}") == READONLY_ERROR
        assert s.request(f"CHECKOBJECT {name}") == "FAILURE"
        in_step(s)
    assert not s3world.has("s3enc", name)


# X2, X3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["readwrite", "appendonly"])
def test_x3_failed_indirectdone_never_deletes_another_writers_object(
    s3world: S3World, mode: str
) -> None:
    env = {"GIT_ANNEX_SHELL_APPENDONLY": "1"} if mode == "appendonly" else {}
    name = gpg_name("c" if mode == "readwrite" else "d")
    good = os.urandom(500)
    with s3world.session("s3enc", **env) as attacker:
        # The name is absent: a URL for it, with a checksum of nothing real.
        presign(attacker, name, 7, sha(b"garbage"))
        with s3world.session("s3enc") as victim:  # meanwhile, the real object arrives
            assert put_object(victim, name, good) == "SUCCESS"
        assert attacker.request(f"INDIRECTDONE {name}") == "FAILURE"
        # Presigning a name that exists: no URL at all.
        assert attacker.request(f"PUTINDIRECT {name} 7 {sha(b'garbage')}") == "ALREADY-HAVE"
    assert s3world.get("s3enc", name) == good


@pytest.mark.parametrize("mode", ["readwrite", "appendonly"])
def test_x2_own_bad_upload_is_removed_only_with_full_write_access(
    s3world: S3World, mode: str, tmp_path: Path
) -> None:
    env = {"GIT_ANNEX_SHELL_APPENDONLY": "1"} if mode == "appendonly" else {}
    name = gpg_name("e" if mode == "readwrite" else "f")
    with s3world.session("s3enc", **env) as s:
        reply = presign(s, name, 7, sha(b"claimed"))
        upload(reply, b"other", tmp_path)  # moto checks neither size nor checksum
        assert s3world.has("s3enc", name)
        assert s.request(f"INDIRECTDONE {name}") == "FAILURE"
        in_step(s)
    # Append-only removes nothing at all, not even what it can prove it wrote itself.
    assert s3world.has("s3enc", name) == (mode == "appendonly")


@pytest.mark.parametrize("mode", ["readwrite", "appendonly"])
def test_x16_a_matching_checksum_is_no_proof_of_authorship(s3world: S3World, mode: str) -> None:
    env = {"GIT_ANNEX_SHELL_APPENDONLY": "1"} if mode == "appendonly" else {}
    name = gpg_label(f"x16-{mode}")
    good = os.urandom(500)
    with s3world.session("s3enc", **env) as attacker:
        # The checksum of what another writer will store, with a size that will not match:
        # the proxy's own PUT of that object carries the same checksum.
        presign(attacker, name, 7, sha(good))
        with s3world.session("s3enc") as victim:
            assert put_object(victim, name, good) == "SUCCESS"
        assert attacker.request(f"INDIRECTDONE {name}") == "FAILURE"
    assert s3world.get("s3enc", name) == good


def test_x16_no_presign_for_a_key_without_size(s3world: S3World) -> None:
    """The issue's case: a sizeless key's chunk, presigned at any size with the checksum of
    the real chunk; another client then stores the key with a plain PUT."""
    content = os.urandom(CHUNK + 100)
    key = Key.parse(f"SHA256E--{sha(content)}.bin")
    first, _ = chunks.chunk_keys(key, CHUNK, 2)
    with s3world.session("s3chunk", GIT_ANNEX_SHELL_APPENDONLY="1") as attacker:
        answer = attacker.request(f"PUTINDIRECT {first} 1 {sha(content[:CHUNK])}")
        with s3world.shell("s3chunk") as victim:
            victim.handshake()
            assert victim.request(f"PUT victim.bin {key}") == "PUT-FROM 0"
            victim.send_data(content)
            assert victim.request("VALID") == "SUCCESS"
            assert victim.finish().code == 0
        if answer.startswith("INDIRECT "):
            attacker.request(f"INDIRECTDONE {first}")
        in_step(attacker)
        # The whole key has no size either: nothing binds a URL's length.
        other = Key.parse(f"SHA256E--{sha(b'other')}.bin")
        whole = attacker.request(f"PUTINDIRECT {other} 5 {sha(b'other')}")
    assert s3world.has("s3chunk", str(first))
    log = s3world.branch_file(location_log_path(key)) or b""
    assert s3world.uuids["s3chunk"].encode() in log
    with s3world.shell("s3chunk") as reader:
        reader.handshake()
        assert reader.request(f"GET 0 victim.bin {key}") == f"DATA {len(content)}"
        assert reader.read_exact(len(content)) == content and reader.readline() == "VALID"
        reader.send("SUCCESS")
        in_step(reader)
    assert answer == "FAILURE" and whole == "FAILURE"


# X18 (indirect) --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["readwrite", "appendonly"])
def test_x18_poisoned_indirect_chunks_are_never_recorded(
    s3world: S3World, mode: str, tmp_path: Path
) -> None:
    """Zeros of the right length uploaded through the URLs (their checksums claimed
    honestly: INDIRECTDONE is satisfied), then RECORD: read back, not the key's."""
    env = {"GIT_ANNEX_SHELL_APPENDONLY": "1"} if mode == "appendonly" else {}
    content = os.urandom(CHUNK + 300)
    key = make_key(content)
    pieces = chunks.chunk_keys(key, CHUNK, 2)
    with s3world.session("s3chunk", **env) as s:
        for piece, n in zip(pieces, (CHUNK, 300), strict=True):
            reply = presign(s, str(piece), n, sha(bytes(n)))
            upload(reply, bytes(n), tmp_path)
            assert s.request(f"INDIRECTDONE {piece}") == "SUCCESS"
        assert record(s, key, CHUNK, [str(p) for p in pieces]) == "FAILURE"
        assert s.finish().code == 0
    assert s3world.branch_file(location_log_path(key)) is None
    assert s3world.branch_file(chunks.chunk_log_path(key)) is None
    # Its own uploads (they carry its presigns' tags): removed with full write access.
    left = [p for p in pieces if s3world.has("s3chunk", str(p))]
    assert len(left) == (2 if mode == "appendonly" else 0)


# X5 (indirect) ---------------------------------------------------------------------------------


def test_x5_traversal_never_reaches_a_url(s3world: S3World) -> None:
    with s3world.session("s3flat") as s:
        for name in PLAIN_BAD:
            if "\x00" in name:
                continue
            assert s.request(f"PUTINDIRECT {name} 1 {sha(b'x')}") == "ERROR bad object name"
        in_step(s)


DOT_KEYS = ["URL--http://example.com/a/../../../s3enc/x", "URL--http://example.com/./x",
            "URL-s5--http://h/../x"]  # fmt: skip


@pytest.mark.parametrize("remote", ["s3flat", "s3chunk"])
def test_x17_dot_segments_never_reach_s3_on_the_plain_path(s3world: S3World, remote: str) -> None:
    """One object-name rule for every path: the plain PUT, GET, CHECKPRESENT and REMOVE of
    a key with a `.` or `..` segment are refused as the extension's requests are, before
    any request names it to S3 (a URL path an HTTP library or a proxy in front of the
    storage could resolve into another object or bucket)."""
    before = {b: set(s3world.server.list_objects(b)) for b in S3_REMOTES}
    with s3world.shell(remote) as s:
        s.handshake()
        for key in DOT_KEYS:
            answer = s.request(f"PUT x {key}")
            if answer == "PUT-FROM 0":
                s.send_data(b"hello")
                answer = s.request("VALID")
            assert answer.startswith("ERROR") and "segment" in answer, answer
            assert s.request(f"CHECKPRESENT {key}").startswith("ERROR")
            assert s.request(f"GET 0 x {key}").startswith("ERROR")
            assert s.request(f"REMOVE {key}").startswith("ERROR")
        in_step(s)
        assert s.finish().code == 0
    assert {b: set(s3world.server.list_objects(b)) for b in S3_REMOTES} == before
    for key in DOT_KEYS:
        assert s3world.branch_file(location_log_path(Key.parse(key))) is None


# X9 (indirect) ---------------------------------------------------------------------------------


def test_x9_unencrypted_indirect_is_bound_to_the_key(s3world: S3World, tmp_path: Path) -> None:
    content = os.urandom(1000)
    key = make_key(content)
    with s3world.session("s3flat") as s:
        assert s.request(f"PUTINDIRECT {key} 999 {sha(content)}") == "FAILURE"  # size
        assert s.request(f"PUTINDIRECT {key} 1000 {sha(b'x')}") == "FAILURE"  # not its hash
        reply = presign(s, str(key), 1000, sha(content))
        upload(reply, content, tmp_path)
        assert s.request(f"INDIRECTDONE {key}") == "SUCCESS"
        assert record(s, key, 0, [str(key)]) == "SUCCESS"
    # A key whose hash is not SHA-256: the object is read back and verified.
    other = os.urandom(800)
    mkey = Key.parse(f"MD5E-s800--{hashlib.md5(other, usedforsecurity=False).hexdigest()}.bin")
    with s3world.session("s3flat") as s:
        reply = presign(s, str(mkey), 800, sha(bytes(800)))
        upload(reply, bytes(800), tmp_path)  # the size and the checksum claimed, wrong content
        assert s.request(f"INDIRECTDONE {mkey}") == "FAILURE"
        assert not s3world.has("s3flat", str(mkey))
        reply = presign(s, str(mkey), 800, sha(other))
        upload(reply, other, tmp_path)
        assert s.request(f"INDIRECTDONE {mkey}") == "SUCCESS"


# X12 (indirect) --------------------------------------------------------------------------------


def test_x12_renegotiation_forgets_presigned_names(s3world: S3World, tmp_path: Path) -> None:
    name = gpg_name("7")
    with s3world.session("s3enc") as s:
        reply = presign(s, name, 3, sha(b"abc"))
        upload(reply, b"abc", tmp_path)
        again = s.request("EXTENSIONS annexproxy-objects annexproxy-indirect")
        assert again == "EXTENSIONS annexproxy-objects annexproxy-indirect"
        assert s.request(f"INDIRECTDONE {name}") == "ERROR no upload of that object was presigned"


# X14 -------------------------------------------------------------------------------------------


def test_x14_presigned_url_scope(s3world: S3World) -> None:
    name = gpg_name("8")
    digest = sha(b"scoped")
    with s3world.shell("s3enc") as s:
        s.handshake()
        s.request("EXTENSIONS annexproxy-objects annexproxy-indirect")
        s.send(f"PUTINDIRECT {name} 6 {digest}")
        line = s.readline()
        result = s.finish()
    conn = p2p.P2PConnection()
    conn.receive_data(line.encode() + b"\n")
    reply = conn.next_event()
    assert isinstance(reply, p2p.Indirect)
    url = urllib.parse.urlsplit(reply.url)
    assert (url.scheme, url.netloc) == ("http", f"127.0.0.1:{s3world.server.port}")
    assert url.path == f"/s3enc/pre/{name}" and not url.fragment
    query = dict(urllib.parse.parse_qsl(url.query))
    assert query["X-Amz-Expires"] == "900"
    assert query["X-Amz-Credential"].startswith(KEY_ID + "/")
    signed = query["X-Amz-SignedHeaders"].split(";")
    assert {"content-length", "host", "x-amz-checksum-sha256"} <= set(signed)
    headers = dict(reply.headers)
    assert headers["Content-Length"] == "6"
    assert headers["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(digest)).decode()
    assert not {k.lower() for k in headers} & {"authorization", "x-amz-security-token"}
    # The secret is never sent, in any form, nor written to the log.
    for form in (SECRET, urllib.parse.quote(SECRET, safe=""), urllib.parse.quote_plus(SECRET)):
        assert form not in line and form not in result.stderr
    assert result.stdout == b""


EXPIRIES = [("999999", "86400"), ("60", "60"), ("0", "1"), ("junk", "900"), ("²", "900")]


@pytest.mark.parametrize(("value", "expected"), EXPIRIES)
def test_x14_expiry_is_bounded(s3world: S3World, value: str, expected: str) -> None:
    s3world.config("annexproxy.presignexpiry", value)
    try:
        with s3world.session("s3enc") as s:
            reply = presign(s, gpg_name("9"), 1, sha(b"x"))
    finally:
        s3world.config("--unset", "annexproxy.presignexpiry")
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(reply.url).query))
    assert query["X-Amz-Expires"] == expected


# X15 -------------------------------------------------------------------------------------------


def test_x15_indirectdone_only_for_this_sessions_presigns(s3world: S3World, tmp_path: Path) -> None:
    name = gpg_name("0")
    with s3world.session("s3enc") as first, s3world.session("s3enc") as second:
        reply = presign(first, name, 3, sha(b"abc"))
        upload(reply, b"abc", tmp_path)
        assert second.request(f"INDIRECTDONE {name}") == (
            "ERROR no upload of that object was presigned"
        )
        in_step(second)
        assert first.request(f"INDIRECTDONE {name}") == "SUCCESS"
        # Once confirmed, a claim again is not presigned any more.
        assert first.request(f"INDIRECTDONE {name}").startswith("ERROR")
    assert s3world.get("s3enc", name) == b"abc"
