"""Fetching annexed content through a proxy into a clone: sources, sessions, resume.

For each key: choose the repositories that have it (`candidates`), try them in order, and
download into the clone's object store the way git-annex does (`AnnexStore.begin_receive`:
a resumable partial in `.git/annex/tmp/<keyfile>`, hash-verified, then renamed into
`.git/annex/objects/...`). Then record in the location log (the journal, which git-annex
adopts on `git annex init`) that this clone has the key.

Choice, best first: a cluster that has the key (its gateway picks a node), a node behind
the proxy, the proxy's own repository, a special remote behind it (the proxy retrieves and
decrypts, the slowest path). A repository the location logs name but no remote reaches is
reported, not tried. `--from` tries exactly the named repository, whatever the logs say.

Resume: an interrupted download leaves its partial; the next attempt sends `GET <offset>`.
Like git-annex's `annex.forward-retry` (default 5), an attempt that failed after making
progress is retried at once, from where it stopped.

Sessions: one `git-annex-shell p2pstdio DIR CLIENT --uuid TARGET` per repository and per
concurrent job, kept open and reused for the next key (the protocol is one request at a
time per session). A repository whose session cannot even be opened is not tried again in
this run.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from git_remote_annexproxy import annexlog, objectclient, urls
from git_remote_annexproxy.branch import AnnexBranch, current_clock
from git_remote_annexproxy.crypto import GpgError
from git_remote_annexproxy.discovery import BranchLogs, RemoteView, Repository
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pclient import P2PRefused, P2PSession, P2PSessionError
from git_remote_annexproxy.specialformat import StorageError
from git_remote_annexproxy.store import AnnexStore, Receive, TransferInProgress

CONNECT_TIMEOUT = 60.0  # ssh + git-annex-shell start + AUTH-SUCCESS + VERSION
IDLE_TIMEOUT = 300.0  # any later wait; a special remote may be slow to start sending
DEFAULT_FORWARD_RETRY = 5  # git-annex's annex.forward-retry default

# Rank of each kind of source, lowest first.
_RANK = {"cluster": 0, "node": 1, "proxy": 2, "repository": 2, "special": 3}


@dataclass(frozen=True)
class Source:
    repo: Repository
    view: RemoteView


def candidates(
    key: Key, views: Sequence[RemoteView], logs: BranchLogs, dead: frozenset[str]
) -> list[Source]:
    """Repositories reachable through `views` that the location logs say have `key`.

    A cluster has it when one of its live nodes does: location logs never name a cluster
    (git-annex derives it from cluster.log the same way).
    """
    present = logs.present(key) - dead
    found: list[tuple[int, int, str, Source]] = []
    for i, view in enumerate(views):
        for repo in view.repositories:
            if repo.dead:
                continue
            has = (
                bool(present.intersection(repo.nodes))
                if repo.kind == "cluster"
                else (repo.uuid in present)
            )
            if has:
                found.append((_RANK[repo.kind], i, repo.name, Source(repo, view)))
    found.sort(key=lambda t: t[:3])
    return [t[3] for t in found]


def why_unavailable(
    key: Key, views: Sequence[RemoteView], logs: BranchLogs, dead: frozenset[str]
) -> str:
    """One line: why no reachable repository has `key`."""
    present = logs.present(key) - dead
    if not present:
        return "no repository is recorded to have it (git fetch may help)"
    names = logs.descriptions()
    where = ", ".join(sorted(f"{names.get(u) or '?'} ({u})" for u in present))
    if not views:
        return f"only in {where}, and no remote is usable"
    via = ", ".join(v.remote for v in views)
    return f"only in {where}, which {via} does not reach"


class SessionPool:
    """Open P2P sessions by target repository UUID, reused between keys."""

    def __init__(
        self,
        nursery: trio.Nursery,
        client_uuid: str,
        env: Mapping[str, str],
        *,
        max_idle: int,
    ) -> None:
        self._nursery = nursery
        self._client_uuid = client_uuid
        self._env = env
        self._max_idle = max_idle
        self._idle: dict[str, list[P2PSession]] = {}
        self._broken: dict[str, str] = {}  # uuid -> why it could not be opened

    async def acquire(self, src: Source) -> P2PSession:
        uuid = src.repo.uuid
        if uuid in self._broken:
            raise P2PSessionError(self._broken[uuid])
        idle = self._idle.get(uuid)
        if idle:
            return idle.pop()
        url = src.view.url
        # Always with --uuid, as git-annex does for an ssh remote: the server then refuses
        # to serve any other repository than the one we mean.
        words = ["p2pstdio", url.path, self._client_uuid, "--uuid", uuid]
        try:
            argv = urls.shell_argv(url, words, self._env)
            return await P2PSession.spawn(
                argv,
                self._nursery,
                name=src.repo.name,
                expected_uuid=uuid,
                env=self._env,
                connect_timeout=CONNECT_TIMEOUT,
                idle_timeout=IDLE_TIMEOUT,
            )
        except ValueError as exc:
            self._broken[uuid] = f"{src.repo.name}: {exc}"
        except P2PSessionError as exc:
            self._broken[uuid] = str(exc)
        raise P2PSessionError(self._broken[uuid])

    async def release(self, session: P2PSession) -> None:
        """Keep a healthy, idle session for reuse; close anything else."""
        total = sum(len(v) for v in self._idle.values())
        if session.dead or session.busy is not None or total >= self._max_idle:
            await session.aclose()
        else:
            self._idle.setdefault(session.uuid, []).append(session)

    async def aclose(self) -> None:
        sessions = [s for v in self._idle.values() for s in v]
        self._idle.clear()
        with trio.CancelScope(shield=True):  # each close is bounded
            for s in sessions:
                await s.aclose()


@dataclass
class Fetched:
    """The outcome for one key."""

    key: Key
    ok: bool
    source: Repository | None = None
    bytes: int = 0  # received over the wire, all attempts
    error: str | None = None


class _Absent(Exception):
    """The source answered that it does not have the content."""


class _BadContent(Exception):
    """What arrived is not the key's content. `resumed`: the partial we started from may
    be what was wrong (it is gone now), so one more try from the start makes sense."""

    def __init__(self, message: str, *, resumed: bool) -> None:
        super().__init__(message)
        self.resumed = resumed


class Fetcher:
    """Downloads keys into one clone's object store."""

    def __init__(
        self,
        gitdir: Path,
        store: AnnexStore,
        pool: SessionPool,
        logs: BranchLogs,
        client_uuid: str,
        *,
        forward_retry: int = DEFAULT_FORWARD_RETRY,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.logs = logs
        self.client_uuid = client_uuid
        self.forward_retry = forward_retry
        self.on_bytes = on_bytes
        self.branch = AnnexBranch(gitdir, gitdir / "annex")
        self.gitdir = gitdir
        self.specials: dict[str, objectclient.SpecialTarget | None] = {}
        self.negotiated: dict[str, objectclient.Negotiated] = {}

    async def fetch(self, key: Key, af: str | None, sources: Sequence[Source]) -> Fetched:
        result = Fetched(key, ok=False)
        errors: list[str] = []
        for src in sources:
            retries = self.forward_retry
            while True:
                before = result.bytes
                try:
                    await self._attempt(key, af, src, result)
                except _Absent:
                    errors.append(f"not present in {src.repo.name}")
                    break
                except _BadContent as exc:
                    errors.append(str(exc))
                    if exc.resumed and retries > 0:
                        retries -= 1
                        continue
                    break
                except (P2PSessionError, OSError, TransferInProgress) as exc:
                    errors.append(_describe(exc, src))
                    if result.bytes > before and retries > 0:
                        retries -= 1  # it moved forward: resume at once
                        continue
                    break
                result.ok, result.source, result.error = True, src.repo, None
                self.record_present(key)
                return result
        result.error = "; ".join(dict.fromkeys(errors)) or "no source to try"
        return result

    async def _special(self, src: Source) -> objectclient.SpecialTarget | None:
        """`src` as an encrypted special remote whose objects we decrypt here, else None."""
        uuid = src.repo.uuid
        if src.repo.kind != "special":
            return None
        if uuid not in self.specials:
            try:
                special = await objectclient.special_target(self.logs, uuid, src.repo.name)
            except (GpgError, ValueError):
                special = None  # we cannot open the cipher: the proxy decrypts, as before
            self.specials[uuid] = special if special and special.encryption else None
            self.negotiated[uuid] = objectclient.Negotiated(lambda line: None)
        return self.specials[uuid]

    async def _objects(
        self, session: P2PSession, special: objectclient.SpecialTarget, key: Key,
        receive: Receive, result: Fetched,
    ) -> None:  # fmt: skip
        async def write(piece: bytes) -> None:
            result.bytes += len(piece)
            self.on_bytes(len(piece))
            receive.write(piece)

        try:
            await objectclient.download_key(
                session, special, key, logs=self.logs, annexdir=self.gitdir / "annex",
                write=write, offset=receive.offset,
            )  # fmt: skip
        except objectclient.ObjectError as exc:
            raise _Absent from exc
        except (GpgError, StorageError) as exc:
            raise _BadContent(f"{special.name}: {exc}", resumed=receive.offset > 0) from None

    async def _attempt(self, key: Key, af: str | None, src: Source, result: Fetched) -> None:
        """One GET from `src` into the partial; raises unless the object is in place."""
        with self.store.begin_receive(key) as receive:
            session = await self.pool.acquire(src)
            resumed = receive.offset > 0
            try:
                special = await self._special(src)
                if special is not None:
                    try:
                        agreed = await self.negotiated[src.repo.uuid].agreed(session)
                    except objectclient.ServerClosed:
                        await self.pool.release(session)  # the offer cost that session
                        session = await self.pool.acquire(src)
                        agreed = None
                    if agreed:
                        await self._objects(session, special, key, receive, result)
                        if not await trio.to_thread.run_sync(receive.finish):
                            why = f"{src.repo.name}: verification of content failed"
                            raise _BadContent(why, resumed=resumed)
                        return
                download = await session.get(key, receive.offset, af)
                async for piece in download:
                    result.bytes += len(piece)
                    self.on_bytes(len(piece))
                    receive.write(piece)  # EFBIG if the server sends more than the key
                if download.length == 0 and download.valid is False:
                    await download.verdict(False)
                    raise _Absent
                if download.valid is False and not key.verifiable:
                    # INVALID: the file changed while the server read it, and nothing
                    # but its size could show that the bytes are wrong.
                    receive.discard()
                    await download.verdict(False)
                    raise _BadContent(f"{src.repo.name}: content changed while sent", resumed=False)
                ok = await trio.to_thread.run_sync(receive.finish)
                await download.verdict(ok)
                if not ok:
                    why = f"{src.repo.name}: verification of content failed"
                    raise _BadContent(why, resumed=resumed)
            finally:
                with trio.CancelScope(shield=True):  # a close is bounded
                    await self.pool.release(session)

    def record_present(self, key: Key) -> None:
        """Log `key` present here, in the journal, on top of the union of all the branches
        (the journal replaces a branch file, so it must carry every other line too)."""
        path = annexlog.location_log_path(key)
        clock = current_clock()

        def change(current: bytes | None) -> bytes:
            merged = self.logs.read(path)
            if self.client_uuid in annexlog.present_uuids(merged):
                return current or b""
            return annexlog.add_presence(merged, self.client_uuid, True, clock)

        self.branch.change(path, change)


def _describe(exc: BaseException, src: Source) -> str:
    if isinstance(exc, TransferInProgress):
        return "another process is downloading it"
    if isinstance(exc, P2PRefused):
        return f"{src.repo.name} refused: {exc.text}"
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return f"{src.repo.name} sent more data than the key's size"
    if isinstance(exc, OSError):
        return f"cannot write: {exc.strerror or exc}"
    return str(exc)
