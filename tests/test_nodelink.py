"""P2PLink (shell/nodelink.py) against a scripted fake node on in-memory streams.

Each test attaches a link to one end of `trio.testing.lockstep_stream_pair()` and runs a
script on the other end that reads exactly what the link must send and answers as a node
would, or misbehaves: dies, hangs, stops reading, sends garbage. Lockstep streams block a
sender until the peer reads, so "the node stopped reading" is real back-pressure here.
Hangs run on pytest-trio's autojump clock: a 30 s timeout costs no wall time, and the
virtual time elapsed shows the wait was bounded by the link's timeout and nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from git_remote_annexproxy.keys import Key
from shell.nodelink import AlreadyHave, NodeError, NodeRefused, Outcome, P2PLink, Upload
from shell.proxyselect import Remote

N1 = "40de0000-0000-4000-8000-000000000001"
N3 = "40de0000-0000-4000-8000-000000000003"
GW1 = "9a7e0000-0000-4000-8000-000000000001"
GW2 = "9a7e0000-0000-4000-8000-000000000002"
KEY_TEXT = "SHA256E-s10--6d2a9b1b9ab5a2c6cc8e55ccde2a3a9a5b8f8e9bcf5d2ee04b5c1a0a3a6d8c4d.bin"
KEY = Key.parse(KEY_TEXT)
TIMEOUT = 30.0
# How long `session` waits for the node script after the body (the first line it waits for
# is usually there already; generous because a loaded machine may be slow to schedule us).
SCRIPT_GRACE = 10.0


class FakeNode:
    """The node's end: read what the link sends, answer with raw bytes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def line(self) -> str:
        while b"\n" not in self.buffer:
            if not await self._fill():
                raise AssertionError(f"link closed; unterminated: {bytes(self.buffer)!r}")
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return line.decode()

    async def expect(self, line: str) -> None:
        assert await self.line() == line

    async def raw(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._fill():
                raise AssertionError(f"link closed after {len(self.buffer)} of {n} bytes")
        data, self.buffer = bytes(self.buffer[:n]), self.buffer[n:]
        return data

    async def say(self, *lines: str | bytes) -> None:
        for item in lines:
            await self.stream.send_all(item if isinstance(item, bytes) else item.encode() + b"\n")

    async def close(self) -> None:
        await self.stream.aclose()

    async def at_eof(self) -> bool:
        """True if the link closed its end without sending anything more."""
        return not self.buffer and not await self._fill()


async def handshake(node: FakeNode, version: int = 4) -> None:
    await node.say(f"AUTH-SUCCESS {N1}")
    await node.expect("VERSION 4")
    await node.say(f"VERSION {version}")


def make_link(timeout: float = TIMEOUT) -> P2PLink:
    remote = Remote("node1", N1, "/srv/node1.git", 100.0)
    return P2PLink(remote, GW1, timeout=timeout)


NodeScript = Callable[[FakeNode], Awaitable[None]]


async def session(
    script: NodeScript,
    body: Callable[[P2PLink], Awaitable[None]],
    *,
    version: int | None = 4,
    bypass: frozenset[str] = frozenset(),
    timeout: float = TIMEOUT,
    buffered: bool = False,
    node_may_wait: bool = False,
) -> P2PLink:
    """Attach a link to a node running `script`, then run `body` on the link.

    The node script must run to its end: its expectations are the wire checks, and one the
    link never meets (a line never sent, an EOF that never comes) leaves the script waiting.
    A script still waiting `SCRIPT_GRACE` seconds after `body` fails the test, unless
    `node_may_wait` says the test means it (a node that hangs on purpose); then it is
    cancelled. `buffered` streams let the node send without the link reading (a reply can
    then sit in the pipe, as with real pipes)."""
    pair = trio.testing.memory_stream_pair if buffered else trio.testing.lockstep_stream_pair
    link_end, node_end = pair()
    link = make_link(timeout)
    node = FakeNode(node_end)
    finished = trio.Event()

    async def run_node() -> None:
        await script(node)
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_node)
        await link.attach(link_end, link_end, version, bypass)
        await body(link)
        # Let a node that only had to observe the link's last words finish.
        with trio.move_on_after(SCRIPT_GRACE):
            await finished.wait()
        nursery.cancel_scope.cancel()
    if not finished.is_set() and not node_may_wait:
        pytest.fail(
            f"the fake node's script did not finish within {SCRIPT_GRACE} s of the link's "
            f"last action: it waits for something the link never sent (unread: "
            f"{bytes(node.buffer)!r}); pass node_may_wait=True if the node hangs on purpose"
        )
    return link


# --- the helper itself -----------------------------------------------------------------------


@pytest.mark.parametrize("last", ["a final line", "the link's EOF"])
async def test_session_fails_when_the_node_script_does_not_finish(
    autojump_clock: trio.testing.MockClock, last: str
) -> None:
    """An expectation after the link's last action is checked: a node still waiting for a
    line the link never sends (or for an EOF, the link staying open) fails the test."""

    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await n.say("SUCCESS")
        if last == "a final line":
            await n.expect("SUCCESS")  # never sent: CHECKPRESENT has no verdict
        else:
            assert await n.at_eof()  # never: the body does not close the link

    async def body(link: P2PLink) -> None:
        assert await link.checkpresent(KEY)

    with pytest.raises(pytest.fail.Exception, match="did not finish"):
        await session(node, body)
    # The explicit opt-out, for a node that hangs on purpose.
    await session(node, body, node_may_wait=True)


# --- negotiation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_version", "node_version", "bypass", "sent"),
    [
        # gw1 -> node: VERSION, then BYPASS with the sorted set (cluster.txt S6, S9).
        (4, 4, frozenset({GW2, GW1}), ["VERSION 4", f"BYPASS {GW1} {GW2}"]),
        (2, 2, frozenset({GW1}), ["VERSION 2", f"BYPASS {GW1}"]),
        # A node that speaks v1 knows no BYPASS: none is sent.
        (4, 1, frozenset({GW1}), ["VERSION 4"]),
        (1, 1, frozenset({GW1}), ["VERSION 1"]),
        # Nothing to bypass, nothing sent.
        (4, 4, frozenset(), ["VERSION 4"]),
        # Never more than our maximum, whatever the client asked.
        (9, 4, frozenset({GW1}), ["VERSION 4", f"BYPASS {GW1}"]),
        # A v0 client: the node gets no VERSION either.
        (None, 0, frozenset({GW1}), []),
    ],
)
async def test_version_negotiation_and_bypass(
    client_version: int | None, node_version: int, bypass: frozenset[str], sent: list[str]
) -> None:
    async def node(n: FakeNode) -> None:
        await n.say(f"AUTH-SUCCESS {N1}")
        if sent:
            await n.expect(sent[0])
            await n.say(f"VERSION {node_version}")
        for line in sent[1:]:
            await n.expect(line)
        # The first request comes next: nothing else was sent in between.
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await n.say("SUCCESS")

    async def body(link: P2PLink) -> None:
        assert link.version == node_version
        assert await link.checkpresent(KEY)

    await session(node, body, version=client_version, bypass=bypass)


async def test_wrong_uuid_in_auth_success() -> None:
    link_end, node_end = trio.testing.lockstep_stream_pair()
    link = make_link()
    node = FakeNode(node_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.say, f"AUTH-SUCCESS {N3}")
        with pytest.raises(NodeError, match=f"expected UUID {N1}, found {N3}"):
            await link.attach(link_end, link_end, 4)
    assert link.dead


# --- requests by version ----------------------------------------------------------------------


@pytest.mark.parametrize(("node_version", "sent"), [(3, "REMOVE-BEFORE 700"), (2, "REMOVE")])
async def test_remove_before_needs_v3(node_version: int, sent: str) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n, node_version)
        await n.expect(f"{sent} {KEY_TEXT}")
        await n.say(f"SUCCESS-PLUS {N3}")

    async def body(link: P2PLink) -> None:
        assert await link.remove(KEY, 700) == Outcome(True, (N3,))

    await session(node, body)


@pytest.mark.parametrize(
    ("node_version", "valid", "trailer"),
    [(1, True, ["VALID"]), (4, False, ["INVALID"]), (0, True, []), (4, None, ["VALID"])],
)
async def test_upload_validity_by_version(
    node_version: int, valid: bool | None, trailer: list[str]
) -> None:
    async def node(n: FakeNode) -> None:
        if node_version:
            await handshake(n, node_version)
        else:
            await n.say(f"AUTH-SUCCESS {N1}")
        await n.expect(f"PUT a_file.txt {KEY_TEXT}")
        await n.say("PUT-FROM 3")
        await n.expect("DATA 7")
        assert await n.raw(7) == b"defghij"
        for line in trailer:
            await n.expect(line)
        await n.say("SUCCESS")

    async def body(link: P2PLink) -> None:
        upload = await link.put("a_file.txt", KEY)
        assert isinstance(upload, Upload) and upload.offset == 3
        await upload.send_data(7)
        await upload.send_piece(b"def")
        await upload.send_piece(b"ghij")
        assert await upload.finish(valid) == Outcome(True)

    await session(node, body, version=4 if node_version else None)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("ALREADY-HAVE", AlreadyHave()), (f"ALREADY-HAVE-PLUS {N3} {GW2}", AlreadyHave((N3, GW2)))],
)
async def test_put_already_have(reply: str, expected: AlreadyHave) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"PUT  {KEY_TEXT}")
        await n.say(reply)

    async def body(link: P2PLink) -> None:
        assert await link.put(None, KEY) == expected

    await session(node, body)


async def test_get_below_v1_has_no_validity() -> None:
    async def node(n: FakeNode) -> None:
        await n.say(f"AUTH-SUCCESS {N1}")
        await n.expect(f"GET 2  {KEY_TEXT}")
        await n.say("DATA 3", b"cde")
        await n.expect("SUCCESS")

    async def body(link: P2PLink) -> None:
        download = await link.get(2, None, KEY)
        assert [p async for p in download.pieces()] == [b"cde"]
        assert await download.validity() is None
        await download.verdict(True)

    await session(node, body, version=None)


# --- refusals keep the link; protocol breakage kills it ---------------------------------------


async def test_error_reply_is_a_refusal_and_the_link_stays_usable() -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"REMOVE {KEY_TEXT}")
        await n.say("ERROR this repository is append-only; removal denied")
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await n.say("SUCCESS")

    async def body(link: P2PLink) -> None:
        with pytest.raises(NodeRefused) as info:
            await link.remove(KEY, None)
        assert info.value.text == "this repository is append-only; removal denied"
        assert not link.dead
        assert await link.checkpresent(KEY)

    await session(node, body)


@pytest.mark.parametrize(
    "reply",
    [
        b"FROBNICATE\n",  # no such message
        b"SUCCESS extra\n",  # a 0-argument message with an argument does not parse
        b"PUT-FROM 0\n",  # a message, but not an answer to CHECKPRESENT
        b"DATA 5\nabcde",  # likewise, and it even brings a body
        b"x" * 40000,  # an overlong line is fatal to the framing
    ],
    ids=["unknown", "bad-arity", "wrong-reply", "unexpected-data", "overlong"],
)
async def test_malformed_reply_kills_the_link(reply: bytes) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await n.say(reply)
        # A dead link never talks to this node again.
        assert await n.at_eof()

    async def body(link: P2PLink) -> None:
        with pytest.raises(NodeError) as info:
            await link.checkpresent(KEY)
        assert not isinstance(info.value, NodeRefused)
        assert link.dead
        with pytest.raises(NodeError, match="connection lost"):
            await link.checkpresent(KEY)
        await link.aclose()

    await session(node, body)


@pytest.mark.parametrize(
    "data",
    [
        b"DATA abc\n",  # unreadable length: the framing is gone
        b"DATA 4\nabcdGARBAGE\n",  # the payload, then no VALID/INVALID
        b"DATA 4\nabcdSUCCESS\n",  # a well-formed line, but not a validity
    ],
    ids=["bad-length", "garbage-validity", "wrong-validity"],
)
async def test_broken_data_framing_on_get(data: bytes) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"GET 0 f {KEY_TEXT}")
        await n.say(data)
        assert await n.at_eof()

    async def body(link: P2PLink) -> None:
        with pytest.raises(NodeError) as info:
            download = await link.get(0, "f", KEY)
            async for _ in download.pieces():
                pass
            await download.validity()
        assert not isinstance(info.value, NodeRefused)
        assert link.dead
        await link.aclose()

    await session(node, body)


# --- node death -------------------------------------------------------------------------------


async def test_node_dies_before_answering() -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await n.close()

    async def body(link: P2PLink) -> None:
        with pytest.raises(NodeError, match="connection closed"):
            await link.checkpresent(KEY)
        assert link.dead

    await session(node, body)


async def test_node_dies_mid_put() -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"PUT f {KEY_TEXT}")
        await n.say("PUT-FROM 0")
        await n.expect("DATA 10")
        assert await n.raw(4) == b"abcd"
        await n.close()

    async def body(link: P2PLink) -> None:
        upload = await link.put("f", KEY)
        assert isinstance(upload, Upload)
        await upload.send_data(10)
        await upload.send_piece(b"abcd")
        with pytest.raises(NodeError):
            await upload.send_piece(b"efghij")
            await upload.finish(True)
        assert link.dead

    await session(node, body)


async def test_node_dies_after_the_data_of_a_put() -> None:
    """All bytes delivered, then no SUCCESS: the node may have kept them or not; the link
    must not report success."""

    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"PUT f {KEY_TEXT}")
        await n.say("PUT-FROM 0")
        await n.expect("DATA 3")
        assert await n.raw(3) == b"abc"
        await n.expect("VALID")
        await n.close()

    async def body(link: P2PLink) -> None:
        upload = await link.put("f", KEY)
        assert isinstance(upload, Upload)
        await upload.send_data(3)
        await upload.send_piece(b"abc")
        with pytest.raises(NodeError, match="connection closed"):
            await upload.finish(True)
        assert link.dead

    await session(node, body)


async def test_node_dies_mid_get() -> None:
    received: list[bytes] = []

    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"GET 0 f {KEY_TEXT}")
        await n.say("DATA 10", b"abcd")
        await n.close()

    async def body(link: P2PLink) -> None:
        download = await link.get(0, "f", KEY)
        assert download.length == 10
        with pytest.raises(NodeError, match="connection closed"):
            async for piece in download.pieces():
                received.append(piece)
        assert link.dead

    await session(node, body)
    # What did arrive was passed on (the proxy streams it; the client sees a short DATA).
    assert b"".join(received) == b"abcd"


# --- hangs ------------------------------------------------------------------------------------


async def test_silent_node_at_open_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    link_end, _node_end = trio.testing.lockstep_stream_pair()
    link = make_link(timeout=7)
    start = trio.current_time()
    with pytest.raises(NodeError, match="no data from peer"):
        await link.attach(link_end, link_end, 4)
    assert trio.current_time() - start == pytest.approx(7)
    assert link.dead


async def test_node_that_never_answers_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await trio.sleep_forever()

    async def body(link: P2PLink) -> None:
        start = trio.current_time()
        with pytest.raises(NodeError, match="no data from peer"):
            await link.checkpresent(KEY)
        assert trio.current_time() - start == pytest.approx(TIMEOUT)
        assert link.dead

    await session(node, body, node_may_wait=True)  # the node hangs on purpose


async def test_node_that_stops_reading_mid_put_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"PUT f {KEY_TEXT}")
        await n.say("PUT-FROM 0")
        await n.expect("DATA 8")
        await trio.sleep_forever()  # alive, but reads no more: back-pressure

    async def body(link: P2PLink) -> None:
        upload = await link.put("f", KEY)
        assert isinstance(upload, Upload)
        await upload.send_data(8)
        start = trio.current_time()
        with pytest.raises(NodeError, match="did not read"):
            await upload.send_piece(b"abcdefgh")
        assert trio.current_time() - start == pytest.approx(TIMEOUT)
        assert link.dead

    await session(node, body, node_may_wait=True)  # the node hangs on purpose


async def test_node_that_stalls_mid_get_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"GET 0 f {KEY_TEXT}")
        await n.say("DATA 10", b"abc")
        await trio.sleep_forever()

    async def body(link: P2PLink) -> None:
        download = await link.get(0, "f", KEY)
        pieces = download.pieces()
        assert await pieces.__anext__() == b"abc"
        start = trio.current_time()
        with pytest.raises(NodeError, match="no data from peer"):
            await pieces.__anext__()
        assert trio.current_time() - start == pytest.approx(TIMEOUT)

    await session(node, body, node_may_wait=True)  # the node hangs on purpose


async def test_request_cut_short_by_the_caller_kills_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The gateway bounds each node call with its own fail_after. A request cancelled that
    way leaves its reply in flight: the node's late FAILURE must never be taken as the
    answer to the next request, so the link is dead (and gets no exit grace on close)."""

    async def node(n: FakeNode) -> None:
        await handshake(n)
        await n.expect(f"CHECKPRESENT {KEY_TEXT}")
        await trio.sleep(5)
        await n.say("FAILURE")  # the late answer
        assert await n.at_eof()

    async def body(link: P2PLink) -> None:
        with trio.move_on_after(2) as scope:
            await link.checkpresent(KEY)
        assert scope.cancelled_caught
        assert link.dead
        await trio.sleep(10)  # the late FAILURE is on its way now
        with pytest.raises(NodeError, match="connection lost"):
            await link.lockcontent(KEY)
        await link.aclose()

    await session(node, body, buffered=True)


# --- a real process ---------------------------------------------------------------------------


async def test_open_a_node_that_is_not_a_repository(tmp_path: object) -> None:
    """`open` spawns our git-annex-shell for a local path; a path that is no repository
    makes it exit before AUTH-SUCCESS, which is a NodeError, not a hang or a crash."""
    remote = Remote("gone", N1, f"{tmp_path}/renamed-away.git", 100.0)
    link = P2PLink(remote, GW1, timeout=TIMEOUT)
    with trio.fail_after(TIMEOUT), pytest.raises(NodeError, match="connection closed"):
        await link.open(4, frozenset({GW1}))
    assert link.dead
    await link.aclose()
    assert link.process is not None and link.process.returncode == 1
