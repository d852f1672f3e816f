"""The p2pstdio session for a plain repository (p2p-protocol.md §5-8).

One request at a time, as the protocol demands. The filesystem calls are synchronous on
purpose: they are page-cache writes and small metadata operations, and a session serves
exactly one client, so there is nothing for the event loop to do meanwhile. trio is here
for bounded waits on the peer and for the proxy, which shares this module's conventions.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, suppress
from typing import BinaryIO

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import (
    ChannelTimeout,
    P2PChannel,
    restore_stdio,
    stdio_channel,
)
from git_remote_annexproxy.store import (
    AnnexStore,
    ContentLocked,
    Direction,
    Receive,
    TransferInProgress,
)
from shell import gitconnect, restrict
from shell.repo import Repo

MAX_VERSION = 4
SEND_PIECE = 1 << 20

# How long a session waits on a client that sends nothing, or stops reading what we send,
# before closing (security.md row 35: slow loris). Git config `annexproxy.idletimeout`, in
# seconds, read from the repository's config (or the global one) so an admin can shorten
# it, and tests can use a second or two. A held LOCKCONTENT is bounded by it as well.
IDLE_TIMEOUT_CONFIG = "annexproxy.idletimeout"
DEFAULT_IDLE_TIMEOUT = 7200.0


class SessionEnd(Exception):
    """The session is over; `code` is the process exit status."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def warn(message: str) -> None:
    """A line on stderr, which git-annex shows to its user; stdout is the protocol."""
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (BlockingIOError, BrokenPipeError, OSError):
        pass


def idle_timeout(repo: Repo) -> float:
    """The configured idle timeout; a bad value is reported and the default used."""
    text = repo.config.get(IDLE_TIMEOUT_CONFIG)
    if text is None:
        return DEFAULT_IDLE_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        warn(f"git-annex-shell: ignoring bad {IDLE_TIMEOUT_CONFIG}={text!r}")
        return DEFAULT_IDLE_TIMEOUT
    return value


def monotonic_seconds() -> int:
    # git-annex's timestamps are whole seconds of the monotonic clock (seconds since boot
    # on Linux), so REMOVE-BEFORE deadlines agree across sessions on the same machine.
    return int(time.monotonic())


class ClientFacing:
    """What every p2pstdio session does towards its client, plain or proxying: send, read
    the next message (EOF ends the session), and refuse writes the restrictions forbid."""

    channel: P2PChannel
    mode: int
    branch: AnnexBranch

    async def send(self, *messages: p2p.Message) -> None:
        await self.channel.send(*messages)

    async def event(self, *, data: bool = False) -> p2p.Event:
        """The client's next message; EOF ends the session. A DATA payload is read only
        where the caller expects one (`data=True`: after our PUT-FROM); anywhere else a
        DATA is `p2p.UnexpectedData`, answered like any other message out of place, and
        the bytes it announced are never read (p2p.py, "Which DATA starts a payload")."""
        event = await self.channel.next_event(data=data)
        if isinstance(event, p2p.ConnectionClosed):
            raise SessionEnd(0)
        return event

    def log_location(self, key: Key, uuid: str, present: bool) -> bool:
        """Record in our location log that `uuid` has (or no longer has) `key`.

        False, with a line on stderr, if the log cannot be written; the request then
        answers FAILURE and the session goes on, as git-annex-shell answers a PUT whose
        log write fails. The classic case: a key whose journal file name
        (``<hash dirs>_<keyfile>.log``, ``_`` doubled) is longer than the filesystem
        allows, though its object fits.
        """
        try:
            self.branch.log_presence(key, uuid, present=present)
        except OSError as exc:
            warn(f"  cannot write the location log: {exc.strerror or exc}")
            return False
        return True

    async def refuse_write(self, removal: bool) -> bool:
        """Answer ERROR and return True when the mode forbids this request."""
        if self.mode == restrict.Mode.READONLY:
            await self.send(p2p.Error(restrict.READONLY_DENIED))
            return True
        if removal and self.mode == restrict.Mode.APPENDONLY:
            await self.send(p2p.Error(restrict.APPENDONLY_DENIED))
            return True
        return False


class PlainSession(ClientFacing):
    """Serves one client against this repository's own annex."""

    def __init__(self, repo: Repo, channel: P2PChannel, client_uuid: str) -> None:
        assert repo.uuid is not None
        self.repo = repo
        self.uuid: str = repo.uuid
        self.channel = channel
        self.client_uuid = client_uuid
        self.store = AnnexStore(repo.gitdir, bare=repo.bare)
        self.branch = AnnexBranch(repo.gitdir, repo.annexdir)
        self.mode = restrict.server_mode()
        self.version = 0

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.send(p2p.AuthSuccess(self.uuid))
        while True:
            event = await self.event()
            await self.handle(event)

    async def handle(self, event: p2p.Event) -> None:
        match event:
            case p2p.Version(n):
                self.version = min(n, MAX_VERSION)
                await self.send(p2p.Version(self.version))
            case p2p.Bypass():
                pass  # only gateways act on BYPASS
            case p2p.CheckPresent(key):
                await self.send(p2p.Success() if self.store.has(key) else p2p.Failure())
            case p2p.LockContent(key):
                await self.lock_content(key)
            case p2p.Remove(key):
                if not await self.refuse_write(removal=True):
                    await self.remove(key, deadline=None)
            case p2p.RemoveBefore(ts, key):
                if not await self.refuse_write(removal=True):
                    await self.remove(key, deadline=ts)
            case p2p.GetTimestamp():
                await self.send(p2p.Timestamp(monotonic_seconds()))
            case p2p.Put(af, key):
                if not await self.refuse_write(removal=False):
                    await self.put(af, key)
            case p2p.Get(offset, af, key):
                await self.get(offset, af, key)
            case p2p.Connect(service):
                # git tunnelled for git-remote-annexproxy (git-annex itself exits here); a
                # refusal under the restrictions is an ERROR and the session goes on.
                if await gitconnect.connect(self.channel, self.repo.gitdir_str, service, self.mode):
                    raise SessionEnd(0)
            case p2p.NotifyChange():
                raise SessionEnd(1, "change notification not available")
            case p2p.Error():
                raise SessionEnd(0)
            case p2p.Unparsable():
                await self.send(p2p.Error("unknown command"))
            case p2p.Extensions():
                await self.send(p2p.Extensions(()))  # a plain repository serves none
            case _:
                await self.send(p2p.Error("unexpected command"))

    def record_transfer(
        self, stack: ExitStack, direction: Direction, key: Key, af: str | None
    ) -> None:
        """Write git-annex's transfer information file for the rest of the request.

        It is informational (`git annex info` shows it), so a client UUID that cannot be a
        file name (`../x`: any non-empty string is a valid CLIENTUUID), a second transfer of
        the same key by the same client, or a filesystem error only leave it unwritten.
        """
        with suppress(ValueError, OSError, TransferInProgress):
            stack.enter_context(self.store.transfer(direction, self.client_uuid, key, af))

    async def drain_body(self) -> int:
        """Consume a DATA payload we will not use; returns its size."""
        total = 0
        while True:
            event = await self.event()
            if isinstance(event, p2p.BodyEnd):
                return total
            assert isinstance(event, p2p.Body)
            total += len(event.data)

    # -- requests ----------------------------------------------------------------------

    async def lock_content(self, key: Key) -> None:
        if not self.store.has(key):
            await self.send(p2p.Failure())
            return
        with ExitStack() as stack:
            try:
                stack.enter_context(self.store.lock_shared(key))
                self.store.write_retention(key)
            except (ContentLocked, OSError) as exc:
                # OSError: removed meanwhile (FileNotFoundError), or the lock or retention
                # file cannot be made (a key file name within 4 bytes of the limit, a
                # read-only store); git-annex answers FAILURE too.
                if not isinstance(exc, ContentLocked | FileNotFoundError):
                    warn(f"  cannot lock content: {exc.strerror or exc}")
                await self.send(p2p.Failure())
                return
            await self.send(p2p.Success())
            try:
                # EOF raises SessionEnd: connection lost while locked, and the drop proof
                # relies on the retention file outliving us, so it is left in place.
                event = await self.event()
            except ChannelTimeout:
                # The retention file keeps the content for its 10 minutes regardless.
                raise SessionEnd(1, "client held a content lock past the idle timeout") from None
            self.store.clear_retention(key)
            if not isinstance(event, p2p.UnlockContent):
                await self.send(p2p.Error("expected UNLOCKCONTENT"))

    async def remove(self, key: Key, deadline: int | None) -> None:
        if not self.store.has(key):
            await self.send(p2p.Success())
            return
        if deadline is not None and monotonic_seconds() >= deadline:
            await self.send(p2p.Failure())
            return
        try:
            gone = self.store.remove(key)
        except ContentLocked:
            # git-annex-shell dies silently here; a clear answer is better (spec §7).
            warn("  content is locked")
            await self.send(p2p.Failure())
            return
        except OSError as exc:
            warn(f"  cannot remove content: {exc.strerror}")
            await self.send(p2p.Failure())
            return
        if gone and not self.log_location(key, self.uuid, present=False):
            gone = False
        await self.send(p2p.Success() if gone else p2p.Failure())

    async def put(self, af: str | None, key: Key) -> None:
        if self.store.has(key):
            await self.send(p2p.AlreadyHave())
            return
        try:
            receive = self.store.begin_receive(key)
        except TransferInProgress:
            await self.send(
                p2p.Error("transfer already in progress, or unable to take transfer lock")
            )
            return
        except OSError as exc:
            # The partial cannot be opened: a key too long for a file name, or a symlink
            # or non-directory planted at annex/tmp (refused, never followed).
            warn(f"  cannot receive content: {exc.strerror}")
            await self.send(p2p.Error(f"cannot receive content: {exc.strerror}"))
            return
        with ExitStack() as stack:
            stack.enter_context(receive)
            self.record_transfer(stack, "download", key, af)
            await self.send(p2p.PutFrom(receive.offset))
            event = await self.event(data=True)
            if isinstance(event, p2p.DataPresent):
                await self.send(p2p.Success() if self.store.has(key) else p2p.Failure())
                return
            if not isinstance(event, p2p.Data):
                if isinstance(event, p2p.ConnectionClosed):
                    raise SessionEnd(0)
                await self.send(p2p.Error("expected DATA"))
                return
            ok = await self.receive_body(receive, key, event.length)
            if ok and self.version >= 1:
                validity = await self.event()
                if isinstance(validity, p2p.Invalid) and event.length == 0:
                    # "DATA 0" + INVALID: the sender had nothing to send.
                    await self.send(p2p.Failure())
                    return
                if not isinstance(validity, p2p.Valid | p2p.Invalid):
                    await self.send(p2p.Error("expected VALID or INVALID"))
                    return
            elif not ok and self.version >= 1:
                await self.event()  # the VALID/INVALID that follows a refused body
            if not ok:
                await self.send(p2p.Failure())
                return
            try:
                stored = receive.finish()
            except OSError as exc:
                warn(f"  cannot store content: {exc.strerror}")
                await self.send(p2p.Failure())
                return
            if not stored:
                warn("  Verification of content failed")
                await self.send(p2p.Failure())
                return
            # Only now, with the object durable on disk, is the location recorded.
            logged = self.log_location(key, self.uuid, present=True)
            await self.send(p2p.Success() if logged else p2p.Failure())

    async def receive_body(self, receive: Receive, key: Key, length: int) -> bool:
        """Write the DATA payload into the partial; False if it cannot be the content.

        Leaving without `finish()` keeps the partial, so a cut transfer resumes.
        """
        if key.size is not None and receive.offset + length != key.size:
            # Wrong size: refuse before writing anything (security.md row 18).
            await self.drain_body()
            return False
        while True:
            try:
                event = await self.channel.next_event()
            except ChannelTimeout:
                raise SessionEnd(1, "client stopped sending content") from None
            if isinstance(event, p2p.BodyEnd):
                return True
            if isinstance(event, p2p.ConnectionClosed):
                # Cut mid-transfer: the partial stays for a resumed PUT.
                raise SessionEnd(0)
            assert isinstance(event, p2p.Body)
            try:
                receive.write(event.data)
            except OSError as exc:
                # Disk full, EIO, a file size limit: the rest of the payload is not read,
                # so the framing is lost and the connection must close (spec §1). The
                # Receive kept the intact prefix for a resume (ENOSPC) or deleted it (EIO).
                await self.send(p2p.Failure())
                raise SessionEnd(1, f"cannot store content: {exc.strerror}") from None

    async def get(self, offset: int, af: str | None, key: Key) -> None:
        with ExitStack() as stack:
            # No content lock while sending, as git-annex (sendAnnex in Annex/Content.hs
            # takes none): a `<object>.lck` made here would stay beside the object when
            # the session is killed mid-transfer (sshd or systemd ending it, SIGKILL),
            # and would keep REMOVE out for as long as a stalled client holds the GET.
            # Nothing is lost without it: a removal meanwhile unlinks the object, but the
            # open file goes on reading the same inode, whole; a change in place (an
            # unlocked work-tree file hard-linked to the object) shows in its size or
            # mtime and makes us say INVALID, as git-annex's inode-cache check does.
            fh = self.store.open_object(key)
            if fh is None:
                await self.send(p2p.Data(0))
                if self.version >= 1:
                    await self.send(p2p.Invalid())
                await self.read_verdict()
                return
            stack.enter_context(fh)
            self.record_transfer(stack, "upload", key, af)
            before = _stamp(fh)
            size = before[0]
            length = max(size - offset, 0)
            if length:
                fh.seek(offset)
            await self.channel.send_data(_pieces(fh, length), length)
            if self.version >= 1:
                changed = _stamp(fh) != before
                await self.send(p2p.Invalid() if changed else p2p.Valid())
        await self.read_verdict()

    async def read_verdict(self) -> None:
        """The client's SUCCESS/FAILURE after a GET; the server only reads it."""
        event = await self.event()
        if not isinstance(event, p2p.Success | p2p.Failure):
            await self.handle(event)


def _stamp(fh: BinaryIO) -> tuple[int, int]:
    """Size and mtime (ns) of an open file: what a change while sending shows in."""
    import os  # noqa: PLC0415

    st = os.fstat(fh.fileno())
    return st.st_size, st.st_mtime_ns


def _pieces(fh: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        piece = fh.read(min(SEND_PIECE, remaining))
        if not piece:
            return
        remaining -= len(piece)
        yield piece


async def run_session(session: ClientFacing, run: Callable[[], Awaitable[None]]) -> int:
    """Run a p2pstdio session (plain or proxying) to its end and give the exit status.

    Every way it can end becomes one line on stderr; the journal is committed however the
    session ended (spec §5).
    """
    code = 0
    try:
        await run()
    except SessionEnd as end:
        code = end.code
        if end.message:
            warn(f"git-annex-shell: {end.message}")
    except p2p.RemoteProtocolError:
        warn("git-annex-shell: protocol error")
        code = 1
    except ChannelTimeout as exc:
        warn(f"git-annex-shell: {exc}")
        code = 1
    except (trio.BrokenResourceError, BrokenPipeError, ConnectionResetError):
        code = 1
    except OSError as exc:
        # A storage error no request handler expected: fatal, as in git-annex (spec §8).
        warn(f"git-annex-shell: {exc}")
        code = 1
    finally:
        try:
            session.branch.commit()
        except Exception as exc:  # the exit path must not be lost over it
            warn(f"git-annex-shell: could not commit the git-annex branch: {exc}")
            code = 1
        await session.channel.aclose()
    return code


async def _serve(repo: Repo, client_uuid: str) -> int:
    session = PlainSession(repo, stdio_channel(idle_timeout=idle_timeout(repo)), client_uuid)
    return await run_session(session, session.run)


def serve(repo: Repo, client_uuid: str) -> int:
    try:
        return trio.run(_serve, repo, client_uuid)
    finally:
        restore_stdio()
