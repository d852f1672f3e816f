"""A raw client of `git-annex-shell noderpc` for tests and `bench/noderpc_abuse.py`.

It writes the frames it is given, reads only when asked, and follows the worker's peak
resident set: what a hostile holder of an ssh key could do to the node worker, byte for byte.
Writes never block the test (the worker may stop reading on purpose), and every wait is
bounded.

    with RpcSession(argv, env=env) as s:
        s.push(hello(window=64 << 10) + request(1, "info", {}))
        assert s.frame()[0] == 5                       # the worker's HELLO
        assert s.frame()[:3] == [1, 1, None]           # the answer to request 1
"""

from __future__ import annotations

import os
import select
import time
from typing import Any

import msgpack
from p2pdriver import ShellSession

PROTO = "annexproxy-noderpc"


def hello(window: int) -> bytes:
    return msgpack.packb([5, {"proto": PROTO, "versions": [1], "caps": [], "window": window}])


def request(rid: int, method: str, params: dict[str, Any]) -> bytes:
    return msgpack.packb([0, rid, method, params])


def credit(stream: int, n: int) -> bytes:
    return msgpack.packb([4, stream, n])


class RpcSession(ShellSession):
    """One node worker with its stdin/stdout as the test's RPC connection."""

    _unpacker: msgpack.Unpacker | None = None
    _peak = 0

    def push(self, data: bytes, *, stall: float = 3.0, limit: float = 120.0) -> int:
        """Write `data` as far as the worker takes it: stop when it has taken nothing for
        `stall` seconds or after `limit`; returns the bytes written."""
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        os.set_blocking(fd, False)
        view = memoryview(data)
        done = 0
        end = time.monotonic() + limit
        while done < len(view):
            wait = min(stall, end - time.monotonic())
            if wait <= 0 or not select.select([], [fd], [], wait)[1]:
                break
            try:
                done += os.write(fd, view[done : done + (1 << 16)])
            except BlockingIOError:
                continue
            except BrokenPipeError:
                break
        return done

    def frame(self, timeout: float | None = None) -> Any:
        """The next frame the worker sent (EOFError if it closed first)."""
        if self._unpacker is None:
            self._unpacker = msgpack.Unpacker(raw=False)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                return self._unpacker.unpack()
            except msgpack.OutOfData:
                pass
            if self._buf:
                self._unpacker.feed(bytes(self._buf))
                self._buf.clear()
            elif not self._fill(deadline):
                raise EOFError("the worker closed its stdout")

    def peak_kib(self) -> int:
        """The worker's peak resident set (VmHWM), as last seen while it ran; 0 if never.

        Not wait4's ru_maxrss: the kernel keeps in it the RSS of the image before exec,
        i.e. of this (forked) test process."""
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self._peak = max(self._peak, int(line.split()[1]))
        except OSError:
            pass
        return self._peak

    def settle(self, *, quiet: float = 2.0, limit: float = 60.0) -> int:
        """Wait until the peak has not grown for `quiet` seconds, or the worker exited, or
        `limit` passed; returns the peak in KiB."""
        end = time.monotonic() + limit
        peak, since = self.peak_kib(), time.monotonic()
        while time.monotonic() < end and time.monotonic() - since < quiet:
            if not self.alive():
                break
            time.sleep(0.1)
            now = self.peak_kib()
            if now != peak:
                peak, since = now, time.monotonic()
        return self.peak_kib()

    def __enter__(self) -> RpcSession:
        return self

    def alive(self) -> bool:
        """Still running (reaping it with wait4 otherwise, so that its rusage is kept)."""
        if self.proc.returncode is not None:
            return False
        try:
            self.wait(0)
        except TimeoutError:
            return True
        return False
