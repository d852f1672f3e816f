"""The client's end of `CONNECT`: one git service through a git-annex-shell p2pstdio session.

    S: AUTH-SUCCESS <uuid>
    C: VERSION 4            C: CONNECT git-upload-pack       (sent together: no round trip)
    S: VERSION n
    S/C: DATA ...           both ways (shell/gitconnect.py has the server's side)
    C: DATA 0               git's input ended (our marker; see shell/gitconnect.py)
    S: CONNECTDONE <code>

`open_tunnel` runs the handshake and decides, before git has been told anything:

* the first DATA came: the tunnel works; `Tunnel.relay` then joins git's stdin/stdout to it;
* the session ended with no reply to CONNECT (git-annex's own git-annex-shell prints
  "relaying to git not supported" and exits), or never started (no annex there): `None`, and
  the caller runs the git service directly instead;
* ssh itself failed (exit 255), or the server refused with `ERROR`: `TunnelError`.

The session's stderr is held back until that decision, so the expected complaint of a
server without CONNECT does not reach the user; once the tunnel works it is relayed live.
Every wait is bounded by the idle timeout, counting traffic in either direction.

A `StreamWatch` may be given to see git's bytes both ways (the push-content feature
learns from them which refs a push updated; pushcontent.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Mapping
from typing import Protocol

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.p2pchannel import ChannelTimeout, P2PChannel, restore_stdio

READ_SIZE = 65536
SSH_FAILED = 255  # ssh's own exit status when it could not connect
EXIT_GRACE = 10.0  # seconds for the session process to exit after we are done
MAX_HELD_STDERR = 64 * 1024


class TunnelError(Exception):
    """The tunnel cannot be used and falling back would not help; one line for the user."""


class StreamWatch(Protocol):
    """Sees the git service's bytes as they pass: git's to the server, and the server's."""

    def from_git(self, data: bytes | bytearray) -> None: ...

    def to_git(self, data: bytes | bytearray) -> None: ...


class StderrRelay:
    """The session's stderr: held back until `go_live()` (then relayed), or dropped."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.held = bytearray()
        self.live = False
        self.done = False

    async def run(self) -> None:
        try:
            while data := await self.stream.receive_some(READ_SIZE):
                if self.live:
                    await _write_stderr(data)
                elif len(self.held) < MAX_HELD_STDERR:
                    self.held += data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.done = True

    async def go_live(self) -> None:
        self.live = True
        await self.show_held()

    async def show_held(self) -> None:
        held, self.held = bytes(self.held), bytearray()
        if held:
            await _write_stderr(held)


async def _write_stderr(data: bytes | bytearray) -> None:
    # Not an FdStream: fd 2 is usually a terminal shared with git and the user's shell, and
    # FdStream would make that shared file description non-blocking for all of them.
    def write() -> None:
        with contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                view = view[os.write(2, view) :]

    await trio.to_thread.run_sync(write, abandon_on_cancel=True)


class Tunnel:
    """An established CONNECT: the session's channel and its stderr."""

    def __init__(
        self, channel: P2PChannel, stderr: StderrRelay, idle: float, watch: StreamWatch | None
    ) -> None:
        self.channel = channel
        self.watch = watch
        self.stderr = stderr
        self.idle_timeout = idle
        self.last_activity = trio.current_time()
        self.error: BaseException | None = None
        self.git_out_open = True

    def active(self) -> None:
        self.last_activity = trio.current_time()

    async def relay(self, git_in: trio.abc.ReceiveStream, git_out: trio.abc.SendStream) -> int:
        """Join git's pipes to the tunnel until CONNECTDONE; its exit code."""
        await self.stderr.go_live()
        code = 1
        async with trio.open_nursery() as nursery:

            async def guarded_to_git() -> None:
                nonlocal code
                try:
                    code = await self.to_git(git_out)
                except (TunnelError, ChannelTimeout, p2p.RemoteProtocolError, OSError) as exc:
                    self.error = exc
                nursery.cancel_scope.cancel()

            async def guarded_watchdog() -> None:
                try:
                    await self.watchdog()
                except ChannelTimeout as exc:
                    self.error = exc
                    nursery.cancel_scope.cancel()

            nursery.start_soon(self.from_git, git_in)
            nursery.start_soon(guarded_watchdog)
            await guarded_to_git()
        if self.error is not None:
            raise TunnelError(str(self.error))
        return code

    async def to_git(self, git_out: trio.abc.SendStream) -> int:
        while True:
            try:
                event = await self.channel.next_event()
            except ChannelTimeout:
                continue  # the watchdog decides, counting traffic both ways
            match event:
                case p2p.Body(data):
                    self.active()
                    if self.watch is not None:
                        self.watch.to_git(data)
                    await self.write_git(git_out, data)
                case p2p.Data() | p2p.BodyEnd():
                    pass
                case p2p.ConnectDone(code):
                    return code
                case p2p.Error(text):
                    raise TunnelError(f"server: {text}")
                case p2p.ConnectionClosed():
                    raise TunnelError("the server closed the connection before CONNECTDONE")
                case _:
                    raise TunnelError(f"unexpected message from the server: {event!r:.80}")

    async def write_git(self, git_out: trio.abc.SendStream, data: bytes) -> None:
        if not self.git_out_open:
            return
        try:
            await git_out.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # git stopped reading (it has what it wanted); run on to CONNECTDONE.
            self.git_out_open = False

    async def from_git(self, git_in: trio.abc.ReceiveStream) -> None:
        try:
            while data := await git_in.receive_some(READ_SIZE):
                self.active()
                if self.watch is not None:
                    self.watch.from_git(data)
                await self.channel.send(p2p.Data(len(data)))
                await self.channel.send_raw(data)
            await self.channel.send(p2p.Data(0))  # end of git's input
        except (trio.BrokenResourceError, trio.ClosedResourceError, ChannelTimeout, OSError):
            # The server went away, or stopped reading; to_git sees how it ended.
            pass

    async def watchdog(self) -> None:
        while True:
            deadline = self.last_activity + self.idle_timeout
            if trio.current_time() >= deadline:
                raise ChannelTimeout(f"no traffic for {self.idle_timeout:.0f}s")
            await trio.sleep_until(deadline)


async def _handshake(channel: P2PChannel, service: str) -> p2p.Event:
    """Send VERSION and CONNECT; the server's first answer to CONNECT (or the end)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await channel.send(p2p.Version(p2p.MAX_VERSION), p2p.Connect(service))
    first = await channel.next_event()
    if isinstance(first, p2p.ConnectionClosed):
        return first
    if not isinstance(first, p2p.AuthSuccess):
        raise TunnelError(f"not a git-annex P2P server (it said {first!r:.80})")
    version = await channel.next_event()
    # An old server answers VERSION with ERROR and goes on at version 0: fine for CONNECT.
    if not isinstance(version, p2p.Version | p2p.Error):
        if isinstance(version, p2p.ConnectionClosed):
            return version
        raise TunnelError(f"expected VERSION, the server said {version!r:.80}")
    return await channel.next_event()


async def run_service(
    argv: list[str],
    env: Mapping[str, str],
    service: str,
    *,
    idle_timeout: float,
    announce: Callable[[], None],
    verbose: bool = False,
    watch: StreamWatch | None = None,
) -> int | None:
    """Run `service` through the session started by argv, with git on our fds 0 and 1.

    `announce()` is called once the tunnel works, before anything is relayed (the helper
    tells git "connected" there). Returns the service's exit code, or None when the server
    cannot tunnel git and nothing has been said to git yet. Raises TunnelError.
    """
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert process.stdin is not None and process.stdout is not None
    assert process.stderr is not None
    stderr = StderrRelay(process.stderr)
    channel = P2PChannel(process.stdout, process.stdin, idle_timeout=idle_timeout)
    outcome: int | TunnelError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stderr.run)
        try:
            outcome = await _session(
                channel, stderr, service, idle_timeout=idle_timeout, announce=announce, watch=watch
            )
        except TunnelError as exc:
            outcome = exc
        except OSError as exc:
            # Telling git, or setting up its pipes, failed: git is gone or broken.
            outcome = TunnelError(f"cannot talk to git: {exc.strerror or exc}")
        finally:
            with trio.CancelScope(shield=True):
                await channel.aclose()  # the session sees EOF and ends
                returncode = await _reap(process)
                # Let the last stderr lines arrive, but not wait on a stray holder of the pipe.
                with trio.move_on_after(1.0):
                    while not stderr.done:
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    if outcome is None and returncode == SSH_FAILED:
        outcome = TunnelError("ssh could not connect (exit status 255)")
    if isinstance(outcome, TunnelError):
        await stderr.show_held()
        raise outcome
    if outcome is None and verbose:
        await stderr.show_held()
    return outcome


async def _session(
    channel: P2PChannel,
    stderr: StderrRelay,
    service: str,
    *,
    idle_timeout: float,
    announce: Callable[[], None],
    watch: StreamWatch | None,
) -> int | None:
    try:
        with trio.fail_after(idle_timeout):
            first = await _handshake(channel, service)
    except (trio.TooSlowError, ChannelTimeout):
        raise TunnelError(f"no answer from the server for {idle_timeout:.0f}s") from None
    except p2p.RemoteProtocolError as exc:
        raise TunnelError(f"protocol error: {exc}") from None
    match first:
        case p2p.Data():
            pass
        case p2p.ConnectionClosed():
            return None
        case p2p.Error(text):
            raise TunnelError(text)
        case p2p.ConnectDone(code):
            raise TunnelError(f"{service} ended (exit status {code}) before saying anything")
        case _:
            raise TunnelError(f"unexpected answer to CONNECT: {first!r:.80}")
    announce()
    # Only now are fds 0 and 1 made non-blocking (FdStream); they are pipes of git's
    # that no other process of ours shares, and blocking mode is restored after.
    git_in = trio.lowlevel.FdStream(os.dup(0))
    git_out = trio.lowlevel.FdStream(os.dup(1))
    try:
        return await Tunnel(channel, stderr, idle_timeout, watch).relay(git_in, git_out)
    finally:
        for stream in (git_in, git_out):
            await stream.aclose()
        restore_stdio()


async def _reap(process: trio.Process) -> int:
    with trio.move_on_after(EXIT_GRACE):
        return await process.wait()
    process.kill()
    return await process.wait()
