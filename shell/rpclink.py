"""The node RPC link: the proxy's side of `git-annex-shell noderpc` (architecture.md, "Node RPC").

P2P allows one request at a time per connection; this link keeps many calls in flight on one
connection to a node (the cluster's fan-out, -J jobs), batches presence checks, and streams
bodies under credit so that one slow body never blocks the other calls. It implements the same
`NodeLink` interface as `P2PLink`, so the proxy and the gateway do not know which one they hold.

How it works:

- One pump task per link (a trio system task, because links are opened lazily from inside a
  request and have no nursery of their own) reads frames and writes them. Frames are queued by
  the callers and written by one writer in the order the codec made them: request ids must
  strictly increase on the wire, and queuing never blocks, so the reader can answer (credit,
  cancel, clean-up) without waiting on the node.
- Each call waits on its own event, bounded by the link's timeout and by the caller's
  `fail_after`. The reader hands every response to its call, body chunks to their download,
  credit and cancels to their upload.
- A call whose caller has gone (timeout, cancellation) is remembered, and its late answer is
  undone: a lock is unlocked, a download cancelled, an upload ended, so the node holds nothing
  for nobody.
- A malformed frame, EOF, or a write that makes no progress for the timeout kills the link:
  all of its calls raise NodeError, other links are untouched (security.md rows 31-32). A typed
  error answers one call only; the link carries on.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from git_remote_annexproxy import p2p, rpc
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.rpcmethods import (
    MAX_BATCH,
    BadRequestError,
    CallProtocolError,
    LockedError,
    NotFoundError,
    RpcError,
    StorageIOError,
)
from shell.nodelink import (
    AlreadyHave,
    Download,
    NodeError,
    NodeLink,
    NodeRefused,
    Outcome,
    Upload,
    parse_ssh_url,
    spawn_node,
    ssh_argv,
)
from shell.p2pserver import warn
from shell.proxyselect import Remote, local_path

# The node worker stores whatever a plain repository stores, so the proxy can offer its client
# every P2P version it speaks itself.
READ_SIZE: Final = 1 << 20
_COALESCE: Final = 1 << 20  # queued frames joined into one write, up to this many bytes
_SMALL: Final = 64 << 10  # frames below this are joined as they are queued
_PAD: Final = 1 << 20
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class LinkBroken(Exception):
    """The byte stream to the peer failed: no progress for the timeout, or a write error."""


class PeerGone(LinkBroken):
    """The peer closed its end: how links usually end, not something to report."""


class Outbox:
    """Frames for the peer, written by one task (`run`) in the order they were queued.

    Shared with the node worker. Writing never blocks; what may wait here is bounded by the
    user of this class: the proxy's by the protocol (body bytes by the peer's credit,
    requests by rpc.MAX_PENDING), the node worker's with `pending` and `room` (a proxy that
    reads nothing must not make it queue without end). Small frames are joined as they are
    queued, so many tiny answers cost their bytes, not an object each.
    """

    def __init__(self, stream: trio.abc.SendStream, *, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._queue: deque[bytes | bytearray] = deque()
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._progress = trio.Event()
        self.pending = 0  # bytes queued or being written
        self.last_progress = trio.current_time()  # when a write last completed

    def write(self, data: bytes) -> None:
        if not data:
            return
        tail = self._queue[-1] if self._queue else None
        if isinstance(tail, bytearray) and len(tail) + len(data) <= _COALESCE:
            tail += data
        elif len(data) < _SMALL:
            self._queue.append(bytearray(data))
        else:
            self._queue.append(data)
        self.pending += len(data)
        self._wakeup.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    async def drained(self) -> None:
        """Wait until everything queued so far has been written."""
        await self._idle.wait()

    async def room(self, limit: int) -> None:
        """Wait until fewer than `limit` bytes wait to be written."""
        while self.pending >= limit:
            await self._progress.wait()

    async def run(self) -> None:
        """Write until cancelled; raises LinkBroken."""
        while True:
            while self._queue:
                parts = [self._queue.popleft()]
                size = len(parts[0])
                while self._queue and size + len(self._queue[0]) <= _COALESCE:
                    size += len(self._queue[0])
                    parts.append(self._queue.popleft())
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                del parts
                with trio.move_on_after(self._timeout) as scope:
                    try:
                        await self._stream.send_all(data)
                    except _BROKEN as exc:
                        raise PeerGone(f"cannot write: {exc or 'connection closed'}") from None
                if scope.cancelled_caught:
                    raise LinkBroken(f"peer read nothing for {self._timeout:.0f}s")
                del data
                self.pending -= size
                self.last_progress = trio.current_time()
                self._progress.set()
                self._progress = trio.Event()
            self._idle.set()
            self._wakeup = trio.Event()
            await self._wakeup.wait()


@dataclass(eq=False)
class _Call:
    method: str
    done: trio.Event = field(default_factory=trio.Event)
    response: rpc.Response | None = None


@dataclass(eq=False)
class _Stream:
    """A body stream's state as the reader leaves it for the task that uses it."""

    chunks: deque[bytes] = field(default_factory=deque)  # downloads only
    ended: bool = False  # download: the node's end arrived; upload: we sent ours
    wakeup: trio.Event = field(default_factory=trio.Event)


def _expected_size(key: Key) -> int | None:
    # A chunk key's size is the whole object's; its own length is left to the verifier.
    if key.chunk_size is not None or key.chunk_num is not None:
        return None
    return key.size


def _wire_af(af: str | None) -> str | None:
    # The associated file is informational; one the RPC refuses (rpcmethods._af) is left out.
    if not af or af.startswith("/") or "\n" in af or "\0" in af:
        return None
    return af


class RpcLink(NodeLink):
    """Our node worker (`git-annex-shell noderpc`), spawned locally or through ssh."""

    def __init__(self, remote: Remote, proxy_uuid: str, *, timeout: float) -> None:
        super().__init__(remote)
        self.proxy_uuid = proxy_uuid
        self.timeout = timeout
        self.dead = False
        self.conn = rpc.RpcConnection("client")
        self.process: trio.Process | None = None
        self._reason = "not connected"
        self._send: trio.abc.SendStream | None = None
        self._receive: trio.abc.ReceiveStream | None = None
        self._outbox: Outbox | None = None
        self._calls: dict[int, _Call] = {}
        self._abandoned: dict[int, str] = {}  # request id -> method, for late answers
        self._downloads: dict[int, _Stream] = {}
        self._uploads: dict[int, _Stream] = {}
        self._locks: list[int] = []
        self._handshake = trio.Event()
        self._pump_scope = trio.CancelScope()
        self._pump_done = trio.Event()
        self._closed = False

    def argv(self) -> list[str]:
        """The node worker's command: our interpreter for a local path, ssh otherwise."""
        if self.remote.is_local:
            path = local_path(self.remote.url)
            return [sys.executable, "-m", "shell", "noderpc", path, self.proxy_uuid]
        _, _, path = parse_ssh_url(self.remote.url)
        return ssh_argv(self.remote, ["noderpc", path, self.proxy_uuid])

    # -- connecting ------------------------------------------------------------------------

    async def open(self, version: int | None, bypass: frozenset[str] = frozenset()) -> None:
        # `bypass` names gateways to avoid; a node worker serves one repository, no cluster.
        try:
            self.process = await spawn_node(self.remote, self.argv())
        except NodeError:
            self.dead = True
            raise
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.attach(self.process.stdout, self.process.stdin, version)

    async def attach(
        self,
        receive: trio.abc.ReceiveStream,
        send: trio.abc.SendStream,
        version: int | None,
        bypass: frozenset[str] = frozenset(),
    ) -> None:
        """Run the link over connected streams (the node's pipes, or a test's fake node):
        handshake, then check the node's UUID as P2P checks AUTH-SUCCESS."""
        self._send, self._receive = send, receive
        self._outbox = Outbox(send, timeout=self.timeout)
        trio.lowlevel.spawn_system_task(self._pump, name=f"noderpc link {self.remote.name}")
        self._outbox.write(self.conn.handshake())
        with trio.move_on_after(self.timeout):
            await self._handshake.wait()
        if not self._handshake.is_set():
            self._die(f"no handshake within {self.timeout:.0f}s")
        if self.dead:
            raise self._error()
        _, info = await self._call("info", {})
        if info["uuid"] != self.uuid:
            self._die(f"expected UUID {self.uuid}, found {info['uuid']}")
            raise self._error()
        self.version = 0 if version is None else min(version, p2p.MAX_VERSION)

    # -- the pump: one reader and one writer for the life of the link ----------------------

    async def _pump(self) -> None:
        try:
            with self._pump_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop)
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # a bug here must fail this link, never the whole process
            self._die(f"internal error: {exc!r}")
        finally:
            self._pump_done.set()

    async def _write_loop(self) -> None:
        assert self._outbox is not None
        try:
            await self._outbox.run()
        except LinkBroken as exc:
            self._die(str(exc))

    async def _read_loop(self) -> None:
        assert self._receive is not None
        try:
            while not self.dead:
                event = self.conn.next_event()
                if event is rpc.NEED_DATA:
                    self.conn.receive_data(await self._receive.receive_some(READ_SIZE))
                else:
                    assert not isinstance(event, rpc.NeedData)
                    self._dispatch(event)
        except rpc.RemoteProtocolError as exc:
            self._die(f"protocol error: {exc}")
        except _BROKEN as exc:
            self._die(f"connection lost: {exc or 'closed'}")

    def _dispatch(self, event: rpc.Event) -> None:
        match event:
            case rpc.Handshake():
                self._handshake.set()
            case rpc.Response(id=rid):
                call = self._calls.pop(rid, None)
                if call is None:
                    self._late(rid, event)
                    return
                # Stream state exists before the caller runs: chunks may be in this read.
                if event.error is None and call.method == "get":
                    self._downloads[rid] = _Stream()
                if event.error is None and call.method == "put_begin":
                    assert event.result is not None
                    if event.result["offset"] is not None:
                        self._uploads[rid] = _Stream()
                call.response = event
                call.done.set()
            case rpc.BodyChunk(stream_id=sid, data=data, end=end):
                stream = self._downloads.get(sid)
                if stream is not None:  # else a download we gave up: the rest is dropped
                    stream.chunks.append(data)
                    stream.ended |= end
                    stream.wakeup.set()
            case rpc.CreditGranted(stream_id=sid):
                if (stream := self._uploads.get(sid)) is not None:
                    stream.wakeup.set()
            case rpc.StreamCancelled(stream_id=sid):
                # The node will not store this upload (a write failed, say): end the stream
                # now; put_finish brings the node's reason.
                self._end_upload(sid)
            case rpc.Notification(params=params):
                warn(f"  {self.remote.name}: {params.get('message', '')}")
            case rpc.ConnectionClosed(truncated=truncated):
                self._die("node closed the connection" + (" inside a frame" if truncated else ""))
            case _:  # requests are refused by a client-side codec
                self._die(f"unexpected {type(event).__name__}")

    def _late(self, rid: int, response: rpc.Response) -> None:
        """Undo what a call left on the node after its caller stopped waiting."""
        method = self._abandoned.pop(rid, None)
        if method is None or response.result is None or self._outbox is None:
            return
        if method == "lock":
            self._fire("unlock", {"lock": response.result["lock"]})
        elif method == "get":
            self._outbox.write(self.conn.cancel(rid))
        elif method == "put_begin" and response.result["offset"] is not None:
            self._outbox.write(self.conn.send_body(rid, b"", end=True))
            # valid=False with nothing sent: the node answers FAILURE and keeps its partial.
            self._fire("put_finish", {"upload": rid, "valid": False})

    def _fire(self, method: str, params: dict[str, Any]) -> None:
        """A request whose answer nobody waits for."""
        if self.dead or self._outbox is None:
            return
        try:
            rid, data = self.conn.request(method, params)
        except rpc.LocalProtocolError:
            return  # too many unanswered: the node releases it when the link closes
        self._abandoned[rid] = method
        self._outbox.write(data)

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self._reason = reason
        self._pump_scope.cancel()
        self._handshake.set()
        for call in self._calls.values():
            call.done.set()
        self._calls.clear()
        for stream in (*self._downloads.values(), *self._uploads.values()):
            stream.wakeup.set()

    def _error(self) -> NodeError:
        return NodeError(f"{self.remote.name}: {self._reason}")

    # -- calls -----------------------------------------------------------------------------

    async def _call(
        self, method: str, params: dict[str, Any], expected: tuple[type[RpcError], ...] = ()
    ) -> tuple[int, dict[str, Any]]:
        """One request and its answer: (request id, result).

        Typed errors in `expected` are raised as they are; a malformed answer or request is
        NodeError; any other typed error is the node refusing this request (NodeRefused, as
        a P2P ERROR), with the link still usable.
        """
        if self.dead or self._outbox is None:
            raise self._error()
        try:
            rid, data = self.conn.request(method, params)
        except rpc.LocalProtocolError as exc:
            raise NodeError(f"{self.remote.name}: {exc}") from None
        call = _Call(method)
        self._calls[rid] = call
        self._outbox.write(data)
        try:
            with trio.move_on_after(self.timeout):
                await call.done.wait()
        finally:
            if call.response is None and not self.dead:
                del self._calls[rid]
                self._abandoned[rid] = method
        if call.response is None:
            if self.dead:
                raise self._error()
            raise NodeError(f"{self.remote.name}: no answer to {method} in {self.timeout:.0f}s")
        try:
            return rid, call.response.unwrap()
        except expected:
            raise
        except (CallProtocolError, BadRequestError) as exc:
            raise NodeError(f"{self.remote.name}: {method}: {exc.message}") from None
        except RpcError as exc:
            raise NodeRefused(self.remote.name, exc.message) from None

    async def _wait(self, stream: _Stream, what: str) -> None:
        """Wait for the reader to touch `stream`; NodeError after the timeout."""
        stream.wakeup = trio.Event()
        with trio.move_on_after(self.timeout):
            await stream.wakeup.wait()
            return
        raise NodeError(f"{self.remote.name}: no {what} for {self.timeout:.0f}s")

    async def checkpresent(self, key: Key) -> bool:
        return (await self.checkpresent_many([key]))[0]

    async def checkpresent_many(self, keys: Sequence[Key]) -> list[bool]:
        """Presence of many keys, MAX_BATCH per round trip."""
        out: list[bool] = []
        for i in range(0, len(keys), MAX_BATCH):
            batch = [str(k) for k in keys[i : i + MAX_BATCH]]
            _, result = await self._call("checkpresent", {"keys": batch})
            if len(result["present"]) != len(batch):
                raise NodeError(f"{self.remote.name}: {len(result['present'])} answers "
                                f"for {len(batch)} keys")  # fmt: skip
            out += result["present"]
        return out

    async def lockcontent(self, key: Key) -> bool:
        # A storage error (a lock file name too long for the filesystem, say) is the
        # FAILURE p2pstdio answers for it, here as for REMOVE below.
        expected = (NotFoundError, LockedError, StorageIOError)
        try:
            _, result = await self._call("lock", {"key": str(key)}, expected)
        except expected:
            return False
        self._locks.append(result["lock"])
        return True

    async def unlockcontent(self) -> None:
        # P2P holds one lock per connection, so UNLOCKCONTENT names none: the latest it is.
        if self._locks:
            with contextlib.suppress(NotFoundError):
                await self._call("unlock", {"lock": self._locks.pop()}, (NotFoundError,))

    async def remove(self, key: Key, before: int | None) -> Outcome:
        try:
            await self._call(
                "remove", {"key": str(key), "before": before}, (LockedError, StorageIOError)
            )
        except (LockedError, StorageIOError):
            # Locked, retained, past `before`, or not removed or logged: P2P's FAILURE.
            return Outcome(False)
        return Outcome(True)

    async def timestamp(self) -> int:
        _, result = await self._call("timestamp", {})
        ts: int = result["ts"]
        return ts

    async def put(self, af: str | None, key: Key) -> Upload | AlreadyHave:
        rid, result = await self._call("put_begin", {"key": str(key), "af": _wire_af(af)})
        if result["offset"] is None:
            return AlreadyHave()
        return _RpcUpload(self, key, rid, result["offset"])

    async def get(self, offset: int, af: str | None, key: Key) -> Download:
        params = {"key": str(key), "offset": offset, "af": _wire_af(af)}
        try:
            rid, result = await self._call("get", params, (NotFoundError,))
        except NotFoundError:
            return _RpcDownload(self, 0, 0, None)  # P2P: DATA 0, then INVALID
        return _RpcDownload(self, rid, result["length"], self._downloads[rid])

    # -- streams ---------------------------------------------------------------------------

    async def _send_body(self, sid: int, stream: _Stream, data: bytes) -> None:
        assert self._outbox is not None
        view = memoryview(data)
        while view:
            if self.dead:
                raise self._error()
            if stream.ended:
                return  # the node cancelled: it will refuse this upload anyway
            credit = self.conn.available_credit(sid)
            if credit == 0:
                await self._wait(stream, "credit for the upload")
                continue
            self._outbox.write(self.conn.send_body(sid, view[:credit]))
            view = view[credit:]

    def _end_upload(self, sid: int) -> None:
        stream = self._uploads.get(sid)
        if stream is None or stream.ended:
            return
        stream.ended = True
        stream.wakeup.set()
        if not self.dead and self._outbox is not None:
            self._outbox.write(self.conn.send_body(sid, b"", end=True))

    def _consumed(self, sid: int, n: int) -> None:
        if not self.dead and self._outbox is not None:
            self._outbox.write(self.conn.consumed(sid, n))

    def _give_up_download(self, sid: int) -> None:
        stream = self._downloads.pop(sid, None)
        if stream is not None and not stream.ended and not self.dead and self._outbox is not None:
            self._outbox.write(self.conn.cancel(sid))

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A node that already failed gets no grace to exit: its failure must cost no more
        # than the bounded wait that found it (as P2PLink does).
        grace = 0 if self.dead else 5
        with trio.CancelScope(shield=True):
            if self._outbox is not None and not self.dead:
                # What is queued (an unlock, the end of a stream) should reach the node.
                with trio.move_on_after(min(self.timeout, 2.0)):
                    await self._outbox.drained()
            self._die("link closed")
            if self._outbox is not None:
                with trio.move_on_after(2):
                    await self._pump_done.wait()
            # EOF on its stdin: the node commits its journal and exits.
            for stream in (self._send, self._receive):
                if stream is not None:
                    with contextlib.suppress(*_BROKEN), trio.move_on_after(1):
                        await stream.aclose()
            if self.process is not None:
                with trio.move_on_after(grace) as scope:
                    await self.process.wait()
                if scope.cancelled_caught:
                    self.process.kill()
                    with trio.move_on_after(2):
                        await self.process.wait()


class _RpcUpload(Upload):
    def __init__(self, link: RpcLink, key: Key, sid: int, offset: int) -> None:
        self.link = link
        self.key = key
        self.sid = sid
        self.offset = offset
        self.stream = link._uploads[sid]
        self.length: int | None = None
        self.sent = 0
        self.refused = False

    async def send_data(self, length: int) -> None:
        self.length = length
        expected = _expected_size(self.key)
        if expected is not None and self.offset + length != expected:
            # These bytes cannot be the content (security.md row 18): send none of them, so
            # the node's partial stays as it was, and answer FAILURE in finish().
            self.refused = True
            self.link._end_upload(self.sid)

    async def send_piece(self, data: bytes) -> None:
        if self.refused:
            return
        self.sent += len(data)
        await self.link._send_body(self.sid, self.stream, data)

    async def finish(self, valid: bool | None) -> Outcome:
        # Short or long against DATA's length means our caller lost the framing; the node
        # must not store that (valid=False, which also discards what it got this time).
        whole = self.length is not None and self.sent == self.length
        self.link._end_upload(self.sid)
        params = {"upload": self.sid, "valid": valid is not False and whole and not self.refused}
        try:
            await self.link._call("put_finish", params, (RpcError,))
        except (CallProtocolError, BadRequestError) as exc:
            raise NodeError(f"{self.link.remote.name}: put_finish: {exc.message}") from None
        except RpcError:
            return Outcome(False)  # verification failed, a write failed, or a short body
        finally:
            self.link._uploads.pop(self.sid, None)
        return Outcome(not self.refused)

    async def data_present(self) -> Outcome:
        # The client says the node already has the content: close this upload empty (the
        # node answers FAILURE and keeps any partial) and ask the node itself.
        self.link._end_upload(self.sid)
        with contextlib.suppress(RpcError):
            await self.link._call("put_finish", {"upload": self.sid, "valid": False}, (RpcError,))
        self.link._uploads.pop(self.sid, None)
        return Outcome(await self.link.checkpresent(self.key))


class _RpcDownload(Download):
    def __init__(self, link: RpcLink, sid: int, length: int, stream: _Stream | None) -> None:
        self.link = link
        self.sid = sid
        self.length = length
        self.stream = stream
        self.valid = stream is not None

    async def pieces(self) -> AsyncIterator[bytes]:
        link, stream, got = self.link, self.stream, 0
        if stream is None:
            return
        try:
            while True:
                if stream.chunks:
                    chunk = stream.chunks.popleft()
                    got += len(chunk)
                    if got > self.length:
                        link._die(f"sent more than the {self.length} bytes it announced")
                        raise link._error()
                    if chunk:
                        yield chunk
                    link._consumed(self.sid, len(chunk))  # credit only once passed on
                elif stream.ended:
                    break
                elif link.dead:
                    raise link._error()
                else:
                    await link._wait(stream, "data of the download")
        finally:
            link._give_up_download(self.sid)
        if got < self.length:
            # The node could not read the rest. Below version 1 the client cannot be told;
            # otherwise keep its framing whole and answer INVALID, as git-annex does for a
            # file that changed while it was sent.
            if link.version < 1:
                raise NodeError(f"{link.remote.name}: download ended at {got} of {self.length}")
            self.valid = False
            while got < self.length:
                n = min(_PAD, self.length - got)
                got += n
                yield bytes(n)

    async def validity(self) -> bool | None:
        return None if self.link.version < 1 else self.valid

    async def verdict(self, ok: bool) -> None:
        # A P2P server only reads the client's verdict to move on; the node needs none.
        return None
