"""Tests for git_remote_annexproxy.keys, against vectors taken from real git-annex."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, reject
from hypothesis import strategies as st

from git_remote_annexproxy.keys import MAX_FIELD_DIGITS, MAX_KEY_LENGTH, BadKey, Key

# (key as sent, git-annex's re-serialization, keyfile, hashdir lower, hashdir mixed).
# Generated with git-annex 10.20261026 in throw-away repos:
#  * keys without spaces: `git annex examinekey --format
#    '${key}\t${hashdirlower}\t${hashdirmixed}\t${objectpointer}' -- KEY` (the keyfile is
#    the objectpointer minus "/annex/objects/"; trailing "/" of the dirs dropped);
#  * keys with spaces (examinekey cuts its argument at the first space): `git annex setkey
#    KEY FILE` in a bare repo (lower dirs) and a non-bare one (mixed dirs), reading the
#    object path that appeared on disk;
#  * the last two: examinekey given the raw non-UTF-8 bytes in argv, written here decoded
#    with surrogateescape.
ORACLE: list[tuple[str, str, str, str, str]] = [
    (
        "SHA256E-s3--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt",
        "SHA256E-s3--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt",
        "SHA256E-s3--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt",
        "205/b20",
        "j0/85",
    ),
    (
        "SHA256-s0--e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "SHA256-s0--e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "SHA256-s0--e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "999/812",
        "2K/49",
    ),
    (
        "SHA512E-s3--ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f.tar.gz",
        "SHA512E-s3--ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f.tar.gz",
        "SHA512E-s3--ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f.tar.gz",
        "27b/32d",
        "j7/qV",
    ),
    (
        "SHA1-s5--aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
        "SHA1-s5--aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
        "SHA1-s5--aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d",
        "1b8/ba0",
        "jV/88",
    ),
    (
        "MD5E-s5--5d41402abc4b2a76b9719d911017c592.jpeg",
        "MD5E-s5--5d41402abc4b2a76b9719d911017c592.jpeg",
        "MD5E-s5--5d41402abc4b2a76b9719d911017c592.jpeg",
        "6a9/f59",
        "Gz/QK",
    ),
    (
        "SHA3_256E-s1--80084bf2fba02475726feb2cab2d8215eab14bc6bdd8bfb2c8151257032ecd8b.x",
        "SHA3_256E-s1--80084bf2fba02475726feb2cab2d8215eab14bc6bdd8bfb2c8151257032ecd8b.x",
        "SHA3_256E-s1--80084bf2fba02475726feb2cab2d8215eab14bc6bdd8bfb2c8151257032ecd8b.x",
        "8d6/3e9",
        "kx/MQ",
    ),
    (
        "BLAKE2B160E-s2--deadbeef.bin",
        "BLAKE2B160E-s2--deadbeef.bin",
        "BLAKE2B160E-s2--deadbeef.bin",
        "058/1fd",
        "45/FX",
    ),
    ("BLAKE2S256-s10--00", "BLAKE2S256-s10--00", "BLAKE2S256-s10--00", "712/fa2", "Gw/82"),
    ("SKEIN512E-s1--abc.y", "SKEIN512E-s1--abc.y", "SKEIN512E-s1--abc.y", "620/689", "K2/2v"),
    ("BLAKE3_256E-s1--abc", "BLAKE3_256E-s1--abc", "BLAKE3_256E-s1--abc", "1d3/988", "4G/23"),
    (
        "XXH3-s7--0123456789abcdef",
        "XXH3-s7--0123456789abcdef",
        "XXH3-s7--0123456789abcdef",
        "cae/f3c",
        "Fz/mk",
    ),
    (
        "XMYBACKENDE-s4--abc.def",
        "XMYBACKENDE-s4--abc.def",
        "XMYBACKENDE-s4--abc.def",
        "03e/e92",
        "X3/4k",
    ),
    (
        "WORM-s1-m1--../../../../tmp/evil",
        "WORM-s1-m1--../../../../tmp/evil",
        "WORM-s1-m1--..%..%..%..%tmp%evil",
        "198/ca8",
        "vK/z8",
    ),
    (
        "WORM-s12-m1700000000--My Documents/report (final).pdf",
        "WORM-s12-m1700000000--My Documents/report (final).pdf",
        "WORM-s12-m1700000000--My Documents%report (final).pdf",
        "73e/e2b",
        "Kp/zP",
    ),
    (
        "WORM-s1-m0--a:b&c%d/e",
        "WORM-s1-m0--a:b&c%d/e",
        "WORM-s1-m0--a&cb&ac&sd%e",
        "29b/6aa",
        "X9/zq",
    ),
    ("WORM-m5--&a&s&c%", "WORM-m5--&a&s&c%", "WORM-m5--&aa&as&ac&s", "dc9/dee", "JW/V9"),
    (
        "URL--https://example.com/a%20b?x=1&y=2",
        "URL--https://example.com/a%20b?x=1&y=2",
        "URL--https&c%%example.com%a&s20b?x=1&ay=2",
        "f04/a34",
        "qv/x4",
    ),
    (
        "URL-s100--http://example.org:8080/",
        "URL-s100--http://example.org:8080/",
        "URL-s100--http&c%%example.org&c8080%",
        "1b6/975",
        "4V/GQ",
    ),
    (
        "VURL-s5--https://example.com/file",
        "VURL-s5--https://example.com/file",
        "VURL-s5--https&c%%example.com%file",
        "b70/0cb",
        "2J/gv",
    ),
    ("FOOBAR-s3--abc", "FOOBAR-s3--abc", "FOOBAR-s3--abc", "d10/d4a", "Jw/g0"),
    ("SHA256E-s1--", "SHA256E-s1--", "SHA256E-s1--", "574/4c0", "wJ/v4"),
    ("SHA256E--x", "SHA256E--x", "SHA256E--x", "ee9/e6e", "Vk/V9"),
    ("SHA256E-s03--abc", "SHA256E-s3--abc", "SHA256E-s3--abc", "d5e/3bf", "mZ/mP"),
    (
        "SHA256E-s3-S10-C2--abc",
        "SHA256E-s3-S10-C2--abc",
        "SHA256E-s3-S10-C2--abc",
        "d5e/3bf",
        "mZ/mP",
    ),
    (
        "SHA256E-s100-S30-C4--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt",
        "SHA256E-s100-S30-C4--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt",
        "SHA256E-s100-S30-C4--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt",
        "f1b/647",
        "Vw/wV",
    ),
    ("WORM-s1-m2-S3-C4--x", "WORM-s1-m2-S3-C4--x", "WORM-s1-m2-S3-C4--x", "742/d3d", "Zf/mg"),
    ("SHA256E-C1--x", "SHA256E-C1--x", "SHA256E-C1--x", "ee9/e6e", "Vk/V9"),
    (
        "WORM-s5-m1--café 日本語.txt",
        "WORM-s5-m1--café 日本語.txt",
        "WORM-s5-m1--café 日本語.txt",
        "af2/972",
        "6m/W2",
    ),
    ("WORM-s1--emoji 😀/..", "WORM-s1--emoji 😀/..", "WORM-s1--emoji 😀%..", "464/e92", "K6/44"),
    ("WORM-s1--.", "WORM-s1--.", "WORM-s1--.", "65c/5a3", "Z5/8W"),
    ("WORM-s1--a--b--c", "WORM-s1--a--b--c", "WORM-s1--a--b--c", "1eb/216", "8P/5q"),
    ("GITBUNDLE--abc", "GITBUNDLE--abc", "GITBUNDLE--abc", "536/78e", "Gp/36"),
    (
        "WORM-s1--\udcff\udcfe\udc80latin1-\udce9",
        "WORM-s1--\udcff\udcfe\udc80latin1-\udce9",
        "WORM-s1--\udcff\udcfe\udc80latin1-\udce9",
        "b71/e2f",
        "MJ/qw",
    ),
    (
        "SHA256E-s2--ab.\udce9t\udce9",
        "SHA256E-s2--ab.\udce9t\udce9",
        "SHA256E-s2--ab.\udce9t\udce9",
        "375/5a5",
        "fJ/9Z",
    ),
]

FOX = b"The quick brown fox jumps over the lazy dog\n"

# `git annex calckey --backend=B fox.txt` (empty.dat for SHA256 and BLAKE2S160E) with FOX as
# fox.txt's content, git-annex 10.20261026.
CALCKEY: list[str] = [
    "SHA1-s44--be417768b5c3c5c1d9bcb2e7c119196dd76b5570",
    "SHA1E-s44--be417768b5c3c5c1d9bcb2e7c119196dd76b5570.txt",
    "MD5-s44--37c4b87edffc5d198ff5a185cee7ee09",
    "MD5E-s44--37c4b87edffc5d198ff5a185cee7ee09.txt",
    "SHA224-s44--62e514e536e4ed4633eeec99d60f97b4d95889227975d975b2ad0de3",
    "SHA224E-s44--62e514e536e4ed4633eeec99d60f97b4d95889227975d975b2ad0de3.txt",
    "SHA256-s0--e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "SHA256E-s44--c03905fcdab297513a620ec81ed46ca44ddb62d41cbbd83eb4a5a3592be26a69.txt",
    "SHA384-s44--f565ad8f9c76cf8c4a2e145e712df740702e066a5908f6285eafa1a83a623e882207643ce5ec29628ff0186150275ef3",
    "SHA384E-s44--f565ad8f9c76cf8c4a2e145e712df740702e066a5908f6285eafa1a83a623e882207643ce5ec29628ff0186150275ef3.txt",
    "SHA512-s44--a12ac6bdd854ac30c5cc5b576e1ee2c060c0d8c2bec8797423d7119aa2b962f7f30ce2e39879cbff0109c8f0a3fd9389a369daae45df7d7b286d7d98272dc5b1",
    "SHA512E-s44--a12ac6bdd854ac30c5cc5b576e1ee2c060c0d8c2bec8797423d7119aa2b962f7f30ce2e39879cbff0109c8f0a3fd9389a369daae45df7d7b286d7d98272dc5b1.txt",
    "SHA3_224-s44--3680fc3b3a647fb55313d6a4a2fbc80f1d664b5066b564cfd94d80f9",
    "SHA3_224E-s44--3680fc3b3a647fb55313d6a4a2fbc80f1d664b5066b564cfd94d80f9.txt",
    "SHA3_256-s44--dad18f1e2410a1955b93b13537c783fbf44b52bdcb1fbde59bcd9de25028c4ae",
    "SHA3_256E-s44--dad18f1e2410a1955b93b13537c783fbf44b52bdcb1fbde59bcd9de25028c4ae.txt",
    "SHA3_384-s44--37fdab11c350b5b1671f155379cc038857eb5fd1b0188de2686151a4d2048e32d40fc61c6ee21fd01ded413429fc304f",
    "SHA3_384E-s44--37fdab11c350b5b1671f155379cc038857eb5fd1b0188de2686151a4d2048e32d40fc61c6ee21fd01ded413429fc304f.txt",
    "SHA3_512-s44--5b9d73eb2ace54d7d1bf76b6f8a20fbab32bc8f1404fd869d102a1c6b21cdc514d57a5c730835d5b9aca281224f18ad3b6434090408b55010bc0d693e86279aa",
    "SHA3_512E-s44--5b9d73eb2ace54d7d1bf76b6f8a20fbab32bc8f1404fd869d102a1c6b21cdc514d57a5c730835d5b9aca281224f18ad3b6434090408b55010bc0d693e86279aa.txt",
    "BLAKE2B160-s44--f97d5156b308eaf4f6a323abc8d3db818fcd73ef",
    "BLAKE2B160E-s44--f97d5156b308eaf4f6a323abc8d3db818fcd73ef.txt",
    "BLAKE2B224-s44--8d92c0a2deeb5111d85bbac84f7515833df0749e2ee1e9e9da43f21f",
    "BLAKE2B224E-s44--8d92c0a2deeb5111d85bbac84f7515833df0749e2ee1e9e9da43f21f.txt",
    "BLAKE2B256-s44--68b4cc122a40d35fd43535eeccd296629400cd399d518e4bc2c048ade5a4b783",
    "BLAKE2B256E-s44--68b4cc122a40d35fd43535eeccd296629400cd399d518e4bc2c048ade5a4b783.txt",
    "BLAKE2B384-s44--0563b69447b16942888fca268cf3c2624d26416af3c3258cae363e21fb682f46918b981326dbbbc88a665696c693a400",
    "BLAKE2B384E-s44--0563b69447b16942888fca268cf3c2624d26416af3c3258cae363e21fb682f46918b981326dbbbc88a665696c693a400.txt",
    "BLAKE2B512-s44--20a9ed5b422c04cf7328b36c0d4ad235408d034bee5a15d77a4185c1bf2c30202d340c212e872d1074f3556f428357e2503b749f3e198b59a74313ad2975a951",
    "BLAKE2B512E-s44--20a9ed5b422c04cf7328b36c0d4ad235408d034bee5a15d77a4185c1bf2c30202d340c212e872d1074f3556f428357e2503b749f3e198b59a74313ad2975a951.txt",
    "BLAKE2S160-s44--084b22cffab335d0ba46a7ff5bdde657a50d0464",
    "BLAKE2S160E-s0--354c9c33f735962418bdacb9479873429c34916f.dat",
    "BLAKE2S224-s44--e1974f109b8524c817f174cf4f2e18e86b197e85c6dc04dc565b2600",
    "BLAKE2S224E-s44--e1974f109b8524c817f174cf4f2e18e86b197e85c6dc04dc565b2600.txt",
    "BLAKE2S256-s44--668e0a8671f032f313c8a12d24f5c8669259ba6d9a9f6f62451ea33fda9f2f79",
    "BLAKE2S256E-s44--668e0a8671f032f313c8a12d24f5c8669259ba6d9a9f6f62451ea33fda9f2f79.txt",
    # Backends Python cannot compute: only the size is checked.
    "SKEIN256-s44--1ae264e530f7fbc53029d57f9e71799be713a40b771f4f099715b82d14bcae5a",
    "SKEIN256E-s44--1ae264e530f7fbc53029d57f9e71799be713a40b771f4f099715b82d14bcae5a.txt",
    "BLAKE2BP512-s44--d2ed5e5c51f3a9cb26af5fe785e3a06f8bf17b7330754d7342cf34b639c492c2fdb10f9b5b2fd7e753e3aa6e261fb3a2882d9ce77c5258a2833dd05664e36b42",
    "BLAKE2SP224E-s44--fb06d4b16a887be17d32ad015e601cb244806cbf05af8bdb2e0027f1.txt",
    "BLAKE3_256E-s44--9a689455c65ca329fbcae5a1ae8725d88c7a6fbc82fd25bbcd9370ad9c272c50.txt",
    "XXH3-s44--8bfe7a34715dc03d",
    "WORM-s44-m1795623672--fox.txt",
]

# Written out independently of the module: the backends whose hash we check.
COMPUTABLE = {
    b + e
    for b in [
        "SHA1", "MD5", "SHA224", "SHA256", "SHA384", "SHA512",
        "SHA3_224", "SHA3_256", "SHA3_384", "SHA3_512",
        "BLAKE2B160", "BLAKE2B224", "BLAKE2B256", "BLAKE2B384", "BLAKE2B512",
        "BLAKE2S160", "BLAKE2S224", "BLAKE2S256",
    ]
    for e in ("", "E")
}  # fmt: skip


def content_for(key: Key) -> bytes:
    return b"" if key.size == 0 else FOX


def tamper(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


def unkeyfile(kf: str) -> str:
    """git-annex's fileKey unescaping, to show keyfile() is one to one."""
    return re.sub(r"&[asc]|%", lambda m: {"&a": "&", "&s": "%", "&c": ":", "%": "/"}[m[0]], kf)


# --- the oracle table -------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "canonical", "keyfile", "lower", "mixed"), ORACLE)
def test_oracle_vector(raw: str, canonical: str, keyfile: str, lower: str, mixed: str) -> None:
    key = Key.parse(raw)
    assert str(key) == raw
    assert key.canonical() == canonical
    assert key.keyfile() == keyfile
    assert key.hashdir_lower() == lower
    assert key.hashdir_mixed() == mixed


def test_spec_observations() -> None:
    evil = Key.parse("WORM-s1-m1--../../../../tmp/evil")
    assert evil.keyfile() == "WORM-s1-m1--..%..%..%..%tmp%evil"
    assert evil.hashdir_mixed() == "vK/z8"
    assert (evil.size, evil.mtime, evil.name) == (1, 1, "../../../../tmp/evil")


def test_chunks_share_the_object_dir_of_their_key() -> None:
    chunk = Key.parse("SHA256E-s100-S30-C4--abc.txt")
    assert chunk.without_chunk() == Key("SHA256E", "abc.txt", size=100)
    assert chunk.hashdir_lower() == chunk.without_chunk().hashdir_lower()
    assert chunk.hashdir_mixed() == chunk.without_chunk().hashdir_mixed()
    assert chunk.keyfile() != chunk.without_chunk().keyfile()


# --- live oracle ------------------------------------------------------------------------


def _git_annex() -> str:
    found = shutil.which("git-annex") or str(Path(sys.executable).parent / "git-annex")
    if not os.access(found, os.X_OK):
        pytest.skip("git-annex not installed")
    return found


def _examinekey(repo: Path, key: str) -> subprocess.CompletedProcess[bytes]:
    fmt = "${key}\t${hashdirlower}\t${hashdirmixed}\t${objectpointer}"
    return subprocess.run(
        [_git_annex(), "examinekey", "--format", fmt, "--", os.fsencode(key)],
        cwd=repo, capture_output=True, check=False,
    )  # fmt: skip


@pytest.fixture
def plain_repo(tmp_path: Path) -> Path:
    _git_annex()
    # examinekey and calckey need a git repository, not an initialised annex.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    return tmp_path


LIVE_KEYS = [
    "WORM-s1-m1--../../../../tmp/evil",
    "URL--https://example.com/a%20b?x=1&y=2",
    "SHA256E-s0003-S01-C02--ab&c:d%e.tar",
    "WORM-m5--\udcff\udcfe&%",
    "BLAKE2B160E-s1--%%::&&//",
]


@pytest.mark.parametrize("raw", LIVE_KEYS)
def test_live_examinekey(plain_repo: Path, raw: str) -> None:
    out = _examinekey(plain_repo, raw)
    assert out.returncode == 0, out.stderr
    canonical, lower, mixed, pointer = os.fsdecode(out.stdout).rstrip("\n").split("\t")
    key = Key.parse(raw)
    assert key.canonical() == canonical
    assert key.hashdir_lower() + "/" == lower
    assert key.hashdir_mixed() + "/" == mixed
    assert "/annex/objects/" + key.keyfile() == pointer


@pytest.mark.parametrize("backend", sorted(COMPUTABLE))
def test_live_calckey_verifies(plain_repo: Path, backend: str) -> None:
    data = os.urandom(1000 + len(backend))
    sample = plain_repo / "sample.bin"
    sample.write_bytes(data)
    out = subprocess.run(
        [_git_annex(), "calckey", f"--backend={backend}", "sample.bin"],
        cwd=plain_repo, capture_output=True, check=True, text=True,
    )  # fmt: skip
    key = Key.parse(out.stdout.strip())
    assert key.backend == backend
    assert key.verifiable
    good, bad = key.verifier(), key.verifier()
    good.update(data)
    bad.update(tamper(data))
    assert good.ok()
    assert not bad.ok()


# --- parsing ------------------------------------------------------------------------------

REJECTED_BY_BOTH = [
    "SHA256E-s3-x5--abc",  # unknown field letter
    "SHA256E-s\u0663--abc",  # ARABIC-INDIC DIGIT THREE
    "SHA256E-s\u00b3--abc",  # SUPERSCRIPT THREE: str.isdigit() is True for it
    "SHA256E-s\uff13--abc",  # FULLWIDTH DIGIT THREE
    "SHA256E-s+3--abc",
    "SHA256E-s-3--abc",
    "SHA256E-s1_000--abc",  # int() would accept this
    "SHA256E-s0x10--abc",
    "SHA256E-s--abc",  # empty field
    "SHA256E-s1-m--abc",
    "SHA256E-m5-s3--abc",  # out of order
    "SHA256E-C1-S2--abc",
    "SHA256E-s1-s2--abc",  # repeated
    "SHA256E-s3-abc",  # no "--"
    "SHA256E",
    "--abc",  # empty backend
    "-s3--abc",
    "",
    "SHA256E-s1--x." + "a" * 64,  # extension of 65 bytes
    "SHA256E-s1--x.\u00e9" + "a" * 62,  # 65 bytes, 64 characters
    "FOOE-s1--x." + "a" * 64,  # the limit applies to any backend ending in E
]

# Accepted by git-annex but refused here (documented in keys.py).
REJECTED_BY_US = [
    "SHA256E-s3--a\nb",  # cannot travel on a P2P line
    "SHA256E\n-s3--abc",
    "SHA256E-s3--a\0b",  # cannot be a file name
    "SHA256E-s1--" + "a" * MAX_KEY_LENGTH,
    "WORM--" + "\u00e9" * (MAX_KEY_LENGTH // 2),  # the cap is in bytes
    # Raw too long although the canonical form (without the zeros) would fit.
    "WORM-s" + "0" * 99 + "1--" + "a" * (MAX_KEY_LENGTH - 9),
    "WORM-s" + "9" * 5000 + "--x",  # past Python's int/str digit limit
    "WORM-s" + "0" * MAX_FIELD_DIGITS + "1--x",
    "WORM-m9223372036854775808--x",  # git-annex wraps it to a negative mtime
    "SHA256E-s1--\ud800",  # lone surrogate: not bytes decoded with surrogateescape
]


@pytest.mark.parametrize("bad", REJECTED_BY_BOTH + REJECTED_BY_US)
def test_rejected(bad: str) -> None:
    with pytest.raises(BadKey):
        Key.parse(bad)


@pytest.mark.parametrize("bad", [b for b in REJECTED_BY_BOTH if b and " " not in b])
def test_live_rejected_by_git_annex(plain_repo: Path, bad: str) -> None:
    out = _examinekey(plain_repo, bad)
    assert out.returncode != 0
    assert b"bad key" in out.stderr


@pytest.mark.parametrize(
    "good",
    [
        "SHA256E-s1--",  # empty name
        "SHA256E--x",  # no fields
        "SHA256E-C1--x",  # any subset of fields
        "SHA256E-s3---abc",  # name starting with "-"
        "SHA256E-s1--x." + "a" * 63,  # extension of exactly 64 bytes
        "SHA256E-s1--x.\u00e9" + "a" * 61,
        "SHA256-s1--x." + "a" * 100,  # no limit without E
        "WORM-m9223372036854775807--x",
        "WORM-s99999999999999999999999--x",  # sizes are unbounded in git-annex
        "FOO BAR/..-s1--x y\r\t",  # backend and name are arbitrary bytes otherwise
        "SHA256E-s1--" + "a" * (MAX_KEY_LENGTH - 12),
        "WORM-s" + "0" * 99 + "1--" + "a" * (MAX_KEY_LENGTH - 9 - 99),
        "WORM-s" + "9" * MAX_FIELD_DIGITS + "--x",
    ],
)
def test_accepted(good: str) -> None:
    assert str(Key.parse(good)) == good


def test_fields() -> None:
    key = Key.parse("SHA256E-s10-m20-S30-C40--a-b--c.d")
    assert key == Key("SHA256E", "a-b--c.d", 10, 20, 30, 40)


def test_leading_zeros_equal_and_normalised() -> None:
    # git-annex accepts "-s03" and re-serializes it as "-s3" (objects live under that name).
    padded, plain = Key.parse("SHA256E-s03-m007--abc"), Key.parse("SHA256E-s3-m7--abc")
    assert padded == plain
    assert hash(padded) == hash(plain)
    assert str(padded) == "SHA256E-s03-m007--abc"
    assert padded.canonical() == str(plain) == "SHA256E-s3-m7--abc"
    assert padded.keyfile() == plain.keyfile()


def test_constructor_validates() -> None:
    for kwargs in [
        {"backend": "", "name": "x"},
        {"backend": "SHA-256", "name": "x"},
        {"backend": "SHA256", "name": "a\nb"},
        {"backend": "SHA256", "name": "x", "size": -1},
        {"backend": "SHA256", "name": "x", "chunk_num": True},
        {"backend": "SHA256", "name": "x", "size": 10**MAX_FIELD_DIGITS},
        {"backend": "SHA256", "name": "x", "mtime": 2**63},
        {"backend": "SHA256E", "name": "x." + "a" * 64},
    ]:
        with pytest.raises(BadKey):
            Key(**kwargs)  # type: ignore[arg-type]
    assert str(Key("WORM", "x", size=1, mtime=2)) == "WORM-s1-m2--x"


def test_raw_must_match_fields() -> None:
    key = Key.parse("SHA256E-s03--abc")
    with pytest.raises(BadKey):
        dataclasses.replace(key, name="other")
    assert str(dataclasses.replace(key, name="other", raw=None)) == "SHA256E-s3--other"
    assert str(Key("SHA256E", "abc", 3, raw="SHA256E-s0003--abc")) == "SHA256E-s0003--abc"
    with pytest.raises(BadKey):
        Key("SHA256E", "abc", 4, raw="SHA256E-s03--abc")


def test_bad_key_is_value_error() -> None:
    assert issubclass(BadKey, ValueError)


# --- properties ---------------------------------------------------------------------------

_TEXT = st.characters(codec="utf-8", exclude_characters="\n\0")
_ESCAPED = st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF)  # undecodable bytes
_NAME = st.text(st.one_of(_TEXT, _ESCAPED, st.sampled_from("&%:/.-")), max_size=40)
_BACKEND = st.one_of(
    st.sampled_from([*sorted(COMPUTABLE), "WORM", "URL", "SKEIN256E", "XFOOE"]),
    st.text(st.one_of(_TEXT, _ESCAPED).filter(lambda c: c != "-"), min_size=1, max_size=10),
)
_NUM = st.none() | st.integers(0, 10**MAX_FIELD_DIGITS - 1)


@st.composite
def keys(draw: st.DrawFn) -> Key:
    try:
        return Key(
            draw(_BACKEND),
            draw(_NAME),
            size=draw(_NUM),
            mtime=draw(st.none() | st.integers(0, 2**63 - 1)),
            chunk_size=draw(_NUM),
            chunk_num=draw(_NUM),
        )
    except BadKey:  # only an over-long extension on an E backend
        reject()


@given(keys())
def test_print_parse_round_trip(key: Key) -> None:
    again = Key.parse(str(key))
    assert again == key
    assert str(again) == str(key) == key.canonical()


@given(keys(), st.lists(st.integers(0, 3), min_size=4, max_size=4))
def test_parse_print_keeps_raw(key: Key, zeros: list[int]) -> None:
    values = (key.size, key.mtime, key.chunk_size, key.chunk_num)
    fields = [
        (letter, "0" * z + str(v))
        for letter, v, z in zip("smSC", values, zeros, strict=True)
        if v is not None
    ]
    if any(len(digits) > MAX_FIELD_DIGITS for _, digits in fields):
        reject()  # refused on purpose; see test_rejected
    raw = key.backend + "".join(f"-{letter}{digits}" for letter, digits in fields) + "--" + key.name
    parsed = Key.parse(raw)
    assert str(parsed) == raw
    assert parsed == key
    assert parsed.canonical() == key.canonical()


@given(keys())
def test_keyfile_is_one_safe_path_component(key: Key) -> None:
    kf = key.keyfile()
    assert "/" not in kf
    assert kf not in ("", ".", "..")
    assert unkeyfile(kf) == key.canonical()


@pytest.mark.parametrize(
    ("a", "b"),
    [("a:b", "a&cb"), ("a/b", "a%b"), ("a%b", "a&sb"), ("a&b", "a&ab"), ("a/", "a&s")],
)
def test_keyfile_keeps_confusable_names_apart(a: str, b: str) -> None:
    assert Key("WORM", a).keyfile() != Key("WORM", b).keyfile()


@given(keys())
def test_hashdirs_shape(key: Key) -> None:
    assert re.fullmatch(r"[0-9a-f]{3}/[0-9a-f]{3}", key.hashdir_lower())
    assert re.fullmatch(r"[0-9zqjxkmvwgpfZQJXKMVWGPF]{2}/[0-9zqjxkmvwgpfZQJXKMVWGPF]{2}",
                        key.hashdir_mixed())  # fmt: skip
    md5 = hashlib.md5(os.fsencode(key.without_chunk().canonical())).hexdigest()
    assert key.hashdir_lower() == f"{md5[:3]}/{md5[3:6]}"


# --- verification -------------------------------------------------------------------------


@pytest.mark.parametrize("raw", CALCKEY)
def test_verifier_against_calckey(raw: str) -> None:
    key = Key.parse(raw)
    data = content_for(key)
    assert key.verifiable == (key.backend in COMPUTABLE)
    whole = key.verifier()
    whole.update(data)
    assert whole.length == len(data)
    assert whole.ok()
    # Same length, one bit flipped: caught only where the hash is computed.
    if data:
        flipped = key.verifier()
        flipped.update(tamper(data))
        assert flipped.ok() == (not key.verifiable)
    longer = key.verifier()
    longer.update(data + b"x")
    assert not longer.ok()


def test_verifier_is_incremental() -> None:
    key = Key.parse(CALCKEY[7])  # SHA256E of FOX
    v = key.verifier()
    v.update(FOX[:10])
    v.update(bytearray(FOX[10:20]))
    v.update(memoryview(FOX)[20:])
    assert v.length == len(FOX)
    assert v.ok()
    partial = key.verifier()
    partial.update(FOX[:-1])
    assert not partial.ok()


def test_verifier_without_size_field_checks_hash() -> None:
    digest = hashlib.sha256(FOX).hexdigest()
    good = Key("SHA256E", digest + ".txt").verifier()
    good.update(FOX)
    assert good.ok()
    bad = Key("SHA256E", digest + ".txt").verifier()
    bad.update(FOX + b"!")
    assert not bad.ok()


def test_verifier_digest_rules() -> None:
    digest = hashlib.sha256(FOX).hexdigest()

    def ok(name: str) -> bool:
        v = Key("SHA256", name, size=len(FOX)).verifier()
        v.update(FOX)
        return v.ok()

    assert ok(digest)
    assert ok(digest + ".txt")  # git-annex's keyHash drops the extension on any hash key
    assert ok(digest + ".tar.gz")  # from the first "."
    assert ok("\\" + digest)  # an old git-annex bug; git-annex still accepts it
    assert not ok(digest.upper())  # git-annex compares lowercase hex exactly
    assert not ok(digest[:-1])
    assert not ok("")


def test_worm_is_size_only() -> None:
    key = Key.parse("WORM-s3-m1700000000--notes.txt")
    assert not key.verifiable
    for data, expected in [(b"abc", True), (b"xyz", True), (b"ab", False), (b"abcd", False)]:
        v = key.verifier()
        v.update(data)
        assert v.ok() is expected


@pytest.mark.parametrize("raw", ["URL--http://x/y", "FOOBAR--abc", "XFOO--abc"])
def test_unverifiable_without_size_accepts_anything(raw: str) -> None:
    key = Key.parse(raw)
    assert not key.verifiable
    v = key.verifier()
    v.update(b"whatever")
    assert v.ok()


@pytest.mark.parametrize(
    ("raw", "length"),
    [
        ("SHA256E-s100-S30-C1--abc", 30),
        ("SHA256E-s100-S30-C4--abc", 10),  # the short last chunk
        ("SHA256E-s90-S30-C3--abc", 30),
        ("SHA256E-s90-S30-C4--abc", 0),  # past the end
    ],
)
def test_chunk_keys_check_chunk_length_not_hash(raw: str, length: int) -> None:
    key = Key.parse(raw)
    assert not key.verifiable
    for n in (length - 1, length, length + 1):
        if n < 0:
            continue
        v = key.verifier()
        v.update(b"z" * n)
        assert v.ok() == (n == length)
