"""One HTTP PUT of a file range to a presigned URL (annexproxy-indirect uploads).

stdlib ``http.client`` in a worker thread: every socket operation is bounded by
``timeout`` seconds, the body streams from the file in pieces (never held whole), and the
URL and headers come from our proxy, checked before use: http or https only, and header
values without CR/LF (the codec refuses those already; checked again at the edge).
"""

from __future__ import annotations

import http.client
import os
import urllib.parse

import trio

PIECE = 1 << 20
TIMEOUT = 120.0  # seconds any one socket operation may take
_MAX_ERROR_BODY = 2048


def _put(url: str, headers: dict[str, str], fd: int, offset: int, length: int) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OSError(f"refusing upload URL scheme {parts.scheme!r}")
    if any(c in v for v in (*headers, *headers.values()) for c in "\r\n\0"):
        raise OSError("bad header in the upload instructions")
    conn_type = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    conn = conn_type(parts.netloc, timeout=TIMEOUT)
    try:
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        skip_host = any(h.lower() == "host" for h in headers)
        conn.putrequest("PUT", target, skip_host=skip_host, skip_accept_encoding=True)
        for name, value in headers.items():
            if name.lower() != "content-length":
                conn.putheader(name, value)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        sent = 0
        while sent < length:
            piece = os.pread(fd, min(PIECE, length - sent), offset + sent)
            if not piece:
                raise OSError("file shorter than expected")
            conn.send(piece)
            sent += len(piece)
        response = conn.getresponse()
        body = response.read(_MAX_ERROR_BODY)
        if not 200 <= response.status < 300:
            said = body.decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"HTTP {response.status} {response.reason}"
                          + (f": {said[0][:200]}" if said else ""))  # fmt: skip
    except http.client.HTTPException as exc:
        raise OSError(f"HTTP error: {exc}") from None
    finally:
        conn.close()


async def http_put(url: str, headers: dict[str, str], fd: int, offset: int, length: int) -> None:
    """PUT ``length`` bytes of ``fd`` from ``offset``; OSError on any failure. The thread
    cannot be cancelled, but each of its socket waits ends within TIMEOUT."""
    await trio.to_thread.run_sync(_put, url, headers, fd, offset, length)
