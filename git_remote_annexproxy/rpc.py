"""The node RPC codec (msgpack), sans-IO: bytes in, events out; methods return bytes to send.

The proxy talks to its node workers (`git-annex-shell noderpc DIR`) with this instead of
P2P because P2P allows one request at a time per connection, while a gateway wants many
calls in flight per node, batched presence checks, and streamed bodies with back-pressure
so that one slow body never blocks other calls. The method table and the typed errors are
in `rpcmethods.py`.

Every frame is one msgpack array:

| type | frame                        | sent by            | meaning                             |
|------|------------------------------|--------------------|-------------------------------------|
| 5    | `[5, hello]`                 | both, first        | handshake map, see below            |
| 0    | `[0, id, method, params]`    | client             | request; ids go 1, 2, 3, ...        |
| 1    | `[1, id, error, result]`     | server             | the one answer to request `id`      |
| 2    | `[2, method, params]`        | either             | notification, never answered        |
| 3    | `[3, stream, data, end]`     | stream's sender    | body chunk, data bin <= MAX_CHUNK   |
| 4    | `[4, stream, n]`             | stream's receiver  | credit: n more body bytes allowed   |
| 6    | `[6, stream]`                | stream's receiver  | cancel: please end the stream soon  |

* hello = `{"proto": "annexproxy-noderpc", "versions": [int], "caps": [str], "window":
  int}`; unknown fields are ignored so later versions can add some. The version used is the
  highest both list; none in common is fatal. `window` is the credit its sender grants
  up front on each stream it receives. Nothing but HELLO may come before the peer's HELLO.
* Request ids strictly increase, so reuse is detected without remembering old ids.
  `error` is nil or `{"type": str, "message": str}`; `result` is nil exactly when `error`
  is not. A bad request gets a `bad-request` error and the connection carries on.
* Streams: a successful answer to a streaming method (see the method table) opens the
  stream whose id is the request id; for a download the answer comes before the body. The
  sender's credit starts at the receiver's `window`; each body byte uses one; credit frames
  add more. A chunk with `end` true closes the stream, also after a cancel, which only asks
  the sender to end early. Credit or cancel may cross an `end` on the wire, so for an id that
  could have had a stream they are ignored; a body chunk for a stream that is not open, or
  beyond the credit, is fatal.

Limits: strings, bins, arrays and frames are bounded by `rpcframing` (a frame over a limit
fails on its header), unanswered requests by MAX_PENDING, credit by MAX_CREDIT. Any
exception from `next_event` other than RemoteProtocolError is a bug.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeGuard

import msgpack

from .rpcframing import (
    MAX_CHUNK,
    NEED_DATA,
    FrameReader,
    LocalProtocolError,
    NeedData,
    ProtocolError,
    RemoteProtocolError,
    check_outgoing,
)
from .rpcmethods import (
    ERROR_TYPES,
    MAX_ID,
    MAX_MESSAGE,
    METHODS,
    BadRequestError,
    CallProtocolError,
    RpcError,
    error_from_wire,
    validate_notification,
    validate_params,
    validate_result,
)

__all__ = [
    "DEFAULT_WINDOW", "MAX_CHUNK", "MAX_CREDIT", "MAX_PENDING", "NEED_DATA", "PROTO",
    "VERSIONS", "BodyChunk", "ConnectionClosed", "CreditGranted", "Event", "Frame",
    "Handshake", "InvalidRequest", "LocalProtocolError", "NeedData", "Notification",
    "ProtocolError", "RemoteProtocolError", "Request", "Response", "Role", "RpcConnection",
    "StreamCancelled",
]  # fmt: skip

PROTO: Final = "annexproxy-noderpc"
VERSIONS: Final = (1,)
DEFAULT_WINDOW: Final = 4 << 20
# Outstanding credit per stream, also the largest window: 4 x the proxy's window, and small
# enough that a peer cannot invite a gigabyte per stream (the node worker bounds what it
# queues regardless, see shell/noderpc.py).
MAX_CREDIT: Final = 16 << 20
MAX_PENDING: Final = 1024  # unanswered requests per connection
_MAX_LIST: Final = 64  # versions and caps in a hello


class Frame(enum.IntEnum):
    REQUEST = 0
    RESPONSE = 1
    NOTIFY = 2
    BODY = 3
    CREDIT = 4
    HELLO = 5
    CANCEL = 6


_ARITY: Final = {Frame.REQUEST: 3, Frame.RESPONSE: 3, Frame.NOTIFY: 2, Frame.BODY: 3,
                 Frame.CREDIT: 2, Frame.HELLO: 1, Frame.CANCEL: 1}  # fmt: skip
_RECEIVER: Final = {Frame.REQUEST: "server", Frame.RESPONSE: "client"}


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    version: int
    caps: frozenset[str]
    window: int


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    method: str
    params: dict[str, Any]  # valid for the method (rpcmethods.METHODS)


@dataclass(frozen=True, slots=True)
class InvalidRequest:
    """A well-framed request for an unknown method or with bad params: answer `error`."""

    id: int
    method: str
    error: BadRequestError


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    error: RpcError | None
    result: dict[str, Any] | None  # valid for the method when error is None

    def unwrap(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BodyChunk:
    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class CreditGranted:
    stream_id: int
    n: int


@dataclass(frozen=True, slots=True)
class StreamCancelled:
    """The receiver wants no more: end the stream (send_body(..., end=True)) soon."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    truncated: bool  # the end came inside a frame


Event: TypeAlias = (
    Handshake | Request | InvalidRequest | Response | Notification | BodyChunk | CreditGranted
    | StreamCancelled | ConnectionClosed
)  # fmt: skip


# --- the connection --------------------------------------------------------------------------

Role: TypeAlias = Literal["client", "server"]


@dataclass(slots=True)
class _SendStream:
    credit: int


@dataclass(slots=True)
class _RecvStream:
    outstanding: int  # credit the sender still holds
    received: int = 0
    consumed: int = 0
    ungranted: int = 0  # consumed bytes not yet granted back


def _is_int(v: object) -> TypeGuard[int]:
    return type(v) is int  # exact: a msgpack bool must not pass as 0 or 1


def _is_id(v: object) -> TypeGuard[int]:
    return type(v) is int and 1 <= v <= MAX_ID


def _str_list(v: object) -> bool:
    return type(v) is list and len(v) <= _MAX_LIST and all(type(x) is str for x in v)


class RpcConnection:
    """One end of a node RPC connection: `role` "client" (the proxy) or "server" (the node).

    Receive: `receive_data(bytes)` (b"" = end of stream), then `next_event()` until NEED_DATA;
    call receive_data again only then, which keeps the input buffer bounded. After a
    RemoteProtocolError the connection stays broken. Send: `handshake()` first, then the
    methods below; each returns the bytes to write, in order, or raises LocalProtocolError.
    Some return b"" when there is nothing to send (never hand that to a receive_data).

    Streams: the receiving end gets BodyChunk events and calls `consumed(stream, n)` as it
    passes bytes on, writing out the credit frames that returns; the sending end sends at
    most `available_credit(stream)` and waits for CreditGranted when that is 0.
    """

    def __init__(
        self, role: Role, *, caps: Iterable[str] = (), window: int = DEFAULT_WINDOW
    ) -> None:
        self.caps: Final = tuple(caps)
        if role not in ("client", "server") or not 1 <= window <= MAX_CREDIT:
            raise ValueError("bad role or window")
        if not _str_list(list(self.caps)):
            raise ValueError(f"caps must be at most {_MAX_LIST} strings")
        self.role: Final = role
        self.window: Final = window
        self.version: int | None = None  # negotiated, once the peer's HELLO arrived
        self.peer_caps: frozenset[str] = frozenset()
        self.peer_window = 0
        self._hello_sent = False
        self._calls: dict[int, str | None] = {}  # unanswered ids -> method (None: invalid)
        self._last_id = 0  # highest request id sent (client) or received (server)
        self._send: dict[int, _SendStream] = {}
        self._recv: dict[int, _RecvStream] = {}
        self._packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")
        self._reader = FrameReader()
        self._broken: RemoteProtocolError | None = None

    # --- receiving ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._reader.receive_data(data)

    def next_event(self) -> Event | NeedData:
        if self._broken is not None:
            raise RemoteProtocolError(f"connection already failed: {self._broken}")
        try:
            while True:
                frame = self._reader.next_frame()
                if frame is NEED_DATA:
                    if self._reader.eof:
                        return ConnectionClosed(self._reader.mid_frame)
                    return NEED_DATA
                event = self._handle(frame)
                if event is not None:
                    return event
        except RemoteProtocolError as e:
            self._broken = e
            raise

    def _handle(self, frame: object) -> Event | None:
        if type(frame) is not list or not frame or not _is_int(frame[0]):
            raise RemoteProtocolError("a frame must be an array that starts with its type")
        try:
            kind = Frame(frame[0])
        except ValueError:
            raise RemoteProtocolError(f"unknown frame type {frame[0]}") from None
        args = frame[1:]
        if len(args) != _ARITY[kind]:
            raise RemoteProtocolError(f"{kind.name} frame with {len(args)} fields")
        if self.version is None and kind != Frame.HELLO:
            raise RemoteProtocolError(f"{kind.name} frame before the handshake")
        if _RECEIVER.get(kind, self.role) != self.role:
            raise RemoteProtocolError(f"a {self.role} cannot receive a {kind.name} frame")
        match kind:
            case Frame.HELLO:
                return self._on_hello(args[0])
            case Frame.REQUEST:
                return self._on_request(*args)
            case Frame.RESPONSE:
                return self._on_response(*args)
            case Frame.NOTIFY:
                return self._on_notify(*args)
            case Frame.BODY:
                return self._on_body(*args)
            case Frame.CREDIT | Frame.CANCEL:
                return self._on_credit_or_cancel(kind, args)

    def _on_hello(self, hello: object) -> Event:
        if self.version is not None:
            raise RemoteProtocolError("second HELLO")
        if type(hello) is not dict or hello.get("proto") != PROTO:
            raise RemoteProtocolError(f"the peer does not speak {PROTO}")
        versions, caps, window = hello.get("versions"), hello.get("caps"), hello.get("window")
        if not (
            type(versions) is list
            and 0 < len(versions) <= _MAX_LIST
            and all(map(_is_int, versions))
            and _str_list(caps)
            and type(window) is int
            and window >= 1
        ):
            raise RemoteProtocolError("malformed HELLO")
        if window > MAX_CREDIT:
            raise RemoteProtocolError(f"HELLO window {window} over the limit {MAX_CREDIT}")
        common = set(VERSIONS).intersection(versions)
        if not common:
            raise RemoteProtocolError(f"no common version: ours {VERSIONS}, theirs {versions}")
        assert isinstance(caps, list)
        self.version, self.peer_caps, self.peer_window = max(common), frozenset(caps), window
        return Handshake(self.version, self.peer_caps, window)

    def _on_request(self, rid: object, method: object, params: object) -> Event:
        if not _is_id(rid) or type(method) is not str:
            raise RemoteProtocolError("malformed REQUEST")
        if rid <= self._last_id:
            raise RemoteProtocolError(f"request id {rid} reused or out of order")
        if len(self._calls) >= MAX_PENDING:
            raise RemoteProtocolError(f"more than {MAX_PENDING} unanswered requests")
        self._last_id = rid
        try:
            validate_params(method, params)
        except BadRequestError as e:
            self._calls[rid] = None
            return InvalidRequest(rid, method, e)
        assert type(params) is dict
        self._calls[rid] = method
        return Request(rid, method, params)

    def _on_response(self, rid: object, error: object, result: object) -> Event:
        if not _is_id(rid) or rid not in self._calls:
            raise RemoteProtocolError(f"response to unknown request id {rid!r}")
        method = self._calls.pop(rid)
        assert method is not None  # a client stores only valid requests
        if error is not None:
            if not (
                type(error) is dict
                and error.keys() == {"type", "message"}
                and type(error["type"]) is str
                and type(error["message"]) is str
                and result is None
            ):
                raise RemoteProtocolError(f"malformed error in the response to {rid}")
            return Response(rid, error_from_wire(error["type"], error["message"]), None)
        try:
            validate_result(method, result)
        except CallProtocolError as e:
            # Framing is intact, so only this call fails (security.md row 32).
            return Response(rid, e, None)
        assert type(result) is dict
        self._open_stream(rid, method, result)
        return Response(rid, None, result)

    def _on_notify(self, method: object, params: object) -> Event:
        if type(method) is not str:
            raise RemoteProtocolError("malformed NOTIFY")
        problem = validate_notification(method, params)
        if problem is not None:
            raise RemoteProtocolError(problem)
        assert type(params) is dict
        return Notification(method, params)

    def _on_body(self, sid: object, data: object, end: object) -> Event:
        if not _is_int(sid) or type(data) is not bytes or type(end) is not bool:
            raise RemoteProtocolError("malformed BODY")
        stream = self._recv.get(sid)
        if stream is None:
            raise RemoteProtocolError(f"body for stream {sid} which is not open")
        if len(data) > stream.outstanding:
            raise RemoteProtocolError(f"body on stream {sid} beyond its credit")
        stream.outstanding -= len(data)
        stream.received += len(data)
        if end:
            del self._recv[sid]
        return BodyChunk(sid, data, end)

    def _on_credit_or_cancel(self, kind: Frame, args: list[object]) -> Event | None:
        sid, n = args[0], args[1] if kind == Frame.CREDIT else 1
        if not _is_id(sid) or not _is_int(n) or not 1 <= n <= MAX_CREDIT:
            raise RemoteProtocolError(f"malformed {kind.name}")
        stream = self._send.get(sid)
        if stream is None:
            if sid <= self._last_id:
                return None  # it crossed our end of that stream, or the id had no stream
            raise RemoteProtocolError(f"{kind.name} for stream {sid} which never existed")
        if kind == Frame.CANCEL:
            return StreamCancelled(sid)
        if stream.credit + n > MAX_CREDIT:
            raise RemoteProtocolError(f"credit on stream {sid} beyond {MAX_CREDIT}")
        stream.credit += n
        return CreditGranted(sid, n)

    def _open_stream(self, rid: int, method: str, result: dict[str, Any]) -> None:
        spec = METHODS[method]
        if spec.stream is None or not spec.opens(result):
            return
        if (spec.stream == "upload") == (self.role == "client"):
            self._send[rid] = _SendStream(self.peer_window)
        else:
            self._recv[rid] = _RecvStream(self.window)

    # --- sending -----------------------------------------------------------------------------

    def handshake(self) -> bytes:
        if self._hello_sent:
            raise LocalProtocolError("handshake already sent")
        self._hello_sent = True
        hello = {"proto": PROTO, "versions": list(VERSIONS), "caps": list(self.caps),
                 "window": self.window}  # fmt: skip
        return self._frame([Frame.HELLO, hello])

    def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Returns the new request's id and its bytes."""
        self._ready("client")
        params = {} if params is None else params
        try:
            validate_params(method, params)
        except BadRequestError as e:
            raise LocalProtocolError(e.message) from None
        if len(self._calls) >= MAX_PENDING:
            raise LocalProtocolError(f"already {MAX_PENDING} unanswered requests")
        rid = self._last_id + 1
        data = self._frame([Frame.REQUEST, rid, method, params])
        self._last_id = rid
        self._calls[rid] = method
        return rid, data

    def respond(
        self, rid: int, result: dict[str, Any] | None = None, error: RpcError | None = None
    ) -> bytes:
        """Answer request `rid` with `result` ({} if None) or, if given, `error`."""
        self._ready("server")
        if rid not in self._calls:
            raise LocalProtocolError(f"no unanswered request {rid}")
        method = self._calls[rid]
        if error is not None:
            if result is not None or error.error_type not in ERROR_TYPES:
                raise LocalProtocolError(f"cannot send {error!r} with result {result!r}")
            wire = {"type": error.error_type, "message": error.message[:MAX_MESSAGE]}
            data = self._frame([Frame.RESPONSE, rid, wire, None])
        else:
            result = {} if result is None else result
            if method is None:
                raise LocalProtocolError(f"request {rid} was invalid: answer it with its error")
            try:
                validate_result(method, result)
            except CallProtocolError as e:
                raise LocalProtocolError(e.message) from None
            data = self._frame([Frame.RESPONSE, rid, None, result])
            self._open_stream(rid, method, result)
        del self._calls[rid]
        return data

    def notify(self, method: str, params: dict[str, Any]) -> bytes:
        self._ready(None)
        problem = validate_notification(method, params)
        if problem is not None:
            raise LocalProtocolError(problem)
        return self._frame([Frame.NOTIFY, method, params])

    def send_body(
        self, stream_id: int, data: bytes | bytearray | memoryview, end: bool = False
    ) -> bytes:
        """Body bytes on an open stream we send, as frames of at most MAX_CHUNK."""
        stream = self._send.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        with memoryview(data) as raw, raw.cast("B") as view:
            n = len(view)
            if n > stream.credit:
                raise LocalProtocolError(f"{n} bytes on stream {stream_id}, credit {stream.credit}")
            stream.credit -= n
            out = [
                self._packer.pack([Frame.BODY, stream_id, view[i : i + MAX_CHUNK], end and last])
                for i in range(0, max(n, 1), MAX_CHUNK)
                for last in [i + MAX_CHUNK >= n]
            ]
        if end:
            del self._send[stream_id]
        return b"".join(out)

    def available_credit(self, stream_id: int) -> int:
        stream = self._send.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        return stream.credit

    def grant(self, stream_id: int, n: int) -> bytes:
        """Allow the sender `n` more bytes on a stream we receive."""
        stream = self._recv.get(stream_id)
        if stream is None or not 1 <= n <= MAX_CREDIT - stream.outstanding:
            raise LocalProtocolError(f"cannot grant {n} on stream {stream_id}")
        stream.outstanding += n
        return self._frame([Frame.CREDIT, stream_id, n])

    def consumed(self, stream_id: int, n: int) -> bytes:
        """Say that `n` received bytes were dealt with; returns a credit frame or b"".

        Credit goes back in batches of half a window, so the sender keeps going while the
        receiver never holds more than a window of unconsumed bytes."""
        stream = self._recv.get(stream_id)
        if stream is None:
            if 1 <= stream_id <= self._last_id:
                return b""  # the stream has ended: nothing more to allow
            raise LocalProtocolError(f"stream {stream_id} never existed")
        if n < 0 or stream.consumed + n > stream.received:
            raise LocalProtocolError(f"consumed {n} more than received on stream {stream_id}")
        stream.consumed += n
        stream.ungranted += n
        if stream.ungranted < max(1, self.window // 2):
            return b""
        n, stream.ungranted = stream.ungranted, 0
        return self.grant(stream_id, n)

    def cancel(self, stream_id: int) -> bytes:
        """Ask the sender of a stream we receive to end it; its chunks still arrive until then."""
        if stream_id not in self._recv:
            if 1 <= stream_id <= self._last_id:
                return b""  # already ended
            raise LocalProtocolError(f"stream {stream_id} never existed")
        return self._frame([Frame.CANCEL, stream_id])

    def _ready(self, role: Role | None) -> None:
        if not self._hello_sent or self.version is None:
            raise LocalProtocolError("the handshake is not complete")
        if role is not None and role != self.role:
            raise LocalProtocolError(f"only a {role} can do that")

    def _frame(self, frame: list[Any]) -> bytes:
        try:
            data = self._packer.pack(frame)
        except (TypeError, ValueError, OverflowError) as e:
            raise LocalProtocolError(f"cannot encode a {Frame(frame[0]).name} frame: {e}") from e
        # The peer would refuse what our reader refuses: find out here, not by a dead link.
        problem = check_outgoing(data)
        if problem is not None:
            raise LocalProtocolError(f"{Frame(frame[0]).name} frame over a limit: {problem}")
        return data
