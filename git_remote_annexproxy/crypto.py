"""git-annex's encryption of special remote content: ciphers, MAC'd object names, gpg.

Follows git-annex 10.20261026 (``Crypto.hs``, ``Utility/Gpg.hs``,
``Remote/Helper/Encryptable.hs``, ``Types/Crypto.hs``); checked against what the binary
stores and the gpg command lines it runs (``tests/test_special.py``).

Ciphers. remote.log's ``cipher=`` is base64 of the *stored cipher*:

* ``encryption=shared``: the cipher itself, in the clear (anyone with the branch has it);
* ``hybrid``: the cipher, gpg-encrypted to ``cipherkeys=`` (decrypting needs a secret key);
* ``pubkey``: a MAC-only cipher, gpg-encrypted to ``cipherkeys=``; content is then
  encrypted to those public keys rather than with a passphrase;
* ``sharedpubkey``: a MAC-only cipher in the clear; content is encrypted to ``pubkeys=``.

A cipher is the text ``gpg --gen-random --armor`` printed (base64, no inner newline). Its
first 256 bytes are the HMAC key for object names; the rest is the passphrase for gpg's
symmetric encryption (a MAC-only cipher is all HMAC key). An object is stored under
``GPG<MAC>--<hex HMAC of the key's serialization>``, so no key name reaches the remote.

Where gpg runs, it runs exactly as git-annex runs it (the same options, the passphrase on
a pipe given by ``--passphrase-fd``, never in argv or the environment): the output then is
what git-annex's own gpg produces and accepts, by construction. That is for ciphers, for
content encrypted to public keys, and for what the in-process OpenPGP code
(``openpgpsym.py``, used by ``specialformat.py`` for passphrase ciphers) leaves to gpg.
This module uses trio for that one streaming process (``GpgProcess``); the rest is pure.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hmac
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import trio

from git_remote_annexproxy.keys import Key

# Crypto.hs cipherBeginning: the MAC key part of a cipher.
CIPHER_BEGINNING = 256
# Types/Crypto.hs: remote.log's mac= values and the default.
MACS = {
    "HMACSHA1": "sha1",
    "HMACSHA224": "sha224",
    "HMACSHA256": "sha256",
    "HMACSHA384": "sha384",
    "HMACSHA512": "sha512",
}
DEFAULT_MAC = "HMACSHA1"
# The pipes to and from gpg are enlarged to this size (Linux; from the default 64 KiB) and
# its output is read in pieces of at most this size: fewer wake-ups per gigabyte, and still
# a small, fixed amount of memory.
PIPE_SIZE = 1 << 20
# The passphrase is written into its pipe before gpg starts, so it must fit the pipe's
# buffer (64 KiB on Linux); git-annex's is about 430 bytes.
_MAX_PASSPHRASE = 1 << 15
# How much of gpg's stderr an error message quotes.
_STDERR_TAIL = 2048


class CryptoConfigError(ValueError):
    """remote.log's encryption settings are unusable (never silently read as unencrypted)."""


class GpgError(Exception):
    """gpg failed or stalled; the message says why (the tail of its stderr)."""


# --- ciphers ------------------------------------------------------------------------------

SHARED = "shared"
HYBRID = "hybrid"
PUBKEY = "pubkey"
SHAREDPUBKEY = "sharedpubkey"


@dataclass(frozen=True)
class StoredCipher:
    """remote.log's cipher as stored: ``data`` is ``cipher=`` base64-decoded."""

    method: str
    data: bytes
    keyids: tuple[str, ...]

    @property
    def encrypted(self) -> bool:
        """Whether ``data`` must be gpg-decrypted (with a secret key) to get the cipher."""
        return self.method in (HYBRID, PUBKEY)


def stored_cipher(fields: dict[str, str]) -> StoredCipher | None:
    """The remote's stored cipher (extractCipher), or None for an unencrypted remote.

    Without ``encryption=`` (written by old git-annex versions), a cipher with
    ``cipherkeys=`` is hybrid and one without is shared. Where git-annex would quietly
    treat an inconsistent setting as "no encryption" (say ``encryption=hybrid`` without
    ``cipherkeys=``) this raises instead: storing plaintext is never the fallback.
    """
    method = fields.get("encryption")
    cipher = fields.get("cipher")
    keys = fields.get("cipherkeys") if "cipherkeys" in fields else fields.get("pubkeys")
    if method == "none" or (method is None and cipher is None):
        return None
    if method is None:
        method = HYBRID if keys is not None else SHARED
    if method not in (SHARED, HYBRID, PUBKEY, SHAREDPUBKEY):
        raise CryptoConfigError(f"unknown encryption={method}")
    if cipher is None or (keys is None) != (method == SHARED):
        raise CryptoConfigError(f"encryption={method} but the cipher settings do not match")
    try:
        data = base64.b64decode(cipher, validate=True)
    except binascii.Error:
        raise CryptoConfigError("bad base64 encoded cipher") from None
    keyids = tuple(k for k in (keys or "").split(",") if k)
    return StoredCipher(method, data, keyids)


def mac_name(fields: dict[str, str]) -> str:
    """remote.log's ``mac=``; an unknown value reads as the default, as in git-annex."""
    value = fields.get("mac", DEFAULT_MAC)
    return value if value in MACS else DEFAULT_MAC


@dataclass(frozen=True)
class Cipher:
    """A usable cipher. ``mac_only`` (pubkey, sharedpubkey): no passphrase part, content
    is encrypted to public keys instead."""

    data: bytes
    mac_only: bool

    @property
    def mac_key(self) -> bytes:
        return self.data if self.mac_only else self.data[:CIPHER_BEGINNING]

    @property
    def passphrase(self) -> bytes | None:
        return None if self.mac_only else self.data[CIPHER_BEGINNING:]


def calc_mac(mac: str, key: bytes, message: bytes) -> str:
    return hmac.new(key, message, MACS[mac]).hexdigest()


def encrypted_key(cipher: Cipher, mac: str, key: Key) -> Key:
    """The name ``key`` (a chunk key, or a whole one) is stored under (encryptKey): no size,
    no mtime, nothing of the original key but its MAC."""
    message = key.canonical().encode("utf-8", "surrogateescape")
    return Key("GPG" + mac, calc_mac(mac, cipher.mac_key, message))


# --- gpg command lines ----------------------------------------------------------------------


@dataclass(frozen=True)
class Gpg:
    """How to run gpg for one remote: the program (git config ``gpg.program``) and the
    remote's ``annex-gnupg-options`` / ``annex-gnupg-decrypt-options``."""

    program: str = "gpg"
    encrypt_options: tuple[str, ...] = ()
    decrypt_options: tuple[str, ...] = ()

    def _argv(self, params: list[str]) -> list[str]:
        # Utility/Gpg.hs stdParams: batch mode when an agent or the test suite asks for it,
        # then quiet and no trustdb checks.
        batch = ["--batch", "--no-tty", "--use-agent"]
        if not (os.environ.get("GPG_AGENT_INFO") or os.environ.get("GPG_BATCH")):
            batch = []
        return [self.program, *batch, "--quiet", "--trust-model", "always", *params]

    def encrypt_argv(
        self, cipher: Cipher, recipients: tuple[str, ...], fd: int | None
    ) -> list[str]:
        """Content encryption: symmetric with the passphrase on ``fd``, or (MAC-only
        cipher) to ``recipients`` (Crypto.hs encrypt, Gpg.hs stdEncryptionParams)."""
        if cipher.mac_only:
            to = [arg for r in recipients for arg in ("--recipient", r)]
            return self._argv(["--batch", *self.encrypt_options, *to, "--encrypt",
                               "--no-encrypt-to", "--no-default-recipient",
                               "--force-mdc", "--no-textmode"])
        assert fd is not None
        return self._argv(["--batch", "--passphrase-fd", str(fd), *self.encrypt_options,
                           "--symmetric", "--force-mdc", "--no-textmode"])

    def decrypt_argv(self, cipher: Cipher, fd: int | None) -> list[str]:
        if cipher.mac_only:
            return self._argv(["--batch", "--decrypt", *self.decrypt_options])
        assert fd is not None
        return self._argv(["--batch", "--passphrase-fd", str(fd), "--decrypt",
                           *self.decrypt_options])

    def cipher_decrypt_argv(self) -> list[str]:
        # git-annex runs this without --batch and lets gpg prompt on a terminal; a server
        # has none, so gpg must fail at once rather than wait for a pinentry forever.
        return self._argv(["--batch", "--decrypt", *self.decrypt_options])


def recipients(stored: StoredCipher) -> tuple[str, ...]:
    """Public keys content is encrypted to (MAC-only ciphers); none for symmetric ones."""
    return stored.keyids if stored.method in (PUBKEY, SHAREDPUBKEY) else ()


def decrypt_cipher(gpg: Gpg, stored: StoredCipher, timeout: float) -> Cipher:
    """The usable cipher (decryptCipher). For hybrid and pubkey this runs gpg with the
    proxy's keyring; call it in a worker thread, and once per remote: it is slow."""
    mac_only = stored.method in (PUBKEY, SHAREDPUBKEY)
    if not stored.encrypted:
        return Cipher(stored.data, mac_only)
    try:
        done = subprocess.run(
            gpg.cipher_decrypt_argv(), input=stored.data, capture_output=True,
            timeout=timeout, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpgError(f"cannot decrypt the remote's cipher: {exc}") from None
    if done.returncode != 0 or not done.stdout:
        tail = done.stderr[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
        raise GpgError(f"cannot decrypt the remote's cipher: {tail or 'gpg failed'}")
    return Cipher(done.stdout, mac_only)


# --- the streaming gpg process --------------------------------------------------------------


class GpgProcess:
    """One run of gpg as a filter, every wait bounded by ``timeout`` seconds of no progress.

    stdin is a pipe the caller feeds (``send``/``end_input``) or a readable file descriptor
    gpg reads by itself; stdout is read with ``receive``; stderr goes to an anonymous temp
    file and is only read for the error message. With a file for stdin the process needs
    no helper task, so an async generator can drive it.
    """

    def __init__(self, process: trio.Process, stderr: IO[bytes], timeout: float) -> None:
        self.process = process
        self._stderr = stderr
        self.timeout = timeout

    @classmethod
    async def start(
        cls,
        argv: Callable[[int | None], list[str]],
        passphrase: bytes | None,
        *,
        stdin: int | None,
        timeout: float,
    ) -> GpgProcess:
        """Run ``argv(fd)``, ``fd`` being the passphrase pipe (None without passphrase);
        ``stdin`` None gives a pipe to feed."""
        if passphrase is not None and len(passphrase) > _MAX_PASSPHRASE:
            raise GpgError("cipher passphrase too long")
        rfd: int | None = None
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the object, closed in aclose
        try:
            if passphrase is not None:
                rfd, wfd = os.pipe()
                try:
                    # gpg reads the passphrase up to the first newline; git-annex adds one.
                    os.write(wfd, passphrase + b"\n")
                finally:
                    os.close(wfd)
            process = await trio.lowlevel.open_process(
                argv(rfd),
                stdin=subprocess.PIPE if stdin is None else stdin,
                stdout=subprocess.PIPE,
                stderr=stderr.fileno(),
                pass_fds=() if rfd is None else (rfd,),
            )
        except BaseException as exc:
            stderr.close()
            if isinstance(exc, OSError):
                raise GpgError(f"cannot run gpg: {exc}") from None
            raise
        finally:
            if rfd is not None:
                os.close(rfd)
        for stream in (process.stdin, process.stdout):
            if isinstance(stream, trio.lowlevel.FdStream):
                _enlarge_pipe(stream.fileno())
        return cls(process, stderr, timeout)

    def _stalled(self, what: str) -> GpgError:
        return GpgError(f"gpg {what} for {self.timeout:.0f}s")

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        assert self.process.stdin is not None
        try:
            with trio.fail_after(self.timeout):
                await self.process.stdin.send_all(data)
        except trio.TooSlowError:
            raise self._stalled("accepted no input") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # gpg exited early; wait() reports why.
            await self.wait()
            raise GpgError("gpg stopped reading its input") from None

    async def end_input(self) -> None:
        if self.process.stdin is not None:
            await self.process.stdin.aclose()

    async def receive(self) -> bytes:
        """The next piece of gpg's output; b"" at its end."""
        assert self.process.stdout is not None
        try:
            with trio.fail_after(self.timeout):
                return bytes(await self.process.stdout.receive_some(PIPE_SIZE))
        except trio.TooSlowError:
            raise self._stalled("produced no output") from None

    async def wait(self) -> None:
        """Wait for gpg to exit; raise GpgError with its stderr if it failed."""
        try:
            with trio.fail_after(self.timeout):
                code = await self.process.wait()
        except trio.TooSlowError:
            raise self._stalled("did not exit") from None
        if code != 0:
            self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, self._stderr.tell() - _STDERR_TAIL))
            tail = self._stderr.read().decode("utf-8", "replace").strip()
            raise GpgError(tail.splitlines()[-1] if tail else f"gpg exited with status {code}")

    async def aclose(self) -> None:
        """Release everything; a gpg still running (an error or cancellation cut the
        transfer short) is killed."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
                with trio.move_on_after(5):
                    await self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    await stream.aclose()
            self._stderr.close()


def _enlarge_pipe(fd: int) -> None:
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is not None:
        with contextlib.suppress(OSError):  # over the system's limit: keep the default
            fcntl.fcntl(fd, setpipe, PIPE_SIZE)
