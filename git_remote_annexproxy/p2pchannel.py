"""One P2P connection over a pair of trio streams: the codec plus bounded waits.

The codec (`p2p.py`) knows nothing about I/O; this is the thin trio edge that the server,
the proxy's node links and the client all use. Every wait is bounded: a peer that stops
sending or stops reading is cut off after `idle_timeout` seconds.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable

import trio

from git_remote_annexproxy import p2p

READ_SIZE = 1 << 20
DEFAULT_IDLE_TIMEOUT = p2p.DEFAULT_IDLE_TIMEOUT


class ChannelTimeout(Exception):
    """The peer neither sent nor accepted anything for the idle timeout."""


class P2PChannel:
    def __init__(
        self,
        receive: trio.abc.ReceiveStream,
        send: trio.abc.SendStream,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_line: int = 32768,
    ) -> None:
        self._receive = receive
        self._send = send
        self.idle_timeout = idle_timeout
        self.conn = p2p.P2PConnection(max_line=max_line)
        self.bytes_in = 0
        self.bytes_out = 0
        self._eof = False

    async def next_event(self, *, data: bool = True) -> p2p.Event:
        """The next event; raises p2p.RemoteProtocolError or ChannelTimeout. `data`: may a
        DATA payload start here (see `p2p.P2PConnection.next_event`)?"""
        while True:
            event = self.conn.next_event(data=data)
            if event is not p2p.NEED_DATA:
                assert not isinstance(event, p2p.NeedData)
                return event
            if self._eof:
                # The codec always reports ConnectionClosed after EOF; this guards a bug.
                raise p2p.RemoteProtocolError("read past end of stream")
            with trio.move_on_after(self.idle_timeout) as scope:
                received = await self._receive.receive_some(READ_SIZE)
            if scope.cancelled_caught:
                raise ChannelTimeout(f"no data from peer for {self.idle_timeout:.0f}s")
            if not received:
                self._eof = True
            self.bytes_in += len(received)
            self.conn.receive_data(received)

    async def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        with trio.move_on_after(self.idle_timeout) as scope:
            await self._send.send_all(data)
        if scope.cancelled_caught:
            raise ChannelTimeout(f"peer did not read for {self.idle_timeout:.0f}s")
        self.bytes_out += len(data)

    async def send(self, *messages: p2p.Message) -> None:
        await self.send_raw(b"".join(p2p.serialize(m) for m in messages))

    async def send_data(self, pieces: Iterable[bytes], length: int) -> None:
        """Send `DATA length` then exactly `length` bytes taken from `pieces`."""
        await self.send(p2p.Data(length))
        sent = 0
        for piece in pieces:
            await self.send_raw(piece)
            sent += len(piece)
        if sent != length:
            # The framing is now broken; the only honest thing left is to close.
            raise OSError(f"short data: sent {sent} of {length} bytes")

    async def aclose(self) -> None:
        for stream in (self._send, self._receive):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()


def stdio_channel(*, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> P2PChannel:
    """A channel on this process's stdin/stdout (the ssh session).

    FdStream makes the open file description it gets non-blocking. For a pipe that is a
    description of our own (`_private_fd`), so whoever shares fd 0 or 1's (a parent shell)
    never sees the flag, even if we are killed. A socket cannot be reopened: it gets a dup,
    whose shared flag `restore_stdio` puts back before exit (not after SIGKILL; the peer
    holding the socket's other end has a description of its own).
    """
    stdin = trio.lowlevel.FdStream(_private_fd(0, os.O_RDONLY))
    stdout = trio.lowlevel.FdStream(_private_fd(1, os.O_WRONLY))
    return P2PChannel(stdin, stdout, idle_timeout=idle_timeout)


def _private_fd(fd: int, mode: int) -> int:
    """`fd`'s pipe opened again through /proc (a new open file description), else a dup.

    O_NONBLOCK on the open: a pipe whose writer is gone would otherwise block it (FIFO
    semantics), and one whose reader is gone fails it (ENXIO), which is the dup's case.
    """
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return os.open(f"/proc/self/fd/{fd}", mode | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        pass
    return os.dup(fd)


def restore_stdio() -> None:
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            os.set_blocking(fd, True)
