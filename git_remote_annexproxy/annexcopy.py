"""`git annexproxy copy --to NAME`: upload annexed content through a proxy, without git-annex.

NAME is any repository `git annexproxy info` lists: a proxy remote itself (`origin`), a
cluster (`origin-mycluster`), a node or a special remote behind it. For each annexed file
under PATH whose object is in this clone's store, the key is offered once with `PUT` over a
pooled `git-annex-shell p2pstdio DIR CLIENT --uuid NAME-UUID` session (as `get` does,
`annexget.SessionPool`); content whose object is not here is skipped silently, as
git-annex does.

What git-annex 10.20261026 does, and what we do (checked on the wire against our proxy):

* `git annex copy --to` (without --fast) does not trust its location log: it asks
  `CHECKPRESENT` first, then `PUT`s. We ask `CHECKPRESENT` only for keys the log says NAME
  has; for the others we `PUT` at once, since `ALREADY-HAVE` answers the same question in
  the same round trip. Outcome identical, one round trip less per new file.
* After an upload git-annex logs, in the client's location log, the UUID it sent to plus
  the UUIDs of `SUCCESS-PLUS` / `ALREADY-HAVE-PLUS`, minus cluster UUIDs: after a copy to
  a cluster the client's log names the nodes that stored it, never the cluster. So do we,
  in the journal (adopted by `git annex init`, and read by `get`/`info`).
* The server logs the same in its own git-annex branch (a proxy or gateway logs the node
  UUIDs), so other clones learn it from `git fetch`; nothing needs to be pushed.

Resume: a cut upload leaves the server a partial; the next `PUT` is answered `PUT-FROM
<offset>` and only the rest is sent. Like `get`, an attempt that made progress before it
failed is retried at once, up to `annex.forward-retry` times.

The seam for other upload methods (client-side encryption for special remotes): an upload
of one key over one session is an `UploadMethod`; `method_for(target)` chooses it.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from git_remote_annexproxy import annexlog, clientrepo, discovery, objectclient
from git_remote_annexproxy.annexget import DEFAULT_FORWARD_RETRY, SessionPool, Source
from git_remote_annexproxy.branch import AnnexBranch, current_clock
from git_remote_annexproxy.clientrepo import Clone, Fatal, find_clone, int_config
from git_remote_annexproxy.crypto import Gpg, GpgError
from git_remote_annexproxy.discovery import BranchLogs, Repository
from git_remote_annexproxy.gitenv import without_local_repo
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pclient import P2PRefused, P2PSession, P2PSessionError
from git_remote_annexproxy.report import Progress, Report
from git_remote_annexproxy.store import AnnexStore, ContentLocked
from git_remote_annexproxy.worktree import POINTER_READ, in_scope, parse_link_or_pointer

GIT_TIMEOUT = 300.0  # one git plumbing command over the whole index or a tree diff


# --- the seam: one key, one target, one session ----------------------------------------------


@dataclass
class Sent:
    """The outcome of one upload attempt. `stored`: UUIDs the server says now have the key
    (the target's, plus any listed); `already`: nothing had to be sent."""

    ok: bool
    stored: tuple[str, ...] = ()
    already: bool = False
    error: str | None = None


class UploadMethod(Protocol):
    async def __call__(
        self,
        session: P2PSession,
        store: AnnexStore,
        key: Key,
        af: str | None,
        on_bytes: Callable[[int], None],
    ) -> Sent:
        """Upload `key` from `store` over `session`, calling `on_bytes(n)` as content
        crosses. Raise P2PSessionError/OSError when the session broke (the caller may
        retry: a server keeps what it received), P2PRefused for an ERROR answer."""
        ...


async def put_content(
    session: P2PSession,
    store: AnnexStore,
    key: Key,
    af: str | None,
    on_bytes: Callable[[int], None],
) -> Sent:
    """The plain P2P upload: PUT, then the object from the offset the server asks for."""
    with store.lock_shared(key):  # not removed while it is read
        source = store.open_object(key)
        if source is None:
            raise FileNotFoundError(errno.ENOENT, "content not present")
        with source:
            before = os.fstat(source.fileno())
            if key.size is not None and before.st_size != key.size:
                raise OSError(errno.EIO, "local content has the wrong size (git annex fsck)")

            def unchanged() -> bool:
                after = os.fstat(source.fileno())
                return (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

            upload = await session.put(key, af)
            if upload.already:
                return Sent(True, (session.uuid, *upload.plus), already=True)
            source.seek(upload.offset)
            length = max(0, before.st_size - upload.offset)
            stored = await upload.send(source, length, unchanged=unchanged, on_bytes=on_bytes)
    if not stored.ok:
        why = f"{session.name} did not store it (verification failed there?)"
        return Sent(False, stored.plus, error=why)
    return Sent(True, (session.uuid, *stored.plus))


class EncryptedUpload:
    """An encrypted special remote: chunked and encrypted here, finished objects sent
    (objectclient.py); a plain PUT when the server does not offer that (said once)."""

    def __init__(self, special: objectclient.SpecialTarget, annexdir: Path,
                 pool: SessionPool, source: Source) -> None:  # fmt: skip
        self.special, self.annexdir, self.pool, self.source = special, annexdir, pool, source
        self.negotiated = objectclient.Negotiated(lambda line: print(line, file=sys.stderr))

    async def __call__(
        self, session: P2PSession, store: AnnexStore, key: Key, af: str | None,
        on_bytes: Callable[[int], None],
    ) -> Sent:  # fmt: skip
        try:
            agreed = await self.negotiated.agreed(session)
        except objectclient.ServerClosed:
            fresh = await self.pool.acquire(self.source)  # the offer cost that session
            try:
                return await put_content(fresh, store, key, af, on_bytes)
            finally:
                with trio.CancelScope(shield=True):
                    await self.pool.release(fresh)
        if agreed is None:
            return await put_content(session, store, key, af, on_bytes)

        with store.lock_shared(key):
            source = store.open_object(key)
            if source is None:
                raise FileNotFoundError(errno.ENOENT, "content not present")
            with source:
                try:
                    result = await objectclient.upload_key(
                        session, self.special, key, source, agreed=agreed,
                        annexdir=self.annexdir, on_bytes=on_bytes,
                    )  # fmt: skip
                except objectclient.ObjectError as exc:
                    return Sent(False, (), error=str(exc))
        return Sent(True, (session.uuid,), already=result == "already")


def method_for(
    target: Repository, special: objectclient.SpecialTarget | None, annexdir: Path,
    pool: SessionPool, source: Source,
) -> UploadMethod:  # fmt: skip
    """How content goes to `target`: an encrypted special remote gets client-side
    encryption, an S3 one indirect uploads straight to the storage (both negotiated per
    session, a plain PUT when the server does not offer them); everything else the plain
    PUT."""
    if special is not None and (special.encryption is not None or special.kind == "S3"):
        return EncryptedUpload(special, annexdir, pool, source)
    return put_content


# --- uploading with sessions, retries and the location log ------------------------------------


@dataclass
class Copied:
    """The outcome for one key, all attempts."""

    key: Key
    ok: bool
    bytes: int = 0
    skipped: bool = False  # NAME already had it (the log said so and CHECKPRESENT agreed)
    error: str | None = None


class Uploader:
    """Uploads keys from one clone's store to one target repository."""

    def __init__(
        self,
        commondir: Path,
        store: AnnexStore,
        pool: SessionPool,
        logs: BranchLogs,
        target: Source,
        *,
        forward_retry: int = DEFAULT_FORWARD_RETRY,
        on_bytes: Callable[[int], None] = lambda n: None,
        special: objectclient.SpecialTarget | None = None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.logs = logs
        self.target = target
        self.method = method_for(target.repo, special, commondir / "annex", pool, target)
        self.forward_retry = forward_retry
        self.on_bytes = on_bytes
        self.branch = AnnexBranch(commondir, commondir / "annex")

    def logged_present(self, key: Key) -> bool:
        """Does the location log say the target has `key` (a cluster: one of its nodes)?"""
        present = self.logs.present(key)
        repo = self.target.repo
        return bool(present.intersection(repo.nodes)) if repo.kind == "cluster" else (
            repo.uuid in present
        )  # fmt: skip

    async def copy(self, key: Key, af: str | None) -> Copied:
        result = Copied(key, ok=False)
        retries = self.forward_retry
        check = self.logged_present(key)
        while True:
            before = result.bytes
            try:
                sent = await self._attempt(key, af, check, result)
            except (P2PSessionError, OSError, ContentLocked) as exc:
                result.error = self._describe(exc)
                if result.bytes > before and retries > 0:
                    retries -= 1  # it moved forward: resume at once
                    continue
                return result
            if sent.stored:
                self.record_present(key, sent.stored)
            result.ok, result.error = sent.ok, sent.error
            result.skipped = sent.already and check
            return result

    async def _attempt(self, key: Key, af: str | None, check: bool, result: Copied) -> Sent:
        session = await self.pool.acquire(self.target)

        def counted(n: int) -> None:
            result.bytes += n
            self.on_bytes(n)

        try:
            if check and await session.checkpresent(key):
                return Sent(True, (session.uuid,), already=True)
            return await self.method(session, self.store, key, af, counted)
        finally:
            with trio.CancelScope(shield=True):  # a close is bounded
                await self.pool.release(session)

    def _describe(self, exc: BaseException) -> str:
        name = self.target.repo.name
        if isinstance(exc, P2PRefused):
            return f"{name}: {exc.text}"
        if isinstance(exc, ContentLocked):
            return "the local content is locked for removal"
        if isinstance(exc, FileNotFoundError):
            return "the local content went away"
        if isinstance(exc, OSError):
            return f"cannot read the local content: {exc.strerror or exc}"
        return str(exc)

    def record_present(self, key: Key, uuids: Iterable[str]) -> None:
        """Log `key` present in `uuids` (never a cluster UUID), in the journal, on top of
        the union of all the branches (a journal file replaces the branch's)."""
        wanted = sorted({u for u in uuids if not annexlog.is_cluster_uuid(u)})
        if not wanted:
            return
        path = annexlog.location_log_path(key)
        clock = current_clock()

        def change(current: bytes | None) -> bytes:
            merged = self.logs.read(path)
            have = annexlog.present_uuids(merged)
            if have.issuperset(wanted):
                return current if current is not None else merged
            for u in wanted:
                if u not in have:
                    merged = annexlog.add_presence(merged, u, True, clock)
            return merged

        self.branch.change(path, change)


def copy_keys(
    clone: Clone,
    target_name: str,
    wanted: Mapping[Key, Sequence[str]],
    report: Report,
    *,
    jobs: int = 1,
    env: Mapping[str, str] | None = None,
) -> None:
    """Upload every key of `wanted` ({key: the files that use it}) whose object is here to
    the repository called `target_name`; each file is reported. Used by `copy` and by the
    remote helper after a push."""
    logs = BranchLogs(clone.commondir)
    target = find_target(clone, logs, target_name)  # a wrong name is an error in any case
    store = AnnexStore(clone.commondir, bare=clone.top is None)
    present = {k: files for k, files in wanted.items() if files and store.has(k)}
    if not present:
        return
    client = discovery.client_uuid(clone.commondir, clone.config)
    retry = int_config(clone.config, "annex.forward-retry", DEFAULT_FORWARD_RETRY)
    progress = report.progress
    progress.total_files = sum(len(fs) for fs in present.values())
    progress.total_bytes = sum((k.size or 0) * len(fs) for k, fs in present.items())
    progress.started = time.monotonic()

    def finished(files: Sequence[str], res: Copied) -> None:
        for i, path in enumerate(files):
            if res.skipped:
                pass  # already there: nothing to say, as `get` for content already here
            elif res.ok:
                # A key's bytes count once, however many files use it.
                report.ok(path, res.key, target.repo.name, 0 if i else res.bytes, target.repo.uuid)
            else:
                report.fail(path, res.key, res.error or "failed")
            progress.file_done()
        report.bytes += res.bytes

    async def run() -> None:
        session_env = without_local_repo(os.environ if env is None else env)
        async with trio.open_nursery() as nursery:
            pool = SessionPool(nursery, client, session_env, max_idle=jobs)
            special = None
            if target.repo.kind == "special":
                # A hybrid cipher is opened with the user's keyring; without a key that
                # opens it, the proxy encrypts (a plain PUT), as git-annex would.
                try:
                    special = await objectclient.special_target(
                        logs, target.repo.uuid, target.repo.name,
                        Gpg(program=clone.config.get("gpg.program") or "gpg"),
                    )  # fmt: skip
                except (GpgError, ValueError) as exc:
                    print(f"{target.repo.name}: {exc}; the proxy will encrypt",
                          file=sys.stderr)  # fmt: skip
            uploader = Uploader(
                clone.commondir, store, pool, logs, target,
                forward_retry=retry, on_bytes=progress.add, special=special,
            )  # fmt: skip
            limiter = trio.CapacityLimiter(jobs)

            async def one(key: Key, files: Sequence[str]) -> None:
                async with limiter:
                    finished(files, await uploader.copy(key, files[0]))

            try:
                async with trio.open_nursery() as running:
                    for key, files in present.items():
                        running.start_soon(one, key, files)
            finally:
                await pool.aclose()

    trio.run(run)


def find_target(clone: Clone, logs: BranchLogs, name: str) -> Source:
    """The repository `name` as `git annexproxy info` lists it; Fatal if there is none."""
    views, errors = clientrepo.views(clone, logs, None)
    for view in views:
        repo = view.by_name(name)
        if repo is not None:
            if repo.dead:
                raise Fatal(f"{name} is dead (git annex semitrust may revive it)")
            return Source(repo, view)
    why = f"; {errors[0]}" if errors else ""
    raise Fatal(f"no repository named {name} (see git annexproxy info){why}")


# --- which keys: annexed files in the index, or in trees --------------------------------------


def git_lines(gitdir: Path, args: Sequence[str], *, top: Path | None = None) -> list[bytes]:
    """NUL-separated output of a git plumbing command on this repository (run at the top
    of the work tree if given: ls-files lists only what is under the current directory)."""
    where = [f"--git-dir={gitdir}"] + ([f"--work-tree={top}"] if top is not None else [])
    proc = subprocess.run(
        ["git", *where, *args],
        cwd=top,
        env=without_local_repo(),
        capture_output=True,
        check=False,
        timeout=GIT_TIMEOUT,
    )
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise Fatal(f"git {args[0]}: {said[-1] if said else 'failed'}")
    return [item for item in proc.stdout.split(b"\0") if item]


def keys_of_blobs(
    gitdir: Path, entries: Sequence[tuple[str, str, str]]
) -> Iterator[tuple[str, Key]]:
    """(path, key) for the entries (mode, blob sha, path) that are annexed: symlinks into
    annex/objects and pointer files (git-annex's rule: a small blob whose first line is
    `/annex/objects/KEY`). Only blobs small enough to be a pointer are read."""
    candidates = [(m, sha, p) for m, sha, p in entries if m in ("120000", "100644", "100755")]
    shas = list(dict.fromkeys(sha for _, sha, _ in candidates))
    if not shas:
        return
    sizes = _batch(gitdir, ["cat-file", "--batch-check=%(objectname) %(objectsize)"], shas)
    small = [s for s in shas if int(sizes.get(s, b"-1") or -1) in range(1, POINTER_READ + 1)]
    contents = _batch(gitdir, ["cat-file", "--batch"], small, with_content=True)
    for _, sha, path in candidates:
        data = contents.get(sha)
        key = parse_link_or_pointer(data) if data is not None else None
        if key is not None:
            yield path, key


def _batch(
    gitdir: Path, args: Sequence[str], shas: Sequence[str], *, with_content: bool = False
) -> dict[str, bytes]:
    """`git cat-file --batch(-check)` over `shas`: {sha: the rest of its header line} or,
    with_content, {sha: the object's content}."""
    if not shas:
        return {}
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", *args],
        input="".join(s + "\n" for s in shas).encode(),
        env=without_local_repo(),
        capture_output=True,
        check=False,
        timeout=GIT_TIMEOUT,
    )
    if proc.returncode != 0:
        raise Fatal(f"git cat-file: {proc.stderr.decode('utf-8', 'replace').strip()}")
    out, pos, found = proc.stdout, 0, {}
    while pos < len(out):
        end = out.index(b"\n", pos)
        header = out[pos:end].split(b" ")
        pos = end + 1
        sha = header[0].decode()
        if len(header) < 2 or header[1] == b"missing":
            continue
        if not with_content:
            found[sha] = header[1]
            continue
        size = int(header[2])
        found[sha] = out[pos : pos + size]
        pos += size + 1  # the content, then a newline
    return found


def index_entries(
    clone: Clone, scopes: Sequence[str], matched: set[str]
) -> list[tuple[str, str, str]]:
    """(mode, sha, path) of the index entries under `scopes` (conflicts left out)."""
    entries = []
    for item in git_lines(clone.gitdir, ["ls-files", "-z", "--stage"], top=clone.top):
        meta, _, raw = item.partition(b"\t")
        mode, sha, stage = meta.decode().split(" ")
        path = os.fsdecode(raw)
        if stage != "0" or not in_scope(path, scopes):
            continue
        matched.update(s for s in scopes if in_scope(path, [s]))
        entries.append((mode, sha, path))
    return entries


# --- the command -----------------------------------------------------------------------------


def cmd_copy(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise Fatal("-J needs a number of jobs of at least 1")
    clone = find_clone()
    if clone.top is None:
        raise Fatal("copy needs a work tree")
    scopes = [clientrepo.scope(clone, p) for p in args.paths or ["."]]
    progress = Progress(enabled=sys.stderr.isatty() and not args.json and not args.quiet)
    progress.verb = "copy"
    report = Report(args.json, args.quiet, progress, verb="copy", direction="to")

    matched: set[str] = set()
    entries = index_entries(clone, scopes, matched)
    for scope, arg in zip(scopes, args.paths, strict=False):  # only paths the user gave
        if scope not in matched:
            report.fail(arg, None, "did not match any file known to git")
    wanted: dict[Key, list[str]] = {}
    for path, key in keys_of_blobs(clone.gitdir, entries):
        wanted.setdefault(key, []).append(path)
    copy_keys(clone, args.target, wanted, report, jobs=args.jobs)
    report.summary()
    return 1 if report.failed else 0
