"""The S3 special remote behind our proxy (shell/s3storage.py, its credentials
shell/s3creds.py), against moto's standalone S3 server (tests/s3server.py) and real
git-annex 10.20261026 with S3 support.

* the storage alone: layout settings read as git-annex reads them, store/retrieve/
  present/remove, multipart for streams larger than a part, failures leave nothing,
  unreachable servers and missing credentials give one clear line;
* credentials found where git-annex finds them (env, annex/creds/<uuid>, s3creds= in
  remote.log, plain and encrypted with a shared cipher) from remotes git-annex set up;
* presigned PUTs and `stat`, and what moto does and does not enforce for them;
* interop through our proxy over the fake ssh: the client copies through the proxy and
  git-annex with the remote enabled directly gets the content; git-annex stores directly
  and the proxy serves it; the bucket listings of both are identical; encrypted buckets
  hold no plaintext and no key names.

Real git-annex needs `region=` against moto: without it, it signs for the region
"127.0.0.1" (the aws library derives the region from the endpoint) and moto then refuses
to create the bucket (IllegalLocationConstraintException); with region=us-east-1 it works.
It also needs annex.security.allowed-ip-addresses to talk to 127.0.0.1.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import os
import re
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import SshEnv, make_ssh_env
from s3server import MotoServer, moto_server

from git_remote_annexproxy import chunks
from git_remote_annexproxy.keys import Key
from shell import s3creds, s3storage
from shell.proxyselect import Remote
from shell.s3creds import CredentialSource
from shell.s3storage import S3Config, S3ConfigError, S3Storage
from shell.speciallink import SpecialLink, make_storage
from shell.specialstore import ObjectMissing, StorageError

MiB = 1 << 20
KEY_ID, SECRET = "AKIDANNEXPROXYTEST", "annexproxy/test+secret"
UUID = "5ec1a100-0000-4000-8000-0000000000a1"
TAG = "5eed" * 8  # an upload tag, as objectserve draws them


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def s3_fields(server: MotoServer, bucket: str, **extra: str) -> dict[str, str]:
    return {"type": "S3", "host": "127.0.0.1", "port": str(server.port), "protocol": "http",
            "requeststyle": "path", "signature": "v4", "bucket": bucket,
            "region": "us-east-1", **extra}  # fmt: skip


@pytest.fixture
def creds_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def new_bucket(server: MotoServer, name: str) -> str:
    server.create_bucket(name)
    return name


async def pieces(data: bytes, size: int = MiB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await trio.lowlevel.checkpoint()


async def read_all(storage: S3Storage, key: Key) -> bytes:
    return b"".join([piece async for piece in storage.retrieve(key)])


def pending_uploads(server: MotoServer, bucket: str) -> int:
    status, _, body = server.request("GET", f"/{bucket}?uploads")
    assert status == 200, body
    return body.count(b"<Upload>")


# --- settings ----------------------------------------------------------------------------------


def test_settings_as_git_annex_reads_them() -> None:
    aws = S3Config.from_fields({"bucket": "MyBucket"})
    assert (aws.bucket, aws.host, aws.port, aws.https, aws.region, aws.path_style) == (
        "mybucket", "s3.amazonaws.com", 80, False, "us-east-1", False)  # fmt: skip
    assert aws.host_header == "mybucket.s3.amazonaws.com"
    assert aws.object_path("K") == "/K"
    eu = S3Config.from_fields({"bucket": "b", "datacenter": "EU", "protocol": "https"})
    assert (eu.host, eu.port, eu.https, eu.region) == (
        "s3-eu-west-1.amazonaws.com", 443, True, "eu-west-1")  # fmt: skip
    west = S3Config.from_fields({"bucket": "b", "datacenter": "us-west-2", "port": "443"})
    assert (west.host, west.https, west.region) == ("s3-us-west-2.amazonaws.com", True, "us-west-2")
    # A non-AWS host without region=: the aws library signs for the host name itself.
    other = S3Config.from_fields({"bucket": "b", "host": "minio.example", "port": "9000",
                                  "signature": "v4", "requeststyle": "path",
                                  "fileprefix": "p/"})  # fmt: skip
    assert (other.region, other.host_header, other.object_path("p/K")) == (
        "minio.example", "minio.example:9000", "/b/p/K")  # fmt: skip
    assert other.url("/b/p/K $") == "http://minio.example:9000/b/p/K%20%24"
    assert ("x-amz-storage-class", "STANDARD") in other.headers
    # remote.log's x-amz-meta-* go on every PUT, but never the proxy's own upload tag
    # (only a presigned URL sets it: objectserve's proof that it came through that URL).
    meta = S3Config.from_fields({"bucket": "b", "x-amz-meta-owner": "me",
                                 "x-amz-meta-annexproxy-upload": TAG})  # fmt: skip
    assert [h for h in meta.headers if h[0].startswith("x-amz-meta-")] == [
        ("x-amz-meta-owner", "me")]  # fmt: skip
    for bad in ({"bucket": "b", "host": "h"},  # v2 by default for a non-AWS host
                {"bucket": "b", "signature": "v2"}, {"bucket": "b", "signature": "anonymous"},
                {"bucket": "b", "versioning": "yes"}, {"bucket": "b", "exporttree": "yes"},
                {"bucket": "b", "requeststyle": "vhost"}, {"bucket": "b", "port": "x"},
                {"bucket": "b", "protocol": "ftp"}, {"bucket": "b", "mungekeys": "ia"},
                {}, {"bucket": "b", "host": "a/b"}):  # fmt: skip
        with pytest.raises(S3ConfigError):
            S3Config.from_fields(bad)


# --- the storage against moto ------------------------------------------------------------------


async def test_store_retrieve_present_remove(moto: MotoServer, creds_env: None) -> None:
    bucket = new_bucket(moto, "roundtrip")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket, fileprefix="pre/fix "), {})
    key = Key.parse("SHA256E-s11--" + "a" * 64 + ".txt")
    assert not await storage.present(key)
    with pytest.raises(ObjectMissing):
        await read_all(storage, key)
    await storage.store(key, pieces(b"hello world", 3))
    assert moto.list_objects(bucket) == {"pre/fix " + str(key): 11}
    assert await storage.present(key)
    assert await read_all(storage, key) == b"hello world"
    stat = await storage.stat(str(key))
    assert stat == (11, hashlib.sha256(b"hello world").hexdigest(), None)  # no upload tag
    await storage.store(key, pieces(b""))  # replaces, atomically
    assert await read_all(storage, key) == b""
    await storage.remove(key)
    await storage.remove(key)  # absent is fine
    assert not await storage.present(key)
    assert await storage.stat(str(key)) is None
    assert moto.list_objects(bucket) == {}
    await storage.aclose()


async def test_no_request_names_an_object_with_a_dot_segment(
    moto: MotoServer, creds_env: None
) -> None:
    bucket = new_bucket(moto, "dots")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket), {})
    key = Key.parse("URL--http://example.com/a/../../other/x")
    for call in (storage.present(key), storage.remove(key), storage.stat(str(key)),
                 storage.store(key, pieces(b"x")), read_all(storage, key)):  # fmt: skip
        with pytest.raises(StorageError, match="path segment"):
            await call
    with pytest.raises(StorageError, match="path segment"):
        storage.presign_put(str(key), 1, "0" * 64, 60, TAG)
    assert moto.list_objects(bucket) == {}
    # A name with dots that are no segment of their own is an ordinary object.
    fine = Key.parse("URL--http://example.com/a..b/.x")
    await storage.store(fine, pieces(b"x"))
    assert await storage.present(fine)
    await storage.aclose()


async def test_large_stream_goes_multipart_in_bounded_pieces(
    moto: MotoServer, creds_env: None
) -> None:
    bucket = new_bucket(moto, "multipart")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket), {})
    data = os.urandom(2 * s3storage.PART_SIZE + 12345)
    key = Key.parse("SHA256E-s1--" + "b" * 64)
    await storage.store(key, pieces(data, 999_999))
    assert moto.list_objects(bucket) == {str(key): len(data)}
    assert await read_all(storage, key) == data
    assert pending_uploads(moto, bucket) == 0
    # A multipart object's checksum is not the content's: stat does not claim one.
    assert await storage.stat(str(key)) == (len(data), None, None)


async def test_a_failing_stream_leaves_nothing(moto: MotoServer, creds_env: None) -> None:
    bucket = new_bucket(moto, "failing")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket), {})

    async def broken(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield bytes(MiB)
        raise OSError("gpg died")

    for n in (2, 20):  # within the first part, and after parts were sent
        with pytest.raises(OSError, match="gpg died"):
            await storage.store(Key.parse("SHA256E-s1--" + "c" * 64), broken(n))
        assert moto.list_objects(bucket) == {}
        assert pending_uploads(moto, bucket) == 0


async def test_missing_bucket_and_unreachable_server(moto: MotoServer, creds_env: None) -> None:
    key = Key.parse("SHA256E-s1--" + "d" * 64)
    nobucket = S3Storage.from_remote(UUID, s3_fields(moto, "no-such-bucket"), {})
    with pytest.raises(StorageError, match="NoSuchBucket") as info:
        await read_all(nobucket, key)
    assert not isinstance(info.value, ObjectMissing)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        await nobucket.remove(key)
    closed = S3Storage.from_remote(UUID, {**s3_fields(moto, "x"), "port": str(_closed_port())}, {})
    with pytest.raises(StorageError, match="cannot reach") as unreachable:
        await closed.present(key)
    assert "\n" not in str(unreachable.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nobody listens once closed


async def test_missing_credentials_is_one_clear_line(
    moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    storage = S3Storage.from_remote(UUID, s3_fields(moto, "whatever"), {})
    with pytest.raises(StorageError) as info:
        await storage.present(Key.parse("SHA256E-s1--" + "e" * 64))
    assert str(info.value) == s3creds.MISSING_CREDS
    assert "AWS_ACCESS_KEY_ID" in str(info.value) and "\n" not in str(info.value)


def test_node_timeout_bounds_s3_connections(tmp_path: Path, creds_env: None) -> None:
    """annexproxy.nodetimeout (the link's timeout) is the socket timeout of S3 requests;
    without one, DEFAULT_TIMEOUT."""
    fields = {"type": "S3", "bucket": "b", "host": "127.0.0.1", "port": "9",
              "signature": "v4", "requeststyle": "path"}  # fmt: skip
    remote = Remote("s3", UUID, "", 100.0, special=fields)
    link = SpecialLink(remote, gitdir=tmp_path, config=None, timeout=7.5)
    storage = make_storage(remote, fields, tmp_path, link.timeout)
    assert isinstance(storage, S3Storage) and storage.timeout == 7.5
    conn = storage._connect()
    assert conn.timeout == 7.5
    conn.close()
    default = make_storage(remote, fields, tmp_path)
    assert isinstance(default, S3Storage) and default.timeout == s3storage.DEFAULT_TIMEOUT


async def test_link_open_gives_its_timeout_to_the_storage(
    moto: MotoServer, creds_env: None, tmp_path: Path
) -> None:
    fields = s3_fields(moto, new_bucket(moto, "linktimeout"))
    link = SpecialLink(Remote("s3", UUID, "", 100.0, special=fields), gitdir=tmp_path,
                       config=None, timeout=12.5)  # fmt: skip
    await link.open(None)
    try:
        assert link.storage is not None and isinstance(link.storage.inner, S3Storage)
        assert link.storage.inner.timeout == 12.5
    finally:
        await link.aclose()


def uploads_in(server: MotoServer, bucket: str) -> list[str]:
    """The object names of the bucket's unfinished multipart uploads."""
    status, _, body = server.request("GET", f"/{bucket}?uploads")
    assert status == 200, body
    return sorted(re.findall(r"<Key>([^<]*)</Key>", body.decode()))


def test_which_uploads_are_stale() -> None:
    now = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.UTC)
    listing = b"""<ListMultipartUploadsResult><Bucket>b</Bucket>
      <Upload><Key>p/old &amp; dead</Key><UploadId>u1</UploadId>
        <Initiated>2026-04-01T00:00:00.000Z</Initiated></Upload>
      <Upload><Key>p/live</Key><UploadId>u2</UploadId>
        <Initiated>2026-05-01T11:00:00.000Z</Initiated></Upload>
      <Upload><Key>q/outside</Key><UploadId>u3</UploadId>
        <Initiated>2020-01-01T00:00:00.000Z</Initiated></Upload>
      <Upload><Key>p/no date</Key><UploadId>u4</UploadId>
        <Initiated>yesterday</Initiated></Upload>
    </ListMultipartUploadsResult>"""
    assert s3storage.stale_uploads(listing, "p/", now) == [("p/old & dead", "u1")]
    assert s3storage.stale_uploads(listing, "p/", now, age=1800) == [
        ("p/old & dead", "u1"), ("p/live", "u2")]  # fmt: skip
    assert len(s3storage.stale_uploads(listing, "", now)) == 2
    assert s3storage.STALE_UPLOAD_SECONDS >= 24 * 3600


async def test_cleanup_aborts_stale_uploads_under_the_prefix(
    moto: MotoServer, creds_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto 5.2.5 reports every upload as initiated 2010-11-10, so all look stale; an age
    larger than that shows the age is what decides."""
    bucket = new_bucket(moto, "leftovers")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket, fileprefix="pre/"), {})
    key = Key.parse("SHA256E-s5--" + "f" * 64)
    await storage.store(key, pieces(b"kept!"))
    for name in ("pre/A", "pre/B", "pre/C", "other/D"):  # as a killed proxy leaves them
        storage._call("create", "POST", storage.config.object_path(name), (("uploads", ""),))
    assert uploads_in(moto, bucket) == ["other/D", "pre/A", "pre/B", "pre/C"]
    monkeypatch.setattr(s3storage, "STALE_UPLOAD_SECONDS", 100 * 365 * 24 * 3600.0)
    await storage.cleanup()
    assert uploads_in(moto, bucket) == ["other/D", "pre/A", "pre/B", "pre/C"]
    monkeypatch.undo()
    monkeypatch.setattr(s3storage, "MAX_ABORTS", 2)  # bounded per open
    await storage.cleanup()
    assert len(uploads_in(moto, bucket)) == 2 and "other/D" in uploads_in(moto, bucket)
    await storage.cleanup()
    assert uploads_in(moto, bucket) == ["other/D"]  # outside the fileprefix: not ours
    assert moto.list_objects(bucket) == {"pre/" + str(key): 5}
    assert await read_all(storage, key) == b"kept!"
    await storage.aclose()


async def test_cleanup_failures_only_warn(
    moto: MotoServer, creds_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    nobucket = S3Storage.from_remote(UUID, s3_fields(moto, "no-such-bucket"), {})
    await nobucket.cleanup()
    closed = S3Storage.from_remote(UUID, {**s3_fields(moto, "x"), "port": str(_closed_port())}, {})
    await closed.cleanup()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "NoSuchBucket" in err[0] and "cannot reach" in err[1]


def test_credentials_from_the_creds_file_and_plain_remote_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    creds = tmp_path / "annex" / "creds"
    creds.mkdir(parents=True)
    (creds / UUID).write_text("fileid\nfilesecret\n")
    embedded = base64.b64encode(b"logid\nlogsecret\n").decode()
    found = CredentialSource(UUID, {"s3creds": embedded}, tmp_path).find()
    assert (found.access_key, found.secret_key) == ("fileid", "filesecret")
    found = CredentialSource(UUID, {"s3creds": embedded}, None).find()
    assert (found.access_key, found.secret_key) == ("logid", "logsecret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envid")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    assert CredentialSource(UUID, {}, tmp_path).find().access_key == "envid"
    # A uuid that is not one never becomes a path.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StorageError):
        CredentialSource("../creds/" + UUID, {}, tmp_path).find()


# --- presigned PUTs ---------------------------------------------------------------------------


def put_url(url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.putrequest("PUT", f"{parts.path}?{parts.query}", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if "Content-Length" not in headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_presigned_put_and_stat(moto: MotoServer, creds_env: None) -> None:
    bucket = new_bucket(moto, "presigned")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket, fileprefix="in/"), {})
    body = os.urandom(100_000)
    digest = hashlib.sha256(body).hexdigest()
    url, headers = storage.presign_put("OBJ", len(body), digest, 600, TAG)
    assert url.startswith(f"http://127.0.0.1:{moto.port}/{bucket}/in/OBJ?")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"]
    assert query["X-Amz-SignedHeaders"] == [
        "content-length;host;if-none-match;x-amz-checksum-sha256;"
        "x-amz-meta-annexproxy-upload;x-amz-sdk-checksum-algorithm;x-amz-storage-class"
    ]  # fmt: skip
    assert headers["x-amz-meta-annexproxy-upload"] == TAG
    assert SECRET not in url and KEY_ID in url
    assert headers["Content-Length"] == str(len(body))
    assert base64.b64decode(headers["x-amz-checksum-sha256"]).hex() == digest
    assert await storage.stat("OBJ") is None
    assert put_url(url, headers, body)[0] == 200
    assert await storage.stat("OBJ") == (len(body), digest, TAG)
    assert moto.get_object(bucket, "in/OBJ") == body
    # The URL is a conditional write: once the object exists (here: stored through it),
    # a second PUT through a still valid URL cannot overwrite it.
    assert put_url(url, headers, os.urandom(len(body)))[0] == 412
    assert moto.get_object(bucket, "in/OBJ") == body
    with pytest.raises(ValueError):
        storage.presign_put("OBJ", 1, "not hex", 600, TAG)
    with pytest.raises(ValueError):
        storage.presign_put("OBJ", 1, digest, 600, "short")


@pytest.mark.parametrize("case", ["other body", "other size", "other checksum", "expired"])
async def test_what_moto_enforces_for_presigned_puts(
    moto: MotoServer, creds_env: None, case: str
) -> None:
    """Real S3 refuses each of these (the signature covers Content-Length and
    x-amz-checksum-sha256, and S3 checks the body against the checksum and the expiry).
    moto 5.2.5 refuses none: it checks no presigned signature, no expiry and no checksum,
    and stores the checksum the client claims. So with moto, `stat` reports the claimed
    checksum; a proxy must not take it as proof of content (this test pins that down)."""
    bucket = new_bucket(moto, f"lax-{case.replace(' ', '-')}")
    storage = S3Storage.from_remote(UUID, s3_fields(moto, bucket), {})
    body = os.urandom(5000)
    digest = hashlib.sha256(body).hexdigest()
    url, headers = storage.presign_put("OBJ", len(body), digest, 1 if case == "expired" else 600,
                                       TAG)  # fmt: skip
    sent, send_headers = body, dict(headers)
    if case == "other body":
        sent = os.urandom(len(body))
    elif case == "other size":
        sent = body + b"x"
        send_headers["Content-Length"] = str(len(sent))
    elif case == "other checksum":
        sent = os.urandom(len(body))
        send_headers["x-amz-checksum-sha256"] = base64.b64encode(
            hashlib.sha256(sent).digest()).decode()  # fmt: skip
    else:
        await trio.sleep(2.5)
    status, _ = put_url(url, send_headers, sent)
    assert status == 200, "moto started enforcing this: update the docstring and the report"
    size, reported, _ = await storage.stat("OBJ") or (None, None, None)
    assert size == len(sent)
    claimed = base64.b64decode(send_headers["x-amz-checksum-sha256"]).hex()
    assert reported == claimed  # what the client said, checked or not
    stored = hashlib.sha256(moto.get_object(bucket, "OBJ")).hexdigest()
    # Whether the reported checksum is that of the stored bytes: not for a different body
    # sent under the presigned checksum.
    assert (stored == reported) == (case in ("other checksum", "expired"))


# --- interop with real git-annex through our proxy ----------------------------------------------

REMOTES: dict[str, dict[str, str]] = {
    "s3flat": {"encryption": "none"},
    "s3chunk": {"encryption": "none", "chunk": "1MiB", "fileprefix": "annex/"},
    "s3shared": {"encryption": "shared", "chunk": "512KiB", "embedcreds": "yes"},
    "s3sharedflat": {"encryption": "shared", "fileprefix": "x-"},
}


@dataclass
class World:
    env: SshEnv
    server: MotoServer
    proxy: Path
    client: Path
    direct: Path
    uuids: dict[str, str]

    def client_run(self, *args: str, env: dict[str, str] | None = None,
                   check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(list(args), cwd=self.client, env=env or dict(self.env),
                              capture_output=True, text=True, timeout=300, check=check)  # fmt: skip

    def admin(self, *args: str, cwd: Path) -> str:
        return self.env.run(list(args), cwd=cwd, admin=True).stdout

    def direct_pull(self) -> None:
        self.admin("git", "fetch", "-q", "origin", cwd=self.direct)
        self.admin("git", "annex", "merge", "-q", cwd=self.direct)

    def direct_push(self) -> None:
        self.direct_pull()
        self.admin("git", "push", "-q", "origin", "git-annex", cwd=self.direct)

    def objects(self, name: str) -> dict[str, int]:
        """The remote's objects (the annex-uuid marker git-annex writes left out)."""
        prefix = REMOTES[name].get("fileprefix", "")
        return {k: v for k, v in self.server.list_objects(name).items()
                if k != prefix + "annex-uuid"}  # fmt: skip


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path,
    moto: MotoServer,
) -> Iterator[World]:  # fmt: skip
    root = tmp_path_factory.mktemp("s3")
    env = make_ssh_env(root / "ssh", annex_bin, our_shell)
    gnupghome = root / "gnupg"
    gnupghome.mkdir(mode=0o700)
    env.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, GNUPGHOME=str(gnupghome))
    # The proxy gets the credentials from its environment, as git-annex would.
    env["FAKESSH_PASSENV"] = "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY GNUPGHOME"
    proxy = env.make_server_repo("proxy.git", "proxy")
    allow = ["git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1"]
    env.run(allow, cwd=proxy, admin=True)
    for name, settings in REMOTES.items():
        args = ["git", "annex", "initremote", "-q", name, "type=S3", "host=127.0.0.1",
                f"port={moto.port}", "protocol=http", "requeststyle=path", "signature=v4",
                "region=us-east-1", f"bucket={name}", "fileprefix="]  # fmt: skip
        args += [f"{k}={v}" for k, v in settings.items()]
        env.run(args, cwd=proxy, admin=True)
        env.run(["git", "config", f"remote.{name}.annex-proxy", "true"], cwd=proxy, admin=True)
    env.run(["git", "annex", "updateproxy", "-q"], cwd=proxy, admin=True)
    uuids = {name: env.run(["git", "config", f"remote.{name}.annex-uuid"], cwd=proxy,
                           admin=True).stdout.strip() for name in REMOTES}  # fmt: skip
    client = root / "client"
    env.run(["git", "clone", "-q", f"localhost:{proxy}", str(client)])
    env.run(["git", "annex", "init", "-q", "client"], cwd=client)
    env.run(["git", "config", "remote.origin.annex-verified", "verified"], cwd=client)
    direct = root / "direct"
    env.run(["git", "clone", "-q", str(proxy), str(direct)], admin=True)
    env.run(["git", "annex", "init", "-q", "direct"], cwd=direct, admin=True)
    env.run(allow, cwd=direct, admin=True)
    for name in REMOTES:
        env.run(["git", "annex", "enableremote", "-q", name], cwd=direct, admin=True)
        env.run(["git", "config", f"remote.{name}.annex-verified", "verified"], cwd=direct,
                admin=True)  # fmt: skip
    yield World(env, moto, proxy, client, direct, uuids)
    subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(gnupghome)},
                   check=False, capture_output=True, timeout=60)  # fmt: skip


def add_file(world: World, name: str, content: bytes) -> Key:
    (world.client / name).write_bytes(content)
    world.client_run("git", "annex", "add", "-q", name)
    world.client_run("git", "commit", "-q", "-m", name)
    return Key.parse(world.client_run("git", "annex", "lookupkey", name).stdout.strip())


def content_of(run_dir: Path, env: dict[str, str], key: Key) -> bytes:
    where = subprocess.run(
        ["git", "annex", "contentlocation", str(key)], cwd=run_dir, env=env,
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    return (run_dir / where).read_bytes()


def expected_objects(name: str, length: int) -> int:
    chunk = REMOTES[name].get("chunk")
    size = chunks.parse_size(chunk) if chunk else None
    return chunks.chunk_count(length, size) if size else 1


@pytest.mark.parametrize("name", sorted(REMOTES))
def test_proxy_stores_git_annex_reads_and_the_layouts_agree(world: World, name: str) -> None:
    content = os.urandom(2_500_000)
    filename = f"ours-{name}.bin"
    key = add_file(world, filename, content)
    before = world.objects(name)
    world.client_run("git", "annex", "copy", "-q", "--to", f"origin-{name}", filename)
    ours = {k: v for k, v in world.objects(name).items() if k not in before}
    assert len(ours) == expected_objects(name, len(content))
    # Real git-annex, with the remote enabled directly, gets it back byte for byte.
    world.direct_pull()
    world.admin("git", "annex", "get", "-q", "--key", str(key), "--from", name, cwd=world.direct)
    assert content_of(world.direct, world.env.admin_env(), key) == content
    # Dropped through the proxy: every object goes.
    world.client_run("git", "annex", "drop", "-q", "--from", f"origin-{name}", filename)
    assert not set(ours) & set(world.objects(name))
    # git-annex storing the same content makes exactly the same objects.
    world.direct_pull()
    world.admin("git", "annex", "copy", "-q", "--key", str(key), "--to", name, cwd=world.direct)
    theirs = {k: v for k, v in world.objects(name).items() if k not in before}
    if REMOTES[name]["encryption"] == "none":
        assert theirs == ours
    else:
        # Same object names. Sizes only nearly agree: gpg compresses (random content grows
        # by its deflate and partial-length framing, about 0.25%), our writer does not.
        assert theirs.keys() == ours.keys()
        assert all(abs(theirs[k] - ours[k]) <= 64 + ours[k] // 200 for k in ours), (theirs, ours)
    prefix = REMOTES[name].get("fileprefix", "")
    assert all(k.startswith(prefix) for k in ours)
    if REMOTES[name]["encryption"] == "none":
        chunk = REMOTES[name].get("chunk")
        size = chunks.parse_size(chunk) if chunk else None
        layout = chunks.chunk_keys(key, size, len(ours)) if size else [key]
        assert set(ours) == {prefix + k.canonical() for k in layout}


@pytest.mark.parametrize("name", sorted(REMOTES))
def test_git_annex_stores_and_proxy_serves(world: World, name: str) -> None:
    content = os.urandom(1_300_000)
    filename = f"theirs-{name}.bin"
    (world.direct / filename).write_bytes(content)
    world.admin("git", "annex", "add", "-q", filename, cwd=world.direct)
    world.admin("git", "commit", "-q", "-m", filename, cwd=world.direct)
    key = Key.parse(world.admin("git", "annex", "lookupkey", filename, cwd=world.direct).strip())
    before = world.objects(name)
    world.admin("git", "annex", "copy", "-q", "--to", name, filename, cwd=world.direct)
    assert len(set(world.objects(name)) - set(before)) == expected_objects(name, len(content))
    world.direct_push()
    world.client_run("git", "fetch", "-q", "origin")
    world.client_run("git", "annex", "merge", "-q")
    world.client_run("git", "annex", "get", "-q", "--key", str(key), "--from", f"origin-{name}")
    assert content_of(world.client, dict(world.env), key) == content
    world.client_run("git", "annex", "fsck", "-q", "--fast", "--key", str(key),
                     "--from", f"origin-{name}")  # fmt: skip


def test_encrypted_buckets_hold_no_plaintext_and_no_key_names(world: World) -> None:
    content = os.urandom(3 * MiB + 12345)
    key = add_file(world, "secret.bin", content)
    encrypted = [n for n, s in REMOTES.items() if s["encryption"] != "none"]
    for name in encrypted:
        world.client_run("git", "annex", "copy", "-q", "--to", f"origin-{name}", "secret.bin")
    probes = [content[i : i + 32] for i in range(0, len(content) - 32, 4096)]
    names = [str(key).encode(), key.name.encode(), key.name.split(".")[0].encode()]
    for name in encrypted:
        objects = world.objects(name)
        assert objects, name
        prefix = REMOTES[name].get("fileprefix", "")
        for obj in objects:
            assert key.name.split(".")[0] not in obj
            assert obj.startswith(prefix + "GPGHMACSHA1--"), obj
            data = world.server.get_object(name, obj)
            assert data[:1] in (b"\x8c", b"\x8d", b"\x8e", b"\x8f", b"\xc3"), obj
            assert not any(p in data for p in probes), f"plaintext in {obj}"
            assert not any(n in data for n in names), f"key name in {obj}"


def test_embedded_credentials_and_missing_ones_through_the_proxy(world: World) -> None:
    """Without credentials in the proxy's environment: s3shared's (embedcreds=yes,
    encrypted with its shared cipher) still work; s3flat's come from the creds file, and
    without that file the copy fails in one clear line."""
    fields = dict(
        w.split("=", 1) for line in world.admin("git", "show", "git-annex:remote.log",
                                                cwd=world.proxy).splitlines()
        if world.uuids["s3shared"] in line for w in line.split() if "=" in w
    )  # fmt: skip
    assert "s3creds" in fields
    assert KEY_ID not in base64.b64decode(fields["s3creds"]).decode("latin-1")
    env = {k: v for k, v in world.env.items() if not k.startswith("AWS_")}
    env["FAKESSH_PASSENV"] = "GNUPGHOME"
    key = add_file(world, "nocreds.bin", os.urandom(700_000))
    world.client_run("git", "annex", "copy", "-q", "--to", "origin-s3shared", "nocreds.bin",
                     env=env)  # fmt: skip
    assert world.objects("s3shared")
    # s3flat's credentials are in the file git-annex cached at initremote: the proxy reads
    # them there; without that file it has none and says so in one line.
    [cached] = [p for p in world.proxy.rglob(f"creds/{world.uuids['s3flat']}")
                if p.parent.parent.name == "annex"]  # fmt: skip
    hidden = cached.with_name("hidden")
    cached.rename(hidden)
    failed = world.client_run("git", "annex", "copy", "--to", "origin-s3flat", "nocreds.bin",
                              env=env, check=False)  # fmt: skip
    assert failed.returncode != 0
    assert s3creds.MISSING_CREDS in failed.stdout + failed.stderr
    assert str(key) not in "".join(world.objects("s3flat"))
    hidden.rename(cached)
    world.client_run("git", "annex", "copy", "-q", "--to", "origin-s3flat", "nocreds.bin",
                     env=env)  # fmt: skip
    assert str(key) in "".join(world.objects("s3flat"))


def test_credential_source_reads_what_git_annex_embedded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("GNUPGHOME", world.env["GNUPGHOME"])
    log = world.admin("git", "show", "git-annex:remote.log", cwd=world.proxy)
    line = next(x for x in log.splitlines() if world.uuids["s3shared"] in x)
    fields = dict(w.split("=", 1) for w in line.split()[1:] if "=" in w)
    found = CredentialSource(world.uuids["s3shared"], fields).find()
    assert (found.access_key, found.secret_key) == (KEY_ID, SECRET)
    # git-annex cached them in the proxy's annex/creds/<uuid> at initremote.
    cached = CredentialSource(world.uuids["s3flat"], {}, world.proxy).find()
    assert (cached.access_key, cached.secret_key) == (KEY_ID, SECRET)
