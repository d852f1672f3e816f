"""`git-annex-shell noderpc DIR [CLIENTUUID]`: our node worker, serving one repository's annex
to a proxy over the node RPC (`rpc.py`, method table in `rpcmethods.py`) on stdio.

It does what p2pstdio does for a plain repository (`p2pserver.py`), with the same store and
branch calls and the same restrictions, but with many calls in flight on one connection.
CLIENTUUID (the proxy's UUID, as p2pstdio's UUID parameter) names the transfer records.

Concurrency: requests are handled by the reader, in the order they arrive, because each is a
few quick filesystem calls; that keeps them ordered (an `unlock` and then a `remove` happen in
that order) with no locking of our own. An upload's body is written by the reader as its chunks
arrive, and credit goes back as they are written. Only what waits on the proxy runs in a task
of its own: sending a download's body, which waits for credit.

Memory is bounded whatever the proxy does (it may be a hostile key's holder, see
restrict.check_noderpc): the reader stops reading while READ_PAUSE bytes wait to be written,
a download's body waits while BODY_ROOM do, and at most rpcmethods.MAX_STREAMS streams and
MAX_LOCKS locks are open. `annexproxy.idletimeout` (as in p2pstdio) ends a link on which
nothing moved either way for that long, or that has held a lock that long.

However the link ends (EOF, a malformed frame, a dead pipe), content locks are released with
their retention files left in place (as p2pstdio does when its client vanishes), partial
uploads are kept for a resume, and the journal is committed. A malformed or oversized frame
ends this link with exit 1 and one line on stderr; stdout carries RPC frames only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Final

import trio

from git_remote_annexproxy import rpc
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import restore_stdio
from git_remote_annexproxy.rpcmethods import (
    MAX_LOCKS,
    MAX_STREAMS,
    AppendOnlyError,
    CallProtocolError,
    LockedError,
    NotFoundError,
    ReadOnlyError,
    RpcError,
    StorageIOError,
    TransferInProgressError,
    VerifyFailedError,
)
from shell.p2pserver import idle_timeout, warn
from shell.repo import Repo
from shell.rpclink import LinkBroken, Outbox, PeerGone
from shell.service.repository import (
    ContentLocked,
    Download,
    Hold,
    NotPresent,
    Refused,
    RemoveOutcome,
    RepositoryService,
    TransferInProgress,
    Upload,
)

READ_SIZE: Final = 1 << 20
SEND_PIECE: Final = 1 << 20
# Bytes waiting to be written to the proxy: past BODY_ROOM no download sends a piece, past
# READ_PAUSE no request is read. Bodies alone stay below READ_PAUSE (BODY_ROOM + SEND_PIECE
# + a few frames), so only answers piling up, i.e. a proxy that reads nothing, stop reading.
BODY_ROOM: Final = 2 << 20
READ_PAUSE: Final = 4 << 20
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(eq=False)
class _Upload:
    upload: Upload
    ended: bool = False
    error: RpcError | None = None


class NodeWorker:
    """Serves one proxy connection against this repository's own annex."""

    def __init__(
        self,
        repo: Repo,
        client_uuid: str | None,
        send: trio.abc.SendStream,
        receive: trio.abc.ReceiveStream,
    ) -> None:
        self.service = RepositoryService(repo, client_uuid=client_uuid)
        self.uuid = self.service.uuid
        self.idle = idle_timeout(repo)
        self.conn = rpc.RpcConnection("server")
        self.outbox = Outbox(send, timeout=self.idle)
        self.receive = receive
        self.last_input = trio.current_time()
        self.failure: str | None = None  # why the link ended badly, for stderr
        self.gone = False  # the proxy went away mid-exchange: exit 1, quietly (as p2pstdio)
        self.locks: dict[int, tuple[Hold, float]] = {}  # id -> hold, since
        self.next_lock = 1
        self.uploads: dict[int, _Upload] = {}  # by stream id (= the put_begin request id)
        self.credit: dict[int, trio.Event] = {}  # download stream -> wakeup on credit/cancel
        self.cancelled: set[int] = set()
        self.nursery: trio.Nursery | None = None
        self.methods: dict[str, Callable[[int, dict[str, Any]], dict[str, Any] | None]] = {
            "info": self.info,
            "checkpresent": self.checkpresent,
            "lock": self.lock,
            "unlock": self.unlock,
            "put_begin": self.put_begin,
            "put_finish": self.put_finish,
            "get": self.get,
            "remove": self.remove,
            "timestamp": self.timestamp,
        }

    # -- the connection --------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._watchdog)
            self.outbox.write(self.conn.handshake())
            await self._read_loop()
            # What was answered before the end still goes out, if the proxy still reads.
            with trio.move_on_after(1):
                await self.outbox.drained()
            nursery.cancel_scope.cancel()

    async def _write_loop(self) -> None:
        try:
            await self.outbox.run()
        except PeerGone:
            self.gone = True
        except LinkBroken as exc:
            self.failure = str(exc)
        finally:
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()

    async def _watchdog(self) -> None:
        """End the link once nothing moved either way for the idle timeout, or a lock has
        been held that long (p2pstdio's bounds: a silent client, a LOCKCONTENT)."""
        while True:
            moved = max(self.last_input, self.outbox.last_progress)
            deadline = moved + self.idle
            oldest = min((since for _, since in self.locks.values()), default=None)
            if oldest is not None and oldest + self.idle < deadline:
                deadline = oldest + self.idle
            if trio.current_time() >= deadline:
                break
            await trio.sleep_until(deadline)
        if oldest is not None and oldest <= moved:
            self.failure = f"the proxy held a content lock past the idle timeout ({self.idle:.0f}s)"
        else:
            self.failure = f"nothing from or to the proxy for {self.idle:.0f}s"
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        while True:
            try:
                if self.outbox.pending >= READ_PAUSE:
                    await self.outbox.room(READ_PAUSE // 2)
                event = self.conn.next_event()
                if event is rpc.NEED_DATA:
                    data = await self.receive.receive_some(READ_SIZE)
                    self.last_input = trio.current_time()
                    self.conn.receive_data(data)
                    continue
            except rpc.RemoteProtocolError as exc:
                self.failure = f"protocol error: {exc}"
                return
            except _BROKEN:
                self.gone = True
                return
            assert not isinstance(event, rpc.NeedData)
            if isinstance(event, rpc.ConnectionClosed):
                if event.truncated:
                    self.failure = "connection closed inside a frame"
                return
            self._handle(event)

    def _handle(self, event: rpc.Event) -> None:
        match event:
            case rpc.Request(id=rid, method=method, params=params):
                self._request(rid, method, params)
            case rpc.InvalidRequest(id=rid, error=error):
                self.outbox.write(self.conn.respond(rid, error=error))
            case rpc.BodyChunk():
                self._body(event)
            case rpc.CreditGranted(stream_id=sid) | rpc.StreamCancelled(stream_id=sid):
                if isinstance(event, rpc.StreamCancelled):
                    self.cancelled.add(sid)
                if (wakeup := self.credit.get(sid)) is not None:
                    wakeup.set()
            case _:
                pass  # the handshake; notifications (none is defined from a proxy yet)

    def _request(self, rid: int, method: str, params: dict[str, Any]) -> None:
        try:
            result = self.methods[method](rid, params)
        except RpcError as exc:
            self.outbox.write(self.conn.respond(rid, error=exc))
            return
        except OSError as exc:
            warn(f"  {method}: {exc.strerror or exc}")
            error = StorageIOError(f"{method}: {exc.strerror or exc}")
            self.outbox.write(self.conn.respond(rid, error=error))
            return
        if result is not None:  # None: the method answered itself (get)
            self.outbox.write(self.conn.respond(rid, result))

    def close(self) -> None:
        """After the link, however it ended: release, keep what must be kept, commit."""
        for hold, _ in self.locks.values():
            hold.abandon()  # the retention file stays: a drop proof may rely on it
        for pending in self.uploads.values():
            pending.upload.keep()  # the partial stays for a resumed upload
        self.locks.clear()
        self.uploads.clear()
        self.service.commit()

    # -- methods ---------------------------------------------------------------------------

    def info(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        return {"uuid": self.uuid, "kind": "repo"}

    def timestamp(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        return {"ts": self.service.timestamp()}

    def checkpresent(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        return {"present": [self.service.has(Key.parse(k)) for k in params["keys"]]}

    def lock(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        key = Key.parse(params["key"])
        if len(self.locks) >= MAX_LOCKS:
            raise CallProtocolError(f"already {MAX_LOCKS} locks held on this link")
        try:
            hold = self.service.hold(key)
        except ContentLocked:
            raise LockedError("content is locked") from None
        except NotPresent:
            raise NotFoundError("content not present") from None
        lock_id, self.next_lock = self.next_lock, self.next_lock + 1
        self.locks[lock_id] = (hold, trio.current_time())
        return {"lock": lock_id}

    def unlock(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        held = self.locks.pop(params["lock"], None)
        if held is None:
            raise NotFoundError(f"no lock {params['lock']}")
        held[0].release()
        return {}

    def remove(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        try:
            outcome = self.service.remove(Key.parse(params["key"]), before=params["before"])
        except Refused as refused:
            raise _refusal(refused) from None
        if outcome == RemoveOutcome.LOCKED:
            warn("  content is locked")
            raise LockedError("content is locked")
        if outcome == RemoveOutcome.TOO_LATE:
            # There is no FAILURE without a reason in the RPC; to the proxy this is the same
            # "not removed now, maybe later" as a lock.
            raise LockedError("the removal deadline has passed")
        return {}

    def put_begin(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        key = Key.parse(params["key"])
        try:
            self.service.check_write(removal=False)
            if self.service.has(key):
                return {"offset": None}
            self._check_streams()  # an ALREADY-HAVE opens no stream; an upload does
            upload = self.service.begin_put(key, params["af"])
        except Refused as refused:
            raise _refusal(refused) from None
        except TransferInProgress:
            raise TransferInProgressError(
                "transfer already in progress, or unable to take transfer lock"
            ) from None
        if upload is None:
            return {"offset": None}
        self.uploads[rid] = _Upload(upload)
        return {"offset": upload.offset}

    def _body(self, chunk: rpc.BodyChunk) -> None:
        pending = self.uploads.get(chunk.stream_id)
        if pending is not None and not pending.ended and pending.error is None and chunk.data:
            try:
                pending.upload.write(chunk.data)
            except OSError as exc:
                # The store has already kept (ENOSPC) or dropped (EIO) the partial; ask the
                # proxy to stop sending, and tell it why at put_finish.
                if exc.errno == errno.EFBIG:
                    pending.error = VerifyFailedError("more data than the key's size")
                else:
                    warn(f"  cannot store content: {exc.strerror or exc}")
                    pending.error = StorageIOError(f"cannot store content: {exc.strerror or exc}")
                self.outbox.write(self.conn.cancel(chunk.stream_id))
        if pending is not None and chunk.end:
            pending.ended = True
        self.outbox.write(self.conn.consumed(chunk.stream_id, len(chunk.data)))

    def put_finish(self, rid: int, params: dict[str, Any]) -> dict[str, Any]:
        pending = self.uploads.pop(params["upload"], None)
        if pending is None:
            raise CallProtocolError(f"no upload {params['upload']} in progress")
        upload = pending.upload
        try:
            if not pending.ended:
                raise CallProtocolError("put_finish before the end of the upload's body")
            if pending.error is not None:
                raise pending.error
            if not upload.complete:
                raise StorageIOError(
                    f"upload ended at {upload.receive.size} of "
                    f"{self.service.expected_size(upload.key)} bytes; "
                    "the partial is kept for a resume"
                )
            valid = bool(params["valid"])
            if not upload.finish(valid=valid):
                if not valid and not upload.written:
                    raise VerifyFailedError("the sender reported the content as invalid")
                warn("  Verification of content failed")
                raise VerifyFailedError("verification of content failed")
        finally:
            upload.keep()  # a no-op after finish(); else the partial stays for a resume
        return {}

    def _check_streams(self) -> None:
        # Each stream holds open files and locks (and a download, a task): bounded per link.
        if len(self.uploads) + len(self.credit) >= MAX_STREAMS:
            raise CallProtocolError(f"already {MAX_STREAMS} streams open on this link")

    def get(self, rid: int, params: dict[str, Any]) -> None:
        key, offset = Key.parse(params["key"]), params["offset"]
        self._check_streams()
        try:
            download = self.service.open_get(key, offset, params["af"])
        except NotPresent:
            raise NotFoundError("content not present") from None
        self.outbox.write(self.conn.respond(rid, {"length": download.length}))
        self.credit[rid] = trio.Event()
        assert self.nursery is not None
        self.nursery.start_soon(self._send_body, rid, download)

    async def _send_body(self, sid: int, download: Download) -> None:
        """Stream a download under the proxy's credit; a short stream means a failed read."""
        sent, length, offset, fh = 0, download.length, download.offset, download.fh
        try:
            while sent < length and sid not in self.cancelled:
                credit = self.conn.available_credit(sid)
                if credit == 0:
                    wakeup = self.credit[sid] = trio.Event()
                    with trio.move_on_after(self.idle) as scope:
                        await wakeup.wait()
                    if scope.cancelled_caught:
                        warn(f"  no credit for a download for {self.idle:.0f}s")
                        break
                    continue
                if self.outbox.pending >= BODY_ROOM:
                    await self.outbox.room(BODY_ROOM)
                    continue  # a cancel or a smaller credit may have come meanwhile
                try:
                    n = min(credit, length - sent, SEND_PIECE)
                    data = os.pread(fh.fileno(), n, offset + sent)
                except OSError as exc:
                    warn(f"  cannot read content: {exc.strerror or exc}")
                    break
                if not data:
                    break  # the object shrank under us
                self.outbox.write(self.conn.send_body(sid, data))
                sent += len(data)
                del data  # not held while other streams run: they may be many
                await trio.lowlevel.checkpoint()  # other streams and calls get their turn
            self.outbox.write(self.conn.send_body(sid, b"", end=True))
        finally:
            download.close()
        self.credit.pop(sid, None)
        self.cancelled.discard(sid)


async def _serve(repo: Repo, client_uuid: str | None) -> int:
    send = trio.lowlevel.FdStream(os.dup(1))
    receive = trio.lowlevel.FdStream(os.dup(0))
    worker = NodeWorker(repo, client_uuid, send, receive)
    code = 0
    try:
        await worker.run()
    finally:
        try:
            worker.close()
        except Exception as exc:
            warn(f"git-annex-shell: noderpc: could not commit the git-annex branch: {exc}")
            code = 1
        for stream in (send, receive):
            with suppress(*_BROKEN):
                await stream.aclose()
    if worker.failure is not None:
        warn(f"git-annex-shell: noderpc: {worker.failure}")
    return 1 if worker.failure is not None or worker.gone else code


def serve(repo: Repo, client_uuid: str | None) -> int:
    try:
        return trio.run(_serve, repo, client_uuid)
    finally:
        restore_stdio()


def _refusal(refused: Refused) -> RpcError:
    return ReadOnlyError(str(refused)) if refused.readonly else AppendOnlyError(str(refused))
