"""The requesting side of one P2P connection, shared by the proxy and the client.

`P2PRequester` is what the proxy's link to a node (`shell/nodelink.P2PLink`) and the
client's session (`p2pclient.P2PSession`) have in common: the channel, the dead flag, the
greeting (`AUTH-SUCCESS` with the UUID we expect, then `VERSION`, p2p-protocol.md §5), and
requests and their replies. Each subclass says how a failure and a refusal become its own
exception types (`_error`, `_refusal`, and `_failure` for anything that needs a wait, such
as the client reading the server's last words on stderr), and how it words a broken
protocol and a wrong UUID.

The rules the subclasses share: an exchange that fails, or whose caller is cancelled in the
middle, leaves the connection dead, since a late reply would answer the next request.
`ERROR` to a request is a refusal and leaves it usable; any other reply we did not ask for
is a failure. Every wait is bounded by the channel's idle timeout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import TypeVar

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import ChannelTimeout, P2PChannel

MAX_VERSION = p2p.MAX_VERSION
CLOSE_GRACE = 5.0  # seconds a healthy peer gets to exit after we close its stdin

_T = TypeVar("_T")
# What a broken connection raises from the channel (the message may be empty).
_BROKEN = (
    p2p.RemoteProtocolError,
    ChannelTimeout,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


class P2PRequester(ABC):
    """One P2P connection on which we send the requests. `name` is for messages."""

    # How a subclass words a broken protocol (before "unexpected X" and "bad DATA
    # framing") and a greeting from the wrong repository.
    protocol_error = ""
    uuid_mismatch = "expected UUID {expected}, found {found}"

    def __init__(self, name: str, *, idle_timeout: float) -> None:
        self.name = name
        self.idle_timeout = idle_timeout
        self.version = 0
        self.dead = False
        self.channel: P2PChannel | None = None

    # -- what a subclass decides -----------------------------------------------------------

    @abstractmethod
    def _error(self, what: str) -> Exception:
        """The subclass's failure for `what` (its message names `self.name`)."""

    @abstractmethod
    def _refusal(self, text: str) -> Exception:
        """The subclass's refusal: the peer answered `ERROR text`."""

    async def _failure(self, what: str) -> Exception:
        """Mark the connection dead; the error to raise."""
        self.dead = True
        return self._error(what)

    # -- plumbing --------------------------------------------------------------------------

    def _chan(self) -> P2PChannel:
        if self.dead or self.channel is None:
            raise self._error("connection lost")
        return self.channel

    async def _guard(self, io: Awaitable[_T]) -> _T:
        """Await one read or write on the channel, turning a broken connection into the
        subclass's failure."""
        try:
            return await io
        except _BROKEN as exc:
            raise await self._failure(str(exc) or "connection lost") from None
        except trio.Cancelled:
            # Cut short by the caller's deadline: the stream is mid-exchange now (a late
            # reply would answer the next request), so the connection cannot be used again.
            self.dead = True
            raise

    async def _send(self, *messages: p2p.Message) -> None:
        await self._guard(self._chan().send(*messages))

    async def _send_raw(self, data: bytes) -> None:
        await self._guard(self._chan().send_raw(data))

    async def _event(self) -> p2p.Event:
        event = await self._guard(self._chan().next_event())
        if isinstance(event, p2p.ConnectionClosed):
            raise await self._failure("connection closed")
        return event

    async def _reply(self, *types: type) -> p2p.Event:
        """The next message, which must be one of `types`; ERROR is a refusal."""
        event = await self._event()
        if isinstance(event, types):
            return event
        if isinstance(event, p2p.Error):
            raise self._refusal(event.text)
        raise await self._failure(f"{self.protocol_error}unexpected {type(event).__name__}")

    # -- the greeting ----------------------------------------------------------------------

    async def _greet(
        self,
        receive: trio.abc.ReceiveStream,
        send: trio.abc.SendStream,
        expected_uuid: str | None,
        version: int | None,
    ) -> str:
        """Open the channel on connected streams; check AUTH-SUCCESS (its UUID must be
        `expected_uuid` when one is given, as git-annex insists); then, unless `version`
        is None (a v0 client: no VERSION), ask for min(version, MAX_VERSION) and take the
        peer's answer. The peer's UUID."""
        self.channel = P2PChannel(receive, send, idle_timeout=self.idle_timeout)
        auth = await self._reply(p2p.AuthSuccess)
        assert isinstance(auth, p2p.AuthSuccess)
        if expected_uuid is not None and auth.uuid != expected_uuid:
            self.dead = True
            raise self._error(self.uuid_mismatch.format(expected=expected_uuid, found=auth.uuid))
        self.version = 0
        if version is not None:
            await self._send(p2p.Version(min(version, MAX_VERSION)))
            reply = await self._reply(p2p.Version)
            assert isinstance(reply, p2p.Version)
            self.version = reply.n
        return auth.uuid

    # -- requests and replies --------------------------------------------------------------

    async def _succeeds(self, *messages: p2p.Message) -> bool:
        """Send a request answered SUCCESS or FAILURE (CHECKPRESENT, LOCKCONTENT, ...)."""
        await self._send(*messages)
        return isinstance(await self._reply(p2p.Success, p2p.Failure), p2p.Success)

    async def _verdict(self) -> tuple[bool, tuple[str, ...]]:
        """SUCCESS or FAILURE, or their -PLUS forms: (success, the UUIDs they list)."""
        reply = await self._reply(p2p.Success, p2p.Failure, p2p.SuccessPlus, p2p.FailurePlus)
        if isinstance(reply, p2p.SuccessPlus | p2p.FailurePlus):
            return isinstance(reply, p2p.SuccessPlus), reply.uuids
        return isinstance(reply, p2p.Success), ()

    async def _put(self, af: str | None, key: Key) -> tuple[int | None, tuple[str, ...]]:
        """PUT: (the offset of PUT-FROM, or None when the peer already has the key; the
        UUIDs of ALREADY-HAVE-PLUS)."""
        await self._send(p2p.Put(af, key))
        reply = await self._reply(p2p.PutFrom, p2p.AlreadyHave, p2p.AlreadyHavePlus)
        if isinstance(reply, p2p.PutFrom):
            return reply.offset, ()
        return None, reply.uuids if isinstance(reply, p2p.AlreadyHavePlus) else ()

    async def _get(self, offset: int, af: str | None, key: Key) -> int:
        """GET: the length of the DATA that follows."""
        await self._send(p2p.Get(offset, af, key))
        reply = await self._reply(p2p.Data)
        assert isinstance(reply, p2p.Data)
        return reply.length

    async def _piece(self) -> bytes | None:
        """The next piece of the DATA being received; None at its end."""
        event = await self._event()
        if isinstance(event, p2p.Body):
            return event.data
        if isinstance(event, p2p.BodyEnd):
            return None
        raise await self._failure(f"{self.protocol_error}bad DATA framing")

    async def _validity(self) -> bool | None:
        """After DATA: VALID -> True, INVALID -> False; None below protocol version 1."""
        if self.version < 1:
            return None
        return isinstance(await self._reply(p2p.Valid, p2p.Invalid), p2p.Valid)

    # -- closing ---------------------------------------------------------------------------

    async def _close(self, process: trio.Process | None) -> None:
        """EOF to the peer, then reap its `process`, bounded. One that already failed
        (timed out, broke the protocol, died) gets no grace period to exit: waiting on it
        would add to the bounded time its failure may cost."""
        grace = 0.0 if self.dead else CLOSE_GRACE
        self.dead = True
        if self.channel is not None:
            with trio.move_on_after(1):
                await self.channel.aclose()
        if process is None:
            return
        with trio.move_on_after(grace) as scope:
            await process.wait()
        if scope.cancelled_caught:
            process.kill()
            with trio.move_on_after(2):
                await process.wait()
