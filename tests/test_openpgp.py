"""The in-process OpenPGP code (``openpgp.py``, ``openpgpsym.py``) against the real gpg.

* gpg -> us: objects gpg writes with git-annex's command line (``crypto.Gpg``), with its
  defaults and with every cipher, compression, S2K mode and digest it can be told to use,
  are read here byte for byte; what this reader does not do (Twofish, SED, a public-key
  session key, ASCII armour) is named as ``Unsupported`` before any plaintext comes out;
* us -> gpg: what we write, gpg decrypts with git-annex's command line, and
  ``gpg --list-packets`` shows the packets we mean to write;
* damage: a flipped byte anywhere in an object, a cut or an extension is refused;
* hypothesis: arbitrary bytes give a clean error and nothing else; round trips with any
  split of the input; messages of every framing and algorithm this reader supports, built
  here independently of our writer.
"""

from __future__ import annotations

import base64
import bz2
import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers import algorithms as old_algorithms
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher as CryptoCipher
from cryptography.hazmat.primitives.ciphers import algorithms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_special import MemoryStorage

from git_remote_annexproxy.crypto import Cipher, Gpg, GpgError
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.openpgp import (
    S2K,
    InnerReader,
    IntegrityError,
    OpenPGPError,
    PacketError,
    PacketReader,
    Unsupported,
    decode_count,
    new_length,
)
from git_remote_annexproxy.openpgpsym import Decryptor, Encryptor, gpg_passphrase
from git_remote_annexproxy.specialformat import (
    DEBUG_VARIABLE,
    MEMORY_PLAINTEXT,
    Encryption,
    StorageError,
    derive_key,
    read_object,
    write_object,
)

KiB = 1024
MiB = 1 << 20


def annex_cipher() -> Cipher:
    """A cipher as git-annex makes one for encryption=shared: ``gpg --gen-random --armor``
    text with its newline; the first 256 bytes are the MAC key, the rest the passphrase."""
    return Cipher(base64.b64encode(os.urandom(512)) + b"\n", mac_only=False)


CIPHER = annex_cipher()
PASSPHRASE = CIPHER.passphrase or b""


def run_gpg(argv: list[str], home: Path, data: bytes, passphrase: bytes | None = None) -> bytes:
    """Run gpg as crypto.GpgProcess does: the passphrase (and git-annex's newline) on a
    pipe named in argv by its descriptor."""
    rfd: int | None = None
    if passphrase is not None:
        rfd, wfd = os.pipe()
        os.write(wfd, passphrase + b"\n")
        os.close(wfd)
    try:
        done = subprocess.run(
            [a.replace("{fd}", str(rfd)) for a in argv], input=data, capture_output=True,
            env={**os.environ, "GNUPGHOME": str(home)}, timeout=120, check=False,
            pass_fds=() if rfd is None else (rfd,),
        )  # fmt: skip
    finally:
        if rfd is not None:
            os.close(rfd)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace"))
    return done.stdout


def gpg_encrypt(home: Path, data: bytes, *options: str) -> bytes:
    """gpg's object for ``data``: git-annex's command line, plus annex-gnupg-options."""
    argv = Gpg(encrypt_options=options).encrypt_argv(CIPHER, (), 99)
    return run_gpg([a if a != "99" else "{fd}" for a in argv], home, data, PASSPHRASE)


def gpg_decrypt(home: Path, obj: bytes) -> bytes:
    argv = Gpg().decrypt_argv(CIPHER, 99)
    return run_gpg([a if a != "99" else "{fd}" for a in argv], home, obj, PASSPHRASE)


def decrypt(obj: bytes, pieces: int = 1 << 16, passphrase: bytes = PASSPHRASE) -> bytes:
    d = Decryptor(passphrase, derive=derive_key)
    out = bytearray()
    for i in range(0, len(obj), pieces):
        for piece in d.feed(obj[i : i + pieces]):
            out += piece
    for piece in d.finish():
        out += piece
    return bytes(out)


def encrypt(data: bytes, length: int | None, pieces: int = 1 << 16) -> bytes:
    e = Encryptor(PASSPHRASE, length)
    out = bytearray(e.start())
    for i in range(0, len(data), pieces):
        out += e.update(data[i : i + pieces])
    out += e.finish()
    return bytes(out)


# --- gpg -> us ---------------------------------------------------------------------------------

GPG_OPTIONS = {
    "defaults": (),
    "aes128": ("--cipher-algo", "AES128"),
    "aes192": ("--cipher-algo", "AES192"),
    "camellia128": ("--cipher-algo", "CAMELLIA128"),
    "camellia256": ("--cipher-algo", "CAMELLIA256"),
    "cast5": ("--cipher-algo", "CAST5"),
    "3des": ("--cipher-algo", "3DES"),
    "blowfish": ("--cipher-algo", "BLOWFISH"),
    "uncompressed": ("--compress-algo", "none"),
    "zlib": ("--compress-algo", "zlib"),
    "bzip2": ("--compress-algo", "bzip2"),
    "s2k-simple": ("--s2k-mode", "0"),
    "s2k-salted": ("--s2k-mode", "1"),
    "s2k-sha512": ("--s2k-digest-algo", "SHA512"),
    "s2k-sha224": ("--s2k-digest-algo", "SHA224"),
    "s2k-md5": ("--s2k-digest-algo", "MD5"),
    "textmode": ("--textmode",),
}


@pytest.mark.parametrize("options", sorted(GPG_OPTIONS))
def test_gpg_objects_are_read_in_process(gnupg: tuple[Path, str], options: str) -> None:
    for data in (b"", b"x", os.urandom(70_000) + bytes(200_000)):
        obj = gpg_encrypt(gnupg[0], data, *GPG_OPTIONS[options])
        assert decrypt(obj) == data
        assert decrypt(obj, pieces=777) == data


def test_gpg_defaults_are_what_this_reader_expects(gnupg: tuple[Path, str]) -> None:
    """What gpg on this machine writes for git-annex: an iterated S2K with a large count,
    AES-256, compressed (ZIP) data in an MDC-protected packet; 1 MiB still reads whole."""
    data = os.urandom(MiB)
    obj = gpg_encrypt(gnupg[0], data)
    listing = subprocess.run(
        ["gpg", "--batch", "--list-packets", "--passphrase-fd", "0"],
        input=gpg_passphrase(PASSPHRASE) + b"\n" + obj, capture_output=True,
        env={**os.environ, "GNUPGHOME": str(gnupg[0])}, timeout=60, check=False,
    )  # fmt: skip
    text = listing.stdout.decode()
    assert ":symkey enc packet: version 4, cipher 9" in text and "s2k 3" in text, text
    assert "mdc_method: 2" in text and ":compressed packet: algo=1" in text, text
    assert decrypt(obj) == data


def test_what_is_not_read_here_is_named_before_any_plaintext(gnupg: tuple[Path, str]) -> None:
    home, keyid = gnupg
    data = b"content for gpg alone\n" * 100
    both = ["gpg", "--batch", "--quiet", "--trust-model", "always", "--passphrase-fd", "{fd}",
            "--symmetric", "--encrypt", "--recipient", keyid]  # fmt: skip
    cases = {
        "cipher algorithm 10": gpg_encrypt(home, data, "--cipher-algo", "TWOFISH"),
        "without integrity protection": gpg_encrypt(home, data, "--rfc2440"),
        "ASCII-armored": gpg_encrypt(home, data, "--armor"),
        "public key": run_gpg(both, home, data, PASSPHRASE),
    }
    for reason, obj in cases.items():
        d = Decryptor(PASSPHRASE)
        out: list[bytes | memoryview] = []
        with pytest.raises(Unsupported, match=reason):
            for i in range(0, len(obj), 64):
                out.extend(d.feed(obj[i : i + 64]))
            out.extend(d.finish())
        assert not out, reason
        if reason == "without integrity protection":
            with pytest.raises(RuntimeError, match="decryption forced to fail"):
                gpg_decrypt(home, obj)  # gpg, the fallback, refuses it
        else:
            assert gpg_decrypt(home, obj) == data  # gpg, the fallback, reads it


# --- us -> gpg ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 191, 192, 8383, 8384, 65535, 65536, 65537, 3 * MiB + 5])
def test_gpg_reads_our_objects_with_git_annex_command_line(
    gnupg: tuple[Path, str], size: int
) -> None:
    data = os.urandom(size)
    for length in (size, None):  # definite lengths, and partial ones
        obj = encrypt(data, length, pieces=100_000)
        assert gpg_decrypt(gnupg[0], obj) == data
        assert decrypt(obj) == data


def test_our_packets_as_gpg_lists_them(gnupg: tuple[Path, str]) -> None:
    """SKESK v4 with AES-256 and an iterated SHA-256 S2K of 65536 bytes, MDC, one binary
    literal packet, no compression, nothing AEAD; a fresh salt (key) per object."""
    salts = set()
    for length in (10, None):
        obj = encrypt(b"0123456789", length)
        listing = subprocess.run(
            ["gpg", "--batch", "--list-packets", "-vv", "--passphrase-fd", "0"],
            input=gpg_passphrase(PASSPHRASE) + b"\n" + obj, capture_output=True,
            env={**os.environ, "GNUPGHOME": str(gnupg[0])}, timeout=60, check=False,
        )  # fmt: skip
        text = listing.stdout.decode() + listing.stderr.decode()
        assert ":symkey enc packet: version 4, cipher 9, aead 0,s2k 3, hash 8" in text, text
        assert "count 65536" in text and "mdc_method: 2" in text, text
        assert ":literal data packet:" in text and "mode b" in text, text
        assert "compressed packet" not in text, text
        salts.add(next(w for w in text.split("\n") if "salt" in w))
    assert len(salts) == 2


def test_wrong_passphrase_is_an_integrity_error(gnupg: tuple[Path, str]) -> None:
    for obj in (encrypt(b"abc" * 1000, None), gpg_encrypt(gnupg[0], b"abc" * 1000)):
        with pytest.raises(IntegrityError):
            decrypt(obj, passphrase=annex_cipher().passphrase or b"")


def test_encryptor_checks_the_announced_length() -> None:
    e = Encryptor(PASSPHRASE, 10)
    e.start()
    e.update(b"12345")
    with pytest.raises(OpenPGPError):
        e.finish()
    e = Encryptor(PASSPHRASE, 3)
    e.start()
    with pytest.raises(OpenPGPError):
        e.update(b"1234")


# --- damage ------------------------------------------------------------------------------------


def refused(obj: bytes, home: Path) -> bool:
    """The object is refused: an error here, and for what goes to gpg, an error there."""
    try:
        decrypt(obj)
    except Unsupported:
        try:
            gpg_decrypt(home, obj)
        except RuntimeError:
            return True
        return False
    except (PacketError, IntegrityError):
        return True
    return False


def test_a_flipped_byte_anywhere_in_our_object_is_refused(gnupg: tuple[Path, str]) -> None:
    data = os.urandom(300)
    for obj in (encrypt(data, len(data)), encrypt(data, None)):
        for pos in range(len(obj)):
            for mask in (0x01, 0x80):
                bad = bytearray(obj)
                bad[pos] ^= mask
                assert refused(bytes(bad), gnupg[0]), (pos, mask)


def test_a_flipped_byte_in_a_gpg_object_is_refused(gnupg: tuple[Path, str]) -> None:
    data = os.urandom(5000)
    obj = gpg_encrypt(gnupg[0], data)
    # Every byte of the packet headers, the session key packet and the start of the
    # encrypted data; then a sample through the rest, and the MDC at the end.
    positions = [*range(60), *range(60, len(obj), 97), *range(len(obj) - 22, len(obj))]
    for pos in sorted(set(positions)):
        bad = bytearray(obj)
        bad[pos] ^= 0x04
        assert refused(bytes(bad), gnupg[0]), pos


def test_cut_and_extended_objects_are_refused() -> None:
    obj = encrypt(os.urandom(5000), None)
    for cut in (1, 2, 21, 22, 23, len(obj) // 2, len(obj) - 1):
        with pytest.raises(PacketError):
            decrypt(obj[: len(obj) - cut])
    for extra in (b"\x00", b"\xcb\x01x", obj):
        with pytest.raises(PacketError):
            decrypt(obj + extra)


# --- hypothesis ------------------------------------------------------------------------------

FAST = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=600))
def test_arbitrary_bytes_give_a_clean_error(data: bytes, piece: int) -> None:
    for reader in (Decryptor(PASSPHRASE), InnerReader(), PacketReader()):
        try:
            for i in range(0, len(data), piece):
                for _ in reader.feed(data[i : i + piece]):
                    pass
            finishing = reader.finish() if isinstance(reader, Decryptor) else reader.end()
            for _ in finishing:
                pass
        except OpenPGPError:
            pass


@FAST
@given(st.binary(max_size=3000), st.binary(min_size=1, max_size=3000))
def test_packets_after_a_valid_header_give_a_clean_error(head: bytes, tail: bytes) -> None:
    """Garbage behind a real session key packet: the reader gets as far as decrypting it."""
    obj = encrypt(head, None)[:38] + tail
    with contextlib.suppress(OpenPGPError):
        decrypt(obj, pieces=251)


@FAST
@given(
    st.binary(max_size=200_000),
    st.booleans(),
    st.integers(min_value=1, max_value=70_000),
    st.integers(min_value=1, max_value=70_000),
)
def test_round_trip(data: bytes, definite: bool, write_piece: int, read_piece: int) -> None:
    obj = encrypt(data, len(data) if definite else None, pieces=write_piece)
    assert decrypt(obj, pieces=read_piece) == data


# A message of any framing and algorithm the reader supports, built here without our writer.
CIPHERS = {
    7: (algorithms.AES, 16, 16), 8: (algorithms.AES, 24, 16), 9: (algorithms.AES, 32, 16),
    11: (old_algorithms.Camellia, 16, 16), 13: (old_algorithms.Camellia, 32, 16),
    2: (old_algorithms.TripleDES, 24, 8), 3: (old_algorithms.CAST5, 16, 8),
}  # fmt: skip
HASH_IDS = [1, 2, 8, 9, 10, 11]


def frame(draw: st.DrawFn, tag: int, body: bytes, data_packet: bool, last: bool) -> bytes:
    """One packet: new or old format, definite, partial (data packets) or indeterminate
    (the last packet of its stream)."""
    kinds = ["new", "old"]
    if data_packet and len(body) >= 1:
        kinds.append("partial")
    if last and tag < 16:
        kinds.append("open")
    kind = draw(st.sampled_from(kinds))
    if kind == "new":
        return bytes([0xC0 | tag]) + new_length(len(body)) + body
    if kind == "open":
        return bytes([0x80 | tag << 2 | 3]) + body
    if kind == "old" and tag < 16:
        width = draw(st.sampled_from([w for w in (1, 2, 4) if len(body) < 1 << (8 * w)]))
        return bytes([0x80 | tag << 2 | {1: 0, 2: 1, 4: 2}[width]]) + len(body).to_bytes(
            width, "big"
        ) + body
    if kind == "old":
        return bytes([0xC0 | tag]) + new_length(len(body)) + body
    out = bytearray([0xC0 | tag])
    pos = 0
    while True:
        bits = draw(st.integers(min_value=0, max_value=12))
        if pos + (1 << bits) >= len(body):
            out += new_length(len(body) - pos) + body[pos:]
            return bytes(out)
        out += bytes([0xE0 | bits]) + body[pos : pos + (1 << bits)]
        pos += 1 << bits


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    def rand(n: int) -> bytes:
        return draw(st.binary(min_size=n, max_size=n))

    data = draw(st.binary(max_size=20_000))
    fmt = draw(st.sampled_from([b"b", b"t", b"u"]))
    name = draw(st.binary(max_size=20))
    literal = fmt + bytes([len(name)]) + name + rand(4) + data
    compression = draw(st.sampled_from([None, 0, 1, 2, 3]))
    marker = draw(st.booleans())
    if compression is None:
        inner = frame(draw, 11, literal, True, True)
    else:
        packets = frame(draw, 11, literal, True, True)
        if marker:
            packets = frame(draw, 10, b"PGP", False, False) + packets
        squeezers: dict[int, Callable[[bytes], bytes]] = {
            0: bytes, 1: lambda b: zlib.compress(b, wbits=-15), 2: zlib.compress, 3: bz2.compress,
        }  # fmt: skip
        squeezed = squeezers[compression](packets)
        inner = frame(draw, 8, bytes([compression]) + squeezed, True, True)
    algo = draw(st.sampled_from(sorted(CIPHERS)))
    make, size, block = CIPHERS[algo]
    mode = draw(st.sampled_from([0, 1, 3]))
    s2k = S2K(mode, draw(st.sampled_from(HASH_IDS)), rand(8) if mode else b"",
              draw(st.integers(min_value=0, max_value=0x30)) if mode == 3 else 0)  # fmt: skip
    kek = s2k.derive(gpg_passphrase(PASSPHRASE), size)
    skesk = bytes([4, algo]) + s2k.encode()
    key, key_algo, key_make, key_block = kek, algo, make, block
    if draw(st.booleans()):  # an encrypted session key, possibly for another cipher
        key_algo = draw(st.sampled_from(sorted(CIPHERS)))
        key_make, key_size, key_block = CIPHERS[key_algo]
        key = rand(key_size)
        wrap = CryptoCipher(make(kek), CFB(bytes(block))).encryptor()
        skesk += wrap.update(bytes([key_algo]) + key) + wrap.finalize()
    prefix = rand(key_block)
    plain = prefix + prefix[-2:] + inner + b"\xd3\x14"
    plain += hashlib.sha1(plain).digest()
    enc = CryptoCipher(key_make(key), CFB(bytes(key_block))).encryptor()
    body = b"\x01" + enc.update(plain) + enc.finalize()
    top = frame(draw, 10, b"PGP", False, False) if marker else b""
    top += frame(draw, 3, skesk, False, False) + frame(draw, 18, body, True, True)
    return top, data


@FAST
@given(messages(), st.integers(min_value=1, max_value=5000))
def test_every_framing_and_algorithm_reads(message: tuple[bytes, bytes], piece: int) -> None:
    obj, data = message
    assert decrypt(obj, pieces=piece) == data


# --- S2K -------------------------------------------------------------------------------------


def test_s2k_counts_and_parallel_derivation() -> None:
    assert decode_count(0) == 1024 and decode_count(0x60) == 65536
    assert decode_count(255) == 65011712
    for mode, algo, coded in ((3, 2, 0xFF), (3, 8, 0x90), (1, 2, 0), (0, 10, 0)):
        s2k = S2K(mode, algo, os.urandom(8) if mode else b"", coded)
        for size in (16, 24, 32):
            assert derive_key(s2k, PASSPHRASE, size) == s2k.derive(PASSPHRASE, size)
    # RFC 4880 3.7.1.3: the whole salt and passphrase are hashed even beyond the count.
    s2k = S2K(3, 8, b"12345678", 0)
    long = b"p" * 5000
    assert s2k.derive(long, 32) == hashlib.sha256(b"12345678" + long).digest()


# --- specialformat: objects read and written through the in-process code ---------------------


class FileStorage(MemoryStorage):
    """MemoryStorage whose objects are also local files (DirectoryStorage's read path)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def store(self, key: Key, data: AsyncIterator[bytes]) -> None:
        await super().store(key, data)
        (self.root / str(key)).write_bytes(self.objects[str(key)])

    async def open_local(self, key: Key) -> int | None:
        (self.root / str(key)).write_bytes(self.objects[str(key)])  # as the test left it
        return os.open(self.root / str(key), os.O_RDONLY)


def logging_gpg(tmp_path: Path) -> tuple[Gpg, Path]:
    """A gpg that appends its arguments to a log, then runs the real one."""
    log = tmp_path / "gpg.log"
    log.write_text("")
    script = tmp_path / "gpg-wrapper"
    script.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\nexec gpg "$@"\n')
    script.chmod(0o755)
    return Gpg(program=str(script)), log


@pytest.fixture
def annexdir(tmp_path: Path, gnupg: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GNUPGHOME", str(gnupg[0]))
    path = tmp_path / "annex"
    path.mkdir()
    return path


async def read_all(
    enc: Encryption, storage: MemoryStorage, key: Key, annexdir: Path, limit: int | None = None
) -> tuple[list[bytes], BaseException | None]:
    pieces: list[bytes] = []
    try:
        async for piece in read_object(enc, storage, key, annexdir, 60, limit=limit):
            pieces.append(piece)
    except Exception as exc:
        return pieces, exc
    return pieces, None


OBJECT = Key("GPGHMACSHA1", "0" * 40)


def gnupg_home() -> Path:
    return Path(os.environ["GNUPGHOME"])


@pytest.mark.parametrize("local", [False, True], ids=["retrieved", "local"])
@pytest.mark.parametrize("size", [0, 1, 3 * MiB, MEMORY_PLAINTEXT + 5])
async def test_objects_written_and_read_without_gpg(
    tmp_path: Path, annexdir: Path, local: bool, size: int
) -> None:
    gpg, log = logging_gpg(tmp_path)
    enc = Encryption(CIPHER, "HMACSHA1", gpg, ())
    storage = FileStorage(tmp_path) if local else MemoryStorage()
    data = os.urandom(size)

    async def plain() -> AsyncGenerator[bytes, None]:
        for i in range(0, size, MiB):
            yield data[i : i + MiB]

    await write_object(enc, OBJECT, plain(), storage.store, 60, length=size)
    pieces, error = await read_all(enc, storage, OBJECT, annexdir, limit=size)
    assert error is None and b"".join(pieces) == data
    assert log.read_text() == ""  # no gpg process for either
    assert gpg_decrypt(gnupg_home(), storage.objects[str(OBJECT)]) == data
    assert os.listdir(annexdir / "othertmp") == [] if (annexdir / "othertmp").exists() else True


@pytest.mark.parametrize("local", [False, True], ids=["retrieved", "local"])
async def test_damaged_object_gives_no_plaintext_and_no_gpg(
    tmp_path: Path, annexdir: Path, local: bool
) -> None:
    """Nothing is given out before the MDC matched (gpg itself would stream megabytes
    first), and a damaged object is refused here, not handed to gpg."""
    gpg, log = logging_gpg(tmp_path)
    enc = Encryption(CIPHER, "HMACSHA1", gpg, ())
    storage = FileStorage(tmp_path) if local else MemoryStorage()
    data = os.urandom(3 * MiB)
    obj = gpg_encrypt(gnupg_home(), data)
    for pos in (40, len(obj) // 2, -1):
        bad = bytearray(obj)
        bad[pos] ^= 0x10
        storage.objects[str(OBJECT)] = bytes(bad)
        pieces, error = await read_all(enc, storage, OBJECT, annexdir)
        assert pieces == [] and isinstance(error, GpgError), (pos, error)
    assert log.read_text() == ""


async def test_longer_than_the_key_says_stops_early(tmp_path: Path, annexdir: Path) -> None:
    enc = Encryption(CIPHER, "HMACSHA1", Gpg(), ())
    storage = MemoryStorage()
    storage.objects[str(OBJECT)] = encrypt(os.urandom(1000), None)
    pieces, error = await read_all(enc, storage, OBJECT, annexdir, limit=999)
    assert pieces == [] and isinstance(error, StorageError)


async def test_what_the_reader_cannot_read_goes_to_gpg_once(
    tmp_path: Path, annexdir: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    gpg, log = logging_gpg(tmp_path)
    enc = Encryption(CIPHER, "HMACSHA1", gpg, ())
    storage = MemoryStorage()
    data = os.urandom(100_000)
    storage.objects[str(OBJECT)] = gpg_encrypt(gnupg_home(), data, "--cipher-algo", "TWOFISH")
    monkeypatch.setenv(DEBUG_VARIABLE, "1")
    pieces, error = await read_all(enc, storage, OBJECT, annexdir)
    assert error is None and b"".join(pieces) == data
    assert len(log.read_text().splitlines()) == 1
    assert f"annexproxy debug: {OBJECT}: cipher algorithm 10: decrypting it with gpg" in (
        capfd.readouterr().err
    )
    # Quiet without the variable.
    monkeypatch.delenv(DEBUG_VARIABLE)
    pieces, error = await read_all(enc, storage, OBJECT, annexdir)
    assert error is None and capfd.readouterr().err == ""


async def test_gnupg_options_keep_gpg(tmp_path: Path, annexdir: Path) -> None:
    """annex-gnupg-options / annex-gnupg-decrypt-options: the admin asked for gpg."""
    gpg, log = logging_gpg(tmp_path)
    for options in ((("--cipher-algo", "AES128"), ()), ((), ("--ignore-mdc-error",))):
        with_options = Gpg(program=gpg.program, encrypt_options=options[0],
                           decrypt_options=options[1])  # fmt: skip
        enc = Encryption(CIPHER, "HMACSHA1", with_options, ())
        storage = MemoryStorage()

        async def plain() -> AsyncGenerator[bytes, None]:
            yield b"data"

        log.write_text("")
        await write_object(enc, OBJECT, plain(), storage.store, 60, length=4)
        pieces, error = await read_all(enc, storage, OBJECT, annexdir)
        assert error is None and b"".join(pieces) == b"data"
        runs = log.read_text()
        assert ("--symmetric" in runs) == bool(options[0])
        assert ("--decrypt" in runs) == bool(options[1])


def test_cryptography_is_imported_only_to_encrypt_or_decrypt() -> None:
    """Sessions that move no encrypted content (and every start-up) never pay for it."""
    modules = ["shell.cli", "shell.p2pserver", "shell.speciallink", "shell.objectserve",
               "git_remote_annexproxy.objectclient", "git_remote_annexproxy.annexget",
               "git_remote_annexproxy.annexcmd", "git_remote_annexproxy.remotehelper"]  # fmt: skip
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('cryptography' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    assert done.stdout.strip() == "False"
