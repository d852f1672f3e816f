#!/usr/bin/env python3
"""A relay between the fake ssh and git-annex-shell that counts bytes and cuts sessions.

tests/fakessh.py execs whatever `git-annex-shell` is first on the server's PATH; the
end-to-end tests put a wrapper there that runs

    cutrelay.py TARGET ARGS...

For a `p2pstdio` session the relay runs TARGET ARGS... with pipes of its own and copies
stdin -> child and child -> stdout, counting bytes. Any other command (configlist, git's
pass-through) is exec'd directly. Set in the server's environment (via FAKESSH_PASSENV):

    CUTRELAY_CUT_IN=N    cut each p2pstdio session after N client->server bytes
    CUTRELAY_CUT_OUT=N   ... after N server->client bytes
    CUTRELAY_LOG=FILE    append one JSON line per session: argv, bytes_in, bytes_out, cut
    CUTRELAY_CAPTURE=DIR save each session's client->server bytes to DIR/<pid>.in

A cut is what a dropped connection looks like: the child gets EOF on stdin and a broken
stdout, the client sees EOF, and the relay exits 255 (ssh's "connection failed"). The relay
waits for the child to exit first, so the server's state (a partial, a lock) is settled
before the client, which may retry at once, reconnects.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

PIECE = 1 << 16
SSH_FAILED = 255


def _limit(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class Pump(threading.Thread):
    """Copies src -> dst until EOF or until `limit` bytes have passed, then stops."""

    def __init__(
        self,
        src: int,
        dst: int,
        limit: int | None,
        capture: str | None = None,
        on_eof: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.limit = src, dst, limit
        self.on_eof = on_eof
        self.count = 0
        self.cut = False
        self.capture = capture

    def run(self) -> None:
        sink = open(self.capture, "wb") if self.capture else None  # noqa: SIM115
        try:
            while True:
                allowed = PIECE if self.limit is None else min(PIECE, self.limit - self.count)
                if allowed <= 0:
                    self.cut = True
                    return
                data = os.read(self.src, allowed)
                if not data:
                    if self.on_eof is not None:
                        self.on_eof()  # pass the EOF on
                    return
                if sink is not None:
                    sink.write(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(self.dst, view) :]
                self.count += len(data)
        except OSError:
            return  # the other side went away
        finally:
            if sink is not None:
                sink.close()


def main(argv: list[str]) -> int:
    target, *args = argv
    if not any("p2pstdio" in a for a in args):
        os.execv(target, [target, *args])
    child = subprocess.Popen([target, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    capture_dir = os.environ.get("CUTRELAY_CAPTURE")
    capture = os.path.join(capture_dir, f"{os.getpid()}.in") if capture_dir else None
    inward = Pump(0, child.stdin.fileno(), _limit("CUTRELAY_CUT_IN"), capture, child.stdin.close)
    outward = Pump(child.stdout.fileno(), 1, _limit("CUTRELAY_CUT_OUT"))
    inward.start()
    outward.start()
    # Done when the child's output ends (normal end), or when either direction is cut.
    while outward.is_alive() and not inward.cut:
        outward.join(0.01)
    cut = inward.cut or outward.cut
    if cut:
        # Drop the connection both ways. The client sees EOF: our ends of its pipes are
        # replaced by /dev/null (dup2, so the numbers cannot be reused by a later open).
        # Each child pipe is closed only once its pump has stopped: the child sees EOF on
        # stdin (input cut), or EPIPE on its next write (output cut; its input then ends
        # when the client, seeing EOF, closes its side). The pump still running drains or
        # feeds /dev/null until the child exits.
        if inward.cut:
            with contextlib.suppress(OSError):
                child.stdin.close()
        if outward.cut:
            with contextlib.suppress(OSError):
                child.stdout.close()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        os.close(devnull)
    try:
        code = child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    log = os.environ.get("CUTRELAY_LOG")
    if log:
        record = {
            "t": time.time(),
            "argv": args,
            "bytes_in": inward.count,
            "bytes_out": outward.count,
            "cut": cut,
            "code": code,
        }
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    return SSH_FAILED if cut else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
