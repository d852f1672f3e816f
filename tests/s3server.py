"""moto's standalone S3 server as a subprocess on a free loopback port (a real HTTP
server speaking S3: no client library is mocked).

    with moto_server(tmp_path / "moto.log") as server:
        server.endpoint  # "http://127.0.0.1:PORT"
        server.create_bucket("b")
        server.list_objects("b")  # {name: size}

Requests from the tests themselves carry a dummy Authorization header (moto does not check
signatures by default); what our storage and git-annex send is signed as for AWS.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0
DUMMY_AUTH = ("AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, "
              "SignedHeaders=host, Signature=0")  # fmt: skip


@dataclass
class MotoServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)
        try:
            # moto serves private objects to any request with an Authorization header (it
            # checks no signature by default); without one, it refuses them.
            sent = {"Authorization": DUMMY_AUTH, **(headers or {})}
            conn.request(method, path, body=body or None, headers=sent)
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def create_bucket(self, bucket: str) -> None:
        status, _, body = self.request("PUT", f"/{bucket}")
        assert status == 200, body

    def list_objects(self, bucket: str) -> dict[str, int]:
        """Every object of the bucket: name -> size (ListObjectsV2, all pages)."""
        out: dict[str, int] = {}
        token = ""
        while True:
            query = "list-type=2" + (f"&continuation-token={token}" if token else "")
            status, _, body = self.request("GET", f"/{bucket}?{query}")
            assert status == 200, body
            text = body.decode()
            for item in re.findall(r"<Contents>(.*?)</Contents>", text, re.S):
                name = re.search(r"<Key>(.*?)</Key>", item, re.S)
                size = re.search(r"<Size>(\d+)</Size>", item)
                assert name and size
                out[_unxml(name.group(1))] = int(size.group(1))
            m = re.search(r"<NextContinuationToken>(.*?)</NextContinuationToken>", text)
            if "<IsTruncated>true</IsTruncated>" not in text or m is None:
                return out
            token = m.group(1)

    def get_object(self, bucket: str, name: str) -> bytes:
        from urllib.parse import quote

        status, _, body = self.request("GET", f"/{bucket}/{quote(name)}")
        assert status == 200, (name, body[:200])
        return body


def _unxml(text: str) -> str:
    return (text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
            .replace("&apos;", "'").replace("&amp;", "&"))  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        finally:
            conn.close()
    except OSError:
        return False


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[MotoServer]:
    """Start moto, wait until it answers (bounded), yield it, stop it (bounded)."""
    for _attempt in range(3):  # the port may be taken between free_port and the bind
        port = free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(port):
                break
            time.sleep(0.1)
        if process.poll() is None and _answers(port):
            break
        _stop(process)
    else:
        raise RuntimeError(f"moto server did not start; see {log}")
    try:
        yield MotoServer(process, port)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)
