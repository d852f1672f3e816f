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
* (slow) 1 GiB through an encrypted chunked remote within 150 MiB of RSS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, make_ssh_env
from p2pdriver import ShellSession, p2pstdio_argv, sha256e_key

from git_remote_annexproxy import chunks
from git_remote_annexproxy.annexlog import VectorClock
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


# --- a local git-annex repository with special remotes (no proxy) ---------------------------


def gpg_home_with_key(home: Path) -> str:
    """A throwaway GNUPGHOME holding one passphrase-less key pair; returns the key id."""
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
         "annexproxy test <test@annexproxy.invalid>", "default", "default", "never"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    listing = subprocess.run(
        ["gpg", "--with-colons", "--list-keys"], env=env, check=True, capture_output=True,
        text=True, timeout=60,
    ).stdout
    return next(line.split(":")[4] for line in listing.splitlines() if line.startswith("pub:"))


def stop_gpg_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)},
        check=False, capture_output=True, timeout=60,
    )  # fmt: skip


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


@pytest.fixture(scope="module")
def gnupg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    home = tmp_path_factory.mktemp("gpg") / "home"
    keyid = gpg_home_with_key(home)
    yield home, keyid
    stop_gpg_agent(home)


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
    for name, enc in (("sh", ["encryption=shared"]), ("pk", ["encryption=pubkey", f"keyid={keyid}"])):
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
