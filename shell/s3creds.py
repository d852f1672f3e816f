"""Credentials of a ``type=S3`` special remote, found as git-annex finds them
(``Creds.hs getRemoteCredPair``), in this order:

* the environment: ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` when both are set;
  ``AWS_SESSION_TOKEN``, when set, goes with whichever pair is found;
* the file git-annex caches them in, ``annex/creds/<uuid>`` (when the repository is known);
* ``s3creds=`` embedded in remote.log: base64, gpg-encrypted with the remote's cipher when
  the remote is encrypted (an old git-annex stored them unencrypted despite a shared
  cipher, which is still read).

`find` blocks (a file, maybe gpg, bounded by a timeout); `S3Storage.credentials` calls it
once and caches the result.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from git_remote_annexproxy import s3sign
from git_remote_annexproxy.crypto import (
    Cipher,
    CryptoConfigError,
    Gpg,
    GpgError,
    decrypt_cipher,
    stored_cipher,
)
from shell.specialstore import StorageError

CREDS_FIELD = "s3creds"
ENV_ID, ENV_SECRET, ENV_TOKEN = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"
MISSING_CREDS = f"no S3 credentials: set both {ENV_ID} and {ENV_SECRET} to use S3"
GPG_TIMEOUT = 60.0  # seconds one gpg run (cipher, then credentials) may take
_MAX_FILE = 1 << 16  # the most read of a creds file
_UUID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


@dataclass
class CredentialSource:
    """Where this remote's credentials may be found (git-annex's order)."""

    uuid: str
    fields: Mapping[str, str]
    gitdir: Path | None = None
    gpg: Gpg = field(default_factory=Gpg)
    timeout: float = GPG_TIMEOUT

    def find(self) -> s3sign.Credentials:
        """Blocking (it may run gpg): call it in a worker thread."""
        token = os.environ.get(ENV_TOKEN) or None
        key_id, secret = os.environ.get(ENV_ID), os.environ.get(ENV_SECRET)
        if key_id and secret:
            return s3sign.Credentials(key_id, secret, token)
        pair = self._from_file() or self._from_remote_log()
        if pair is None:
            raise StorageError(MISSING_CREDS)
        return s3sign.Credentials(pair[0], pair[1], token)

    def _from_file(self) -> tuple[str, str] | None:
        if self.gitdir is None or not _UUID_RE.fullmatch(self.uuid):
            return None
        path = self.gitdir / "annex" / "creds" / self.uuid
        try:
            with open(path, "rb") as fh:
                return _decode_pair(fh.read(_MAX_FILE))
        except OSError:
            return None

    def _from_remote_log(self) -> tuple[str, str] | None:
        value = self.fields.get(CREDS_FIELD)
        if not value:
            return None
        try:
            data = base64.b64decode(value, validate=True)
            stored = stored_cipher(dict(self.fields))
        except (binascii.Error, CryptoConfigError) as exc:
            raise StorageError(f"unusable embedded S3 credentials: {exc}") from None
        if stored is None:
            return _decode_pair(data) or _bad_creds()
        try:
            cipher = decrypt_cipher(self.gpg, stored, self.timeout)
            return _decode_pair(_gpg_decrypt(self.gpg, cipher, data, self.timeout)) or _bad_creds()
        except GpgError as exc:
            if stored.method != "shared":
                raise StorageError(f"cannot decrypt the embedded S3 credentials: {exc}") from None
            # Creds.hs: old git-annex stored them unencrypted despite a shared cipher.
            return _decode_pair(data) or _bad_creds()


def _decode_pair(data: bytes) -> tuple[str, str] | None:
    """Creds.hs decodeCredPair: exactly two lines, login and secret."""
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    return (lines[0], lines[1]) if len(lines) == 2 and lines[0] and lines[1] else None


def _bad_creds() -> NoReturn:
    raise StorageError("bad embedded S3 credentials")


def _gpg_decrypt(gpg: Gpg, cipher: Cipher, data: bytes, timeout: float) -> bytes:
    """Decrypt a small message with the cipher, the passphrase on a pipe as crypto.py
    gives it to gpg (never argv or the environment)."""
    rfd: int | None = None
    try:
        if cipher.passphrase is not None:
            rfd, wfd = os.pipe()
            try:
                os.write(wfd, cipher.passphrase + b"\n")
            finally:
                os.close(wfd)
        done = subprocess.run(
            gpg.decrypt_argv(cipher, rfd), input=data, capture_output=True, timeout=timeout,
            pass_fds=() if rfd is None else (rfd,), check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpgError(f"cannot run gpg: {exc}") from None
    finally:
        if rfd is not None:
            os.close(rfd)
    if done.returncode != 0:
        raise GpgError(done.stderr[-512:].decode("utf-8", "replace").strip() or "gpg failed")
    return done.stdout
