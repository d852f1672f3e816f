"""A P2P client session: `git-annex-shell p2pstdio` on a server, spoken to over a pipe.

`P2PSession.spawn` starts the command (ssh, or a local git-annex-shell; see
`urls.shell_argv`), checks the server's `AUTH-SUCCESS <uuid>` against the repository we
asked for, and negotiates `VERSION` (p2p-protocol.md §5). Requests then run one at a time,
as the protocol demands: `checkpresent`; `get`, which hands back a `Download` whose
pieces the caller consumes before giving its verdict (§7); and `put`, which hands back an
`Upload` that either says the server already has the key or streams the content from the
offset the server asked for (`PUT-FROM`, so a cut upload resumes) and returns its verdict.

Every wait is bounded: spawning and the greeting by `connect_timeout`, each read or write
after that by `idle_timeout` (the P2PChannel's), closing by a few seconds. The server's
stderr is drained continuously into a small ring buffer (a full pipe would stall it), and
its last line is what a failure reports, since that is where git-annex-shell and ssh say
why (`not configured to proxy for repository ...`, `Connection refused`).

A session that fails in the middle of an exchange, or whose caller is cancelled there, is
dead: a late reply would otherwise answer the next request. `P2PRefused` is the one error
that leaves it usable (the server answered `ERROR` to a request).
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2prequests import MAX_VERSION, P2PRequester

SEND_PIECE = 1 << 20  # bytes read from a file and written to the server at a time
STDERR_TAIL = 4096  # bytes of the server's stderr kept for error messages
_STDERR_GRACE = 2.0  # seconds to wait for the last words on stderr after a failure


class P2PSessionError(Exception):
    """The session failed: could not start, died, timed out, or broke the protocol."""


class P2PRefused(P2PSessionError):
    """The server answered `ERROR text` to a request; the session is still usable."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.text = text


class _StderrTail:
    """The last STDERR_TAIL bytes a child wrote to stderr; `done` is set at its EOF."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done = trio.Event()

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            while chunk := await stream.receive_some(65536):
                self.data += chunk
                del self.data[:-STDERR_TAIL]
        except (trio.ClosedResourceError, trio.BrokenResourceError, OSError):
            pass
        finally:
            self.done.set()

    def last_line(self) -> str:
        lines = bytes(self.data).decode("utf-8", "replace").splitlines()
        useful = [ln.strip() for ln in lines if ln.strip()]
        return useful[-1] if useful else ""


class P2PSession(P2PRequester):
    """One client session. Build it with `spawn` (a command) or `attach` (given streams).
    The request plumbing, greeting and dead-marking rules are `P2PRequester`'s."""

    protocol_error = "protocol error: "
    uuid_mismatch = "expected repository UUID {expected} but found {found}"

    def __init__(self, name: str, *, idle_timeout: float) -> None:
        # `name` is for messages: the repository as the user calls it.
        super().__init__(name, idle_timeout=idle_timeout)
        self.uuid = ""  # from AUTH-SUCCESS
        # The GET whose verdict, or the PUT whose content, is still due: until then no
        # other request may be sent.
        self.busy: Download | Upload | None = None
        self._process: trio.Process | None = None
        self._stderr: _StderrTail | None = None

    # -- opening -------------------------------------------------------------------------

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        nursery: trio.Nursery,
        *,
        name: str,
        expected_uuid: str | None,
        env: Mapping[str, str] | None = None,
        connect_timeout: float = 60.0,
        idle_timeout: float = 300.0,
    ) -> P2PSession:
        """Start `argv` and negotiate. `nursery` runs the stderr drain; it must outlive
        the session (close the session before the nursery ends)."""
        self = cls(name, idle_timeout=idle_timeout)
        try:
            self._process = await trio.lowlevel.open_process(
                list(argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(env) if env is not None else None,
            )
        except OSError as exc:
            self.dead = True
            raise P2PSessionError(f"{name}: cannot run {argv[0]}: {exc.strerror}") from None
        proc = self._process
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._stderr = _StderrTail()
        nursery.start_soon(self._stderr.drain, proc.stderr)
        try:
            with trio.fail_after(connect_timeout):
                await self.attach(proc.stdout, proc.stdin, expected_uuid)
        except trio.TooSlowError:
            await self.aclose()
            raise P2PSessionError(f"{name}: no answer within {connect_timeout:.0f}s") from None
        except BaseException:
            with trio.CancelScope(shield=True):  # aclose is bounded
                await self.aclose()
            raise
        return self

    async def attach(
        self,
        receive: trio.abc.ReceiveStream,
        send: trio.abc.SendStream,
        expected_uuid: str | None,
        version: int = MAX_VERSION,
    ) -> None:
        """Greet a server on connected streams: AUTH-SUCCESS (its UUID must be
        `expected_uuid` when one is given, as git-annex insists), then VERSION."""
        self.uuid = await self._greet(receive, send, expected_uuid, version)

    # -- plumbing ------------------------------------------------------------------------

    def _error(self, what: str) -> P2PSessionError:
        return P2PSessionError(f"{self.name}: {what}")

    def _refusal(self, text: str) -> P2PRefused:
        return P2PRefused(self.name, text)

    async def _failure(self, what: str) -> Exception:
        """Mark the session dead; the error names the server's last stderr line if any."""
        self.dead = True
        tail = self._stderr
        if tail is not None:
            # The child usually writes why it quit just before closing stdout.
            with trio.move_on_after(_STDERR_GRACE):
                await tail.done.wait()
            said = tail.last_line()
            if said:
                return self._error(said)
        return self._error(what)

    def _idle(self) -> None:
        """Check that a new request may start; one abandoned mid-GET kills the session."""
        if self.busy is not None:
            self.dead = True
            raise P2PSessionError(f"{self.name}: previous transfer was abandoned")

    # -- requests ------------------------------------------------------------------------

    async def checkpresent(self, key: Key) -> bool:
        self._idle()
        return await self._succeeds(p2p.CheckPresent(key))

    async def get(self, key: Key, offset: int = 0, af: str | None = None) -> Download:
        """Ask for `key`'s content from `offset`. Consume the `Download` fully, then
        call `Download.verdict()`; only then is the session free for the next request."""
        self._idle()
        self.busy = Download(self, offset, await self._get(offset, af, key))
        return self.busy

    async def put(self, key: Key, af: str | None = None) -> Upload:
        """Offer `key` (PUT). If `Upload.already`, the server has it and the session is
        free; otherwise call `Upload.send` with the content from `Upload.offset` on (the
        server kept that much of an earlier, interrupted upload). `ERROR` (a read-only
        server, say) raises P2PRefused and leaves the session usable."""
        self._idle()
        offset, plus = await self._put(af, key)
        if offset is None:
            return Upload(self, offset=0, already=True, plus=plus)
        upload = Upload(self, offset=offset, already=False)
        self.busy = upload
        return upload

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """End the session: EOF to the server (it exits 0), then reap it, bounded."""
        proc = self._process
        await self._close(proc)
        if proc is None:
            return
        # A grandchild (an ssh master, say) may keep stderr open: stop draining it.
        if self._stderr is not None and not self._stderr.done.is_set():
            with trio.move_on_after(0.5):
                await self._stderr.done.wait()
            if proc.stderr is not None:
                with trio.move_on_after(1):
                    await proc.stderr.aclose()

    # -- annexproxy's extensions (objectclient.py; HACKING.md "P2P extensions") -----------

    async def extensions(self, wanted: Sequence[str]) -> frozenset[str]:
        """Offer `wanted` (EXTENSIONS); the ones the server agreed to. A server that does
        not know the word is a fallback, not an error: git-annex-shell answers ERROR and
        the session goes on; a git-annex proxy closes the connection, so the session is
        dead (`self.dead`) and the caller opens another one, never offering again."""
        self._idle()
        await self._send(p2p.Extensions(tuple(wanted)))
        try:
            reply = await self._reply(p2p.Extensions)
        except P2PRefused:
            return frozenset()
        except P2PSessionError:
            if self.dead:
                return frozenset()
            raise
        assert isinstance(reply, p2p.Extensions)
        return frozenset(reply.words) & frozenset(wanted)

    async def checkobject(self, name: str) -> bool:
        self._idle()
        return await self._succeeds(p2p.CheckObject(name))

    async def putobject(self, name: str, size: int, pieces: AsyncIterator[bytes]) -> str:
        """Store one finished object: "already" (the server has it), "stored" or "failed".
        `pieces` must give exactly `size` bytes, or the session ends."""
        self._idle()
        await self._send(p2p.PutObject(name, size))
        reply = await self._reply(p2p.AlreadyHave, p2p.PutFrom)
        if isinstance(reply, p2p.AlreadyHave):
            return "already"
        assert isinstance(reply, p2p.PutFrom)
        if reply.offset != 0:
            raise await self._failure("protocol error: PUTOBJECT cannot resume")
        try:
            await self._send(p2p.Data(size))
            sent = 0
            async for piece in pieces:
                sent += len(piece)
                if sent > size:
                    break
                await self._send_raw(piece)
            if sent != size:
                raise P2PSessionError(f"{self.name}: object changed size while it was sent")
        except BaseException:
            self.dead = True  # cut inside the payload: the framing is lost
            raise
        if self.version >= 1:
            await self._send(p2p.Valid())
        ok = await self._reply(p2p.Success, p2p.Failure)
        return "stored" if isinstance(ok, p2p.Success) else "failed"

    async def getobject(self, name: str) -> AsyncGenerator[bytes, None]:
        """The bytes of one stored object; P2PRefused when the server has no such object,
        P2PSessionError when it could not send it whole (INVALID)."""
        self._idle()
        await self._send(p2p.GetObject(name))
        reply = await self._reply(p2p.Data, p2p.Failure)
        if isinstance(reply, p2p.Failure):
            raise P2PRefused(self.name, f"object {name} is not in the remote")
        try:
            while (piece := await self._piece()) is not None:
                yield piece
            valid = await self._validity() is not False
        except BaseException:
            self.dead = True  # abandoned or cut mid-exchange: a late reply would confuse
            raise
        if not valid:
            raise P2PRefused(self.name, f"object {name} could not be read whole")

    async def record(self, key: Key, chunk_size: int, names: Sequence[str]) -> bool:
        """Ask the server to check the objects `names` of `key` and log its location."""
        self._idle()
        payload = "".join(n + "\n" for n in names).encode("utf-8", "surrogateescape")
        await self._send(p2p.Record(chunk_size, len(names), key), p2p.Data(len(payload)))
        await self._send_raw(payload)
        return isinstance(await self._reply(p2p.Success, p2p.Failure), p2p.Success)

    async def putindirect(self, name: str, size: int, sha256: str) -> p2p.Message:
        """INDIRECT (where to PUT the object), ALREADY-HAVE or FAILURE."""
        self._idle()
        await self._send(p2p.PutIndirect(name, size, sha256))
        reply = await self._reply(p2p.Indirect, p2p.AlreadyHave, p2p.Failure)
        assert isinstance(reply, p2p.Indirect | p2p.AlreadyHave | p2p.Failure)
        return reply

    async def indirectdone(self, name: str) -> bool:
        self._idle()
        return await self._succeeds(p2p.IndirectDone(name))


class Download:
    """The server's answer to one GET: `length` bytes, then its validity, then our verdict.

    Iterate it (`async for piece in download`) to the end, then call `verdict`. `valid` is
    set when the iteration ends: True (VALID), False (INVALID: the server had nothing to
    send, or the file changed while it was read) or None (protocol v0). `DATA 0` + INVALID
    is how a server says it does not have the content. Until `verdict` the session is
    busy; abandoned earlier, it is mid-exchange and can only be closed.
    """

    def __init__(self, session: P2PSession, offset: int, length: int) -> None:
        self.session = session
        self.offset = offset
        self.length = length
        self.received = 0
        self.valid: bool | None = None
        self._consumed = False

    def __aiter__(self) -> Download:
        return self

    async def __anext__(self) -> bytes:
        s = self.session
        if self._consumed:
            raise StopAsyncIteration
        piece = await s._piece()
        if piece is not None:
            self.received += len(piece)
            return piece
        self.valid = await s._validity()
        self._consumed = True
        raise StopAsyncIteration

    async def verdict(self, ok: bool) -> None:
        """Tell the server whether we kept the content (SUCCESS/FAILURE)."""
        if not self._consumed:
            raise P2PSessionError(f"{self.session.name}: verdict before the data was read")
        await self.session._send(p2p.Success() if ok else p2p.Failure())
        self.session.busy = None


@dataclass(frozen=True)
class Stored:
    """The server's verdict on an upload: `ok` (SUCCESS...) and the UUIDs a SUCCESS-PLUS
    or FAILURE-PLUS listed (a cluster gateway names the nodes that stored it)."""

    ok: bool
    plus: tuple[str, ...] = ()


class Upload:
    """The server's answer to one PUT: `already` (ALREADY-HAVE, with ALREADY-HAVE-PLUS's
    UUIDs in `plus`), or `PUT-FROM offset`, after which `send` must be called: until it
    returns the session is busy, and one abandoned mid-send can only be closed."""

    def __init__(
        self, session: P2PSession, *, offset: int, already: bool, plus: tuple[str, ...] = ()
    ) -> None:
        self.session = session
        self.offset = offset
        self.already = already
        self.plus = plus
        self.sent = 0

    async def send(
        self,
        source: BinaryIO,
        length: int,
        *,
        unchanged: Callable[[], bool] = lambda: True,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> Stored:
        """Send `length` bytes read from `source` (positioned at `offset` by the caller),
        in SEND_PIECE pieces so memory stays bounded; then VALID, or INVALID when
        `unchanged()` says the file changed while it was read; then read the verdict.

        A source that ends early cannot be covered up (the DATA header promised `length`
        bytes), so the session is ended (P2PSessionError) and the server keeps a partial.
        """
        s = self.session
        if self.already or s.busy is not self:
            raise P2PSessionError(f"{s.name}: nothing to send for this PUT")
        await s._send(p2p.Data(length))
        left = length
        while left > 0:
            piece = await trio.to_thread.run_sync(source.read, min(SEND_PIECE, left))
            if not piece:
                s.dead = True
                await s.aclose()
                raise P2PSessionError(f"{s.name}: the file shrank while it was sent")
            await s._send_raw(piece)
            left -= len(piece)
            self.sent += len(piece)
            on_bytes(len(piece))
        if s.version >= 1:
            await s._send(p2p.Valid() if unchanged() else p2p.Invalid())
        try:
            ok, plus = await s._verdict()
        except P2PRefused:
            s.busy = None  # ERROR ends the exchange; the session goes on
            raise
        s.busy = None
        return Stored(ok, plus)
