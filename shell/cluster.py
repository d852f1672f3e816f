"""The cluster gateway: one p2pstdio session in front of all of a cluster's nodes
(p2p-protocol.md §10).

Nodes are opened lazily, in a nursery that lives as long as the session; every node call is
bounded by `fail_after`, and a node that fails, hangs or dies only drops out of the request
at hand (an upload still lands on the nodes that work, and the answer names exactly those).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from git_remote_annexproxy import p2p
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import P2PChannel
from shell import gatewayrules as rules
from shell import gitconnect
from shell.front import FrontSession, annex_jobs
from shell.nodelink import (
    AlreadyHave,
    Download,
    NodeError,
    NodeLink,
    NodeRefused,
    Outcome,
    Upload,
    make_link,
)
from shell.p2pserver import SessionEnd, warn
from shell.placement import Placement
from shell.proxyselect import Remote, Target
from shell.repo import Repo
from shell.service.repository import monotonic_seconds

T = TypeVar("T")


class GatewaySession(FrontSession):
    def __init__(self, repo: Repo, channel: P2PChannel, client_uuid: str, target: Target) -> None:
        super().__init__(repo, channel, client_uuid, target.uuid)
        self.target = target
        self.bypass: frozenset[str] = frozenset()
        self.links: dict[str, NodeLink] = {}  # by remote name
        self.failed: set[str] = set()  # remote names that could not be opened
        self.jobs = trio.CapacityLimiter(max(annex_jobs(repo), len(target.nodes), 1))
        self.placement = Placement.load(self.branch, repo)
        # GETTIMESTAMP: each node's clock and ours, to translate REMOVE-BEFORE deadlines.
        self.clocks: dict[str, int] | None = None
        self.gateway_clock = 0

    # -- nodes -------------------------------------------------------------------------

    def nodes(self) -> list[Remote]:
        """The cluster's nodes for this session: never ourselves, never a bypassed gateway."""
        skip = self.bypass | {self.own_uuid}
        out = []
        for node in self.target.nodes:
            gateway = node.via.uuid if node.via is not None else None
            if node.uuid in skip or (gateway is not None and gateway in skip):
                continue
            out.append(node)
        return out

    async def link(self, node: Remote) -> NodeLink | None:
        """The open link to `node`, opened on first use; None if it cannot be reached."""
        if node.name in self.failed:
            return None
        link = self.links.get(node.name)
        if link is not None and not getattr(link, "dead", False):
            return link
        link = make_link(node, self.own_uuid, self.timeout, self.repo.config, self.repo.gitdir)
        self.links[node.name] = link
        try:
            with trio.fail_after(self.timeout):
                await link.open(self.v, self.bypass | {self.own_uuid})
        except (NodeError, trio.TooSlowError) as exc:
            warn(f"  cluster node {node.name} is not available: {exc}")
            self.failed.add(node.name)
            await link.aclose()
            return None
        return link

    async def call(
        self,
        node: Remote,
        fn: Callable[[NodeLink], Awaitable[T]],
        refusal: list[str] | None = None,
    ) -> T | None:
        """Run one bounded request on one node; None if the node failed. A node's ERROR
        text is appended to `refusal` when given (REMOVE relays the first one)."""
        link = await self.link(node)
        if link is None:
            return None
        try:
            with trio.fail_after(self.timeout):
                return await fn(link)
        except NodeRefused as exc:
            warn(f"  {exc}")
            if refusal is not None:
                refusal.append(exc.text)
            return None
        except (NodeError, trio.TooSlowError) as exc:
            warn(f"  cluster node {node.name} failed: {exc}")
            self.failed.add(node.name)
            await link.aclose()
            return None

    async def fan_out(
        self, nodes: list[Remote], fn: Callable[[NodeLink], Awaitable[T]]
    ) -> list[tuple[Remote, T | None]]:
        results: list[tuple[Remote, T | None]] = [(n, None) for n in nodes]

        async def one(i: int, node: Remote) -> None:
            async with self.jobs:
                results[i] = (node, await self.call(node, fn))

        async with trio.open_nursery() as nursery:
            for i, node in enumerate(nodes):
                nursery.start_soon(one, i, node)
        return results

    async def close_links(self) -> None:
        with trio.CancelScope(shield=True):
            for link in self.links.values():
                await link.aclose()

    def holders(self, key: Key) -> list[Remote]:
        """Nodes our location log says have the key: cheapest first, random among equals."""
        logged = self.placement.locations(key)
        nodes = [n for n in self.nodes() if n.uuid in logged]
        random.shuffle(nodes)
        return sorted(nodes, key=lambda n: n.cost)

    # -- the session -------------------------------------------------------------------

    async def run(self) -> None:
        await self.send(p2p.AuthSuccess(self.served))
        first = await self.event()
        if isinstance(first, p2p.Version):
            # Answered at once: nodes are contacted lazily and may speak older versions.
            self.version = min(first.n, p2p.MAX_VERSION)
            await self.send(p2p.Version(self.version))
            if self.version >= 2:
                first = await self.event()
                if isinstance(first, p2p.Bypass):
                    self.bypass = frozenset(first.uuids)
                else:
                    await self.handle(first)
        else:
            await self.handle(first)
        while True:
            await self.handle(await self.event())

    async def handle(self, event: p2p.Event) -> None:
        match event:
            case p2p.CheckPresent(key):
                await self.checkpresent(key)
            case p2p.LockContent():
                # Clients lock individual nodes for drop proofs, never the cluster.
                await self.send(p2p.Failure())
            case p2p.Remove(key):
                if not await self.refuse_write(removal=True):
                    await self.remove(key, None)
            case p2p.RemoveBefore(ts, key):
                if not await self.refuse_write(removal=True):
                    await self.remove(key, ts)
            case p2p.GetTimestamp():
                await self.timestamp()
            case p2p.Put(af, key):
                if not await self.refuse_write(removal=False):
                    await self.put(af, key)
            case p2p.Get(offset, af, key):
                await self.get(offset, af, key)
            case p2p.UnlockContent():
                pass
            case p2p.Connect(service):
                # As in git-annex: git is served from the proxy's own repository.
                if await gitconnect.connect(self.channel, self.repo.gitdir_str, service, self.mode):
                    raise SessionEnd(0)
            case p2p.Version() | p2p.NotifyChange():
                await self.protocol_error()
            case _:
                await self.not_a_request(event)

    async def checkpresent(self, key: Key) -> None:
        for node in self.holders(key):
            present = await self.call(node, lambda link: link.checkpresent(key))
            if present is not None:
                await self.send(p2p.Success() if present else p2p.Failure())
                return
        await self.send(p2p.Failure())

    async def get(self, offset: int, af: str | None, key: Key) -> None:
        for node in self.holders(key):
            download = await self.call(node, lambda link: link.get(offset, af, key))
            if download is None:
                continue
            await self.send(p2p.Data(download.length))
            try:
                async for piece in download.pieces():
                    await self.channel.send_raw(piece)
                with trio.fail_after(self.timeout):
                    valid = await download.validity()
            except (NodeError, trio.TooSlowError) as exc:
                # Mid-DATA there is no way to tell the client but to close.
                raise SessionEnd(1, f"cluster node {node.name} failed during GET: {exc}") from None
            if self.v >= 1:
                await self.send(p2p.Valid() if valid in (True, None) else p2p.Invalid())
            verdict = await self.event()
            await self.call(node, _verdict_call(download, isinstance(verdict, p2p.Success)))
            if not isinstance(verdict, p2p.Success | p2p.Failure):
                await self.handle(verdict)
            return
        await self.send(p2p.Data(0))
        if self.v >= 1:
            await self.send(p2p.Invalid())
        verdict = await self.event()
        if not isinstance(verdict, p2p.Success | p2p.Failure):
            await self.handle(verdict)

    async def timestamp(self) -> None:
        nodes = self.nodes()
        results = await self.fan_out(nodes, lambda link: link.timestamp())
        now = monotonic_seconds()
        self.clocks = {n.name: ts for n, ts in results if ts is not None}
        self.gateway_clock = now
        if len(nodes) == 1 and self.clocks:
            # A single node's clock is relayed as it is.
            ts = next(iter(self.clocks.values()))
            self.gateway_clock = ts
            await self.send(p2p.Timestamp(ts))
            return
        await self.send(p2p.Timestamp(now))

    async def remove(self, key: Key, before: int | None) -> None:
        nodes = self.nodes()
        # Per node, in node order: the ERROR text it answered, if any. A node that is down
        # or timed out counts as "removed nothing", not as an error (spec §10).
        errors: list[list[str]] = [[] for _ in nodes]

        async def one(i: int, node: Remote) -> rules.NodeReply:
            deadline = before
            if before is not None and self.clocks is not None and node.name in self.clocks:
                deadline = rules.translate_deadline(
                    before, self.gateway_clock, self.clocks[node.name]
                )
            outcome = await self.call(node, lambda link: link.remove(key, deadline), errors[i])
            if outcome is None:
                return rules.NodeReply(node.uuid, ok=False)
            return rules.NodeReply(node.uuid, outcome.ok, outcome.plus, plus_only=not outcome.ok)

        replies: list[rules.NodeReply] = [rules.NodeReply("", False)] * len(nodes)

        async def slot(i: int, node: Remote) -> None:
            async with self.jobs:
                replies[i] = await one(i, node)

        async with trio.open_nursery() as nursery:
            for i, node in enumerate(nodes):
                nursery.start_soon(slot, i, node)
        logged = True
        for r in replies:
            if r.ok or r.plus_only:
                uuids = [r.uuid, *r.plus] if r.ok else r.plus
                logged = self.log_present(key, uuids, present=False) and logged
        if not logged:
            await self.send(p2p.Failure())
            return
        first_error = next((e[0] for e in errors if e), None)
        await self.send(rules.remove_reply(replies, self.v, self.served, first_error))

    async def put(self, af: str | None, key: Key) -> None:
        # Sizes are read afresh here: a store or removal this session (or a concurrent
        # one) logged in the journal already counts, as git-annex's live update does.
        targets = self.placement.targets(
            self.nodes(), lambda n: n.uuid, key, af, name_of=lambda n: n.name
        )
        answers = await self.fan_out(targets, lambda link: link.put(af, key))
        uploads: list[tuple[Remote, Upload]] = []
        had: list[rules.NodeReply] = []
        for node, answer in answers:
            if isinstance(answer, AlreadyHave):
                had.append(rules.NodeReply(node.uuid, True, answer.plus))
            elif answer is not None:
                uploads.append((node, answer))
        for r in had:
            self.log_present(key, [r.uuid, *r.plus], present=True)
        if not uploads:
            if had:
                await self.send(rules.already_have_reply(had, self.v, self.served))
            else:
                # No node could take it; a client only accepts PUT-FROM or ALREADY-HAVE
                # here, so this ERROR ends its attempt, and it retries later.
                await self.send(p2p.Error("no cluster node is available to store the content"))
            return
        start = min(u.offset for _, u in uploads)
        await self.send(p2p.PutFrom(start))
        event = await self.event(data=True)
        if isinstance(event, p2p.DataPresent):
            results = await self.fan_out_uploads(uploads, lambda u: u.data_present())
        elif isinstance(event, p2p.Data):
            results = await self.stream_to(uploads, start, event.length)
        else:
            await self.send(p2p.Error("expected DATA"))
            raise SessionEnd(1, "client sent no DATA after PUT-FROM")
        stored = [rules.NodeReply(node.uuid, o.ok, o.plus) for node, o in results if o is not None]
        logged = True
        for r in stored:
            if r.ok:
                logged = self.log_present(key, [r.uuid, *r.plus], present=True) and logged
        await self.send(rules.put_reply(stored + had, self.v) if logged else p2p.Failure())

    async def fan_out_uploads(
        self, uploads: list[tuple[Remote, Upload]], fn: Callable[[Upload], Awaitable[T]]
    ) -> list[tuple[Remote, T | None]]:
        results: list[tuple[Remote, T | None]] = [(n, None) for n, _ in uploads]

        async def one(i: int, node: Remote, upload: Upload) -> None:
            try:
                with trio.fail_after(self.timeout):
                    results[i] = (node, await fn(upload))
            except (NodeError, trio.TooSlowError) as exc:
                warn(f"  cluster node {node.name} failed: {exc}")
                self.failed.add(node.name)

        async with trio.open_nursery() as nursery:
            for i, (node, upload) in enumerate(uploads):
                nursery.start_soon(one, i, node, upload)
        return results

    async def stream_to(
        self, uploads: list[tuple[Remote, Upload]], start: int, length: int
    ) -> list[tuple[Remote, Outcome | None]]:
        """Feed the client's DATA to every upload, each from its own offset.

        A node that fails or stalls is dropped from the rest of the stream; the others go
        on. Each gets `DATA` with its own length (the client's minus what it already has).
        """
        live: list[tuple[Remote, Upload, int]] = []  # node, upload, bytes still to skip
        for node, upload in uploads:
            skip = upload.offset - start
            try:
                with trio.fail_after(self.timeout):
                    await upload.send_data(max(length - skip, 0))
                live.append((node, upload, skip))
            except (NodeError, trio.TooSlowError) as exc:
                warn(f"  cluster node {node.name} failed: {exc}")
        while True:
            event = await self.event()
            if isinstance(event, p2p.BodyEnd):
                break
            assert isinstance(event, p2p.Body)
            piece = event.data
            survivors = []
            for node, upload, to_skip in live:
                part = piece[to_skip:] if to_skip else piece
                try:
                    if part:
                        with trio.fail_after(self.timeout):
                            await upload.send_piece(part)
                    survivors.append((node, upload, max(to_skip - len(piece), 0)))
                except (NodeError, trio.TooSlowError) as exc:
                    warn(f"  cluster node {node.name} failed: {exc}")
                    self.failed.add(node.name)
            live = survivors
        valid = await self.client_validity()
        return await self.fan_out_uploads([(n, u) for n, u, _ in live], lambda u: u.finish(valid))


def _verdict_call(download: Download, ok: bool) -> Callable[[NodeLink], Awaitable[None]]:
    """Pass the client's verdict on a GET to the node that served it."""

    async def call(_link: NodeLink) -> None:
        await download.verdict(ok)

    return call
