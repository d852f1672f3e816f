"""`CONNECT git-upload-pack|git-receive-pack` in p2pstdio: git tunnelled in DATA frames.

This is what git-remote-annexproxy uses for clone, fetch and push, so that git and annexed
content travel over the one ssh session. git-annex's own git-annex-shell does not do this
over p2pstdio (it prints an error and exits: p2p-protocol.md §7), which is how the helper
tells the two apart and falls back to plain `git-upload-pack` over ssh.

The session (p2p-protocol.md §6-7):

    C: CONNECT git-upload-pack
    C/S: DATA n + n bytes ...    both ways at once: client -> service stdin, stdout -> client
    C: DATA 0                    (our extension) the client's input ended: close stdin
    S: CONNECTDONE <exit code>   then the session ends

`DATA 0` is how the end of git's input crosses the tunnel; protocol v2 upload-pack serves
requests until its stdin closes. git-annex never sends an empty DATA in a relay, and treats
one as no data, so the marker is invisible to it. End of stream from the client means the
same.

Restrictions are those of the pass-through (annex-shell.md §4-5): LIMITED refuses git;
READONLY and APPENDONLY refuse receive-pack (as git-annex's P2P server does); DIRECTORY was
checked before the session started. The service runs with pipes of its own (never our
fds 0/1, which trio made non-blocking) and an argv of our making: `git upload-pack --strict
-- GITDIR`, GITDIR being the repository we opened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.gitenv import without_local_repo
from git_remote_annexproxy.p2pchannel import ChannelTimeout, P2PChannel
from shell import restrict
from shell.pushguard import PushRefused, ReceivePackGuard

READ_SIZE = 65536  # git's own relay chunk (and git-annex's)
KILL_GRACE = 5.0  # seconds a killed service gets to go away before we stop waiting


def refusal(service: str, mode: int, env: Mapping[str, str] = os.environ) -> str | None:
    """The ERROR text refusing this service under the session's restrictions, or None."""
    if env.get(restrict.LIMITED):
        return f"Action blocked by {restrict.LIMITED}"
    if service == "git-receive-pack" and mode < restrict.Mode.READWRITE:
        # git-annex answers a push under READONLY and APPENDONLY alike with this.
        return restrict.READONLY_DENIED
    return None


def service_argv(service: str, gitdir: str) -> list[str]:
    """git's service for the repository at gitdir; gitdir is absolute, after `--` anyway."""
    if service == "git-upload-pack":
        # --strict: serve exactly this directory, never a `.git` below it.
        return ["git", "upload-pack", "--strict", "--", gitdir]
    if service == "git-receive-pack":
        return ["git", "receive-pack", "--", gitdir]
    raise ValueError(f"not a git service: {service!r}")


def exit_code(returncode: int) -> int:
    """CONNECTDONE carries a natural number; a signal is reported the way a shell does."""
    return returncode if returncode >= 0 else 128 - returncode


class GitRelay:
    """Both directions between the P2P channel and one running git service."""

    def __init__(
        self,
        channel: P2PChannel,
        process: trio.Process,
        guard: ReceivePackGuard | None,
        idle_timeout: float,
    ) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.channel = channel
        self.process = process
        self.stdin: trio.abc.SendStream = process.stdin
        self.stdout: trio.abc.ReceiveStream = process.stdout
        self.guard = guard
        self.idle_timeout = idle_timeout
        self.last_activity = trio.current_time()
        self.refused: str | None = None
        self.error: BaseException | None = None
        self.stdin_open = True

    def active(self) -> None:
        self.last_activity = trio.current_time()

    async def run(self) -> int:
        """Relay until the service is done; its exit code (1 if we refused or git failed)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guarded, self.from_client, nursery.cancel_scope)
            nursery.start_soon(self._guarded, self.watchdog, nursery.cancel_scope)
            await self._guarded(self.to_client, nursery.cancel_scope)
            nursery.cancel_scope.cancel()
        if self.error is not None:
            raise self.error
        assert self.process.returncode is not None
        code = exit_code(self.process.returncode)
        if self.refused is not None or (self.guard is not None and self.guard.failed):
            code = code or 1
        return code

    async def _guarded(self, task: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        """Run one direction; its first error ends the relay and is re-raised by run()."""
        try:
            await task()
        except (
            ChannelTimeout, p2p.RemoteProtocolError, trio.BrokenResourceError, OSError
        ) as exc:  # fmt: skip
            if self.error is None:
                self.error = exc
            scope.cancel()

    async def to_client(self) -> None:
        """Service output as DATA frames, then wait for the service to exit."""
        while True:
            data = await self.stdout.receive_some(READ_SIZE)
            if not data:
                break
            self.active()
            if self.guard is not None:
                self.guard.from_service(data)
            await self.channel.send(p2p.Data(len(data)))
            await self.channel.send_raw(data)
        await self.process.wait()

    async def from_client(self) -> None:
        while True:
            try:
                event = await self.channel.next_event()
            except ChannelTimeout:
                continue  # the watchdog decides, counting traffic in both directions
            match event:
                case p2p.Data(0):
                    await self.close_stdin()
                case p2p.Data() | p2p.BodyEnd():
                    pass
                case p2p.Body(data):
                    self.active()
                    await self.to_service(data)
                case p2p.ConnectionClosed():
                    await self.close_stdin()
                    return
                case p2p.Error():
                    await self.abort("client gave up (ERROR)")
                    return
                case _:
                    await self.abort("expected DATA from the client during CONNECT")
                    return

    async def to_service(self, data: bytes) -> None:
        if self.guard is not None:
            try:
                data = self.guard.from_client(data)
            except PushRefused as exc:
                await self.abort(str(exc))
                return
        if not data or not self.stdin_open:
            return
        try:
            await self.stdin.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The service stopped reading (it is exiting); the rest of the input is moot.
            self.stdin_open = False

    async def close_stdin(self) -> None:
        if self.stdin_open:
            self.stdin_open = False
            await self.stdin.aclose()

    async def abort(self, reason: str) -> None:
        """Stop the service before it acts on anything more; run() then reports failure."""
        if self.refused is None:
            self.refused = reason
        self.stdin_open = False
        await self.stdin.aclose()
        self.process.send_signal(signal.SIGTERM)

    async def watchdog(self) -> None:
        """End a relay where neither side moved for the idle timeout (security.md row 35)."""
        while True:
            deadline = self.last_activity + self.idle_timeout
            if trio.current_time() >= deadline:
                raise ChannelTimeout(f"git service idle for {self.idle_timeout:.0f}s")
            await trio.sleep_until(deadline)


async def serve(channel: P2PChannel, gitdir: str, service: str, *, idle_timeout: float) -> int:
    """Run `service` for gitdir through the channel; the code for CONNECTDONE.

    Raises what the channel raises (the session then ends without CONNECTDONE).
    """
    guard = ReceivePackGuard() if service == "git-receive-pack" else None
    process = await trio.lowlevel.open_process(
        service_argv(service, gitdir),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # GIT_PROTOCOL (from the client's SendEnv) is passed on: that is how v2 is chosen.
        env=without_local_repo(),
    )
    relay = GitRelay(channel, process, guard, idle_timeout)
    try:
        code = await relay.run()
    finally:
        await _reap(process)
    if relay.refused is not None:
        _warn(f"git-annex-shell: {relay.refused}")
    return code


async def _reap(process: trio.Process) -> None:
    """Close our ends and make sure the service is gone, waiting a bounded time."""
    with trio.CancelScope(shield=True):
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                await stream.aclose()
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(KILL_GRACE):
                await process.wait()


def _warn(message: str) -> None:
    # stderr reaches the client's terminal through ssh; stdout is the protocol.
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except OSError:
        pass


async def connect(channel: P2PChannel, gitdir: str, service: str, mode: int) -> bool:
    """Answer one CONNECT: False if refused (ERROR sent, the session goes on, security.md
    row 12), True once the service ran and CONNECTDONE was sent (the session must end:
    git's unread input may still be in flight)."""
    reason = refusal(service, mode)
    if reason is not None:
        await channel.send(p2p.Error(reason))
        return False
    code = await serve(channel, gitdir, service, idle_timeout=channel.idle_timeout)
    await channel.send(p2p.ConnectDone(code))
    return True
