"""The p2pstdio session for a plain repository (p2p-protocol.md §5-8).

One request at a time, as the protocol demands. The filesystem calls are synchronous on
purpose: they are page-cache writes and small metadata operations, and a session serves
exactly one client, so there is nothing for the event loop to do meanwhile. trio is here
for bounded waits on the peer and for the proxy, which shares this module's conventions.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import BinaryIO

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import (
    DEFAULT_IDLE_TIMEOUT,
    ChannelTimeout,
    P2PChannel,
    restore_stdio,
    stdio_channel,
)
from shell import gitconnect, restrict
from shell.repo import Repo
from shell.service.repository import (
    ContentLocked,
    Download,
    LocationLogError,
    NotPresent,
    Refused,
    RemoveOutcome,
    RepositoryService,
    TransferInProgress,
    Upload,
)

SEND_PIECE = 1 << 20

# How long a session waits on a client that sends nothing, or stops reading what we send,
# before closing (security.md row 35: slow loris). Git config `annexproxy.idletimeout`, in
# seconds, read from the repository's config (or the global one) so an admin can shorten
# it, and tests can use a second or two. A held LOCKCONTENT is bounded by it as well.
IDLE_TIMEOUT_CONFIG = "annexproxy.idletimeout"


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
    """Serves one client against this repository's own annex: p2pstdio's adapter of the
    repository service (shell/service/repository.py), which holds every rule."""

    def __init__(self, repo: Repo, channel: P2PChannel, client_uuid: str) -> None:
        self.repo = repo
        self.service = RepositoryService(repo, client_uuid=client_uuid)
        self.uuid = self.service.uuid
        self.channel = channel
        self.client_uuid = client_uuid
        self.branch = self.service.branch
        self.mode = self.service.mode
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
                self.version = min(n, p2p.MAX_VERSION)
                await self.send(p2p.Version(self.version))
            case p2p.Bypass():
                pass  # only gateways act on BYPASS
            case p2p.CheckPresent(key):
                await self.send(p2p.Success() if self.service.has(key) else p2p.Failure())
            case p2p.LockContent(key):
                await self.lock_content(key)
            case p2p.Remove(key):
                await self.remove(key, deadline=None)
            case p2p.RemoveBefore(ts, key):
                await self.remove(key, deadline=ts)
            case p2p.GetTimestamp():
                await self.send(p2p.Timestamp(self.service.timestamp()))
            case p2p.Put(af, key):
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
        try:
            hold = self.service.hold(key)
        except (NotPresent, ContentLocked):
            await self.send(p2p.Failure())
            return
        except OSError as exc:
            # The lock or retention file cannot be made; git-annex answers FAILURE too.
            warn(f"  cannot lock content: {exc.strerror or exc}")
            await self.send(p2p.Failure())
            return
        try:
            await self.send(p2p.Success())
            # EOF raises SessionEnd: connection lost while locked, and the drop proof
            # relies on the retention file outliving us, so it is left in place.
            event = await self.event()
        except ChannelTimeout:
            hold.abandon()  # the retention file keeps the content for its 10 minutes
            raise SessionEnd(1, "client held a content lock past the idle timeout") from None
        except BaseException:
            hold.abandon()
            raise
        hold.release()
        if not isinstance(event, p2p.UnlockContent):
            await self.send(p2p.Error("expected UNLOCKCONTENT"))

    async def remove(self, key: Key, deadline: int | None) -> None:
        try:
            outcome = self.service.remove(key, before=deadline)
        except Refused as refused:
            await self.send(p2p.Error(str(refused)))
            return
        except LocationLogError as exc:
            warn(f"  {exc.strerror}")
            await self.send(p2p.Failure())
            return
        except OSError as exc:
            warn(f"  cannot remove content: {exc.strerror}")
            await self.send(p2p.Failure())
            return
        if outcome == RemoveOutcome.LOCKED:
            # git-annex-shell dies silently here; a clear answer is better.
            warn("  content is locked")
        ok = outcome in (RemoveOutcome.REMOVED, RemoveOutcome.ABSENT)
        await self.send(p2p.Success() if ok else p2p.Failure())

    async def put(self, af: str | None, key: Key) -> None:
        try:
            upload = self.service.begin_put(key, af)
        except Refused as refused:
            await self.send(p2p.Error(str(refused)))
            return
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
        if upload is None:
            await self.send(p2p.AlreadyHave())
            return
        try:
            await self._receive(upload)
        finally:
            upload.keep()  # a no-op after finish(); else the partial stays for a resume

    async def _receive(self, upload: Upload) -> None:
        """The rest of a PUT after PUT-FROM."""
        await self.send(p2p.PutFrom(upload.offset))
        event = await self.event(data=True)
        if isinstance(event, p2p.DataPresent):
            await self.send(p2p.Success() if self.service.has(upload.key) else p2p.Failure())
            return
        if not isinstance(event, p2p.Data):
            await self.send(p2p.Error("expected DATA"))
            return
        ok = await self.receive_body(upload, event.length)
        valid = True
        if self.version >= 1:
            validity = await self.event()
            if ok and not isinstance(validity, p2p.Valid | p2p.Invalid):
                await self.send(p2p.Error("expected VALID or INVALID"))
                return
            valid = not isinstance(validity, p2p.Invalid)
        if not ok:
            await self.send(p2p.Failure())
            return
        try:
            stored = upload.finish(valid=valid)
        except OSError as exc:
            # LocationLogError: stored, but the location log cannot say so.
            what = exc.strerror if isinstance(exc, LocationLogError) else None
            warn(f"  {what or f'cannot store content: {exc.strerror}'}")
            await self.send(p2p.Failure())
            return
        if not stored and (valid or upload.written):
            warn("  Verification of content failed")
        await self.send(p2p.Success() if stored else p2p.Failure())

    async def receive_body(self, upload: Upload, length: int) -> bool:
        """Write the DATA payload into the partial; False if it cannot be the content.

        Leaving without `finish()` keeps the partial, so a cut transfer resumes.
        """
        if not upload.fits(length):
            # Wrong size: refuse before writing anything.
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
                upload.write(event.data)
            except OSError as exc:
                # Disk full, EIO, a file size limit: the rest of the payload is not read,
                # so the framing is lost and the connection must close. The store kept the
                # intact prefix for a resume (ENOSPC) or deleted it (EIO).
                await self.send(p2p.Failure())
                raise SessionEnd(1, f"cannot store content: {exc.strerror}") from None

    async def get(self, offset: int, af: str | None, key: Key) -> None:
        try:
            download: Download | None = self.service.open_get(key, offset, af)
        except NotPresent:
            download = None
        if download is None:
            await self.send(p2p.Data(0))
            if self.version >= 1:
                await self.send(p2p.Invalid())
            await self.read_verdict()
            return
        try:
            if download.length:
                download.fh.seek(offset)
            await self.channel.send_data(_pieces(download.fh, download.length), download.length)
            if self.version >= 1:
                await self.send(p2p.Invalid() if download.changed() else p2p.Valid())
        finally:
            download.close()
        await self.read_verdict()

    async def read_verdict(self) -> None:
        """The client's SUCCESS/FAILURE after a GET; the server only reads it."""
        event = await self.event()
        if not isinstance(event, p2p.Success | p2p.Failure):
            await self.handle(event)


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
