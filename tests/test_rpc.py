"""The node RPC codec: frames, handshake, typed errors, validation, streams and credit, and
robustness against hostile bytes (security.md rows 31-32)."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Iterable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_remote_annexproxy.keys import MAX_KEY_LENGTH
from git_remote_annexproxy.rpc import (
    MAX_CHUNK,
    MAX_CREDIT,
    MAX_PENDING,
    NEED_DATA,
    PROTO,
    BodyChunk,
    ConnectionClosed,
    CreditGranted,
    Event,
    Handshake,
    InvalidRequest,
    LocalProtocolError,
    Notification,
    RemoteProtocolError,
    Request,
    Response,
    RpcConnection,
    StreamCancelled,
)
from git_remote_annexproxy.rpcframing import MAX_FRAME, MAX_ITEMS, MAX_STR
from git_remote_annexproxy.rpcmethods import (
    ERROR_TYPES,
    MAX_BATCH,
    MAX_MESSAGE,
    METHODS,
    BadRequestError,
    CallProtocolError,
    LockedError,
    NotFoundError,
    RpcError,
    validate_params,
)

K1 = "SHA256E-s3--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt"
K2 = "MD5E-s5--5d41402abc4b2a76b9719d911017c592.jpeg"
K3 = "WORM-s1-m1--a b\udcff"  # a space, and a non-UTF-8 byte via surrogateescape
LONG_KEY = "WORM--" + "x" * (MAX_KEY_LENGTH - 6)

# One valid call of every method: (method, params, result).
CALLS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("info", {}, {"uuid": "9f3e0c1a-0000-4000-8000-000000000001", "kind": "repo"}),
    ("checkpresent", {"keys": [K1, K2, K3]}, {"present": [True, False, True]}),
    ("lock", {"key": K1}, {"lock": 7}),
    ("unlock", {"lock": 7}, {}),
    ("put_begin", {"key": K2, "af": "dir/file name.jpeg"}, {"offset": None}),
    ("put_finish", {"upload": 3, "valid": False}, {}),
    ("get", {"key": K3, "offset": 400_000, "af": None}, {"length": 0}),
    ("remove", {"key": K1, "before": 6171}, {}),
    ("timestamp", {}, {"ts": 6171}),
]


def raw(*frame: Any) -> bytes:
    return msgpack.packb(list(frame), use_bin_type=True)


def hello(versions: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"proto": PROTO, "versions": [1] if versions is None else versions, "caps": [],
            "window": 1 << 20} | extra  # fmt: skip


HELLO = raw(5, hello())


def drain(conn: RpcConnection) -> list[Event]:
    out: list[Event] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def deliver(conn: RpcConnection, data: bytes) -> list[Event]:
    if data:  # b"" would mean end of stream
        conn.receive_data(data)
    return drain(conn)


def pair(
    *, client_window: int = 1 << 20, server_window: int = 1 << 20
) -> tuple[RpcConnection, RpcConnection]:
    c = RpcConnection("client", caps=["x-test"], window=client_window)
    s = RpcConnection("server", window=server_window)
    assert deliver(s, c.handshake()) == [Handshake(1, frozenset({"x-test"}), client_window)]
    assert deliver(c, s.handshake()) == [Handshake(1, frozenset(), server_window)]
    return c, s


def after_hello(role: str) -> RpcConnection:
    conn = RpcConnection("server" if role == "server" else "client")
    conn.handshake()
    assert deliver(conn, HELLO) == [Handshake(1, frozenset(), 1 << 20)]
    return conn


def call(
    c: RpcConnection, s: RpcConnection, method: str, params: dict[str, Any], result: Any
) -> Response:
    rid, data = c.request(method, params)
    assert deliver(s, data) == [Request(rid, method, params)]
    [resp] = deliver(c, s.respond(rid, result))
    assert isinstance(resp, Response)
    return resp


def download(c: RpcConnection, s: RpcConnection, length: int) -> int:
    rid, data = c.request("get", {"key": K1, "offset": 0, "af": None})
    deliver(s, data)
    assert deliver(c, s.respond(rid, {"length": length})) == [
        Response(rid, None, {"length": length})
    ]
    return rid


# --- round trips -----------------------------------------------------------------------------


def test_the_call_table_covers_every_method() -> None:
    assert {m for m, _, _ in CALLS} == set(METHODS)


@pytest.mark.parametrize(("method", "params", "result"), CALLS)
def test_every_method_round_trips(method: str, params: dict[str, Any], result: Any) -> None:
    c, s = pair()
    assert call(c, s, method, params, result) == Response(1, None, result)


def test_request_ids_count_up_and_answers_may_come_in_any_order() -> None:
    c, s = pair()
    ids = [c.request("timestamp")[1] for _ in range(3)]
    events = deliver(s, b"".join(ids))
    assert [ev.id for ev in events if isinstance(ev, Request)] == [1, 2, 3]
    out = s.respond(3, {"ts": 3}) + s.respond(1, {"ts": 1}) + s.respond(2, {"ts": 2})
    assert [ev.unwrap()["ts"] for ev in deliver(c, out) if isinstance(ev, Response)] == [3, 1, 2]


@pytest.mark.parametrize("error_type", sorted(ERROR_TYPES))
def test_typed_errors_arrive_as_their_class(error_type: str) -> None:
    c, s = pair()
    rid, data = c.request("lock", {"key": K1})
    deliver(s, data)
    cls = ERROR_TYPES[error_type]
    [resp] = deliver(c, s.respond(rid, error=cls("why")))
    assert isinstance(resp, Response) and type(resp.error) is cls
    assert resp.error == cls("why") and resp.error.error_type == error_type
    with pytest.raises(cls, match="why"):
        resp.unwrap()


def test_an_unknown_error_type_arrives_as_the_base_class() -> None:
    c = after_hello("client")
    c.request("timestamp")
    [resp] = deliver(c, raw(1, 1, {"type": "quota", "message": "full"}, None))
    assert isinstance(resp, Response) and type(resp.error) is RpcError
    assert resp.error.error_type == "quota" and resp.error.message == "full"


def test_error_messages_are_cut_and_unknown_error_types_are_not_sent() -> None:
    c, s = pair()
    rid, data = c.request("info")
    deliver(s, data)
    with pytest.raises(LocalProtocolError):
        s.respond(rid, error=RpcError("x", error_type="quota"))
    with pytest.raises(LocalProtocolError):
        s.respond(rid, {"ts": 1}, error=NotFoundError("both"))
    [resp] = deliver(c, s.respond(rid, error=NotFoundError("é" * 5000)))
    assert isinstance(resp, Response) and resp.error == NotFoundError("é" * MAX_MESSAGE)


def test_notifications_go_both_ways() -> None:
    c, s = pair()
    assert deliver(c, s.notify("log", {"message": "disk 90% full"})) == [
        Notification("log", {"message": "disk 90% full"})
    ]
    assert deliver(s, c.notify("log", {"message": "hi"})) == [
        Notification("log", {"message": "hi"})
    ]
    with pytest.raises(LocalProtocolError):
        s.notify("log", {"text": "wrong field"})
    with pytest.raises(LocalProtocolError):
        s.notify("progress", {})


def test_upload_stream_then_put_finish() -> None:
    c, s = pair()
    rid, data = c.request("put_begin", {"key": K1, "af": None})
    deliver(s, data)
    assert deliver(c, s.respond(rid, {"offset": 1})) == [Response(rid, None, {"offset": 1})]
    assert deliver(s, c.send_body(rid, b"bc", end=True)) == [BodyChunk(rid, b"bc", True)]
    with pytest.raises(LocalProtocolError):  # the stream is closed
        c.send_body(rid, b"d")
    assert call(c, s, "put_finish", {"upload": rid, "valid": True}, {}) == Response(2, None, {})


def test_put_begin_without_offset_opens_no_stream() -> None:
    c, s = pair()
    rid, data = c.request("put_begin", {"key": K1, "af": None})
    deliver(s, data)
    deliver(c, s.respond(rid, {"offset": None}))
    with pytest.raises(LocalProtocolError):
        c.send_body(rid, b"x")
    with pytest.raises(RemoteProtocolError, match="not open"):
        deliver(s, raw(3, rid, b"x", True))


def test_an_error_answer_opens_no_stream() -> None:
    c, s = pair()
    rid, data = c.request("get", {"key": K1, "offset": 0, "af": None})
    deliver(s, data)
    deliver(c, s.respond(rid, error=NotFoundError("no")))
    with pytest.raises(LocalProtocolError):
        s.send_body(rid, b"x")


def test_send_body_splits_into_chunks_of_at_most_max_chunk() -> None:
    body = bytes(range(256)) * (MAX_CHUNK * 2 // 256 + 10)
    c, s = pair(client_window=len(body))
    rid = download(c, s, len(body))
    events = deliver(c, s.send_body(rid, memoryview(body), end=True))
    assert [len(ev.data) for ev in events if isinstance(ev, BodyChunk)] == [
        MAX_CHUNK, MAX_CHUNK, len(body) - 2 * MAX_CHUNK
    ]  # fmt: skip
    assert [ev.end for ev in events if isinstance(ev, BodyChunk)] == [False, False, True]
    assert b"".join(ev.data for ev in events if isinstance(ev, BodyChunk)) == body


def test_a_full_batch_of_the_longest_keys_fits_in_one_frame() -> None:
    c, s = pair()
    keys = [LONG_KEY] * MAX_BATCH
    resp = call(c, s, "checkpresent", {"keys": keys}, {"present": [False] * MAX_BATCH})
    assert resp.unwrap() == {"present": [False] * MAX_BATCH}


def test_a_frame_the_peer_would_refuse_is_not_sent() -> None:
    c, s = pair()
    rid, data = c.request("info")
    deliver(s, data)
    with pytest.raises(LocalProtocolError, match="limit"):
        s.respond(rid, {"uuid": "u" * (MAX_STR + 1), "kind": "repo"})
    assert deliver(c, s.respond(rid, {"uuid": "u" * MAX_STR, "kind": "repo"}))[0] == Response(
        rid, None, {"uuid": "u" * MAX_STR, "kind": "repo"}
    )


# --- handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("versions", [[1], [1, 7], [7, 1, 3]])
def test_the_highest_common_version_is_chosen(versions: list[int]) -> None:
    s = RpcConnection("server")
    s.handshake()
    assert deliver(s, raw(5, hello(versions, future_field={"a": 1}))) == [
        Handshake(1, frozenset(), 1 << 20)
    ]
    assert s.version == 1 and s.peer_window == 1 << 20


def test_no_common_version_is_an_error() -> None:
    s = RpcConnection("server")
    with pytest.raises(RemoteProtocolError, match="no common version"):
        deliver(s, raw(5, hello([2, 3])))


@pytest.mark.parametrize(
    "bad",
    [
        hello(proto="git-annex-p2p"),
        hello([]),
        hello([True]),
        hello(["1"]),
        hello(caps="x"),
        hello(caps=[1]),
        hello(window=0),
        hello(window=MAX_CREDIT + 1),
        {"proto": PROTO, "versions": [1], "caps": []},
        [PROTO, [1]],
    ],
)
def test_a_malformed_hello_is_an_error(bad: object) -> None:
    with pytest.raises(RemoteProtocolError):
        deliver(RpcConnection("client"), raw(5, bad))


def test_bad_constructor_arguments() -> None:
    for kwargs in ({"window": 0}, {"window": MAX_CREDIT + 1}, {"caps": [1]}, {"caps": ["c"] * 65}):
        with pytest.raises(ValueError):
            RpcConnection("client", **kwargs)
    with pytest.raises(ValueError):
        RpcConnection("proxy")  # type: ignore[arg-type]


def test_handshake_order_is_enforced() -> None:
    c = RpcConnection("client")
    with pytest.raises(LocalProtocolError):
        c.request("info")  # nothing sent yet
    c.handshake()
    with pytest.raises(LocalProtocolError):
        c.handshake()
    with pytest.raises(LocalProtocolError):
        c.request("info")  # the server's HELLO has not come
    with pytest.raises(RemoteProtocolError, match="before the handshake"):
        deliver(c, raw(2, "log", {"message": "x"}))
    s = after_hello("server")
    with pytest.raises(RemoteProtocolError, match="second HELLO"):
        deliver(s, HELLO)


def test_roles_are_enforced() -> None:
    c, s = pair()
    with pytest.raises(LocalProtocolError):
        s.request("info")
    with pytest.raises(LocalProtocolError):
        c.respond(1, {})
    with pytest.raises(RemoteProtocolError, match="cannot receive"):
        deliver(after_hello("client"), raw(0, 1, "info", {}))
    with pytest.raises(RemoteProtocolError, match="cannot receive"):
        deliver(after_hello("server"), raw(1, 1, None, {}))


# --- validation ------------------------------------------------------------------------------

BAD_PARAMS: list[tuple[str, Any]] = [
    ("frobnicate", {}),
    ("info", {"verbose": True}),
    ("info", []),
    ("checkpresent", {"keys": []}),
    ("checkpresent", {"keys": [K1] * (MAX_BATCH + 1)}),
    ("checkpresent", {"keys": ["not a key"]}),
    ("checkpresent", {"keys": K1}),
    ("lock", {"key": "SHA256-s3--a\nb"}),
    ("lock", {}),
    ("unlock", {"lock": 0}),
    ("unlock", {"lock": True}),
    ("put_begin", {"key": K1, "af": "/etc/passwd"}),
    ("put_begin", {"key": K1, "af": ""}),
    ("put_begin", {"key": K1, "af": "a\nb"}),
    ("put_begin", {"key": K1}),
    ("put_finish", {"upload": 1, "valid": 1}),
    ("get", {"key": K1, "offset": -5, "af": None}),  # security.md row 19
    ("get", {"key": K1, "offset": 1.0, "af": None}),
    ("get", {"key": K1, "offset": 2**63, "af": None}),
    ("remove", {"key": K1, "before": "soon"}),
    ("timestamp", {"": 1}),
]


@pytest.mark.parametrize(("method", "params"), BAD_PARAMS)
def test_bad_requests_are_refused_on_both_ends(method: str, params: Any) -> None:
    with pytest.raises(BadRequestError):
        validate_params(method, params)
    c, s = pair()
    with pytest.raises(LocalProtocolError):
        c.request(method, params)
    # A peer that sends it anyway gets a bad-request answer and the connection carries on.
    [ev] = deliver(s, raw(0, 1, method, params))
    assert isinstance(ev, InvalidRequest) and ev.id == 1 and ev.method == method
    with pytest.raises(LocalProtocolError):
        s.respond(1, {})  # only the error may answer it
    assert msgpack.unpackb(s.respond(1, error=ev.error)) == [
        1, 1, {"type": "bad-request", "message": ev.error.message}, None
    ]  # fmt: skip
    assert deliver(s, raw(0, 2, "timestamp", {})) == [Request(2, "timestamp", {})]


def test_a_bad_result_fails_that_call_only() -> None:
    c = after_hello("client")
    c.request("timestamp")
    c.request("get", {"key": K1, "offset": 0, "af": None})
    c.request("timestamp")
    events = deliver(c, raw(1, 1, None, {"ts": -1}) + raw(1, 2, None, {"length": "3"}))
    assert [type(ev.error) for ev in events if isinstance(ev, Response)] == [CallProtocolError] * 2
    with pytest.raises(RemoteProtocolError, match="not open"):  # no stream for the failed get
        deliver(c, raw(3, 2, b"abc", True))
    c = after_hello("client")
    c.request("timestamp")
    c.request("timestamp")
    deliver(c, raw(1, 1, None, {"ts": True}))
    assert deliver(c, raw(1, 2, None, {"ts": 5})) == [Response(2, None, {"ts": 5})]


def test_a_server_cannot_send_a_bad_result() -> None:
    c, s = pair()
    rid, data = c.request("checkpresent", {"keys": [K1]})
    deliver(s, data)
    with pytest.raises(LocalProtocolError):
        s.respond(rid, {"present": [1]})
    with pytest.raises(LocalProtocolError):
        s.respond(rid + 1, {})


# --- malformed frames ------------------------------------------------------------------------

_SERVER_BAD: list[bytes] = [
    msgpack.packb(5),
    msgpack.packb({"0": 1}),
    raw(),
    raw("0", 1, "info", {}),
    raw(True, 1, "info", {}),
    raw(7, 1),
    raw(-1),
    raw(0, 1, "info"),
    raw(0, 1, "info", {}, None),
    raw(0, 0, "info", {}),
    raw(0, -1, "info", {}),
    raw(0, "1", "info", {}),
    raw(0, True, "info", {}),
    raw(0, 2**63, "info", {}),
    raw(0, 1, b"info", {}),
    raw(0, 1, "info", {}) + raw(0, 1, "info", {}),  # id reused
    raw(0, 2, "info", {}) + raw(0, 1, "info", {}),  # ids going down
    raw(3, 1, b"x", False),  # body, no stream
    raw(4, 1, 100),  # credit for an id never used
    raw(6, 1),  # cancel for an id never used
    raw(2, "log", {"message": 1}),
    raw(2, "frob", {}),
    raw(2, 1, {}),
    msgpack.packb([2, "log", {"message": "x"}, msgpack.ExtType(1, b"x")]),
    msgpack.packb([2, "log", {1: "x"}], use_bin_type=True),
    b"\xc1",
]
_CLIENT_BAD: list[bytes] = [
    raw(1, 2, None, {"ts": 1}),  # response to a request never made
    raw(1, 1, None, {"ts": 1}) + raw(1, 1, None, {"ts": 1}),  # answered twice
    raw(1, 1, {"type": "io", "message": "m"}, {"ts": 1}),  # both error and result
    raw(1, 1, {"type": "io"}, None),
    raw(1, 1, {"type": "io", "message": "m", "extra": 1}, None),
    raw(1, 1, {"type": 5, "message": "m"}, None),
    raw(1, 1, "io", None),
    raw(1, 1, None),
]


@pytest.mark.parametrize("frame", _SERVER_BAD)
def test_malformed_frames_at_the_server(frame: bytes) -> None:
    s = after_hello("server")
    with pytest.raises(RemoteProtocolError):
        deliver(s, frame)
    with pytest.raises(RemoteProtocolError):  # and it stays broken
        s.next_event()


@pytest.mark.parametrize("frame", _CLIENT_BAD)
def test_malformed_frames_at_the_client(frame: bytes) -> None:
    c = after_hello("client")
    c.request("timestamp")
    with pytest.raises(RemoteProtocolError):
        deliver(c, frame)


@pytest.mark.parametrize(
    "frame",
    [
        raw(3, 1, "abc", False),  # str, not bin
        raw(3, 1, b"abc", 0),
        raw(3, 1, b"abc"),
        raw(3, 2, b"abc", False),  # body on a stream the client sends
        raw(4, 2, 0),
        raw(4, 2, -1),
        raw(4, 2, True),
        raw(4, 2, MAX_CREDIT),  # more than MAX_CREDIT outstanding with the initial window
        raw(4, 3, 10),  # stream id never issued
        raw(6, 3),
        raw(6, 2, 1),
    ],
)
def test_malformed_stream_frames_at_the_client(frame: bytes) -> None:
    c, s = pair()
    download(c, s, 10)  # stream 1: a download
    rid, data = c.request("put_begin", {"key": K1, "af": None})
    deliver(s, data)
    deliver(c, s.respond(rid, {"offset": 0}))  # stream 2: an upload
    with pytest.raises(RemoteProtocolError):
        deliver(c, frame)


def test_credit_and_cancel_for_the_uploading_client() -> None:
    c, s = pair(server_window=100)
    rid, data = c.request("put_begin", {"key": K1, "af": None})
    deliver(s, data)
    deliver(c, s.respond(rid, {"offset": 0}))
    deliver(s, c.send_body(rid, b"x" * 100))
    assert deliver(c, s.consumed(rid, 100) + s.cancel(rid)) == [
        CreditGranted(rid, 100), StreamCancelled(rid)
    ]  # fmt: skip
    assert deliver(s, c.send_body(rid, b"", end=True)) == [BodyChunk(rid, b"", True)]


@pytest.mark.parametrize("bad", [b"\xc1", b"\x93\x02\xdb\x40\x00\x00\x00"])
def test_frames_before_a_bad_one_are_delivered_first(bad: bytes) -> None:
    s = after_hello("server")
    s.receive_data(raw(0, 1, "timestamp", {}) + bad + raw(0, 2, "timestamp", {}))
    assert s.next_event() == Request(1, "timestamp", {})
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_too_many_unanswered_requests() -> None:
    s = after_hello("server")
    deliver(s, b"".join(raw(0, i, "timestamp", {}) for i in range(1, MAX_PENDING + 1)))
    with pytest.raises(RemoteProtocolError, match="unanswered"):
        deliver(s, raw(0, MAX_PENDING + 1, "timestamp", {}))
    c, s = pair()
    for _ in range(MAX_PENDING):
        c.request("timestamp")
    with pytest.raises(LocalProtocolError):
        c.request("timestamp")


# --- end of stream ---------------------------------------------------------------------------


def test_end_of_stream() -> None:
    s = after_hello("server")
    s.receive_data(b"")
    assert s.next_event() == ConnectionClosed(False)
    assert s.next_event() == ConnectionClosed(False)
    with pytest.raises(LocalProtocolError):
        s.receive_data(b"x")
    s = after_hello("server")
    frame = raw(0, 1, "timestamp", {})
    s.receive_data(frame + frame[:-1])
    s.receive_data(b"")
    assert drain(s) == [Request(1, "timestamp", {}), ConnectionClosed(True)]


# --- limits and memory -----------------------------------------------------------------------

GIB = 1 << 30


@pytest.mark.parametrize(
    "header",
    [
        b"\x94\x03\x01\xc6" + GIB.to_bytes(4, "big"),  # body chunk declaring 1 GiB of bin
        b"\x93\x02\xdb" + GIB.to_bytes(4, "big"),  # a 1 GiB method name
        b"\x94\x00\x01\xa4info\xdd\xff\xff\xff\xff",  # params: an array of 4G values
        b"\x94\x00\x01\xa4info\xdf\xff\xff\xff\xff",  # params: a map of 4G pairs
        b"\x94\x00\x01\xa4info\x94" + b"\xdc\x01\x00" * 4,  # 4 x 256 nested values
        b"\x94\x03\x01\xc6" + (MAX_CHUNK + 1).to_bytes(4, "big"),
        b"\x93\x02\xda" + (MAX_STR + 1).to_bytes(2, "big"),
    ],
)
def test_an_oversized_frame_fails_on_its_header(header: bytes) -> None:
    s = after_hello("server")
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            deliver(s, header)  # no payload needed: the header alone is refused
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_frame_of_many_strings_fails_at_max_frame_bytes() -> None:
    s = after_hello("server")
    item = b"\xda" + MAX_STR.to_bytes(2, "big") + b"k" * MAX_STR
    n = MAX_FRAME // len(item) + 10  # fewer values than MAX_ITEMS, more bytes than MAX_FRAME
    assert n < MAX_ITEMS
    stream = b"\x94\x00\x01\xacheckpresent\x81\xa4keys\xdc" + n.to_bytes(2, "big") + item * n
    fed = 0
    with pytest.raises(RemoteProtocolError, match="bytes"):
        for i in range(0, len(stream), 65536):
            fed += len(stream[i : i + 65536])
            deliver(s, stream[i : i + 65536])
    assert MAX_FRAME - 65536 < fed <= MAX_FRAME + 65536


def test_limits_hold_while_feeding_a_huge_frame() -> None:
    # 8 MiB of bin payloads inside one declared array: refused once the frame passes
    # MAX_FRAME, and nothing near 8 MiB is ever held.
    s = after_hello("server")
    chunk = b"\xc5\xff\xff" + b"\0" * 0xFFFF
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError):
            s.receive_data(b"\x93\x02\xa3log\xdc\x00\x80")
            for _ in range(128):
                deliver(s, chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_FRAME + (2 << 20)


# --- credit and streams ----------------------------------------------------------------------


def test_the_sender_cannot_exceed_its_credit() -> None:
    c, s = pair(server_window=1000)
    rid, data = c.request("put_begin", {"key": K1, "af": None})
    deliver(s, data)
    deliver(c, s.respond(rid, {"offset": 0}))
    assert c.available_credit(rid) == 1000
    with pytest.raises(LocalProtocolError, match="credit"):
        c.send_body(rid, b"x" * 1001)
    assert c.available_credit(rid) == 1000  # nothing was used by the refused send
    deliver(s, c.send_body(rid, b"x" * 1000))
    assert c.available_credit(rid) == 0
    with pytest.raises(LocalProtocolError):
        c.send_body(rid, b"x")
    assert c.send_body(rid, b"", end=True)  # ending needs no credit


def test_the_receiver_refuses_bytes_beyond_the_credit() -> None:
    c = RpcConnection("client", window=16)
    c.handshake()
    deliver(c, HELLO)
    rid, _ = c.request("get", {"key": K1, "offset": 0, "af": None})
    deliver(c, raw(1, rid, None, {"length": 100}) + raw(3, rid, b"x" * 10, False))
    assert deliver(c, raw(3, rid, b"x" * 6, False)) == [BodyChunk(rid, b"x" * 6, False)]
    with pytest.raises(RemoteProtocolError, match="credit"):
        deliver(c, raw(3, rid, b"x", False))


def test_grants_reopen_a_stalled_stream() -> None:
    c, s = pair(client_window=1000)
    rid = download(c, s, 5000)
    deliver(c, s.send_body(rid, b"a" * 1000))
    assert s.available_credit(rid) == 0
    assert c.consumed(rid, 499) == b""  # below half a window: no frame yet
    grant = c.consumed(rid, 1)
    assert deliver(s, grant) == [CreditGranted(rid, 500)]
    assert s.available_credit(rid) == 500
    assert deliver(s, c.grant(rid, 250)) == [CreditGranted(rid, 250)]
    assert s.available_credit(rid) == 750
    with pytest.raises(LocalProtocolError):
        c.consumed(rid, 501)  # only 500 received and not yet consumed
    with pytest.raises(LocalProtocolError):
        c.grant(rid, 0)


def test_a_stalled_stream_does_not_hold_up_other_streams_or_calls() -> None:
    window = 64 << 10
    c, s = pair(client_window=window)
    stalled = download(c, s, 10 * window)
    busy = download(c, s, 10 * window)
    # The stalled stream's receiver never consumes: after one window its sender must wait.
    assert [type(ev) for ev in deliver(c, s.send_body(stalled, b"s" * window))] == [BodyChunk]
    assert s.available_credit(stalled) == 0
    moved = 0
    while moved < 10 * window:
        n = s.available_credit(busy)
        assert n > 0  # the other stream always gets credit back
        events = deliver(c, s.send_body(busy, b"b" * n, end=moved + n == 10 * window))
        assert all(isinstance(ev, BodyChunk) and ev.stream_id == busy for ev in events)
        moved += n
        grants = b"".join(c.consumed(busy, len(ev.data)) for ev in events)  # type: ignore[union-attr]
        deliver(s, grants)
        # A call made meanwhile is answered at once.
        resp = call(c, s, "timestamp", {}, {"ts": moved})
        assert resp.unwrap() == {"ts": moved}
    assert s.available_credit(stalled) == 0
    # Once the stalled receiver consumes, its stream moves again.
    assert deliver(s, c.consumed(stalled, window)) == [CreditGranted(stalled, window)]


def test_cancel_asks_the_sender_to_end() -> None:
    c, s = pair(client_window=100)
    rid = download(c, s, 1000)
    deliver(c, s.send_body(rid, b"x" * 60))
    assert deliver(s, c.cancel(rid)) == [StreamCancelled(rid)]
    # Chunks in flight still arrive and count against the credit; then the end.
    assert deliver(c, s.send_body(rid, b"y" * 40) + s.send_body(rid, b"", end=True)) == [
        BodyChunk(rid, b"y" * 40, False),
        BodyChunk(rid, b"", True),
    ]
    assert c.cancel(rid) == b""  # already ended: nothing to send
    assert c.consumed(rid, 100) == b""


def test_credit_and_cancel_that_cross_the_end_are_ignored() -> None:
    c, s = pair(client_window=100)
    rid = download(c, s, 100)
    late_credit = c.grant(rid, 50)
    late_cancel = c.cancel(rid)
    deliver(c, s.send_body(rid, b"x" * 100, end=True))
    assert deliver(s, late_credit + late_cancel) == []
    assert deliver(s, raw(0, 2, "timestamp", {})) == [Request(2, "timestamp", {})]


def test_streams_and_calls_never_share_state() -> None:
    c, s = pair()
    with pytest.raises(LocalProtocolError):
        c.grant(1, 10)  # no such stream
    with pytest.raises(LocalProtocolError):
        c.available_credit(1)
    with pytest.raises(LocalProtocolError):
        c.consumed(5, 1)  # an id never issued
    rid = download(c, s, 10)
    with pytest.raises(LocalProtocolError):
        c.send_body(rid, b"x")  # the client receives on a download


# --- split invariance ------------------------------------------------------------------------

UPLOAD = bytes(range(251)) * 400  # 100 KB: not a multiple of anything
DOWNLOAD = bytes(range(256)) * 1600  # 400 KiB: more than a window, more than a chunk
RESULTS = {method: result for method, _, result in CALLS}


class Side:
    """One end that reacts to each event the same way every time, so replaying its input
    with other split points must give the same events and the same output."""

    def __init__(self, role: str) -> None:
        # Small upload window: credit goes back and forth; big download window: chunking.
        self.conn = (
            RpcConnection("client", window=300 << 10)
            if role == "client"
            else RpcConnection("server", window=40 << 10)
        )
        self.events: list[Event] = []
        self.sent = bytearray()
        self.to_send: dict[int, bytes] = {}  # stream id -> bytes not yet sent
        self.cancel_after_first: set[int] = set()

    def send(self, data: bytes) -> bytes:
        self.sent += data
        return data

    def feed(self, data: bytes) -> bytes:
        # React to each event before reading the next, as a real peer would have.
        if data:
            self.conn.receive_data(data)
        out = b""
        while (ev := self.conn.next_event()) is not NEED_DATA:
            self.events.append(ev)
            out += self.send(self.react(ev))
        return out

    def push(self, sid: int) -> bytes:
        rest = self.to_send[sid]
        n = min(len(rest), self.conn.available_credit(sid))
        self.to_send[sid] = rest[n:]
        end = n == len(rest)
        if end:
            del self.to_send[sid]
        return self.conn.send_body(sid, rest[:n], end) if n or end else b""

    def react(self, ev: Event) -> bytes:
        conn = self.conn
        match ev:
            case Handshake() if conn.role == "server":
                return conn.notify("log", {"message": "node up"})
            case Request(rid, "get", params):
                self.to_send[rid] = DOWNLOAD[params["offset"] :]
                return conn.respond(rid, {"length": len(self.to_send[rid])}) + self.push(rid)
            case Request(rid, "put_begin", params):
                return conn.respond(rid, {"offset": 7 if params["af"] else None})
            case Request(rid, "remove", _):
                return conn.respond(rid, error=LockedError("locked by another process"))
            case Request(rid, method, params):
                return conn.respond(rid, RESULTS[method])
            case Response(rid, None, {"offset": int(offset)}):
                self.to_send[rid] = UPLOAD[offset:]
                return self.push(rid)
            case BodyChunk(sid, data, _):
                if sid in self.cancel_after_first:
                    self.cancel_after_first.discard(sid)
                    return conn.cancel(sid) + conn.consumed(sid, len(data))
                return conn.consumed(sid, len(data))
            case CreditGranted(sid, _) if sid in self.to_send:
                return self.push(sid)
            case StreamCancelled(sid) if sid in self.to_send:
                del self.to_send[sid]
                return conn.send_body(sid, b"", end=True)
        return b""


def client_opening(c: Side) -> bytes:
    """What the client sends on its own once the server's HELLO is in."""
    out = b""
    for method, params, _ in CALLS:
        out += c.send(c.conn.request(method, params)[1])
    out += c.send(c.conn.request("get", {"key": K1, "offset": 0, "af": None})[1])
    rid, data = c.conn.request("get", {"key": K2, "offset": 1000, "af": None})
    c.cancel_after_first.add(rid)
    out += c.send(data)
    rid, data = c.conn.request("put_begin", {"key": K3, "af": "f"})
    return out + c.send(data) + c.send(c.conn.notify("log", {"message": "done"}))


def server_opening(s: Side) -> bytes:
    return s.send(s.conn.handshake())


def converse() -> tuple[Side, Side, int]:
    c, s = Side("client"), Side("server")
    to_server = c.send(c.conn.handshake())
    to_client = server_opening(s)
    opening = len(to_client)
    to_server += c.feed(to_client) + client_opening(c)
    while to_server:
        to_client = s.feed(to_server)
        to_server = c.feed(to_client)
    return c, s, opening


CLIENT, SERVER, SERVER_OPENING = converse()


def pieces(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`stream` cut at these offsets, without empty pieces (b"" would be the end of stream)."""
    bounds = [0, *sorted(x for x in cuts if 0 < x < len(stream)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def replay_server(chunks: list[bytes]) -> Side:
    s = Side("server")
    server_opening(s)
    for chunk in chunks:
        s.feed(chunk)
    return s


def replay_client(chunks: list[bytes]) -> Side:
    c = Side("client")
    c.send(c.conn.handshake())
    c.feed(bytes(SERVER.sent[:SERVER_OPENING]))
    client_opening(c)
    for chunk in chunks:
        c.feed(chunk)
    return c


def test_the_conversation_exercises_what_it_should() -> None:
    kinds = {type(ev) for ev in CLIENT.events + SERVER.events}
    assert kinds == {Handshake, Request, Response, Notification, BodyChunk, CreditGranted,
                     StreamCancelled}  # fmt: skip
    uploads: dict[int, list[BodyChunk]] = {}
    for ev in SERVER.events:
        if isinstance(ev, BodyChunk):
            uploads.setdefault(ev.stream_id, []).append(ev)
    assert len(uploads) == 2  # interleaved on one connection
    for chunks in uploads.values():
        assert b"".join(ev.data for ev in chunks) == UPLOAD[7:]
        assert [ev.end for ev in chunks] == [False] * (len(chunks) - 1) + [True]
    downloads = [ev for ev in CLIENT.events if isinstance(ev, BodyChunk)]
    assert max(len(ev.data) for ev in downloads) == MAX_CHUNK
    assert sum(isinstance(ev, CreditGranted) for ev in CLIENT.events) >= 2
    assert not CLIENT.to_send and not SERVER.to_send


def test_whole_and_byte_at_a_time_give_the_same_events() -> None:
    to_server, to_client = bytes(CLIENT.sent), bytes(SERVER.sent[SERVER_OPENING:])
    for chunks in ([to_server], [to_server[i : i + 1] for i in range(len(to_server))]):
        s = replay_server(chunks)
        assert s.events == SERVER.events and s.sent == SERVER.sent
    for chunks in ([to_client], [to_client[i : i + 1] for i in range(len(to_client))]):
        c = replay_client(chunks)
        assert c.events == CLIENT.events


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_split_points_give_the_same_events(data: st.DataObject) -> None:
    to_server, to_client = bytes(CLIENT.sent), bytes(SERVER.sent[SERVER_OPENING:])
    cuts = data.draw(st.lists(st.integers(0, len(to_server)), max_size=40))
    s = replay_server(pieces(to_server, cuts))
    assert s.events == SERVER.events and s.sent == SERVER.sent
    cuts = data.draw(st.lists(st.integers(0, len(to_client)), max_size=40))
    c = replay_client(pieces(to_client, cuts))
    assert c.events == CLIENT.events and c.sent == CLIENT.sent


# --- hostile bytes ---------------------------------------------------------------------------


def outcome(role: str, chunks: Iterable[bytes], eof: bool) -> tuple[list[Event], bool]:
    """Events until the first error, and whether there was one, feeding chunks one by one.

    A client makes its calls on the Handshake event, so what it expects does not depend on
    how the input is cut: a get (id 1, may open a download) and a put_begin (id 2)."""
    conn = RpcConnection("server" if role == "server" else "client")
    conn.handshake()
    events: list[Event] = []
    try:
        for chunk in [*chunks, *([b""] if eof else [])]:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
                if isinstance(ev, Handshake) and role == "client":
                    conn.request("get", {"key": K1, "offset": 0, "af": None})
                    conn.request("put_begin", {"key": K1, "af": None})
                if isinstance(ev, ConnectionClosed):
                    break
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        return events, True
    return events, False


_fragment = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([HELLO, raw(0, 1, "timestamp", {}), raw(1, 1, None, {"length": 3}),
                     raw(3, 1, b"abc", False), raw(3, 1, b"", True), raw(1, 2, None, {"offset": 0}),
                     raw(4, 2, 5), raw(6, 2), b"\x94", b"\xdc\x01\x00", b"\xc6\xff\xff\xff\xff",
                     b"\xdb", b"\xc1", b"\xd4"]),
)  # fmt: skip


@settings(max_examples=1500, deadline=None)
@given(
    st.sampled_from(["server", "client"]),
    st.lists(_fragment, max_size=12),
    st.lists(st.integers(0, 400), max_size=8),
    st.booleans(),
)
def test_arbitrary_bytes_give_events_or_remote_protocol_error(
    role: str, fragments: list[bytes], cuts: list[int], eof: bool
) -> None:
    stream = b"".join(fragments)
    whole = outcome(role, pieces(stream, []), eof)
    # Any exception but RemoteProtocolError escapes and fails the test; and where the
    # input is cut does not change what comes out, error included.
    assert outcome(role, pieces(stream, [x for x in cuts if x <= len(stream)]), eof) == whole


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from([K1, "log", "get", "checkpresent", "message", "keys", "offset"]),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["server", "client"]),
    st.lists(st.tuples(st.integers(-1, 8), st.lists(_msgpack_values, max_size=4)), max_size=6),
)
def test_well_formed_msgpack_of_any_shape_gives_events_or_remote_protocol_error(
    role: str, frames: list[tuple[int, list[Any]]]
) -> None:
    stream = HELLO + b"".join(raw(kind, *args) for kind, args in frames)
    events, _ = outcome(role, [stream], eof=True)
    for ev in events:
        if isinstance(ev, Request):
            validate_params(ev.method, ev.params)  # what reaches the caller is valid


def test_one_protocol_error_hierarchy() -> None:
    """p2p and the node RPC raise the same error classes (protocolerrors.py), so one
    `except RemoteProtocolError` covers both codecs; before, each had its own unrelated
    class of that name."""
    from git_remote_annexproxy import p2p, protocolerrors, rpc

    for codec in (p2p, rpc):
        assert codec.RemoteProtocolError is protocolerrors.RemoteProtocolError
        assert codec.LocalProtocolError is protocolerrors.LocalProtocolError
    assert issubclass(protocolerrors.RemoteProtocolError, protocolerrors.ProtocolError)
