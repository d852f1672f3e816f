"""git-annex's ``type=S3`` special remote as a `SpecialStorage` (issue 6).

Layout, as git-annex 10.20261026 (``Remote/S3.hs``, and the ``aws`` library it signs with)
places objects, so that git-annex reading the same bucket agrees:

* object name: ``fileprefix`` + the key's serialization (for an encrypted remote, the
  ``GPGHMAC…--…`` key of the chunk); ``bucket`` is lower-cased; one PUT per object;
* endpoint: ``host`` (default ``s3.amazonaws.com``, then the endpoint of ``datacenter``),
  ``port`` (default 80, or 443 with ``protocol=https``), ``protocol`` (https when the port
  is 443); ``requeststyle=path`` puts the bucket in the path, else in the host name;
* signing: SigV4 only (``signature=v4``, or the AWS host by default), for ``region=`` when
  set, else the region the ``aws`` library derives from the endpoint (the host name itself
  for a non-AWS host); ``storageclass`` and ``x-amz-meta-*`` headers on every PUT.

Credentials: `shell.s3creds.CredentialSource`, looked up (git-annex's order) on the first
request and cached.

HTTP: ``http.client`` run in worker threads rather than an HTTP/1.1 client of our own on
trio sockets: it is the standard library's tested parser (chunked bodies, header limits,
keep-alive, TLS with certificate checks); a socket timeout bounds every connect, send and
read, so a worker thread never blocks longer than ``timeout`` without progress; a GET is
streamed one bounded read per thread call. Cancellation waits at most one such step.
Bodies are bytes in memory of bounded size (``PART_SIZE``): a stream of unknown length
(gpg's output) is sent as one PUT when it fits, else as a multipart upload, so memory is
bounded whatever the object size and every body is signed (its SHA-256) and retriable.
``timeout`` is the proxy's node timeout (``annexproxy.nodetimeout``) when the storage is
opened by `shell.speciallink.make_storage`. At open, `S3Storage.cleanup` aborts multipart
uploads a killed process left behind (old ones only; bounded; failures only warn).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import functools
import hashlib
import html
import http.client
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from git_remote_annexproxy import s3sign
from git_remote_annexproxy.crypto import Gpg
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.specialformat import dot_segment
from shell.p2pserver import warn
from shell.s3creds import CredentialSource
from shell.specialstore import ObjectMissing, ObjectStat, SpecialStorage, StorageError

# A stream is sent as one PUT up to this size, else in parts of this size (S3's minimum
# part is 5 MiB). Also the most a store holds in memory.
PART_SIZE = 8 << 20
READ_SIZE = 1 << 20
DEFAULT_TIMEOUT = 60.0
AWS_HOST = "s3.amazonaws.com"
_IDLE_CONNECTIONS = 4
# cleanup(): an unfinished multipart upload under the fileprefix is aborted only when it
# began this long ago. S3 cannot tell a dead upload from a live one (another proxy
# session's, or git-annex's own), and a live one may legitimately run long: a store only
# has to move every node timeout, and our multipart object can be 10000 parts of
# PART_SIZE (~78 GiB), which at ~130 KiB/s still finishes within 7 days. Seven days is
# also the age AWS suggests for an AbortIncompleteMultipartUpload lifecycle rule.
STALE_UPLOAD_SECONDS = 7 * 24 * 3600.0
# ...and the work is bounded, so opening a session never waits long: one listing page of
# at most LIST_UPLOADS, at most MAX_ABORTS aborts, all within CLEANUP_SECONDS (at most
# half the node timeout); whatever is left is for the next session.
LIST_UPLOADS = 100
MAX_ABORTS = 10
CLEANUP_SECONDS = 10.0
_ERROR_BODY = 1 << 16
# The user metadata a presigned PUT must carry (a signed header): the proxy's random tag
# of that one presign, so that an object can be told to have come through that URL.
UPLOAD_TAG = "x-amz-meta-annexproxy-upload"
_T = TypeVar("_T")


class S3ConfigError(ValueError):
    """remote.log's S3 settings are unusable here."""


@dataclass(frozen=True)
class S3Config:
    bucket: str
    host: str  # the endpoint the aws library would use (s3HostName of datacenter for AWS)
    port: int
    https: bool
    path_style: bool
    region: str
    fileprefix: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # sent with every PUT

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> S3Config:
        """S3.hs s3Configuration and extractS3Info, for the settings this proxy supports;
        anything that would change where objects go and that it does not implement is
        refused rather than misread."""
        for name, why in (("exporttree", "exporttree=yes"), ("importtree", "importtree=yes"),
                          ("versioning", "versioning=yes")):  # fmt: skip
            if fields.get(name, "no").lower() in ("yes", "true"):
                raise S3ConfigError(f"S3 remotes with {why} are not supported")
        if fields.get("mungekeys"):
            raise S3ConfigError("Internet Archive S3 remotes (mungekeys=) are not supported")
        # S3.hs usev4: by default v4 only for the AWS host.
        default_signature = "v4" if fields.get("host", AWS_HOST) == AWS_HOST else "v2"
        if fields.get("signature", default_signature) != "v4":
            raise S3ConfigError("only signature=v4 S3 remotes are supported")
        bucket = fields.get("bucket", "").lower()
        if not bucket or "/" in bucket:
            raise S3ConfigError("S3 bucket not configured")
        host = fields.get("host", AWS_HOST)
        if host == AWS_HOST:
            host = _aws_host(fields.get("datacenter", "US"))
        if not host or not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", host):
            raise S3ConfigError(f"bad S3 host value: {host}")
        protocol = fields.get("protocol")
        if protocol not in (None, "http", "https"):
            raise S3ConfigError(f"bad S3 protocol value: {protocol}")
        try:
            port = int(fields.get("port", "80"))
        except ValueError:
            raise S3ConfigError(f"bad S3 port value: {fields.get('port')}") from None
        if port == 80 and protocol == "https":
            port = 443  # as S3.hs: the protocol setting overrides the default port
        https = protocol == "https" or (protocol is None and port == 443)
        style = fields.get("requeststyle")
        if style not in (None, "path"):
            raise S3ConfigError(f"bad S3 requeststyle value: {style}")
        headers = [("x-amz-storage-class", fields.get("storageclass", "STANDARD"))]
        # Never the proxy's own upload tag: only a presigned URL may set it.
        headers += sorted((k, v) for k, v in fields.items()
                          if k.startswith("x-amz-meta-") and k.lower() != UPLOAD_TAG)  # fmt: skip
        return cls(
            bucket=bucket,
            host=host,
            port=port,
            https=https,
            path_style=style == "path",
            region=fields.get("region") or _extract_region(host),
            fileprefix=fields.get("fileprefix", ""),
            headers=tuple(headers),
        )

    @property
    def host_header(self) -> str:
        host = self.host if self.path_style else f"{self.bucket}.{self.host}"
        default = 443 if self.https else 80
        return host if self.port == default else f"{host}:{self.port}"

    def object_path(self, name: str) -> str:
        """The decoded request path of object ``name`` (its fileprefix already added)."""
        return f"/{self.bucket}/{name}" if self.path_style else f"/{name}"

    def url(self, path: str, query: str = "") -> str:
        scheme = "https" if self.https else "http"
        encoded = s3sign.uri_encode(path, encode_slash=False)
        return f"{scheme}://{self.host_header}{encoded}" + (f"?{query}" if query else "")


def _aws_host(datacenter: str) -> str:
    """The aws library's s3HostName for a datacenter (region)."""
    if datacenter in ("US", "us-east-1"):
        return AWS_HOST
    if datacenter == "EU":
        return "s3-eu-west-1.amazonaws.com"
    return f"s3-{datacenter}.amazonaws.com"


def _extract_region(host: str) -> str:
    """The aws library's s3ExtractRegion: the region in an AWS endpoint's name, else the
    endpoint itself (what git-annex signs with for a non-AWS host without region=)."""
    if host in (AWS_HOST, "s3-external-1.amazonaws.com"):
        return "us-east-1"
    m = re.fullmatch(r"s3(?:\.dualstack\.|-|\.)(.+?)\.amazonaws\.com", host)
    return m.group(1) if m else host


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes  # read in full for everything but a streamed GET


class S3Error(StorageError):
    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _clean(text: str, limit: int = 200) -> str:
    """A server's text, safe for one line of a message to the user."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:limit]


def _error(what: str, status: int, body: bytes) -> S3Error:
    text = body[:_ERROR_BODY].decode("utf-8", "replace")
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    code_s = _clean(code.group(1), 64) if code else ""
    detail = f"{code_s}: {_clean(message.group(1))}" if message else code_s or "no details"
    return S3Error(f"S3 {what}: HTTP {status} {detail}", status, code_s)


class S3Storage(SpecialStorage):
    """Objects of one S3 remote. Object names passed to `stat` and `presign_put` are
    key serializations, as `store` gets them; the storage adds ``fileprefix``."""

    def __init__(
        self, config: S3Config, creds: CredentialSource, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.config = config
        self.source = creds
        self.timeout = timeout
        self._creds: s3sign.Credentials | None = None
        self._idle: list[http.client.HTTPConnection] = []

    @classmethod
    def from_remote(
        cls, uuid: str, fields: Mapping[str, str], remote_config: Mapping[str, str],
        gitdir: Path | None = None, *, timeout: float | None = None,
    ) -> S3Storage:  # fmt: skip
        """``timeout``: the socket timeout of every request (None: DEFAULT_TIMEOUT)."""
        try:
            config = S3Config.from_fields(fields)
        except S3ConfigError as exc:
            raise StorageError(str(exc)) from None
        gpg = Gpg(
            encrypt_options=tuple((remote_config.get("gnupg-options") or "").split()),
            decrypt_options=tuple((remote_config.get("gnupg-decrypt-options") or "").split()),
        )
        return cls(config, CredentialSource(uuid, fields, gitdir, gpg),
                   timeout=DEFAULT_TIMEOUT if timeout is None else timeout)  # fmt: skip

    # -- plumbing ------------------------------------------------------------------------------

    def credentials(self) -> s3sign.Credentials:
        """Blocking the first time (files, maybe gpg); cached after."""
        if self._creds is None:
            self._creds = self.source.find()
        return self._creds

    def _object(self, name: str) -> str:
        """The request path of object ``name``. Every request goes through here, so a name
        with a dot segment never reaches S3, whichever path it came by (plain PUT, GET,
        CHECKPRESENT, REMOVE, the extensions, a presign)."""
        if dot_segment(name):
            raise StorageError(f"object name {_clean(name)} has a '.' or '..' path segment: "
                               "refused for S3")  # fmt: skip
        return self.config.object_path(self.config.fileprefix + name)

    def _connect(self) -> http.client.HTTPConnection:
        c = self.config
        if c.https:
            return http.client.HTTPSConnection(
                c.host, c.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(c.host, c.port, timeout=self.timeout)

    def _send(
        self,
        method: str,
        path: str,
        query: tuple[tuple[str, str], ...] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Blocking: one signed request; the response's headers have been read. A pooled
        connection the server closed meanwhile is replaced once (bodies are in memory, so
        a retry sends the same request)."""
        creds = self.credentials()
        request = s3sign.Request(method, path, {"Host": self.config.host_header, **(headers or {})},
                                 query)  # fmt: skip
        digest = hashlib.sha256(body).hexdigest()
        for attempt in (0, 1):
            now = datetime.datetime.now(datetime.UTC)
            signed = s3sign.sign_headers(creds, request, region=self.config.region, now=now,
                                         payload_hash=digest)  # fmt: skip
            conn = self._pooled() if attempt == 0 else None
            reused = conn is not None
            conn = conn or self._connect()
            target = s3sign.uri_encode(path, encode_slash=False)
            if query:
                target += "?" + s3sign.canonical_query(query)
            try:
                # skip_host: the signed Host header is sent as given.
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in signed.items():
                    conn.putheader(name, value)
                if body or method in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _pooled(self) -> http.client.HTTPConnection | None:
        try:
            return self._idle.pop()  # atomic: worker threads share the pool
        except IndexError:
            return None

    def _release(
        self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        if response.isclosed() and not response.will_close and len(self._idle) < _IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            conn.close()

    def _call(
        self, what: str, method: str, path: str, query: tuple[tuple[str, str], ...] = (), *,
        headers: Mapping[str, str] | None = None, body: bytes = b"",
    ) -> _Response:  # fmt: skip
        """Blocking: a request whose whole response body is read (bounded for errors)."""
        try:
            conn, response = self._send(method, path, query, headers, body)
            try:
                limit = None if response.status < 300 else _ERROR_BODY
                data = response.read(limit) if method != "HEAD" else b""
                if limit is not None:
                    conn.close()  # the rest of an error body is not worth reading
                else:
                    self._release(conn, response)
            except BaseException:
                conn.close()
                raise
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(f"S3 {what}: {self._describe(exc)}") from None
        if response.status >= 300:
            raise _error(what, response.status, data)
        return _Response(response.status, response.headers, data)

    def _describe(self, exc: BaseException) -> str:
        where = f"{self.config.host}:{self.config.port}"
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return f"{where} did not answer for {self.timeout:.0f}s"
        return f"cannot reach {where}: {_clean(str(exc) or type(exc).__name__)}"

    async def _run(self, fn: Callable[[], _T]) -> _T:
        return await trio.to_thread.run_sync(fn)

    # -- SpecialStorage ------------------------------------------------------------------------

    async def present(self, key: Key) -> bool:
        return await self._run(lambda: self._head(key.canonical(), False) is not None)

    def _head(self, name: str, checksum: bool) -> _Response | None:
        headers = {"x-amz-checksum-mode": "ENABLED"} if checksum else {}
        try:
            return self._call(f"HEAD {name}", "HEAD", self._object(name), headers=headers)
        except S3Error as exc:
            if exc.status == 404:  # S3.hs checkKey: absent (HEAD has no body to say more)
                return None
            raise

    async def remove(self, key: Key) -> None:
        # S3 answers 204 whether or not the object was there; a missing bucket is an error.
        name = key.canonical()
        await self._run(lambda: self._call(f"DELETE {name}", "DELETE", self._object(name)))

    async def retrieve(self, key: Key) -> AsyncGenerator[bytes, None]:
        name = key.canonical()
        path = self._object(name)
        what = f"GET {name}"

        def start() -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
            try:
                conn, response = self._send("GET", path)
            except (OSError, http.client.HTTPException) as exc:
                raise StorageError(f"S3 {what}: {self._describe(exc)}") from None
            if response.status >= 300:
                try:
                    data = response.read(_ERROR_BODY)
                except (OSError, http.client.HTTPException):
                    data = b""
                conn.close()
                err = _error(what, response.status, data)
                if err.status == 404 and err.code in ("NoSuchKey", ""):
                    raise ObjectMissing(f"{name} is not in bucket {self.config.bucket}")
                raise err
            return conn, response

        conn, response = await self._run(start)
        try:
            while True:
                try:
                    piece = await self._run(lambda: response.read(READ_SIZE))
                except (OSError, http.client.HTTPException) as exc:
                    raise StorageError(f"S3 {what}: {self._describe(exc)}") from None
                if not piece:
                    break
                yield piece
            self._release(conn, response)
        except BaseException:
            conn.close()
            raise

    async def store(self, key: Key, data: AsyncIterator[bytes]) -> None:
        name = key.canonical()
        pending = bytearray()
        async for piece in data:
            pending += piece
            if len(pending) > PART_SIZE:
                break
        else:
            await self._run(functools.partial(self._put, name, bytes(pending)))
            return
        await self._multipart(name, pending, data)

    def _put(self, name: str, body: bytes) -> None:
        checksum = base64.b64encode(hashlib.sha256(body).digest()).decode()
        headers = {**dict(self.config.headers), "x-amz-checksum-sha256": checksum,
                   "x-amz-sdk-checksum-algorithm": "SHA256"}  # fmt: skip
        self._call(f"PUT {name}", "PUT", self._object(name), headers=headers, body=body)

    async def _multipart(self, name: str, pending: bytearray, data: AsyncIterator[bytes]) -> None:
        """CreateMultipartUpload, parts of PART_SIZE, Complete; aborted on any failure
        (S3 then frees the parts; nothing appears under the name)."""
        path = self._object(name)
        what = f"PUT {name}"
        created = await self._run(lambda: self._call(
            what, "POST", path, (("uploads", ""),), headers=dict(self.config.headers)))  # fmt: skip
        m = re.search(rb"<UploadId>([^<]+)</UploadId>", created.body)
        if m is None:
            raise StorageError(f"S3 {what}: no UploadId in the answer")
        upload = m.group(1).decode("ascii", "replace")
        etags: list[str] = []

        async def send(part: bytes) -> None:
            query = (("partNumber", str(len(etags) + 1)), ("uploadId", upload))
            done = await self._run(lambda: self._call(what, "PUT", path, query, body=part))
            etags.append(done.headers.get("ETag", ""))

        try:
            async for piece in data:
                pending += piece
                if len(pending) >= PART_SIZE:
                    await send(bytes(pending))
                    pending.clear()
            if pending or not etags:
                await send(bytes(pending))
            parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml(e)}</ETag></Part>"
                            for n, e in enumerate(etags, 1))  # fmt: skip
            body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
            done = await self._run(lambda: self._call(what, "POST", path, (("uploadId", upload),),
                                                      body=body))  # fmt: skip
            # Complete may answer 200 with an error document (S3's documented quirk).
            if b"<Error>" in done.body:
                raise _error(what, 500, done.body)
        except BaseException:
            with trio.CancelScope(shield=True), contextlib.suppress(StorageError):
                await self._run(lambda: self._call(f"abort {what}", "DELETE", path,
                                                   (("uploadId", upload),)))  # fmt: skip
            raise

    # -- what killed processes left behind ------------------------------------------------------

    async def cleanup(self) -> None:
        """Abort multipart uploads a killed proxy (or git-annex) left under the fileprefix
        (their parts cost storage and never show as objects). Bounded (see
        STALE_UPLOAD_SECONDS and below); a failure is a warning, never the session's end.
        The worker thread is abandoned at the deadline: it starts no request after it,
        and the one it may be in is bounded by the socket timeout."""
        budget = min(CLEANUP_SECONDS, self.timeout / 2)
        deadline = time.monotonic() + budget
        where = f"S3 bucket {self.config.bucket}"
        with trio.move_on_after(budget) as scope:
            try:
                await trio.to_thread.run_sync(
                    functools.partial(self._abort_stale, deadline), abandon_on_cancel=True
                )
            except StorageError as exc:
                warn(f"  {where}: stale multipart uploads not cleaned up: {exc}")
        if scope.cancelled_caught:
            warn(f"  {where}: cleanup of stale multipart uploads stopped after {budget:.0f}s")

    def _abort_stale(self, deadline: float) -> int:
        """Blocking: ListMultipartUploads (one page) under the fileprefix, then abort the
        stale ones among them; how many were aborted."""
        c = self.config
        query = [("uploads", ""), ("max-uploads", str(LIST_UPLOADS))]
        if c.fileprefix:
            query.append(("prefix", c.fileprefix))
        bucket = f"/{c.bucket}" if c.path_style else "/"
        listing = self._call("list multipart uploads", "GET", bucket, tuple(query))
        now = datetime.datetime.now(datetime.UTC)
        aborted = 0
        for name, upload in stale_uploads(listing.body, c.fileprefix, now)[:MAX_ABORTS]:
            if time.monotonic() >= deadline:
                break
            if dot_segment(name):
                continue  # never in a request path (see _object)
            try:
                self._call(f"abort upload of {name}", "DELETE", c.object_path(name),
                           (("uploadId", upload),))  # fmt: skip
            except S3Error as exc:
                if exc.code != "NoSuchUpload":  # gone meanwhile (another session's cleanup)
                    raise
            aborted += 1
        return aborted

    # -- for indirect uploads --------------------------------------------------------------------

    def presign_put(
        self, name: str, size: int, sha256_hex: str, expires: int, tag: str
    ) -> tuple[str, dict[str, str]]:
        """A URL to PUT object ``name`` (a key serialization) within ``expires`` seconds,
        and the headers the client must send with it. The signature covers the size
        (Content-Length), the SHA-256 (x-amz-checksum-sha256), If-None-Match: * and the
        ``tag`` (UPLOAD_TAG, kept as the object's metadata and reported by `stat`), so a
        server that checks signed headers refuses any other body and any overwrite, and
        only an upload through this URL carries the tag. May block once to find
        credentials."""
        if size < 0 or not re.fullmatch(r"[0-9a-f]{64}", sha256_hex):
            raise ValueError("presign_put needs a size and a lower-case hex SHA-256")
        if not re.fullmatch(r"[0-9a-f]{16,64}", tag):
            raise ValueError("presign_put needs a random hex tag")
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
        headers = {
            **dict(self.config.headers),
            UPLOAD_TAG: tag,
            "Content-Length": str(size),
            "x-amz-checksum-sha256": checksum,
            "x-amz-sdk-checksum-algorithm": "SHA256",
            # A conditional write: S3 refuses the PUT if the object exists by then, so a
            # URL still valid after someone else stored the object cannot overwrite it.
            "If-None-Match": "*",
        }
        path = self._object(name)
        query = s3sign.presign(
            self.credentials(), s3sign.Request("PUT", path, {"Host": self.config.host_header,
                                                             **headers}),
            region=self.config.region, now=datetime.datetime.now(datetime.UTC),
            expires=expires,
        )  # fmt: skip
        return self.config.url(path, query), headers

    async def stat(self, name: str) -> ObjectStat | None:
        """Size, hex SHA-256 (when the server reports the object's checksum) and upload
        tag (when it came through a presigned URL) of object ``name``; None if absent."""
        found = await self._run(lambda: self._head(name, True))
        if found is None:
            return None
        try:
            size = int(found.headers.get("Content-Length", ""))
        except ValueError:
            raise StorageError(f"S3 HEAD {name}: no Content-Length") from None
        checksum = found.headers.get("x-amz-checksum-sha256")
        digest: str | None = None
        if checksum:
            try:
                raw = base64.b64decode(checksum, validate=True)
            except binascii.Error:
                raw = b""
            # A multipart object's checksum is of its parts' checksums ("…-N"): not ours.
            digest = raw.hex() if len(raw) == 32 else None
        return ObjectStat(size, digest, found.headers.get(UPLOAD_TAG))

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


def stale_uploads(
    listing: bytes, prefix: str, now: datetime.datetime, age: float | None = None
) -> list[tuple[str, str]]:
    """(object name, upload id) of the uploads in a ListMultipartUploads answer that began
    more than ``age`` seconds (default STALE_UPLOAD_SECONDS) before ``now``. An entry
    outside ``prefix`` or without a readable Initiated time is never stale."""
    limit = STALE_UPLOAD_SECONDS if age is None else age
    found = []
    text = listing.decode("utf-8", "replace")
    for item in re.findall(r"<Upload>(.*?)</Upload>", text, re.S):
        key = re.search(r"<Key>([^<]*)</Key>", item)
        upload = re.search(r"<UploadId>([^<]+)</UploadId>", item)
        initiated = re.search(r"<Initiated>([^<]+)</Initiated>", item)
        if not (key and upload and initiated):
            continue
        name = html.unescape(key.group(1))
        try:
            began = datetime.datetime.fromisoformat(initiated.group(1).strip())
        except ValueError:
            continue
        if began.tzinfo is None or not name.startswith(prefix):
            continue
        if (now - began).total_seconds() > limit:
            found.append((name, html.unescape(upload.group(1))))
    return found


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
