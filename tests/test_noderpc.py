"""The node RPC link (shell/rpclink.py) and our node worker (shell/noderpc.py).

Three layers:

* `RpcLink` against a scripted fake node on in-memory streams: the node answers out of order,
  with typed errors, malformed frames, silence, death, or stalls one stream. Waits run on
  pytest-trio's autojump clock, so a 30 s timeout costs no wall time, and the virtual time
  elapsed shows a wait was bounded by the link's timeout and nothing else.
* The real node worker, spawned as `python -m shell noderpc` on a repository made with the
  real git-annex, driven through `RpcLink`; afterwards the real git-annex checks the node's
  own branch (`whereis`) and objects (`fsck`).
* The proxy end to end: the real client through the fake ssh to our proxy, whose debug log
  (ANNEXPROXY_DEBUG_LINKS) shows which link reached each node.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from conftest import SshEnv, SshEnvFactory, shell_error
from test_e2e_proxy import Site, holders, uuids_of

from git_remote_annexproxy import rpc
from git_remote_annexproxy.gitconfig import GitConfig
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.rpcmethods import (
    ERROR_TYPES,
    AppendOnlyError,
    LockedError,
    NotFoundError,
    ReadOnlyError,
    RpcError,
    StorageIOError,
    TransferInProgressError,
    VerifyFailedError,
)
from shell import restrict
from shell.nodelink import AlreadyHave, NodeError, NodeRefused, Outcome, Upload, link_kind
from shell.proxyselect import Remote
from shell.rpclink import RpcLink

N1 = "40de0000-0000-4000-8000-000000000001"
GW1 = "9a7e0000-0000-4000-8000-000000000001"
KEY = Key.parse("SHA256E-s10--6d2a9b1b9ab5a2c6cc8e55ccde2a3a9a5b8f8e9bcf5d2ee04b5c1a0a3a6d8c4d.bin")
TIMEOUT = 30.0
# How long `session` waits for the node script after the body (generous: a loaded machine
# may be slow to schedule the node's task; a finished script costs nothing of it).
SCRIPT_GRACE = 10.0


def key_of(data: bytes, ext: str = ".bin") -> Key:
    return Key.parse(f"SHA256E-s{len(data)}--{hashlib.sha256(data).hexdigest()}{ext}")


# --- a scripted fake node -----------------------------------------------------------------------


class FakeNode:
    """The node's end of a link: a server codec on a stream, driven by a test script."""

    def __init__(self, stream: trio.abc.Stream, window: int) -> None:
        self.stream = stream
        self.conn = rpc.RpcConnection("server", window=window)

    async def event(self) -> rpc.Event:
        while True:
            event = self.conn.next_event()
            if event is not rpc.NEED_DATA:
                assert not isinstance(event, rpc.NeedData)
                return event
            self.conn.receive_data(await self.stream.receive_some(1 << 16))

    async def request(self, method: str) -> rpc.Request:
        event = await self.event()
        assert isinstance(event, rpc.Request), event
        assert event.method == method, event
        return event

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer(
        self, req: rpc.Request, result: dict[str, Any] | None = None, error: RpcError | None = None
    ) -> None:
        await self.send(self.conn.respond(req.id, result, error))

    async def accept(self) -> None:
        await self.send(self.conn.handshake())
        assert isinstance(await self.event(), rpc.Handshake)
        await self.answer(await self.request("info"), {"uuid": N1, "kind": "repo"})

    async def receive_upload(self, sid: int) -> bytes:
        """Body chunks of an upload until its end, granting credit back as a node does."""
        got = bytearray()
        while True:
            event = await self.event()
            if isinstance(event, rpc.BodyChunk) and event.stream_id == sid:
                got += event.data
                await self.send(self.conn.consumed(sid, len(event.data)))
                if event.end:
                    return bytes(got)


NodeScript = Callable[[FakeNode], Awaitable[None]]


def make_link(timeout: float = TIMEOUT, name: str = "node1") -> RpcLink:
    return RpcLink(Remote(name, N1, f"/srv/{name}.git", 100.0), GW1, timeout=timeout)


async def session(
    script: NodeScript,
    body: Callable[[RpcLink], Awaitable[None]],
    *,
    version: int | None = 4,
    timeout: float = TIMEOUT,
    window: int = rpc.DEFAULT_WINDOW,
    lockstep: bool = False,
    node_may_wait: bool = False,
) -> RpcLink:
    """Attach a link to a fake node running `script` (after the handshake), run `body` on
    the link, close it.

    The script must run to its end: its asserts are the wire checks, and one the link never
    meets leaves it waiting. A script still waiting `SCRIPT_GRACE` seconds after `body`
    fails the test, unless `node_may_wait` says the test means it (a node that hangs on
    purpose); then it is cancelled."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    link_end, node_end = pair()
    link = make_link(timeout)
    node = FakeNode(node_end, window)
    finished = trio.Event()
    node_scope = trio.CancelScope()

    async def run_node() -> None:
        with node_scope:
            await node.accept()
            await script(node)
            finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_node)
        await link.attach(link_end, link_end, version)
        await body(link)
        with trio.move_on_after(SCRIPT_GRACE):
            await finished.wait()
        # Stopped before the close, which it would otherwise see as a (racy) failure.
        node_scope.cancel()
        await link.aclose()
        nursery.cancel_scope.cancel()
    if not finished.is_set() and not node_may_wait:
        pytest.fail(
            f"the fake node's script did not finish within {SCRIPT_GRACE} s of the link's "
            "last action: it waits for something the link never sent; pass "
            "node_may_wait=True if the node hangs on purpose"
        )
    return link


# --- the helper itself -----------------------------------------------------------------------


async def test_session_fails_when_the_node_script_does_not_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An expectation after the link's last action is checked: a node still waiting for a
    request the link never makes fails the test."""

    async def script(node: FakeNode) -> None:
        await node.answer(await node.request("timestamp"), {"ts": 1})
        await node.request("timestamp")  # never made

    async def body(link: RpcLink) -> None:
        assert await link.timestamp() == 1

    with pytest.raises(pytest.fail.Exception, match="did not finish"):
        await session(script, body)
    # The explicit opt-out, for a node that hangs on purpose.
    await session(script, body, node_may_wait=True)


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_calls_on_one_link_complete_out_of_order() -> None:
    async def script(node: FakeNode) -> None:
        reqs = [await node.request(m) for m in ("checkpresent", "timestamp", "lock")]
        # All three are in flight at once; answer them last to first.
        await node.answer(reqs[2], {"lock": 7})
        await node.answer(reqs[1], {"ts": 1234})
        await node.answer(reqs[0], {"present": [True]})

    results: dict[str, object] = {}

    async def body(link: RpcLink) -> None:
        async def run(name: str, call: Callable[[], Awaitable[object]]) -> None:
            results[name] = await call()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "present", lambda: link.checkpresent(KEY))
            await trio.sleep(0.01)
            nursery.start_soon(run, "ts", link.timestamp)
            await trio.sleep(0.01)
            nursery.start_soon(run, "lock", lambda: link.lockcontent(KEY))

    await session(script, body)
    assert results == {"present": True, "ts": 1234, "lock": True}


async def test_batched_checkpresent_splits_at_max_batch() -> None:
    keys = [Key.parse(f"WORM-s{i}--k{i}") for i in range(300)]

    async def script(node: FakeNode) -> None:
        for start in (0, 256):
            req = await node.request("checkpresent")
            batch = req.params["keys"]
            assert batch == [str(k) for k in keys[start : start + 256]]
            await node.answer(req, {"present": [int(k.split("-s")[1].split("-")[0]) % 3 == 0
                                                for k in batch]})  # fmt: skip

    async def body(link: RpcLink) -> None:
        assert await link.checkpresent_many(keys) == [i % 3 == 0 for i in range(300)]

    await session(script, body)


# --- typed errors: one call fails, the link carries on ------------------------------------------


def refused(text: str) -> NodeRefused:
    return NodeRefused("node1", text)


async def _outcome(link: RpcLink, method: str) -> object:
    if method == "remove":
        return await link.remove(KEY, None)
    if method == "lock":
        return await link.lockcontent(KEY)
    if method == "put_begin":
        return await link.put(None, KEY)
    if method == "checkpresent":
        return await link.checkpresent(KEY)
    assert method == "get"
    download = await link.get(0, None, KEY)
    return (download.length, [p async for p in download.pieces()], await download.validity())


@pytest.mark.parametrize(
    ("method", "error", "expected"),
    [
        ("remove", LockedError("content is locked"), Outcome(False)),
        # The node's text is what a P2P node would have said in ERROR; the proxy relays it.
        ("remove", ReadOnlyError(restrict.READONLY_DENIED), refused(restrict.READONLY_DENIED)),
        ("remove", AppendOnlyError("append-only"), refused("append-only")),
        ("lock", NotFoundError("content not present"), False),
        ("lock", LockedError("content is locked"), False),
        ("put_begin", TransferInProgressError("in progress"), refused("in progress")),
        ("get", NotFoundError("content not present"), (0, [], False)),
        ("checkpresent", StorageIOError("disk on fire"), refused("disk on fire")),
        # A node newer than us may send an error type we do not know: still a refusal.
        ("remove", RpcError("quota", error_type="x-quota"), refused("quota")),
    ],
)  # fmt: skip
async def test_typed_errors_map_to_outcomes(method: str, error: RpcError, expected: object) -> None:
    async def script(node: FakeNode) -> None:
        req = await node.request(method)
        if error.error_type in ERROR_TYPES:
            await node.answer(req, error=error)
        else:  # our codec sends only the types it knows
            wire = {"type": error.error_type, "message": error.message}
            await node.send(msgpack.packb([1, req.id, wire, None]))
        await node.answer(await node.request("timestamp"), {"ts": 99})

    async def body(link: RpcLink) -> None:
        if isinstance(expected, NodeRefused):
            with pytest.raises(NodeRefused) as caught:
                await _outcome(link, method)
            assert caught.value.text == expected.text
        else:
            assert await _outcome(link, method) == expected
        assert await link.timestamp() == 99  # the link is still usable
        assert not link.dead

    await session(script, body)


async def test_a_malformed_result_fails_that_call_only() -> None:
    async def script(node: FakeNode) -> None:
        req = await node.request("timestamp")
        # Well framed, wrong type: the codec makes it a protocol error for this call.
        await node.send(msgpack.packb([1, req.id, None, {"ts": "soon"}]))
        await node.answer(await node.request("timestamp"), {"ts": 5})

    async def body(link: RpcLink) -> None:
        with pytest.raises(NodeError) as caught:
            await link.timestamp()
        assert not isinstance(caught.value, NodeRefused)
        assert await link.timestamp() == 5
        assert not link.dead

    await session(script, body)


# --- uploads ------------------------------------------------------------------------------------


async def test_upload_streams_under_the_nodes_credit() -> None:
    data = os.urandom(300_000)
    key = key_of(data)

    async def script(node: FakeNode) -> None:
        req = await node.request("put_begin")
        assert req.params == {"key": str(key), "af": "dir/f.bin"}
        await node.answer(req, {"offset": 0})
        # A 64 KiB window: the link must wait for credit four times over.
        assert await node.receive_upload(req.id) == data
        fin = await node.request("put_finish")
        assert fin.params == {"upload": req.id, "valid": True}
        await node.answer(fin, {})

    async def body(link: RpcLink) -> None:
        upload = await link.put("dir/f.bin", key)
        assert isinstance(upload, Upload) and upload.offset == 0
        await upload.send_data(len(data))
        await upload.send_piece(data[:100_000])
        await upload.send_piece(data[100_000:])
        assert await upload.finish(True) == Outcome(True)

    await session(script, body, window=64 << 10)


@pytest.mark.parametrize(
    ("error", "valid"), [(VerifyFailedError("verification of content failed"), True),
                         (StorageIOError("short"), True), (None, False)]
)  # fmt: skip
async def test_upload_failures_answer_failure(error: RpcError | None, valid: bool) -> None:
    data = b"0123456789"

    async def script(node: FakeNode) -> None:
        req = await node.request("put_begin")
        await node.answer(req, {"offset": 3})  # a resume: only the rest is sent
        assert await node.receive_upload(req.id) == data[3:]
        fin = await node.request("put_finish")
        assert fin.params["valid"] is valid
        await node.answer(fin, None if error else {}, error)

    async def body(link: RpcLink) -> None:
        upload = await link.put(None, KEY)
        assert isinstance(upload, Upload) and upload.offset == 3
        await upload.send_data(7)
        await upload.send_piece(data[3:])
        assert await upload.finish(valid) == Outcome(error is None)

    await session(script, body)


async def test_upload_of_the_wrong_size_sends_nothing() -> None:
    async def script(node: FakeNode) -> None:
        req = await node.request("put_begin")
        await node.answer(req, {"offset": 0})
        assert await node.receive_upload(req.id) == b""
        fin = await node.request("put_finish")
        assert fin.params["valid"] is False  # the node keeps its partial and says no
        await node.answer(fin, error=VerifyFailedError("the sender said INVALID"))

    async def body(link: RpcLink) -> None:
        upload = await link.put(None, KEY)  # KEY is 10 bytes
        assert isinstance(upload, Upload)
        await upload.send_data(11)
        await upload.send_piece(b"x" * 11)
        assert await upload.finish(True) == Outcome(False)

    await session(script, body)


async def test_already_have() -> None:
    async def script(node: FakeNode) -> None:
        await node.answer(await node.request("put_begin"), {"offset": None})

    async def body(link: RpcLink) -> None:
        assert await link.put(None, KEY) == AlreadyHave()

    await session(script, body)


async def test_node_that_cancels_an_upload() -> None:
    """The node stops an upload (say its disk failed): the link stops sending at once."""

    async def script(node: FakeNode) -> None:
        req = await node.request("put_begin")
        await node.answer(req, {"offset": 0})
        await node.send(node.conn.cancel(req.id))
        assert await node.receive_upload(req.id) == b""  # nothing after the cancel arrives
        await node.answer(await node.request("put_finish"), error=StorageIOError("no space"))

    async def body(link: RpcLink) -> None:
        upload = await link.put(None, KEY)
        assert isinstance(upload, Upload)
        await upload.send_data(10)
        await trio.sleep(0.1)  # the cancel arrives
        await upload.send_piece(b"0123456789")
        assert await upload.finish(True) == Outcome(False)

    await session(script, body)


# --- a node that dies, hangs, stalls or breaks the protocol -------------------------------------


async def test_node_dies_mid_upload_fails_only_its_calls() -> None:
    """node1 dies while an upload waits for credit and another call waits for its answer:
    both fail at once with NodeError; node2, on its own link, is not disturbed."""
    died = trio.Event()

    async def dying(node: FakeNode) -> None:
        req = await node.request("put_begin")
        await node.answer(req, {"offset": 0})
        seen: set[str] = set()
        while seen != {"Request", "BodyChunk"}:  # the timestamp (never answered), a chunk
            seen.add(type(await node.event()).__name__)
        await node.stream.aclose()
        died.set()

    async def healthy(node: FakeNode) -> None:
        await died.wait()
        await node.answer(await node.request("timestamp"), {"ts": 7})

    data = os.urandom(1 << 20)
    key = key_of(data)
    errors: list[str] = []

    async def body1(link: RpcLink) -> None:
        upload = await link.put(None, key)
        assert isinstance(upload, Upload)

        async def pending_call() -> None:
            with pytest.raises(NodeError):
                await link.timestamp()
            errors.append("timestamp")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pending_call)
            await upload.send_data(len(data))
            with pytest.raises(NodeError):
                await upload.send_piece(data)  # more than the 64 KiB window
            errors.append("upload")
        assert link.dead
        with pytest.raises(NodeError):
            await link.checkpresent(KEY)  # and nothing more goes to a dead node

    async def body2(link: RpcLink) -> None:
        assert await link.timestamp() == 7

    start = trio.current_time()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: session(dying, body1, window=64 << 10))
            nursery.start_soon(lambda: session(healthy, body2))
    assert sorted(errors) == ["timestamp", "upload"]
    assert trio.current_time() - start < 5


async def test_silent_node_at_handshake_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    link_end, _node_end = trio.testing.memory_stream_pair()
    link = make_link(timeout=7)
    start = trio.current_time()
    with pytest.raises(NodeError, match="no handshake"):
        await link.attach(link_end, link_end, 4)
    assert trio.current_time() - start == pytest.approx(7)
    assert link.dead
    await link.aclose()


async def test_unanswered_call_is_bounded_and_a_late_lock_is_released(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The node answers `lock` after the caller gave up: the link unlocks it, so the node
    holds nothing for a caller that is gone; the link itself stays usable."""

    async def script(node: FakeNode) -> None:
        req = await node.request("lock")
        await trio.sleep(TIMEOUT + 5)
        await node.answer(req, {"lock": 42})
        unlock = await node.request("unlock")
        assert unlock.params == {"lock": 42}
        await node.answer(unlock, {})
        await node.answer(await node.request("timestamp"), {"ts": 3})

    async def body(link: RpcLink) -> None:
        start = trio.current_time()
        with pytest.raises(NodeError, match="no answer to lock"):
            await link.lockcontent(KEY)
        assert trio.current_time() - start == pytest.approx(TIMEOUT)
        await trio.sleep(10)
        assert await link.timestamp() == 3

    await session(script, body)


async def test_callers_own_deadline_also_releases_a_late_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def script(node: FakeNode) -> None:
        req = await node.request("lock")
        await trio.sleep(5)
        await node.answer(req, {"lock": 9})
        assert (await node.request("unlock")).params == {"lock": 9}

    async def body(link: RpcLink) -> None:
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(2):
                await link.lockcontent(KEY)
        await trio.sleep(10)

    await session(script, body)


async def test_node_that_stops_reading_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    """Lockstep streams: the node reads nothing after put_begin, so the link's writes block.
    The link dies after its timeout instead of hanging."""

    async def script(node: FakeNode) -> None:
        req = await node.request("put_begin")
        await node.answer(req, {"offset": 0})
        await trio.sleep_forever()

    async def body(link: RpcLink) -> None:
        upload = await link.put(None, KEY)
        assert isinstance(upload, Upload)
        await upload.send_data(10)
        await upload.send_piece(b"0123456789")
        start = trio.current_time()
        with pytest.raises(NodeError):
            await upload.finish(True)
        assert trio.current_time() - start <= TIMEOUT + 1
        await trio.sleep(1)  # the write that never progressed has failed by now, if not before
        assert link.dead

    await session(script, body, lockstep=True, node_may_wait=True)  # it hangs on purpose


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\xc6\x7f\xff\xff\xff",  # a 2 GiB bin: refused on its header
        b"\xdf\x7f\xff\xff\xff",  # a map of 2**31 pairs: refused on its header
        msgpack.packb([1, 999, None, {}]),  # an answer to a request never made
        msgpack.packb([3, 999, b"x", False]),  # a body chunk for no stream
        msgpack.packb(["not", "a", "frame"]),
    ],
)
async def test_malformed_frame_kills_the_link(garbage: bytes) -> None:
    async def script(node: FakeNode) -> None:
        await node.request("timestamp")
        await node.send(garbage)

    async def body(link: RpcLink) -> None:
        with trio.fail_after(5), pytest.raises(NodeError, match="protocol error"):
            await link.timestamp()
        assert link.dead
        with pytest.raises(NodeError):
            await link.checkpresent(KEY)

    await session(script, body)


async def test_stalled_download_does_not_block_a_small_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A download whose node stops sending: a presence check on the same link is answered
    meanwhile, the download fails alone after the timeout, and the node is told to stop."""

    async def script(node: FakeNode) -> None:
        get = await node.request("get")
        await node.answer(get, {"length": 1 << 20})
        await node.send(node.conn.send_body(get.id, b"x" * 1000))
        await node.answer(await node.request("checkpresent"), {"present": [False]})
        cancel = await node.event()
        assert cancel == rpc.StreamCancelled(get.id)
        await node.send(node.conn.send_body(get.id, b"", end=True))
        await node.answer(await node.request("timestamp"), {"ts": 11})

    async def body(link: RpcLink) -> None:
        download = await link.get(0, None, KEY)
        pieces = download.pieces()
        assert await pieces.__anext__() == b"x" * 1000
        assert await link.checkpresent(KEY) is False  # not stuck behind the download
        start = trio.current_time()
        with pytest.raises(NodeError, match="no data"):
            await pieces.__anext__()
        assert trio.current_time() - start == pytest.approx(TIMEOUT)
        assert await link.timestamp() == 11
        assert not link.dead

    await session(script, body)


async def test_download_follows_the_links_credit() -> None:
    """10 MiB through a 4 MiB window: the fake node sends only what it has credit for (its
    codec would refuse more), so the download completes only if the link grants it back."""
    data = os.urandom(10 << 20)

    async def script(node: FakeNode) -> None:
        get = await node.request("get")
        assert get.params == {"key": str(KEY), "offset": 0, "af": None}
        await node.answer(get, {"length": len(data)})
        sent = 0
        while sent < len(data):
            credit = node.conn.available_credit(get.id)
            if credit == 0:
                event = await node.event()
                assert isinstance(event, rpc.CreditGranted), event
                continue
            n = min(credit, len(data) - sent, 1 << 20)
            await node.send(node.conn.send_body(get.id, data[sent : sent + n]))
            sent += n
        await node.send(node.conn.send_body(get.id, b"", end=True))

    async def body(link: RpcLink) -> None:
        download = await link.get(0, None, KEY)
        assert download.length == len(data)
        assert b"".join([p async for p in download.pieces()]) == data
        assert await download.validity() is True

    with trio.fail_after(20):
        await session(script, body)


@pytest.mark.parametrize("version", [4, 0])
async def test_short_download(version: int) -> None:
    """A stream that ends early means the node could not read the rest: from version 1 the
    client still gets DATA's full length, then INVALID; below, the link can only fail."""

    async def script(node: FakeNode) -> None:
        get = await node.request("get")
        await node.answer(get, {"length": 10})
        await node.send(node.conn.send_body(get.id, b"abcd", end=True))

    async def body(link: RpcLink) -> None:
        download = await link.get(0, None, KEY)
        if version == 0:
            with pytest.raises(NodeError, match="ended at 4 of 10"):
                [p async for p in download.pieces()]
            return
        assert b"".join([p async for p in download.pieces()]) == b"abcd" + bytes(6)
        assert await download.validity() is False

    await session(script, body, version=version)


async def test_wrong_uuid_is_refused() -> None:
    link_end, node_end = trio.testing.memory_stream_pair()
    node = FakeNode(node_end, rpc.DEFAULT_WINDOW)
    link = make_link()

    async def run_node() -> None:
        await node.send(node.conn.handshake())
        await node.event()
        req = await node.request("info")
        await node.answer(req, {"uuid": "someone-else", "kind": "repo"})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_node)
        with pytest.raises(NodeError, match="expected UUID"):
            await link.attach(link_end, link_end, 4)
    await link.aclose()


# --- which link reaches which node --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "settings", "via", "expected"),
    [
        ("/srv/node1.git", {}, False, "rpc"),
        ("/srv/node1.git", {"annexproxy-link": "p2p"}, False, "p2p"),
        ("localhost:/srv/node1.git", {}, False, "p2p"),  # maybe a real git-annex-shell
        ("localhost:/srv/node1.git", {"annexproxy-noderpc": "true"}, False, "rpc"),
        (
            "localhost:/srv/node1.git",
            {"annexproxy-noderpc": "1", "annexproxy-link": "p2p"},
            False,
            "p2p",
        ),
        ("localhost:/srv/gw2.git", {"annexproxy-noderpc": "true"}, True, "p2p"),
    ],
)
def test_link_kind(url: str, settings: dict[str, str], via: bool, expected: str) -> None:
    config = GitConfig([(f"remote.node1.{k}", v) for k, v in settings.items()])
    gateway = Remote("gw2", "9a7e0000-0000-4000-8000-000000000002", url, 200.0)
    remote = Remote("node1", N1, url, 100.0, via=gateway if via else None)
    assert link_kind(remote, config) == expected


def test_local_node_argv_runs_our_interpreter() -> None:
    assert make_link().argv() == [sys.executable, "-m", "shell", "noderpc", "/srv/node1.git", GW1]


# --- the real node worker -----------------------------------------------------------------------


def node_repo(env: SshEnv, name: str = "node1") -> tuple[Path, str]:
    path = env.make_server_repo(f"{name}.git", name)
    uuid = env.run(["git", "config", "annex.uuid"], cwd=path, admin=True).stdout.strip()
    return path, uuid


@pytest.fixture
def node(ssh_env: SshEnvFactory, monkeypatch: pytest.MonkeyPatch) -> tuple[SshEnv, Path, str]:
    env = ssh_env()
    # The worker inherits our environment (minus restrictions): give it the server's HOME.
    monkeypatch.setenv("HOME", str(env.server_home))
    path, uuid = node_repo(env)
    return env, path, uuid


def worker_link(path: Path, uuid: str) -> RpcLink:
    return RpcLink(Remote("node1", uuid, str(path), 100.0), GW1, timeout=TIMEOUT)


async def put(link: RpcLink, key: Key, data: bytes, af: str | None = None) -> Outcome:
    upload = await link.put(af, key)
    assert isinstance(upload, Upload)
    await upload.send_data(len(data) - upload.offset)
    for i in range(upload.offset, len(data), 300_000):
        await upload.send_piece(data[i : i + 300_000])
    return await upload.finish(True)


async def get(link: RpcLink, key: Key, offset: int = 0) -> tuple[bytes, bool | None]:
    download = await link.get(offset, None, key)
    data = b"".join([p async for p in download.pieces()])
    assert len(data) == download.length
    return data, await download.validity()


async def test_worker_serves_every_call(node: tuple[SshEnv, Path, str]) -> None:
    _env, path, uuid = node
    data = os.urandom(10 << 20)  # beyond a window both ways: credit flows for real
    key = key_of(data)
    others = [key_of(str(i).encode()) for i in range(299)]
    link = worker_link(path, uuid)
    with trio.fail_after(60):
        await link.open(4)
        try:
            assert await link.checkpresent(key) is False
            assert await put(link, key, data, "big file.bin") == Outcome(True)
            assert await link.put(None, key) == AlreadyHave()
            present = await link.checkpresent_many([*others, key])  # two round trips
            assert present == [False] * 299 + [True]
            assert await get(link, key) == (data, True)
            assert await get(link, key, offset=len(data) - 5) == (data[-5:], True)
            assert await get(link, key_of(b"absent")) == (b"", False)
            ts = await link.timestamp()
            assert abs(ts - time.monotonic()) < 5  # the same machine's monotonic clock
            # Locked: removal refused; unlocked: it goes.
            assert await link.lockcontent(key) is True
            assert await link.remove(key, None) == Outcome(False)
            await link.unlockcontent()
            assert await link.remove(key, ts - 1) == Outcome(False)  # deadline passed
            assert await link.checkpresent(key) is True
            assert await link.remove(key, None) == Outcome(True)
            assert await link.checkpresent(key) is False
            assert await link.remove(key, None) == Outcome(True)  # absent is removed
            assert await link.lockcontent(key) is False
        finally:
            await link.aclose()
    assert link.process is not None and link.process.returncode == 0


async def test_worker_runs_calls_concurrently(node: tuple[SshEnv, Path, str]) -> None:
    _env, path, uuid = node
    files = [os.urandom(200_000 + i) for i in range(6)]
    link = worker_link(path, uuid)
    with trio.fail_after(60):
        await link.open(4)
        try:
            async with trio.open_nursery() as nursery:
                for data in files:
                    nursery.start_soon(put, link, key_of(data), data)
            got: dict[int, bytes] = {}

            async def fetch(i: int) -> None:
                got[i], _ = await get(link, key_of(files[i]))

            async with trio.open_nursery() as nursery:
                for i in range(len(files)):
                    nursery.start_soon(fetch, i)
            assert [got[i] for i in range(len(files))] == files
        finally:
            await link.aclose()


async def test_worker_resumes_a_cut_upload(node: tuple[SshEnv, Path, str]) -> None:
    _env, path, uuid = node
    data = os.urandom(3 << 20)
    key = key_of(data)
    half = 1_500_000
    with trio.fail_after(60):
        link = worker_link(path, uuid)
        await link.open(4)
        upload = await link.put(None, key)
        assert isinstance(upload, Upload) and upload.offset == 0
        await upload.send_data(len(data))
        await upload.send_piece(data[:half])
        await link.aclose()  # the link dies mid-body
        partial = path / "annex" / "tmp" / key.keyfile()
        assert partial.stat().st_size == half

        link = worker_link(path, uuid)
        await link.open(4)
        try:
            upload = await link.put(None, key)
            assert isinstance(upload, Upload) and upload.offset == half
            await upload.send_data(len(data) - half)
            await upload.send_piece(data[half:])
            assert await upload.finish(True) == Outcome(True)
            assert await get(link, key) == (data, True)
        finally:
            await link.aclose()
    assert not partial.exists()


async def test_worker_keeps_nothing_that_does_not_verify(node: tuple[SshEnv, Path, str]) -> None:
    _env, path, uuid = node
    data = os.urandom(100_000)
    key = key_of(data)
    wrong = bytes(b ^ 1 for b in data)  # the right size, the wrong content
    link = worker_link(path, uuid)
    with trio.fail_after(60):
        await link.open(4)
        try:
            assert await put(link, key, wrong) == Outcome(False)
            assert await link.checkpresent(key) is False
            assert not (path / "annex" / "tmp" / key.keyfile()).exists()
            assert await put(link, key, data) == Outcome(True)  # and the right one goes in
        finally:
            await link.aclose()


async def test_worker_invalid_and_wrong_size_uploads(node: tuple[SshEnv, Path, str]) -> None:
    """A body of the wrong size is not sent at all, so a resumable partial survives it; a
    body the client calls INVALID (its file changed while sent) is verified all the same,
    as git-annex-shell p2pstdio does (the p2pstdio session and this worker share that rule
    in shell/service/repository.py; before it the worker threw such a body away)."""
    _env, path, uuid = node
    data = os.urandom(200_000)
    key = key_of(data)
    partial = path / "annex" / "tmp" / key.keyfile()
    with trio.fail_after(60):
        link = worker_link(path, uuid)
        await link.open(4)
        upload = await link.put(None, key)
        assert isinstance(upload, Upload)
        await upload.send_data(len(data))
        await upload.send_piece(data[:50_000])
        await link.aclose()  # cut: a 50 kB partial
        assert partial.stat().st_size == 50_000

        link = worker_link(path, uuid)
        await link.open(4)
        try:
            upload = await link.put(None, key)
            assert isinstance(upload, Upload) and upload.offset == 50_000
            await upload.send_data(len(data))  # as if from 0: cannot be right
            await upload.send_piece(data)
            assert await upload.finish(True) == Outcome(False)
            assert partial.stat().st_size == 50_000

            upload = await link.put(None, key)
            assert isinstance(upload, Upload) and upload.offset == 50_000
            await upload.send_data(len(data) - 50_000)
            await upload.send_piece(b"\0" * (len(data) - 50_000))  # changed while sent
            assert await upload.finish(False) == Outcome(False)  # INVALID, and wrong
            assert await link.checkpresent(key) is False

            upload = await link.put(None, key)
            assert isinstance(upload, Upload)
            await upload.send_data(len(data) - upload.offset)
            await upload.send_piece(data[upload.offset :])
            assert await upload.finish(False) == Outcome(True)  # INVALID, but it verifies
            assert await link.checkpresent(key) is True
        finally:
            await link.aclose()


async def test_worker_logs_itself_and_real_fsck_is_clean(node: tuple[SshEnv, Path, str]) -> None:
    env, path, uuid = node
    data, gone = os.urandom(50_000), os.urandom(40_000)
    link = worker_link(path, uuid)
    with trio.fail_after(60):
        await link.open(4)
        try:
            assert await put(link, key_of(data), data) == Outcome(True)
            assert await put(link, key_of(gone), gone) == Outcome(True)
            assert await link.remove(key_of(gone), None) == Outcome(True)
        finally:
            await link.aclose()  # the node commits its journal as the link closes
    assert not any((path / "annex" / "journal").glob("*.log"))

    def whereis(key: Key) -> set[str]:
        proc = env.run(["git", "annex", "whereis", "--json", "--key", str(key)], cwd=path,
                       admin=True, check=False)  # fmt: skip
        record = json.loads(proc.stdout.splitlines()[-1])
        return {e["uuid"] for e in record["whereis"]}

    assert whereis(key_of(data)) == {uuid}
    assert whereis(key_of(gone)) == set()
    # Every key the node's log says it has: present, and its content checks out. (The
    # removed key would only draw "no known copies", which is true.)
    fsck = env.run(["git", "annex", "fsck", "--all", "--in", "here"], cwd=path, admin=True,
                   check=False)  # fmt: skip
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "fixing location log" not in fsck.stdout + fsck.stderr
    assert f"fsck {key_of(data)} (checksum...) ok" in fsck.stdout


async def test_worker_lock_retention_outlives_the_link(node: tuple[SshEnv, Path, str]) -> None:
    """A client's drop proof relies on the lock: if the proxy vanishes while it is held, the
    retention file keeps the content for its 10 minutes, as p2pstdio does."""
    _env, path, uuid = node
    data = os.urandom(1000)
    key = key_of(data)
    with trio.fail_after(60):
        link = worker_link(path, uuid)
        await link.open(4)
        assert await put(link, key, data) == Outcome(True)
        assert await link.lockcontent(key) is True
        await link.aclose()  # gone without UNLOCKCONTENT

        link = worker_link(path, uuid)
        await link.open(4)
        try:
            assert await link.remove(key, None) == Outcome(False)
            assert await link.checkpresent(key) is True
        finally:
            await link.aclose()


async def _spawn_worker(path: Path, uuid: str, env: dict[str, str]) -> RpcLink:
    """A worker started by the test itself, so its environment can carry restrictions
    (a link scrubs them from the workers it starts)."""
    link = worker_link(path, uuid)
    link.process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "shell", "noderpc", str(path), GW1],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert link.process.stdout is not None and link.process.stdin is not None
    await link.attach(link.process.stdout, link.process.stdin, 4)
    return link


@pytest.mark.parametrize("mode", ["READONLY", "APPENDONLY"])
async def test_worker_restrictions(node: tuple[SshEnv, Path, str], mode: str) -> None:
    _env, path, uuid = node
    data = os.urandom(1000)
    key = key_of(data)
    with trio.fail_after(60):
        link = worker_link(path, uuid)
        await link.open(4)
        assert await put(link, key, data) == Outcome(True)
        await link.aclose()

        # A restricted key's worker runs only where the admin allowed noderpc for it.
        env = {**os.environ, f"GIT_ANNEX_SHELL_{mode}": "1", restrict.ALLOW_NODERPC: "1"}
        link = await _spawn_worker(path, uuid, env)
        try:
            other = os.urandom(500)
            if mode == "READONLY":
                with pytest.raises(NodeRefused) as caught:
                    await link.put(None, key_of(other))
                assert caught.value.text == restrict.READONLY_DENIED
            else:
                assert await put(link, key_of(other), other) == Outcome(True)
            with pytest.raises(NodeRefused) as caught:
                await link.remove(key, None)
            denied = restrict.READONLY_DENIED if mode == "READONLY" else restrict.APPENDONLY_DENIED
            assert caught.value.text == denied
            assert await get(link, key) == (data, True)  # reading is always allowed
        finally:
            await link.aclose()
    assert link.process is not None and link.process.returncode == 0


@pytest.mark.parametrize(
    "garbage",
    [b"\xc1", b"\xc6\x7f\xff\xff\xff", msgpack.packb([0, 1, "info", {}])],  # the last: no HELLO
)
def test_worker_ends_on_a_malformed_frame(node: tuple[SshEnv, Path, str], garbage: bytes) -> None:
    _env, path, _uuid = node
    proc = subprocess.run(
        [sys.executable, "-m", "shell", "noderpc", str(path)],
        input=garbage, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("git-annex-shell: noderpc: protocol error")
    # stdout holds RPC frames only: the worker's HELLO (flushed as it ends), nothing else.
    frames = list(msgpack.Unpacker(io.BytesIO(proc.stdout), raw=False))
    assert [f[0] for f in frames] == [5]


def test_worker_is_not_proxyable(ssh_env: SshEnvFactory) -> None:
    """noderpc serves the repository it names, never one behind it (it is not in
    PROXYABLE): a proxy asked for its node's UUID refuses."""
    site = Site(ssh_env())
    px = site.proxy(nodes=("node1",))
    node1 = site.uuid(px.nodes["node1"])
    proc = subprocess.run(
        [sys.executable, "-m", "shell", "noderpc", str(px.gateway), "--uuid", node1],
        input=b"", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert proc.stderr.decode() == shell_error("Cannot proxy noderpc command.")  # ours only


# --- the proxy, end to end ----------------------------------------------------------------------


@pytest.fixture
def logged_site(ssh_env: SshEnvFactory) -> tuple[Site, Path]:
    """A site whose server processes append their link choices to a log."""
    env = ssh_env()
    log = env.root / "links.jsonl"
    env["FAKESSH_PASSENV"] = "ANNEXPROXY_DEBUG_LINKS"
    env["ANNEXPROXY_DEBUG_LINKS"] = str(log)
    return Site(env), log


def link_records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_proxy_reaches_local_nodes_through_noderpc(logged_site: tuple[Site, Path]) -> None:
    """node1 (a local path) goes through noderpc; node2 is forced to P2P by its config."""
    site, log = logged_site
    px = site.proxy()
    site.admin(px.gateway, "git", "config", "remote.node2.annexproxy-link", "p2p")
    u = uuids_of(site, px.nodes)
    client = site.clone(px.gateway)
    files = {"one.bin": os.urandom(2 << 20), "two.txt": b"two\n"}
    keys = site.add_files(client, files)
    everywhere = {**px.nodes, "proxy": px.gateway}

    copy = site.client(client, "git", "annex", "copy", "--to", "origin-node1", *files)
    assert "noderpc" not in copy.stderr  # a link that ends normally says nothing
    site.client(client, "git", "annex", "copy", "--to", "origin-node2", "two.txt")
    for name, key in keys.items():
        expected = {"node1", "node2"} if name == "two.txt" else {"node1"}
        assert holders(site, everywhere, key, files[name]) == expected
        assert site.whereis(px.nodes["node1"], key) == {u["node1"]}
    site.client(client, "git", "annex", "drop", *files)  # LOCKCONTENT through both links
    site.client(client, "git", "annex", "get", "--from", "origin-node1", "one.bin")
    assert (client / "one.bin").read_bytes() == files["one.bin"]
    site.client(client, "git", "annex", "drop", "--from", "origin-node1", "one.bin")
    assert holders(site, everywhere, keys["one.bin"], files["one.bin"]) == set()
    site.fsck_clean(px.nodes["node1"])

    records = link_records(log)
    kinds = {(r["remote"], r["link"]) for r in records}
    assert kinds == {("node1", "RpcLink"), ("node2", "P2PLink")}, records
    for r in records:  # our interpreter, never whatever PATH finds
        assert Path(r["argv"][0]).name.startswith("python"), r
        command = "noderpc" if r["remote"] == "node1" else "p2pstdio"
        assert r["argv"][1:5] == ["-m", "shell", command, str(px.nodes[r["remote"]])], r


def test_cluster_node_over_ssh_marked_as_ours(logged_site: tuple[Site, Path]) -> None:
    """An ssh node marked annexproxy-noderpc runs `git-annex-shell noderpc` through ssh,
    where its admin allowed noderpc for the proxy's key."""
    site, log = logged_site
    # The fake ssh has no per-key settings for a server-side hop: the variable reaches the
    # gateway's session as well as the node's, where only the node's reads it.
    site.env["FAKESSH_PASSENV"] += f" {restrict.ALLOW_NODERPC}"
    site.env[restrict.ALLOW_NODERPC] = "1"
    cl = site.cluster()
    site.admin(cl.gateway, "git", "config", "remote.node2.url", f"localhost:{cl.nodes['node2']}")
    site.admin(cl.gateway, "git", "config", "remote.node2.annexproxy-noderpc", "true")
    u = uuids_of(site, cl.nodes)
    client = site.clone(cl.gateway)
    files = {"c.bin": os.urandom(700_000)}
    key = site.add_files(client, files)["c.bin"]

    site.client(client, "git", "annex", "copy", "--to", "origin-mycluster", "c.bin")
    assert holders(site, cl.nodes, key, files["c.bin"]) == {"node1", "node2"}
    assert site.whereis(cl.gateway, key) == {u["node1"], u["node2"], cl.uuid}
    assert site.whereis(cl.nodes["node2"], key) == {u["node2"]}

    records = {r["remote"]: r for r in link_records(log)}
    assert records["node1"]["link"] == records["node2"]["link"] == "RpcLink"
    ssh = records["node2"]["argv"]
    assert ssh[0] == "ssh" and ssh[-1].startswith("git-annex-shell noderpc "), ssh
    ssh_calls = [json.loads(line) for line in site.env.log.read_text().splitlines()]
    assert any("noderpc" in json.dumps(call) for call in ssh_calls)


def test_ssh_node_refuses_noderpc_without_the_opt_in(logged_site: tuple[Site, Path]) -> None:
    """The same node without ANNEXPROXY_ALLOW_NODERPC: its forced command refuses noderpc
    with one line, which reaches the client; the cluster stores on the other node."""
    site, _log = logged_site
    cl = site.cluster()
    site.admin(cl.gateway, "git", "config", "remote.node2.url", f"localhost:{cl.nodes['node2']}")
    site.admin(cl.gateway, "git", "config", "remote.node2.annexproxy-noderpc", "true")
    client = site.clone(cl.gateway)
    files = {"c.bin": os.urandom(70_000)}
    key = site.add_files(client, files)["c.bin"]

    copy = site.client(client, "git", "annex", "copy", "--to", "origin-mycluster", "c.bin",
                       check=False)  # fmt: skip
    assert f"git-annex-shell: {restrict.NODERPC_REFUSED}" in copy.stderr.splitlines()
    assert holders(site, cl.nodes, key, files["c.bin"]) == {"node1"}
