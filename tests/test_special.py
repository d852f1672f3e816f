"""Special remotes behind the proxy (issue 4): git-annex's chunking and encryption.

Every expectation comes from real git-annex and real gpg on this machine, never from our
own output alone:

* pure parts: the cipher split and HMAC object names against names git-annex produced
  (the special.txt transcript, and remotes git-annex sets up here with every ``mac=``);
  chunk logs byte for byte against the ones git-annex writes; our gpg command lines
  against the ones git-annex runs (seen through a logging gpg wrapper);
* interop: content our proxy stores is read by git-annex with the remote enabled directly
  (``enableremote``, ``get --from``), and content git-annex stores there is served by our
  proxy, for ``encryption=shared`` and ``hybrid``, with two chunk sizes and unchunked;
* the store never holds plaintext or key names; temp files never outlive a session, even
  when the client is killed;
* P2P details on our shell directly: offsets across chunk boundaries, corrupt chunks,
  refusals, errors of an unreachable store;
* (slow) 1 GiB through an encrypted chunked remote within 100 MiB of RSS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, make_ssh_env, stop_gpg_agent
from p2pdriver import ShellSession, p2pstdio_argv, sha256e_key

from git_remote_annexproxy import chunks
from git_remote_annexproxy.annexlog import VectorClock
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.crypto import (
    MACS,
    Cipher,
    CryptoConfigError,
    Gpg,
    calc_mac,
    encrypted_key,
    stored_cipher,
)
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.openpgp import OpenPGPError, Unsupported
from git_remote_annexproxy.openpgpsym import Decryptor
from shell.specialremote import Encryption, SpecialRemote, Spool
from shell.specialstore import ObjectMissing, SpecialStorage

MiB = 1 << 20

# --- vectors from git-annex ------------------------------------------------------------------

# ../shared/spec/traces/special.txt: remote.log's cipher of `dirsr` (encryption=shared,
# chunk=1MiB), and the one object left after big.bin was dropped: small.txt's only chunk.
TRACE_CIPHER = (
    "K1dlOUhRaGxPcjU5MFRqamVSZHBMYi83OFA2SUNCN2tDL3V0VVVjM1dBTE80dG8xRTluQ25pMHplZHJwYjFvcmRQV0"
    "pxdWw0NmIzL3VXY0k2MllQY1pWOGRVa1A0aXJYNURQV2dTSDhaWnk2ZmxTS1k5d3NDWExQMWpTYVc1WTdvbmQrRWtR"
    "YmFHajlRQnE5eUF5TjY4YnJkTEVBWXoycW5EUUFlWDErRmpEMFlnZjZVYnUyWXlOMFU5T3RNRWxvcExmTDAvSTVZaz"
    "daRndZSWZBem54RmNkMDAxVUpxOWx3cHV0emZsS2FkU0ovdDhVMndSZFNkaTFiZ1NNK1lYWFdLQm1mZURtWVhtOU5w"
    "VUVEU3hnT1haS2NvOWJvZGZPTjdEUDFDVDRRVFl3SUU5MzdnZzJMN2oxdU45MENObzB5c3BMamhYam05OHc0TlBRYU"
    "IxbjdWZXMvOU00dndEelR0SXN1NnRTQ3lqVThBdWM5dFg2eHZqQWZ5dWs4azhVeHE2SHVlcll5Q2lubW1nNUtBc1hH"
    "UWF0Ri9MMkRYblZoem10Z2pHWWk3azNWdHJIdnZVZ04yVmF0OHFka0w4N2tJbHIrenBSYjRGYlBNbEt4SVJBa3llM2"
    "FTZVZRQXUxREJrVzlUQTZxM3hKY3VBQjlTczQ2M0p5SFFod2VOcjZRSXZnMUlUTDNjbnVPY3JxQWdQVjRLWjlQelZp"
    "T2R6WlpvSjNxTW9IUnJ3bW0zcWxNL0kxeWxid2tHc1U2Z21MSjVVTXhveVpkaWRUbHRManNkT3RrQk5RMHpVeldrS0"
    "5yVmhXVzQ1dnd0UVZTb1N6MTFHOFk4TzZLUmJDV09Cb2FxZnZRYktJK2lqaU5hN05GQmN6dStLZ0ludnBJNlUzZExN"
    "M3lBNytsYmc9Cg=="
)
TRACE_SMALL_KEY = "SHA256E-s6--4c47b3e816fbe7d40cef9f665ba8f0be1ae68b5e8e7ed70f5b6bab7f70528e8f.txt"
TRACE_SMALL_OBJECT = "GPGHMACSHA1--e588a65d913e47ea400dba4b7e5b08042aaa9a08"
TRACE_CHUNK_LOG = (
    b"1795562630s 7815ca3c-cb5f-4fa0-aa40-6a0c2e864211:1048576 0\n"
)


def test_cipher_split_and_object_name_from_the_transcript() -> None:
    stored = stored_cipher({"encryption": "shared", "cipher": TRACE_CIPHER})
    assert stored is not None and stored.method == "shared" and not stored.encrypted
    cipher = Cipher(stored.data, mac_only=False)
    # The cipher is gpg --gen-random --armor output: base64 text and a final newline.
    assert len(stored.data) == 685 and stored.data.endswith(b"=\n")
    assert cipher.mac_key == stored.data[:256]
    assert cipher.passphrase == stored.data[256:]
    chunk = chunks.chunk_keys(Key.parse(TRACE_SMALL_KEY), 1048576, 1)[0]
    assert str(chunk) == TRACE_SMALL_KEY.replace("-s6--", "-s6-S1048576-C1--")
    assert str(encrypted_key(cipher, "HMACSHA1", chunk)) == TRACE_SMALL_OBJECT


def test_hmac_matches_git_annex_known_good_value() -> None:
    # Crypto.hs prop_HmacSha1WithCipher_sane: "Ensure that macWithCipher' returns the same
    # thing forevermore."
    assert calc_mac("HMACSHA1", b"foo", b"bar") == "46b4ec586117154dacd49d664e5d63fdc88efb51"


def test_stored_cipher_rules() -> None:
    assert stored_cipher({"encryption": "none"}) is None
    assert stored_cipher({}) is None
    plain = base64.b64encode(b"x" * 300).decode()
    hybrid = stored_cipher({"encryption": "hybrid", "cipher": plain, "cipherkeys": "A,B"})
    assert hybrid is not None and hybrid.encrypted and hybrid.keyids == ("A", "B")
    pubkey = stored_cipher({"encryption": "pubkey", "cipher": plain, "cipherkeys": "A"})
    assert pubkey is not None and pubkey.encrypted
    shared_pub = stored_cipher({"encryption": "sharedpubkey", "cipher": plain, "pubkeys": "C"})
    assert shared_pub is not None and not shared_pub.encrypted and shared_pub.keyids == ("C",)
    # Written by old git-annex without encryption=: keys make it hybrid, else shared.
    old_hybrid = stored_cipher({"cipher": plain, "cipherkeys": "A"})
    assert old_hybrid is not None and old_hybrid.method == "hybrid"
    old_shared = stored_cipher({"cipher": plain})
    assert old_shared is not None and old_shared.method == "shared"
    # Never read an inconsistent setting as "unencrypted".
    for bad in (
        {"encryption": "hybrid", "cipher": plain},
        {"encryption": "shared"},
        {"encryption": "shared", "cipher": plain, "cipherkeys": "A"},
        {"encryption": "rot13", "cipher": plain},
        {"encryption": "shared", "cipher": "!!notbase64"},
    ):
        with pytest.raises(CryptoConfigError):
            stored_cipher(bad)
    mac_only = Cipher(b"m" * 345, mac_only=True)
    assert mac_only.mac_key == b"m" * 345 and mac_only.passphrase is None


def test_chunk_sizes_as_git_annex_reads_them() -> None:
    assert chunks.parse_size("1MiB") == 1048576
    assert chunks.parse_size("1MB") == 1000000
    assert chunks.parse_size("1mb") == 1000000  # storage units come first
    assert chunks.parse_size("256KiB") == 262144
    assert chunks.parse_size("0.5 GB") == 500000000
    assert chunks.parse_size("10 kilobytes") == 10000
    assert chunks.parse_size("100") == 100
    assert chunks.parse_size("1Mbit") == 125000
    assert chunks.parse_size("MiB") is None
    assert chunks.parse_size("1 furlong") is None
    assert chunks.configured_chunk_size({"chunk": "0"}) is None
    assert chunks.configured_chunk_size({}) is None
    with pytest.raises(chunks.ChunkConfigError):
        chunks.configured_chunk_size({"chunksize": "1MiB"})
    with pytest.raises(chunks.ChunkConfigError):
        chunks.configured_chunk_size({"chunk": "lots"})


def test_chunk_keys_and_counts() -> None:
    key = Key.parse("SHA256E-s2621440--" + "c" * 64 + ".bin")
    assert chunks.chunk_count(2621440, 1048576) == 3
    assert chunks.chunk_count(0, 1048576) == 1  # empty content: one empty chunk
    ks = chunks.chunk_keys(key, 1048576, 3)
    assert [str(k).split("--")[0] for k in ks] == [
        f"SHA256E-s2621440-S1048576-C{n}" for n in (1, 2, 3)
    ]
    assert [chunks.chunk_length(k) for k in ks] == [1048576, 1048576, 524288]
    assert chunks.is_stable(key) and not chunks.is_stable(Key.parse("URL--http://x/y"))


def test_chunk_log_round_trip_and_layout_order() -> None:
    log = chunks.parse_chunk_log(TRACE_CHUNK_LOG)
    assert chunks.format_chunk_log(log) == TRACE_CHUNK_LOG
    uuid = "7815ca3c-cb5f-4fa0-aa40-6a0c2e864211"
    assert chunks.logged_chunkings(TRACE_CHUNK_LOG, uuid) == []  # count 0: removed
    later = VectorClock.from_seconds(1795562700)
    stored = chunks.record_chunks(TRACE_CHUNK_LOG, uuid, 1048576, 3, later)
    assert stored == b"1795562700s " + uuid.encode() + b":1048576 3\n"
    two = chunks.record_chunks(stored, uuid, 65536, 40, later)
    # Sorted by size; the same clock for a new field, advanced for an old one.
    assert two.splitlines()[0].endswith(b":65536 40")
    assert chunks.logged_chunkings(two, uuid) == [(65536, 40), (1048576, 3)]
    again = chunks.record_chunks(two, uuid, 65536, 0, later)
    assert b"1795562701s " + uuid.encode() + b":65536 0" in again
    key = Key.parse("SHA256E-s10--" + "a" * 64)
    unchunked, small, big = [key], chunks.chunk_keys(key, 4, 3), chunks.chunk_keys(key, 8, 2)
    logged = [(4, 3), (8, 2)]
    assert chunks.layouts(key, None, logged) == [unchunked, small, big]
    assert chunks.layouts(key, 8, logged) == [small, big, unchunked]


# --- the special remote over a storage that is not a local file (S3's shape) ----------------


class MemoryStorage(SpecialStorage):
    """Objects in a dict, handed out in small pieces and never as a local file: the path a
    remote type like S3 takes (open_local is None, so gpg reads a spooled copy)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    async def store(self, key: Key, data: AsyncIterator[bytes]) -> None:
        self.objects[str(key)] = b"".join([piece async for piece in data])

    async def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]:
        if str(key) not in self.objects:
            raise ObjectMissing(str(key))
        data = self.objects[str(key)]
        for i in range(0, len(data), 10_000):
            yield data[i : i + 10_000]

    async def present(self, key: Key) -> bool:
        return str(key) in self.objects

    async def remove(self, key: Key) -> None:
        self.objects.pop(str(key), None)


async def test_special_remote_over_a_non_local_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store, read from offsets, remove, through `SpecialRemote` on MemoryStorage; every
    stored object decrypts with plain gpg and the cipher's passphrase to its chunk."""
    gitdir = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(gitdir)], check=True, timeout=60)
    annexdir = gitdir / "annex"
    annexdir.mkdir()
    gnupghome = tmp_path / "gnupg"
    gnupghome.mkdir(mode=0o700)
    monkeypatch.setenv("GNUPGHOME", str(gnupghome))
    storage = MemoryStorage()
    cipher = Cipher(base64.b64encode(os.urandom(512)) + b"\n", mac_only=False)
    encryption = Encryption(cipher, "HMACSHA256", Gpg(), ())
    uuid = "5ec1a100-0000-4000-8000-000000000001"
    remote = SpecialRemote(uuid, storage, chunk_size=100_000, encryption=encryption,
                           branch=AnnexBranch(gitdir, annexdir), annexdir=annexdir,
                           timeout=60)  # fmt: skip
    content = os.urandom(250_000)
    key = Key.parse(sha256e_key(content, ".bin"))
    try:
        spool = Spool.create(annexdir)
        spool.append(content)
        await remote.store(key, spool)
        spool.close()
        assert len(storage.objects) == 3
        assert await remote.present(key)
        layout = await remote.locate(key)
        for offset in (0, 99_999, 100_000, 249_999):
            got = b"".join([piece async for piece in remote.read(layout, offset)])
            assert got == content[offset:]
        for n, chunk in enumerate(chunks.chunk_keys(key, 100_000, 3)):
            stored = storage.objects[str(encryption.object_key(chunk))]
            rfd, wfd = os.pipe()
            os.write(wfd, (cipher.passphrase or b"") + b"\n")
            os.close(wfd)
            plain = subprocess.run(
                ["gpg", "--batch", "--quiet", "--passphrase-fd", str(rfd), "--decrypt"],
                input=stored, capture_output=True, pass_fds=(rfd,), check=True, timeout=60,
            ).stdout  # fmt: skip
            os.close(rfd)
            assert plain == content[n * 100_000 : (n + 1) * 100_000]
        await remote.remove(key)
        assert not storage.objects and not await remote.present(key)
        othertmp = annexdir / "othertmp"  # the branch code removes it when it is empty
        assert not othertmp.exists() or os.listdir(othertmp) == []
    finally:
        stop_gpg_agent(gnupghome)


# --- a local git-annex repository with special remotes (no proxy) ---------------------------


@dataclass
class Local:
    """A plain git-annex repository on this machine, driven with the real binary."""

    path: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            list(args), cwd=self.path, env=self.env, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def branch_file(self, path: str) -> bytes | None:
        proc = subprocess.run(
            ["git", "show", f"git-annex:{path}"], cwd=self.path, env=self.env,
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None


def local_repo(root: Path, annex_bin: Path, gnupg_home: Path, wrapper: Path | None = None) -> Local:
    home = root / "home"
    home.mkdir(parents=True)
    (home / ".gitconfig").write_text(
        "[user]\n\tname = t\n\temail = t@annexproxy.invalid\n[init]\n\tdefaultBranch = main\n"
    )
    path_dirs = [str(wrapper)] if wrapper else []
    env = {
        "HOME": str(home), "GNUPGHOME": str(gnupg_home), "LANG": "C.UTF-8",
        "PATH": os.pathsep.join([*path_dirs, str(annex_bin), "/usr/bin", "/bin"]),
        "GIT_CONFIG_NOSYSTEM": "1",
    }  # fmt: skip
    repo = Local(root / "repo", env)
    repo.path.mkdir()
    repo.run("git", "init", "-q")
    repo.run("git", "annex", "init", "-q", "local")
    return repo


def store_files(store: Path) -> set[Path]:
    return {Path(dp) / f for dp, _, fs in os.walk(store) for f in fs}


@pytest.mark.parametrize("mac", sorted(MACS))
def test_object_names_and_chunk_logs_match_git_annex(
    mac: str, tmp_path: Path, annex_bin: Path, gnupg: tuple[Path, str]
) -> None:
    """git-annex stores a file on a chunked encrypted remote with `mac`: our names for its
    chunks are exactly the files it wrote, and our chunk log code reproduces its logs."""
    repo = local_repo(tmp_path, annex_bin, gnupg[0])
    store = tmp_path / "store"
    store.mkdir()
    repo.run("git", "annex", "initremote", "-q", "sr", "type=directory",
             f"directory={store}", "encryption=shared", f"mac={mac}", "chunk=64KiB")  # fmt: skip
    (repo.path / "f").write_bytes(os.urandom(150_000))
    repo.run("git", "annex", "add", "-q", "f")
    repo.run("git", "annex", "copy", "-q", "--to", "sr", "f")
    key = Key.parse(repo.run("git", "annex", "lookupkey", "f").strip())
    uuid = repo.run("git", "config", "remote.sr.annex-uuid").strip()
    remote_log = repo.branch_file("remote.log") or b""
    fields = dict(w.split("=", 1) for w in remote_log.decode().split() if "=" in w)
    stored = stored_cipher(fields)
    assert stored is not None
    cipher = Cipher(stored.data, mac_only=False)
    ours = {str(encrypted_key(cipher, mac, k)) for k in chunks.chunk_keys(key, 65536, 3)}
    assert {p.name for p in store_files(store)} == ours
    assert all(name.startswith(f"GPG{mac}--") for name in ours)

    log_path = chunks.chunk_log_path(key)
    written = repo.branch_file(log_path)
    assert written is not None and written.endswith(f" {uuid}:65536 3\n".encode())
    parsed = chunks.parse_chunk_log(written)
    assert chunks.format_chunk_log(parsed) == written
    assert chunks.logged_chunkings(written, uuid) == [(65536, 3)]
    repo.run("git", "annex", "drop", "-q", "--force", "--from", "sr", "f")
    removed = repo.branch_file(log_path)
    assert removed is not None and not store_files(store)
    clock = VectorClock.parse(removed.split(b" ")[0])
    assert clock is not None
    assert chunks.record_chunks(written, uuid, 65536, 0, clock) == removed


def test_gpg_command_lines_are_git_annex_ones(
    tmp_path: Path, annex_bin: Path, gnupg: tuple[Path, str]
) -> None:
    """A gpg wrapper logs what git-annex runs, for content of a shared and a pubkey remote;
    our command lines for the same jobs are the same (up to the descriptor number)."""
    home, keyid = gnupg
    wrapper = tmp_path / "wrap"
    wrapper.mkdir()
    log = tmp_path / "gpg.log"
    script = wrapper / "gpg"
    script.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do printf "%s\\0" "$a"; done >> {shlex.quote(str(log))}\n'
        f'printf "\\n" >> {shlex.quote(str(log))}\n'
        'exec /usr/bin/gpg "$@"\n'
    )
    script.chmod(0o755)
    repo = local_repo(tmp_path, annex_bin, home, wrapper)
    remotes = {"sh": ["encryption=shared"], "pk": ["encryption=pubkey", f"keyid={keyid}"]}
    for name, enc in remotes.items():
        (tmp_path / name).mkdir()
        repo.run("git", "annex", "initremote", "-q", name, "type=directory",
                 f"directory={tmp_path / name}", *enc)  # fmt: skip
    (repo.path / "f").write_bytes(b"some content\n")
    repo.run("git", "annex", "add", "-q", "f")
    log.write_bytes(b"")
    for name in ("sh", "pk"):
        repo.run("git", "annex", "copy", "-q", "--to", name, "f")
        repo.run("git", "annex", "drop", "-q", "--force", "f")
        repo.run("git", "annex", "get", "-q", "--from", name, "f")
    seen = [line.rstrip(b"\0").split(b"\0") for line in log.read_bytes().splitlines() if line]
    runs = {tuple("FD" if prev == b"--passphrase-fd" else a.decode() for prev, a in
                  zip([b"", *argv[:-1]], argv, strict=True)) for argv in seen}  # fmt: skip

    def ours(argv: list[str]) -> tuple[str, ...]:
        return tuple("FD" if prev == "--passphrase-fd" else a
                     for prev, a in zip(["", *argv[1:-1]], argv[1:], strict=True))  # fmt: skip

    gpg = Gpg()
    symmetric = Cipher(b"c" * 684, mac_only=False)
    mac_only = Cipher(b"c" * 344, mac_only=True)
    expected = {
        ours(gpg.encrypt_argv(symmetric, (), 9)),
        ours(gpg.decrypt_argv(symmetric, 9)),
        ours(gpg.encrypt_argv(mac_only, (keyid,), None)),
        ours(gpg.decrypt_argv(mac_only, None)),
    }
    assert expected <= runs, f"git-annex ran: {sorted(runs)}"
    # The cipher of the pubkey remote is decrypted as git-annex does, plus --batch.
    assert ("--quiet", "--trust-model", "always", "--decrypt") in runs
    assert ours(gpg.cipher_decrypt_argv()) == ("--quiet", "--trust-model", "always", "--batch",
                                               "--decrypt")  # fmt: skip


# --- the proxy: a server repository with four directory special remotes ---------------------

# name: (encryption, chunk) -- shared and hybrid, two chunk sizes, and unchunked; and the
# two schemes that encrypt content to public keys instead of with a passphrase.
REMOTES = {
    "shchunk": ("shared", "1MiB"),
    "hychunk": ("hybrid", "256KiB"),
    "shflat": ("shared", None),
    "hyflat": ("hybrid", None),
    "pkchunk": ("pubkey", "512KiB"),
    "spkflat": ("sharedpubkey", None),
}


@dataclass
class World:
    """Our proxy (a bare server repository) fronting `REMOTES`; a client that reaches
    them through it over the fake ssh as `origin-NAME`; and a `direct` clone on the server
    where real git-annex has the same remotes enabled directly."""

    env: SshEnv
    shell: Path
    proxy: Path
    client: Path
    direct: Path
    stores: dict[str, Path]
    uuids: dict[str, str]

    def client_run(self, *args: str, check: bool = True) -> str:
        return self.env.run(list(args), cwd=self.client, check=check).stdout

    def admin(self, *args: str, cwd: Path, check: bool = True) -> str:
        return self.env.run(list(args), cwd=cwd, admin=True, check=check).stdout

    def proxy_whereis(self, key: Key) -> str:
        """What real git-annex in the proxy repository says holds `key` (it exits 1 when
        nothing does, which is an answer here)."""
        return self.admin("git", "annex", "whereis", "--key", str(key), cwd=self.proxy,
                          check=False)  # fmt: skip

    def proxy_branch_file(self, path: str) -> bytes | None:
        proc = subprocess.run(
            ["git", "show", f"git-annex:{path}"], cwd=self.proxy, env=self.env.admin_env(),
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        return proc.stdout if proc.returncode == 0 else None

    def direct_pull(self) -> None:
        """Bring the proxy's git-annex branch (chunk logs) into the direct clone."""
        self.admin("git", "fetch", "-q", "origin", cwd=self.direct)
        self.admin("git", "annex", "merge", "-q", cwd=self.direct)

    def direct_push(self) -> None:
        """Give the proxy the direct clone's git-annex branch (the chunk logs it wrote)."""
        self.direct_pull()
        self.admin("git", "push", "-q", "origin", "git-annex", cwd=self.direct)

    def p2p_env(self) -> dict[str, str]:
        return self.env.admin_env()

    def session(self, name: str) -> ShellSession:
        """Our shell's p2pstdio to special remote `name` through the proxy."""
        argv = p2pstdio_argv(self.shell, self.proxy, uuid=self.uuids[name])
        return ShellSession(argv, env=self.p2p_env(), cwd=self.proxy, timeout=120)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory,
    annex_bin: Path,
    our_shell: Path,
    gnupg: tuple[Path, str],
) -> World:
    home, keyid = gnupg
    root = tmp_path_factory.mktemp("special")
    env = make_ssh_env(root / "ssh", annex_bin, our_shell)
    # The proxy decrypts hybrid ciphers with its own keyring: hand GNUPGHOME to the server.
    env["GNUPGHOME"] = str(home)
    env["FAKESSH_PASSENV"] = "GNUPGHOME"
    proxy = env.make_server_repo("proxy.git", "proxy")
    stores: dict[str, Path] = {}
    for name, (encryption, chunk) in REMOTES.items():
        stores[name] = root / "stores" / name
        stores[name].mkdir(parents=True)
        args = ["git", "annex", "initremote", "-q", name, "type=directory",
                f"directory={stores[name]}", f"encryption={encryption}"]  # fmt: skip
        if encryption != "shared":
            args.append(f"keyid={keyid}")
        if chunk:
            args.append(f"chunk={chunk}")
        env.run(args, cwd=proxy, admin=True)
        env.run(["git", "config", f"remote.{name}.annex-proxy", "true"], cwd=proxy, admin=True)
    env.run(["git", "annex", "updateproxy", "-q"], cwd=proxy, admin=True)
    uuids = {
        name: env.run(["git", "config", f"remote.{name}.annex-uuid"], cwd=proxy, admin=True)
        .stdout.strip()
        for name in REMOTES
    }
    client = root / "client"
    env.run(["git", "clone", "-q", f"localhost:{proxy}", str(client)])
    env.run(["git", "annex", "init", "-q", "client"], cwd=client)
    # 10.20261026's verifyremote gate (proxy-and-cluster.md §4 item 8): inherited setting.
    env.run(["git", "config", "remote.origin.annex-verified", "verified"], cwd=client)
    direct = root / "direct"
    env.run(["git", "clone", "-q", str(proxy), str(direct)], admin=True)
    env.run(["git", "annex", "init", "-q", "direct"], cwd=direct, admin=True)
    for name in REMOTES:
        env.run(["git", "annex", "enableremote", "-q", name, f"directory={stores[name]}"],
                cwd=direct, admin=True)  # fmt: skip
        env.run(["git", "config", f"remote.{name}.annex-verified", "verified"],
                cwd=direct, admin=True)  # fmt: skip
    return World(env, our_shell, proxy, client, direct, stores, uuids)


def add_file(world: World, name: str, content: bytes) -> Key:
    (world.client / name).write_bytes(content)
    world.client_run("git", "annex", "add", "-q", name)
    world.client_run("git", "commit", "-q", "-m", name)
    return Key.parse(world.client_run("git", "annex", "lookupkey", name).strip())


def content_of(run_dir: Path, env: dict[str, str], key: Key) -> bytes:
    where = subprocess.run(
        ["git", "annex", "contentlocation", str(key)], cwd=run_dir, env=env,
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    return (run_dir / where).read_bytes()


def expected_objects(name: str, length: int) -> int:
    chunk = REMOTES[name][1]
    size = chunks.parse_size(chunk) if chunk else None
    return chunks.chunk_count(length, size) if size else 1


@pytest.mark.parametrize("name", sorted(REMOTES))
def test_proxy_stores_and_git_annex_reads(world: World, name: str) -> None:
    content = os.urandom(2_500_000)
    key = add_file(world, f"ours-{name}.bin", content)
    store = world.stores[name]
    before = store_files(store)
    world.client_run("git", "annex", "copy", "-q", "--to", f"origin-{name}", f"ours-{name}.bin")
    new = store_files(store) - before
    assert len(new) == expected_objects(name, len(content))
    # The proxy logged the location and, for a chunked remote, the chunks.
    assert world.uuids[name] in world.proxy_whereis(key)
    log = world.proxy_branch_file(chunks.chunk_log_path(key))
    if REMOTES[name][1]:
        size = chunks.parse_size(REMOTES[name][1] or "")
        assert chunks.logged_chunkings(log, world.uuids[name]) == [(size, len(new))]
    else:
        assert log is None
    # Real git-annex, with the remote enabled directly, gets it back byte for byte.
    world.direct_pull()
    world.admin("git", "annex", "get", "-q", "--key", str(key), "--from", name, cwd=world.direct)
    assert content_of(world.direct, world.env.admin_env(), key) == content
    # REMOVE through the proxy deletes every object and zeroes the chunk count.
    world.client_run("git", "annex", "drop", "-q", "--from", f"origin-{name}",
                     f"ours-{name}.bin")  # fmt: skip
    assert not (store_files(store) & new)
    assert world.uuids[name] not in world.proxy_whereis(key)
    if REMOTES[name][1]:
        assert chunks.logged_chunkings(
            world.proxy_branch_file(chunks.chunk_log_path(key)), world.uuids[name]
        ) == []


@pytest.mark.parametrize("name", sorted(REMOTES))
def test_git_annex_stores_and_proxy_serves(world: World, name: str) -> None:
    content = os.urandom(1_300_000)
    filename = f"theirs-{name}.bin"
    (world.direct / filename).write_bytes(content)
    world.admin("git", "annex", "add", "-q", filename, cwd=world.direct)
    world.admin("git", "commit", "-q", "-m", filename, cwd=world.direct)
    key = Key.parse(world.admin("git", "annex", "lookupkey", filename, cwd=world.direct).strip())
    before = store_files(world.stores[name])
    world.admin("git", "annex", "copy", "-q", "--to", name, filename, cwd=world.direct)
    assert len(store_files(world.stores[name]) - before) == expected_objects(name, len(content))
    world.direct_push()
    # The client learns where the content is (git-annex only gets from a remote it knows
    # holds the key), then gets it through our proxy.
    world.client_run("git", "fetch", "-q", "origin")
    world.client_run("git", "annex", "merge", "-q")
    world.client_run("git", "annex", "get", "-q", "--key", str(key), "--from", f"origin-{name}")
    assert content_of(world.client, dict(world.env), key) == content
    # And CHECKPRESENT through the proxy finds every chunk (fsck --fast asks only that).
    world.client_run("git", "annex", "fsck", "-q", "--fast", "--key", str(key),
                     "--from", f"origin-{name}")  # fmt: skip


def test_store_holds_no_plaintext_and_no_key_names(world: World) -> None:
    content = os.urandom(3 * MiB + 12345)
    key = add_file(world, "secret.bin", content)
    for name in REMOTES:
        world.client_run("git", "annex", "copy", "-q", "--to", f"origin-{name}", "secret.bin")
    passphrases = []
    remote_log = world.proxy_branch_file("remote.log") or b""
    for line in remote_log.decode().splitlines():
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        stored = stored_cipher(fields)
        if stored is not None and not stored.encrypted:
            passphrases.append(stored.data[256:300])
    assert passphrases, "no shared cipher found to look for"
    # Every 32 bytes window at a 4 KiB stride: any plaintext window in a file is a leak.
    probes = [content[i : i + 32] for i in range(0, len(content) - 32, 4096)]
    names = [str(key).encode(), key.name.encode(), key.name.split(".")[0].encode()]
    for name, store in world.stores.items():
        files = store_files(store)
        assert files, name
        for path in files:
            assert str(key) not in str(path) and key.name.split(".")[0] not in str(path)
            assert path.name.startswith("GPGHMACSHA1--"), path
            data = path.read_bytes()
            # The first OpenPGP packet (old or new format): a symmetric-key session key
            # for a passphrase (shared, hybrid), a public-key one otherwise.
            if REMOTES[name][0] in ("shared", "hybrid"):
                assert data[:1] in (b"\x8c", b"\x8d", b"\x8e", b"\x8f", b"\xc3"), path
            else:
                assert data[:1] in (b"\x84", b"\x85", b"\x86", b"\x87", b"\xc1"), path
            assert not any(p in data for p in probes), f"plaintext in {path}"
            assert not any(n in data for n in names), f"key name in {path}"
            assert not any(p in data for p in passphrases), f"cipher in {path}"
        assert not (store / "tmp").exists() or not list((store / "tmp").iterdir())


# --- in-process OpenPGP against git-annex and gpg ----------------------------------------------

PASSPHRASE_REMOTES = ["hychunk", "hyflat", "shchunk", "shflat"]


def edge_sizes(name: str) -> dict[str, int]:
    """0 B, 1 B and an exact multiple of the chunk size (2 MiB: 2 x 1 MiB, 8 x 256 KiB)."""
    return {"empty": 0, "one": 1, "multiple": 2 * MiB}


@pytest.fixture
def proxy_gpg(world: World, tmp_path: Path) -> Iterator[Path]:
    """The proxy's gpg.program: a wrapper logging each run's arguments, one line each."""
    log = tmp_path / "proxy-gpg.log"
    log.write_text("")
    wrapper = tmp_path / "gpg"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\nexec gpg "$@"\n')
    wrapper.chmod(0o755)
    world.admin("git", "config", "gpg.program", str(wrapper), cwd=world.proxy)
    yield log
    world.admin("git", "config", "--unset", "gpg.program", cwd=world.proxy)


def content_runs(log: Path) -> list[str]:
    """gpg runs that encrypted or decrypted content (a passphrase on a descriptor); the
    only other kind is the decryption of a hybrid remote's cipher, once per session."""
    return [line for line in log.read_text().splitlines() if "--passphrase-fd" in line]


def edge_content(name: str, size: int) -> bytes:
    # Different per remote (one-byte files too), so that no key is shared between tests.
    return hashlib.sha256(f"{name} {size} {os.urandom(8).hex()}".encode()).digest()[:size] if (
        size <= 32
    ) else os.urandom(size)


@pytest.mark.parametrize("size", ["empty", "one", "multiple"])
@pytest.mark.parametrize("name", PASSPHRASE_REMOTES)
def test_our_objects_are_read_by_git_annex_and_no_gpg_runs(
    world: World, proxy_gpg: Path, name: str, size: str
) -> None:
    """The proxy encrypts in-process (its gpg only opens a hybrid cipher); real
    git-annex with the remote enabled directly decrypts with gpg, byte for byte."""
    length = edge_sizes(name)[size]
    content = edge_content(name, length)
    filename = f"edge-{name}-{size}.bin"
    key = add_file(world, filename, content)
    store = world.stores[name]
    before = store_files(store)
    world.client_run("git", "annex", "copy", "-q", "--to", f"origin-{name}", filename)
    assert len(store_files(store) - before) == expected_objects(name, length)
    assert content_runs(proxy_gpg) == []
    world.direct_pull()
    world.admin("git", "annex", "drop", "-q", "--force", "--key", str(key), cwd=world.direct,
                check=False)  # fmt: skip
    world.admin("git", "annex", "get", "-q", "--key", str(key), "--from", name, cwd=world.direct)
    assert content_of(world.direct, world.env.admin_env(), key) == content
    world.client_run("git", "annex", "drop", "-q", "--from", f"origin-{name}", filename)


@pytest.mark.parametrize("size", ["empty", "one", "multiple"])
@pytest.mark.parametrize("name", PASSPHRASE_REMOTES)
def test_git_annex_objects_are_served_and_no_gpg_runs(
    world: World, proxy_gpg: Path, name: str, size: str
) -> None:
    """Objects real git-annex's gpg wrote (compressed, its own S2K) are decrypted by the
    proxy in-process: the logging gpg sees no content run."""
    length = edge_sizes(name)[size]
    content = edge_content(name, length)
    filename = f"edge-theirs-{name}-{size}.bin"
    (world.direct / filename).write_bytes(content)
    world.admin("git", "annex", "add", "-q", filename, cwd=world.direct)
    world.admin("git", "commit", "-q", "-m", filename, cwd=world.direct)
    key = Key.parse(world.admin("git", "annex", "lookupkey", filename, cwd=world.direct).strip())
    world.admin("git", "annex", "copy", "-q", "--to", name, filename, cwd=world.direct)
    world.direct_push()
    world.client_run("git", "fetch", "-q", "origin")
    world.client_run("git", "annex", "merge", "-q")
    world.client_run("git", "annex", "drop", "-q", "--force", "--key", str(key), check=False)
    world.client_run("git", "annex", "get", "-q", "--key", str(key), "--from", f"origin-{name}")
    assert content_of(world.client, dict(world.env), key) == content
    assert content_runs(proxy_gpg) == []


def unsupported_here(obj: bytes) -> bool:
    """Whether the in-process reader leaves ``obj`` to gpg (refusals are not)."""
    try:
        decryptor = Decryptor(b"any passphrase")
        for _ in decryptor.feed(obj):
            pass
        for _ in decryptor.finish():
            pass
    except Unsupported:
        return True
    except OpenPGPError:
        return False
    return False


def test_a_flipped_byte_in_a_stored_object_is_never_valid(world: World, proxy_gpg: Path) -> None:
    """Damage anywhere in an object (gpg's or ours): the proxy answers INVALID, the real
    git-annex client refuses the content. A flip that turns the cipher into one the
    in-process reader lacks (Twofish) goes to gpg, which refuses it too."""
    content = os.urandom(MiB + 777)
    key = sha256e_key(content, ".bin")
    store = world.stores["shflat"]
    before = store_files(store)
    with world.session("shflat") as s:
        s.handshake()
        assert p2p_put(s, key, content) == "SUCCESS"
        (victim,) = store_files(store) - before
        victim.parent.chmod(0o755)
        victim.chmod(0o644)
        good = victim.read_bytes()
        # 0: packet tag; 1: length; 2: SKESK version; 3: cipher (9 -> 10, Twofish); 4-15:
        # S2K; then the encrypted packet's header, prefix, body and its last byte (the MDC).
        flips = [(0, 0x04), (1, 0x01), (2, 0x01), (3, 0x03), (5, 0x01), (8, 0x80), (14, 0x01),
                 (15, 0x02), (17, 0x01), (30, 0x10), (len(good) // 2, 0x01),
                 (len(good) - 1, 0x01)]  # fmt: skip
        to_gpg = 0
        for pos, mask in flips:
            bad = bytearray(good)
            bad[pos] ^= mask
            victim.write_bytes(bytes(bad))
            got, validity = p2p_get(s, key)
            assert validity == "INVALID" and len(got) == len(content), (pos, mask)
            to_gpg += unsupported_here(bytes(bad))
        # Each object the in-process reader left to gpg went to gpg once (Twofish, at least).
        assert to_gpg >= 1 and len(content_runs(proxy_gpg)) == to_gpg
        victim.write_bytes(good)
        assert p2p_get(s, key) == (content, "VALID")
        assert s.request(f"REMOVE {key}") == "SUCCESS"
        assert s.finish().code == 0
    assert othertmp_files(world) == []


# --- P2P on our shell directly ----------------------------------------------------------------


def p2p_put(s: ShellSession, key: str, content: bytes, validity: str = "VALID") -> str:
    assert s.request(f"PUT file {key}") == "PUT-FROM 0"
    s.send_data(content)
    s.send(validity)
    return s.readline()


def p2p_get(s: ShellSession, key: str, offset: int = 0) -> tuple[bytes, str]:
    s.send(f"GET {offset} file {key}")
    data = s.read_data()
    validity = s.readline()
    s.send("SUCCESS" if validity == "VALID" else "FAILURE")
    return data, validity


def othertmp_files(world: World) -> list[str]:
    tmp = world.proxy / "annex" / "othertmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


@pytest.mark.parametrize("name", ["shchunk", "hyflat"])
def test_get_from_any_offset(world: World, name: str) -> None:
    content = os.urandom(2 * MiB + 4321)
    key = sha256e_key(content, ".bin")
    size = MiB
    offsets = [0, 1, size - 1, size, size + 1, 2 * size, len(content) - 1, len(content)]
    with world.session(name) as s:
        assert s.handshake() == world.uuids[name]
        assert p2p_put(s, key, content) == "SUCCESS"
        assert s.request(f"CHECKPRESENT {key}") == "SUCCESS"
        for offset in offsets:
            assert p2p_get(s, key, offset) == (content[offset:], "VALID")
        assert s.finish().code == 0
    assert othertmp_files(world) == []


@pytest.mark.parametrize("name", ["hychunk", "shflat"])
def test_key_without_size(world: World, name: str) -> None:
    """A key without -s: the PUT is checked by hash alone, and a GET (length unknown until
    the content is retrieved) is spooled first, then streamed."""
    content = os.urandom(700_000)
    key = f"SHA256E--{hashlib.sha256(content).hexdigest()}.bin"
    with world.session(name) as s:
        s.handshake()
        assert p2p_put(s, key, content) == "SUCCESS"
        for offset in (0, 300_000, 700_000):
            assert p2p_get(s, key, offset) == (content[offset:], "VALID")
        assert s.request(f"REMOVE {key}") == "SUCCESS"
        assert s.finish().code == 0
    assert othertmp_files(world) == []


def test_refusals_and_errors(world: World) -> None:
    content = os.urandom(300_000)
    key = sha256e_key(content, ".bin")
    store = world.stores["hychunk"]
    before = store_files(store)
    with world.session("hychunk") as s:
        s.handshake()
        wrong = bytearray(content)
        wrong[1000] ^= 1
        assert p2p_put(s, key, bytes(wrong)) == "FAILURE"  # hash mismatch
        assert p2p_put(s, key, content, "INVALID") == "FAILURE"
        assert p2p_put(s, key, content[:-1]) == "FAILURE"  # wrong length
        assert store_files(store) == before
        assert world.proxy_branch_file(chunks.chunk_log_path(Key.parse(key))) is None
        assert s.request(f"CHECKPRESENT {key}") == "FAILURE"
        assert s.request(f"GET 0 file {key}").startswith(
            "ERROR proxied special remote reports: "
        )
        assert p2p_put(s, key, content) == "SUCCESS"
        assert s.request(f"LOCKCONTENT {key}") == "FAILURE"  # special remotes cannot lock
        assert s.request(f"CHECKPRESENT {key}") == "SUCCESS"
        # A PUT of content already there answers PUT-FROM 0 again, and keeps it whole.
        assert p2p_put(s, key, content) == "SUCCESS"
        assert p2p_get(s, key) == (content, "VALID")
        assert s.request(f"REMOVE {key}") == "SUCCESS"
        assert s.request(f"CHECKPRESENT {key}") == "FAILURE"
        # p2p-protocol.md §9: no change notification from a special remote; the session
        # goes on. (CONNECT, below, ends it.)
        assert s.request("NOTIFYCHANGE") == "ERROR NOTIFYCHANGE unsupported for a special remote"
        assert s.request(f"CHECKPRESENT {key}") == "FAILURE"
        assert s.request("CONNECT git-upload-pack") == "CONNECTDONE 1"
        assert s.finish().code == 0
    assert store_files(store) == before


@pytest.mark.parametrize("name", ["shflat", "hychunk"])
def test_unreachable_store_is_reported(world: World, name: str) -> None:
    content = b"unreachable\n"
    key = sha256e_key(content)
    store = world.stores[name]
    moved = store.with_name(name + "-away")
    store.rename(moved)
    try:
        with world.session(name) as s:
            s.handshake()
            expected = f"ERROR proxied special remote reports: directory {store} is not accessible"
            for request in (f"CHECKPRESENT {key}", f"REMOVE {key}"):
                assert s.request(request) == expected
            s.send(f"PUT file {key}")
            assert s.readline() == "PUT-FROM 0"
            s.send_data(content)
            s.send("VALID")
            assert s.readline().startswith("ERROR proxied special remote reports: ")
            assert s.finish().code == 0
    finally:
        moved.rename(store)
    assert othertmp_files(world) == []


def test_corrupt_chunk_gives_invalid_and_the_session_goes_on(world: World) -> None:
    content = os.urandom(2 * MiB + 100)
    key = sha256e_key(content, ".bin")
    store = world.stores["shchunk"]
    before = store_files(store)
    with world.session("shchunk") as s:
        s.handshake()
        assert p2p_put(s, key, content) == "SUCCESS"
        new = sorted(store_files(store) - before, key=lambda p: p.stat().st_size)
        assert len(new) == 3
        victim = new[-1]  # a full-size chunk
        victim.parent.chmod(0o755)
        victim.chmod(0o644)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
        got, validity = p2p_get(s, key)
        assert validity == "INVALID" and len(got) == len(content)
        assert s.request(f"CHECKPRESENT {key}") == "SUCCESS"  # still usable
        assert s.request(f"REMOVE {key}") == "SUCCESS"
        assert s.finish().code == 0
    assert store_files(store) == before


def test_client_gone_mid_put_leaves_nothing(world: World) -> None:
    content = os.urandom(4 * MiB)
    key = sha256e_key(content, ".bin")
    store = world.stores["hychunk"]
    before = store_files(store)
    # The client closes the connection halfway through the DATA.
    with world.session("hychunk") as s:
        s.handshake()
        assert s.request(f"PUT file {key}") == "PUT-FROM 0"
        s.send_raw(b"DATA %d\n" % len(content) + content[: len(content) // 2])
        assert s.finish().code == 0
    # The proxy itself is killed halfway through: its spool has no name to leave behind.
    with world.session("hychunk") as s:
        s.handshake()
        assert s.request(f"PUT file {key}") == "PUT-FROM 0"
        s.send_raw(b"DATA %d\n" % len(content) + content[: len(content) // 2])
        assert wait_for(lambda: spool_open(s.proc.pid, world.proxy))
        s.kill()
    assert othertmp_files(world) == []
    assert store_files(store) == before


def spool_open(pid: int, proxy: Path) -> bool:
    """Whether process `pid` has a file open in the proxy's annex/othertmp."""
    prefix = str(proxy / "annex" / "othertmp") + "/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def wait_for(condition: object, timeout: float = 60.0) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def shell_pids(proxy: Path) -> list[int]:
    """Our git-annex-shell processes serving `proxy` (p2pstdio)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"p2pstdio" in a for a in argv) and any(str(proxy).encode() in a for a in argv):
            out.append(int(entry))
    return out


def test_killed_git_annex_client_leaves_no_temp_files(world: World) -> None:
    content = os.urandom(64 * MiB)
    (world.client / "killed.bin").write_bytes(content)
    world.client_run("git", "annex", "add", "-q", "killed.bin")
    store = world.stores["shchunk"]
    before = store_files(store)
    client = subprocess.Popen(
        ["git", "annex", "copy", "-q", "--to", "origin-shchunk", "killed.bin"],
        cwd=world.client, env=dict(world.env), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: any(spool_open(p, world.proxy) for p in shell_pids(world.proxy)))
        shells = shell_pids(world.proxy)
        client.kill()  # SIGKILL to git-annex alone: the proxy sees its connection drop
        client.wait(timeout=60)
        assert wait_for(lambda: not any(p in shell_pids(world.proxy) for p in shells))
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=60)
    assert othertmp_files(world) == []
    assert not (store / "tmp").exists() or not list((store / "tmp").iterdir())
    # Either nothing was stored, or (killed after the DATA) a complete chunk set was.
    new = store_files(store) - before
    assert len(new) in (0, 64)


# --- memory: 1 GiB through an encrypted, chunked remote ------------------------------------


class RssSampler:
    """Follows one process's VmHWM, the kernel's own high-water mark of its resident set
    (since its exec), every 50 ms from a thread; `peak` in KiB. Not wait4's ru_maxrss:
    that also counts the forked copy of the test process before the exec."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = max(self.peak, int(line.split()[1]))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


@pytest.mark.slow
def test_one_gib_through_an_encrypted_chunked_remote_in_bounded_memory(world: World) -> None:
    # ANNEXPROXY_RSS_TEST_BYTES: a smaller size for a quicker look (a multiple of 1 MiB).
    size = int(os.environ.get("ANNEXPROXY_RSS_TEST_BYTES", str(1 << 30)))
    name = "bigsh"
    store = world.stores["shchunk"].with_name(name)
    store.mkdir()
    # 100 MiB chunks: git-annex itself holds a chunk in memory; we must not.
    world.admin("git", "annex", "initremote", "-q", name, "type=directory", f"directory={store}",
                "encryption=shared", "chunk=100MiB", cwd=world.proxy)  # fmt: skip
    world.admin("git", "config", f"remote.{name}.annex-proxy", "true", cwd=world.proxy)
    world.admin("git", "annex", "updateproxy", "-q", cwd=world.proxy)
    world.uuids[name] = world.admin("git", "config", f"remote.{name}.annex-uuid",
                                    cwd=world.proxy).strip()  # fmt: skip
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    for i in range(size // MiB):  # distinct blocks, made again while sending
        digest.update(bytes([i % 251]) + block[1:])
    key = f"SHA256E-s{size}--{digest.hexdigest()}.bin"
    with world.session(name) as s:
        s.timeout = 600
        s.handshake()
        sampler = RssSampler(s.proc.pid)
        started = time.monotonic()
        assert s.request(f"PUT file {key}") == "PUT-FROM 0"
        s.send_raw(b"DATA %d\n" % size)
        for i in range(size // MiB):
            s.send_raw(bytes([i % 251]) + block[1:])
        s.send("VALID")
        assert s.readline(timeout=600) == "SUCCESS"
        put_seconds = time.monotonic() - started
        started = time.monotonic()
        s.send(f"GET 0 file {key}")
        assert s.readline(timeout=600) == f"DATA {size}"
        back = hashlib.sha256()
        remaining = size
        while remaining:
            piece = s.read_exact(min(remaining, 4 * MiB), timeout=600)
            back.update(piece)
            remaining -= len(piece)
        assert s.readline(timeout=600) == "VALID"
        s.send("SUCCESS")
        get_seconds = time.monotonic() - started
        assert s.request(f"REMOVE {key}") == "SUCCESS"
        time.sleep(0.2)  # one more sample of the high-water mark, which only grows
        peak = sampler.stop()
        assert s.finish(timeout=120).code == 0
    assert back.hexdigest() == digest.hexdigest()
    print(
        f"\n{size >> 20} MiB, encryption=shared chunk=100MiB: PUT {put_seconds:.1f}s,"
        f" GET {get_seconds:.1f}s, proxy peak RSS (VmHWM) {peak / 1024:.1f} MiB"
    )
    assert 0 < peak < 100 * 1024, f"proxy RSS peaked at {peak / 1024:.1f} MiB"


def test_stale_temp_directories_in_the_store_are_cleaned(world: World) -> None:
    """A store interrupted by a killed proxy leaves tmp/annexproxy.* behind (the object
    being written, encrypted); the next session removes it once it is clearly stale."""
    tmp = world.stores["shflat"] / "tmp"
    stale, fresh = tmp / "annexproxy.0000000000000000", tmp / "annexproxy.1111111111111111"
    for d in (stale, fresh):
        d.mkdir(parents=True)
        (d / "object").write_bytes(b"partial")
    old = time.time() - 2 * 3600
    os.utime(stale / "object", (old, old))
    os.utime(stale, (old, old))
    with world.session("shflat") as s:
        s.handshake()
        assert s.request("CHECKPRESENT " + sha256e_key(b"x")) == "FAILURE"
        assert s.finish().code == 0
    assert not stale.exists() and fresh.exists()
    (fresh / "object").unlink()
    fresh.rmdir()


def test_special_remote_as_a_cluster_node(
    tmp_path: Path, annex_bin: Path, our_shell: Path, gnupg: tuple[Path, str]
) -> None:
    """A cluster whose nodes are a repository and an encrypted special remote: the gateway
    fans out to both, the special one served in-process."""
    env = make_ssh_env(tmp_path / "ssh", annex_bin, our_shell)
    env["GNUPGHOME"] = str(gnupg[0])
    env["FAKESSH_PASSENV"] = "GNUPGHOME"
    gw = env.make_server_repo("gw.git", "gw")
    node1 = env.make_server_repo("node1.git", "node1")
    store = tmp_path / "store"
    store.mkdir()

    def admin(*args: str, cwd: Path = gw) -> str:
        return env.run(list(args), cwd=cwd, admin=True).stdout

    admin("git", "remote", "add", "node1", str(node1))
    admin("git", "annex", "sync", "-q", "--no-content", "node1")
    admin("git", "annex", "initremote", "-q", "cnode", "type=directory", f"directory={store}",
          "encryption=shared", "chunk=512KiB")  # fmt: skip
    admin("git", "annex", "initcluster", "-q", "mycluster")
    for node in ("node1", "cnode"):
        admin("git", "config", f"remote.{node}.annex-cluster-node", "mycluster")
    out = admin("git", "annex", "updatecluster")
    assert "Added node node1" in out and "Added node cnode" in out, out
    cnode = admin("git", "config", "remote.cnode.annex-uuid").strip()
    n1 = admin("git", "config", "annex.uuid", cwd=node1).strip()

    client = tmp_path / "client"
    env.run(["git", "clone", "-q", f"localhost:{gw}", str(client)])
    env.run(["git", "annex", "init", "-q", "client"], cwd=client)
    env.run(["git", "config", "remote.origin.annex-verified", "verified"], cwd=client)
    content = os.urandom(1_200_000)
    (client / "f.bin").write_bytes(content)
    env.run(["git", "annex", "add", "-q", "f.bin"], cwd=client)
    key = env.run(["git", "annex", "lookupkey", "f.bin"], cwd=client).stdout.strip()
    env.run(["git", "annex", "copy", "-q", "--to", "origin-mycluster", "f.bin"], cwd=client)
    where = env.run(["git", "annex", "whereis", "f.bin"], cwd=client).stdout
    assert n1 in where and cnode in where, where
    assert len(store_files(store)) == 3  # 1.2 MB in 512 KiB chunks
    # Only the special node left: the gateway gets it back from there.
    env.run(["git", "annex", "drop", "-q", "--force", "--from", "origin-node1",
             "f.bin"], cwd=client)  # fmt: skip
    env.run(["git", "annex", "drop", "-q", "--force", "f.bin"], cwd=client)
    env.run(["git", "annex", "get", "-q", "--from", "origin-mycluster", "f.bin"], cwd=client)
    assert (client / "f.bin").read_bytes() == content
    env.run(["git", "annex", "drop", "-q", "--from", "origin-mycluster", "f.bin"], cwd=client)
    assert not store_files(store)
    assert chunks.logged_chunkings(
        subprocess.run(["git", "show", f"git-annex:{chunks.chunk_log_path(Key.parse(key))}"],
                       cwd=gw, env=env.admin_env(), capture_output=True, check=True).stdout,
        cnode,
    ) == []  # fmt: skip
