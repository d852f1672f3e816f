"""`git annexproxy`: what sits behind a proxy remote, and annexed content without git-annex.

    git annexproxy info [REMOTE] [--json]
    git annexproxy get [--from NAME] [-J N] [--json] [-q] [PATH...]
    git annexproxy add [--json] [-q] PATH...
    git annexproxy copy --to NAME [-J N] [--json] [-q] [PATH...]

`info` lists, per remote with a fetched git-annex branch, the remote's own repository and
the ones it proxies (nodes, clusters, special remotes; `discovery.py`). `get` finds the
annexed files under PATH whose content is missing (`worktree.py`), downloads each key once
through the proxy (`annexget.py`), puts it in the object store so the symlinks resolve, and
fills in unlocked files. `add` annexes files as git-annex does (`annexadd.py`); `copy`
uploads their content through the proxy to NAME (`annexcopy.py`).

Output: stdout carries results (a table, `get FILE (from NAME) ok` lines, or with --json one
JSON object per line); stderr carries progress (only on a terminal), one line per failure,
and the summary `get: N files, M bytes, K failed`. Usage errors are one `fatal: ...` line
and exit 1, as git's; a run where anything failed exits 1.

Nothing heavy is imported before it is needed: `get` with nothing to do reads the index,
looks at the object store and exits, with no trio, no network and no server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from git_remote_annexproxy import clientrepo
from git_remote_annexproxy.clientrepo import Clone, Fatal, find_clone, int_config
from git_remote_annexproxy.gitenv import without_local_repo
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.report import Progress, Report
from git_remote_annexproxy.store import AnnexStore
from git_remote_annexproxy.worktree import AnnexedFile, Populated, annexed_files, populate, restage

if TYPE_CHECKING:
    from git_remote_annexproxy.annexget import Fetched
    from git_remote_annexproxy.discovery import RemoteView, Repository


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Fatal(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="git annexproxy",
        description="What sits behind a proxy remote, and annexed content without git-annex. "
        "See git-annexproxy(1).",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="list the repositories behind a remote")
    info.add_argument("remote", nargs="?", help="a git remote (default: every one)")
    info.add_argument("--json", action="store_true", help="one JSON object per line")
    get = sub.add_parser("get", help="download the content of annexed files")
    get.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default .)")
    get.add_argument("--from", dest="source", metavar="NAME", help="only this repository")
    get.add_argument("-J", "--jobs", type=int, default=1, metavar="N", help="parallel downloads")
    get.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    get.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    add = sub.add_parser("add", help="annex files as git-annex does (SHA256E, symlinks)")
    add.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    add.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    add.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    copy = sub.add_parser("copy", help="upload the content of annexed files through the proxy")
    copy.add_argument("paths", nargs="*", metavar="PATH", help="files or directories (default .)")
    copy.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="NAME",
        help="the proxy, a cluster, a node or a special remote behind it",
    )
    copy.add_argument("-J", "--jobs", type=int, default=1, metavar="N", help="parallel uploads")
    copy.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    copy.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "info":
            return cmd_info(args)
        if args.command == "add":
            from git_remote_annexproxy.annexadd import cmd_add  # noqa: PLC0415

            return cmd_add(args)
        if args.command == "copy":
            from git_remote_annexproxy.annexcopy import cmd_copy  # noqa: PLC0415

            return cmd_copy(args)
        return cmd_get(args)
    except Fatal as exc:
        sys.stderr.write(f"fatal: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted (partial transfers are kept and resumed next time)\n")
        return 130


# --- info -----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from git_remote_annexproxy.discovery import BranchLogs  # noqa: PLC0415

    clone = find_clone()
    logs = BranchLogs(clone.commondir)
    views, errors = clientrepo.views(clone, logs, args.remote)
    if not views and not errors:
        raise Fatal("no remote with a git-annex branch (git fetch <remote> git-annex)")
    repos = [r for v in views for r in v.repositories]
    if args.json:
        for r in repos:
            print(json.dumps(r.to_json()))
    else:
        _print_table(views)
    for e in errors:
        sys.stderr.write(f"error: {e}\n")
    return 1 if errors else 0


def _print_table(views: Sequence[RemoteView]) -> None:
    def details(view: RemoteView, r: Repository) -> str:
        extra = []
        if r.kind == "cluster":
            names = sorted((n.name if (n := view.by_uuid(u)) else u) for u in r.nodes)
            extra.append("nodes: " + ", ".join(names) if names else "no nodes")
        if r.special_type:
            extra.append(f"type: {r.special_type}")
        if r.dead:
            extra.append("dead")
        return r.description + "".join(f" [{e}]" for e in extra)

    rows = [("NAME", "KIND", "UUID", "DESCRIPTION")]
    for view in views:
        rows += [(r.name, r.kind, r.uuid, details(view, r)) for r in view.repositories]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[3]]).rstrip())


# --- get ------------------------------------------------------------------------------------


def cmd_get(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise Fatal("-J needs a number of jobs of at least 1")
    clone = find_clone()
    if clone.top is None:
        raise Fatal("get needs a work tree")
    top = clone.top
    scopes = [clientrepo.scope(clone, p) for p in args.paths or ["."]]
    progress = Progress(enabled=sys.stderr.isatty() and not args.json and not args.quiet)
    report = Report(args.json, args.quiet, progress)
    store = AnnexStore(clone.commondir, bare=False)

    matched: set[str] = set()
    wanted: dict[Key, list[AnnexedFile]] = {}
    populated: list[Populated] = []
    for f in annexed_files(top, clone.gitdir, scopes, matched):
        obj = store.find_object(f.key)
        if obj is None:
            wanted.setdefault(f.key, []).append(f)
        elif f.unlocked:  # content already here (an earlier run, or another file's key)
            _fill_in(top, f, obj, report, populated)
    for scope, arg in zip(scopes, args.paths, strict=False):  # only paths the user gave
        if scope not in matched:
            report.fail(arg, None, "did not match any file known to git")

    if wanted:
        populated += _fetch_all(clone, args, store, wanted, report)
    if populated:
        why = restage(top, clone.gitdir, populated)
        if why is not None:
            report.progress.write(
                sys.stderr, f"warning: git status will show unlocked files modified: {why}"
            )
    report.summary()
    return 1 if report.failed else 0


def _fetch_all(
    clone: Clone,
    args: argparse.Namespace,
    store: AnnexStore,
    wanted: dict[Key, list[AnnexedFile]],
    report: Report,
) -> list[Populated]:
    """Download every wanted key; returns the unlocked files filled in."""
    import trio  # noqa: PLC0415 (only a run with something to download needs it)

    from git_remote_annexproxy import annexget, discovery  # noqa: PLC0415

    assert clone.top is not None
    logs = discovery.BranchLogs(clone.commondir)
    views, errors = clientrepo.views(clone, logs, None)
    for e in errors:
        report.progress.write(sys.stderr, f"warning: {e}")
    source: Repository | None = None
    if args.source is not None:
        source = next((r for v in views if (r := v.by_name(args.source))), None)
        if source is None:
            raise Fatal(f"no repository named {args.source} (see git annexproxy info)")
    client = discovery.client_uuid(clone.commondir, clone.config)
    dead = logs.dead()
    forward_retry = int_config(clone.config, "annex.forward-retry", annexget.DEFAULT_FORWARD_RETRY)
    report.progress.total_files = sum(len(fs) for fs in wanted.values())
    report.progress.total_bytes = sum((k.size or 0) * len(fs) for k, fs in wanted.items())
    report.progress.started = time.monotonic()
    populated: list[Populated] = []

    def plan(key: Key) -> list[annexget.Source]:
        if source is not None:
            view = next(v for v in views if v.by_uuid(source.uuid) is source)
            return [annexget.Source(source, view)]
        return annexget.candidates(key, views, logs, dead)

    def finished(files: list[AnnexedFile], res: Fetched) -> None:
        assert clone.top is not None
        shown = False
        for f in files:
            if not res.ok:
                report.fail(f.path, f.key, res.error or "failed")
            else:
                obj = store.find_object(f.key)
                assert obj is not None and res.source is not None
                nbytes = 0 if shown else res.bytes  # a key's bytes count once
                _fill_in(clone.top, f, obj, report, populated, source=res.source, nbytes=nbytes)
                shown = True
            report.progress.file_done()
        report.bytes += res.bytes

    async def run() -> None:
        env = without_local_repo()
        async with trio.open_nursery() as nursery:
            pool = annexget.SessionPool(nursery, client, env, max_idle=args.jobs)
            fetcher = annexget.Fetcher(
                clone.commondir, store, pool, logs, client,
                forward_retry=forward_retry, on_bytes=report.progress.add,
            )  # fmt: skip
            limiter = trio.CapacityLimiter(args.jobs)

            async def one(key: Key, files: list[AnnexedFile]) -> None:
                sources = plan(key)
                if not sources:
                    why = annexget.why_unavailable(key, views, logs, dead)
                    finished(files, annexget.Fetched(key, ok=False, error=f"not available: {why}"))
                    return
                async with limiter:
                    finished(files, await fetcher.fetch(key, files[0].path, sources))

            try:
                async with trio.open_nursery() as jobs:
                    for key, files in wanted.items():
                        jobs.start_soon(one, key, files)
            finally:
                await pool.aclose()

    trio.run(run)
    return populated


def _fill_in(
    top: Path,
    f: AnnexedFile,
    obj: Path,
    report: Report,
    populated: list[Populated],
    *,
    source: Repository | None = None,
    nbytes: int = 0,
) -> None:
    """Report a file whose object is in place, filling it in first if it is unlocked."""
    if f.unlocked:
        try:
            done = populate(top, f, obj)
        except OSError as exc:
            report.fail(f.path, f.key, f"cannot fill in the unlocked file: {exc.strerror}")
            return
        if done is None:
            return  # no longer the pointer: the user's file, left alone
        populated.append(done)
    name, uuid = (source.name, source.uuid) if source else (None, None)
    report.ok(f.path, f.key, name, nbytes, uuid)


if __name__ == "__main__":
    sys.exit(main())
