"""Proxying p2pstdio to one repository behind us (p2p-protocol.md §9).

AUTH-SUCCESS goes out with the node's UUID at once; the node is contacted when the client
sends VERSION, and the client gets the version the node agreed to. Each request is checked
against the restrictions here, then relayed; DATA streams through piece by piece (never
held whole), so the client's progress meter and stall detection see a live transfer.
"""

from __future__ import annotations

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import P2PChannel, restore_stdio, stdio_channel
from shell import gitconnect, objectserve
from shell.front import FrontSession
from shell.nodelink import (
    AlreadyHave,
    NodeError,
    NodeOutsideDirectory,
    NodeRefused,
    Outcome,
    Upload,
    make_link,
)
from shell.p2pserver import SessionEnd, idle_timeout, run_session, warn
from shell.proxyselect import Remote, Target
from shell.repo import Repo
from shell.speciallink import SpecialLink


class ProxySession(FrontSession):
    def __init__(self, repo: Repo, channel: P2PChannel, client_uuid: str, node: Remote) -> None:
        super().__init__(repo, channel, client_uuid, node.uuid)
        self.node = node
        self.link = make_link(node, self.own_uuid, self.timeout, repo.config, repo.gitdir)
        self.objects: objectserve.ObjectService | None = None  # once EXTENSIONS agreed on some

    async def run(self) -> None:
        await self.send(p2p.AuthSuccess(self.node.uuid))
        first = await self.event()
        version = first.n if isinstance(first, p2p.Version) else None
        try:
            with trio.fail_after(self.timeout):
                await self.link.open(version)
        except NodeOutsideDirectory as exc:
            # git-annex's bytes: its node's git-annex-shell refuses, then the proxy gives up.
            warn(
                f"git-annex-shell: {exc.text}\n\n"
                "git-annex: Unable to connect to remote.\np2pstdio: 1 failed"
            )
            raise SessionEnd(1) from None
        except (NodeError, trio.TooSlowError) as exc:
            raise SessionEnd(1, f"Unable to connect to remote. ({exc})") from None
        if version is not None:
            self.version = self.link.version
            await self.send(p2p.Version(self.link.version))
        else:
            await self.handle(first)
        while True:
            await self.handle(await self.event())

    async def handle(self, event: p2p.Event) -> None:
        try:
            await self.dispatch(event)
        except NodeRefused as exc:
            await self.send(p2p.Error(exc.text))
        except (NodeError, trio.TooSlowError) as exc:
            await self.send(p2p.Error(f"proxied repository failed: {exc}"))
            raise SessionEnd(1, f"proxied repository failed: {exc}") from None

    async def dispatch(self, event: p2p.Event) -> None:
        link = self.link
        match event:
            case p2p.CheckPresent(key):
                with trio.fail_after(self.timeout):
                    ok = await link.checkpresent(key)
                await self.send(p2p.Success() if ok else p2p.Failure())
            case p2p.LockContent(key):
                await self.lock_content(key)
            case p2p.Remove(key):
                if not await self.refuse_write(removal=True):
                    await self.remove(key, None)
            case p2p.RemoveBefore(ts, key):
                if not await self.refuse_write(removal=True):
                    await self.remove(key, ts)
            case p2p.GetTimestamp():
                with trio.fail_after(self.timeout):
                    ts = await link.timestamp()
                await self.send(p2p.Timestamp(ts))
            case p2p.Put(af, key):
                if not await self.refuse_write(removal=False):
                    await self.put(af, key)
            case p2p.Get(offset, af, key):
                await self.get(offset, af, key)
            case p2p.Connect() if self.node.special is not None:
                # p2p-protocol.md §9: a special remote has no git repository to serve.
                await self.send(p2p.ConnectDone(1))
                raise SessionEnd(0)
            case p2p.NotifyChange() if self.node.special is not None:
                await self.send(p2p.Error("NOTIFYCHANGE unsupported for a special remote"))
            case p2p.Connect(service):
                # As in git-annex: git is served from the proxy's own repository.
                if await gitconnect.connect(self.channel, self.repo.gitdir_str, service, self.mode):
                    raise SessionEnd(0)
            case p2p.Extensions(words):
                await self.extensions(words)
            case _ if self.objects is not None and self.objects.serves(event):
                await self.objects.handle(event)
            case p2p.Version() | p2p.NotifyChange():
                await self.protocol_error()
            case _:
                await self.not_a_request(event)

    async def extensions(self, words: tuple[str, ...]) -> None:
        """Answer with the asked-for extensions this node can serve (see objectserve)."""
        agreed = tuple(w for w in objectserve.offered(self.link) if w in words)
        if agreed and isinstance(self.link, SpecialLink):
            self.objects = objectserve.ObjectService(self, self.link, agreed)
        await self.send(p2p.Extensions(agreed))

    async def lock_content(self, key: Key) -> None:
        with trio.fail_after(self.timeout):
            locked = await self.link.lockcontent(key)
        if not locked:
            await self.send(p2p.Failure())
            return
        await self.send(p2p.Success())
        # While the client holds the lock there is no bound: a drop can take long. If the
        # client goes away, the node sees our EOF and keeps its 10-minute retention.
        event = await self.event()
        await self.link.unlockcontent()
        if not isinstance(event, p2p.UnlockContent):
            await self.send(p2p.Error("expected UNLOCKCONTENT"))

    def reply_for(self, outcome: Outcome) -> p2p.Message:
        if self.v >= 2 and outcome.plus:
            uuids = (self.node.uuid, *outcome.plus) if outcome.ok else outcome.plus
            return p2p.SuccessPlus(uuids) if outcome.ok else p2p.FailurePlus(uuids)
        return p2p.Success() if outcome.ok else p2p.Failure()

    async def remove(self, key: Key, before: int | None) -> None:
        with trio.fail_after(self.timeout):
            outcome = await self.link.remove(key, before)
        logged = True
        if outcome.ok:
            logged = self.log_present(key, [self.node.uuid, *outcome.plus], present=False)
        elif outcome.plus:
            self.log_present(key, outcome.plus, present=False)
        await self.send(self.reply_for(outcome) if logged else p2p.Failure())

    async def put(self, af: str | None, key: Key) -> None:
        with trio.fail_after(self.timeout):
            answer = await self.link.put(af, key)
        if isinstance(answer, AlreadyHave):
            self.log_present(key, [self.node.uuid, *answer.plus], present=True)
            if self.v >= 2 and answer.plus:
                await self.send(p2p.AlreadyHavePlus(answer.plus))
            else:
                await self.send(p2p.AlreadyHave())
            return
        await self.send(p2p.PutFrom(answer.offset))
        event = await self.event(data=True)
        if isinstance(event, p2p.DataPresent):
            with trio.fail_after(self.timeout):
                outcome = await answer.data_present()
        elif isinstance(event, p2p.Data):
            outcome = await self.relay_upload(answer, event.length)
        else:
            # The node is still waiting for DATA; the only clean way out is to close it.
            await self.send(p2p.Error("expected DATA"))
            raise SessionEnd(1, "client sent no DATA after PUT-FROM")
        logged = not outcome.ok or self.log_present(
            key, [self.node.uuid, *outcome.plus], present=True
        )
        await self.send(self.reply_for(outcome) if logged else p2p.Failure())

    async def relay_upload(self, upload: Upload, length: int) -> Outcome:
        await upload.send_data(length)
        while True:
            event = await self.event()
            if isinstance(event, p2p.BodyEnd):
                break
            assert isinstance(event, p2p.Body)
            await upload.send_piece(event.data)
        valid = await self.client_validity()
        with trio.fail_after(self.timeout):
            return await upload.finish(valid)

    async def get(self, offset: int, af: str | None, key: Key) -> None:
        with trio.fail_after(self.timeout):
            download = await self.link.get(offset, af, key)
        await self.send(p2p.Data(download.length))
        async for piece in download.pieces():
            await self.channel.send_raw(piece)
        with trio.fail_after(self.timeout):
            valid = await download.validity()
        if valid is not None and self.v >= 1:
            await self.send(p2p.Valid() if valid else p2p.Invalid())
        verdict = await self.event()
        await download.verdict(isinstance(verdict, p2p.Success))
        if not isinstance(verdict, p2p.Success | p2p.Failure):
            await self.dispatch(verdict)


async def _serve(repo: Repo, target: Target, client_uuid: str) -> int:
    channel = stdio_channel(idle_timeout=idle_timeout(repo))
    if target.cluster is not None:
        from shell.cluster import GatewaySession  # noqa: PLC0415

        gateway = GatewaySession(repo, channel, client_uuid, target)
        try:
            return await run_session(gateway, gateway.run)
        finally:
            await gateway.close_links()
    session = ProxySession(repo, channel, client_uuid, target.nodes[0])
    try:
        return await run_session(session, session.run)
    finally:
        with trio.CancelScope(shield=True):
            await session.link.aclose()
        link = session.link
        storage = link.storage if isinstance(link, SpecialLink) else None
        written, read = (storage.written, storage.read) if storage is not None else (0, 0)
        session.log_traffic(written, read)


def serve(repo: Repo, target: Target, client_uuid: str) -> int:
    try:
        return trio.run(_serve, repo, target, client_uuid)
    finally:
        restore_stdio()
