"""`git annexproxy`: what sits behind a proxy remote, and annexed content without git-annex.

    git annexproxy info [REMOTE] [--json]
    git annexproxy get [--from NAME] [-J N] [--json] [-q] [PATH...]

`info` lists, per remote with a fetched git-annex branch, the remote's own repository and
the ones it proxies (nodes, clusters, special remotes; `discovery.py`). `get` finds the
annexed files under PATH whose content is missing (`worktree.py`), downloads each key once
through the proxy (`annexget.py`), puts it in the object store so the symlinks resolve, and
fills in unlocked files.

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
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

from git_remote_annexproxy.gitconfig import GitConfig
from git_remote_annexproxy.gitenv import without_local_repo
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.store import AnnexStore
from git_remote_annexproxy.worktree import AnnexedFile, Populated, annexed_files, populate, restage

if TYPE_CHECKING:
    from git_remote_annexproxy.annexget import Fetched
    from git_remote_annexproxy.discovery import BranchLogs, RemoteView, Repository


class Fatal(Exception):
    """A one-line usage or setup error: `fatal: <message>`, exit 1."""


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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "info":
            return cmd_info(args)
        return cmd_get(args)
    except Fatal as exc:
        sys.stderr.write(f"fatal: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted (partial downloads are kept and resumed next time)\n")
        return 130


# --- the clone we run in ------------------------------------------------------------------


@dataclass(frozen=True)
class Clone:
    gitdir: Path  # this work tree's: its index
    commondir: Path  # shared by linked work trees: refs, config, the annex (as git-annex)
    top: Path | None  # None for a bare repository
    prefix: str  # cwd relative to top, "" or ending in "/"
    config: GitConfig


def find_clone() -> Clone:
    """The repository around the current directory, found as git finds it."""

    def rev_parse(*what: str) -> list[str] | None:
        proc = subprocess.run(
            ["git", "rev-parse", *what], capture_output=True, text=True, check=False, timeout=30
        )
        return proc.stdout.split("\n") if proc.returncode == 0 else None

    found = rev_parse("--absolute-git-dir", "--git-common-dir", "--is-inside-work-tree")
    if found is None:
        raise Fatal("not a git repository (or any of the parent directories)")
    gitdir = Path(found[0])
    commondir = Path.cwd() / found[1]  # relative to the current directory, or absolute
    top: Path | None = None
    prefix = ""
    if found[2] == "true":
        inside = rev_parse("--show-toplevel", "--show-prefix")
        if inside is not None:
            top, prefix = Path(inside[0]), inside[1]
    return Clone(gitdir, commondir, top, prefix, _git_config())


def _git_config() -> GitConfig:
    """Every setting git would apply here, `git -c` ones and includes too: git reads it.

    (The server reads config files itself to start fast; a client command can afford git.)
    """
    proc = subprocess.run(
        ["git", "config", "--list", "-z"], capture_output=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise Fatal(said[-1].removeprefix("fatal: ") if said else "cannot read git config")
    pairs = []
    for item in proc.stdout.split(b"\0"):
        if item:
            key, newline, value = item.decode("utf-8", "surrogateescape").partition("\n")
            pairs.append((key, value if newline else "true"))
    return GitConfig(pairs)


def _scope(clone: Clone, path: str) -> str:
    """A PATH argument as a path relative to the top of the work tree ("" = the top)."""
    assert clone.top is not None
    full = os.path.normpath(os.path.join(clone.top, clone.prefix, path))
    rel = os.path.relpath(full, clone.top)
    if rel == os.curdir:
        return ""
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise Fatal(f"{path}: outside repository at '{clone.top}'")
    return rel.replace(os.sep, "/")


def _views(clone: Clone, logs: BranchLogs, only: str | None) -> tuple[list[RemoteView], list[str]]:
    """The remotes to use and what is behind each; plus one error line per unusable one."""
    from git_remote_annexproxy import discovery  # noqa: PLC0415

    names = discovery.annex_remotes(clone.config, logs.refs)
    if only is not None:
        if not clone.config.get(f"remote.{only}.url"):
            raise Fatal(f"'{only}' does not appear to be a git remote")
        if only not in names:
            raise Fatal(f"no git-annex branch fetched from {only} (git fetch {only} git-annex)")
        names = [only]
    views, errors = [], []
    for name in names:
        try:
            url = discovery.remote_url(clone.config, name)
            uuid = discovery.remote_uuid(clone.commondir, clone.config, name, url)
        except discovery.DiscoveryError as exc:
            errors.append(str(exc))
            continue
        views.append(discovery.discover(logs, name, url, uuid))
    return views, errors


# --- info -----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from git_remote_annexproxy.discovery import BranchLogs  # noqa: PLC0415

    clone = find_clone()
    logs = BranchLogs(clone.commondir)
    views, errors = _views(clone, logs, args.remote)
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


@dataclass
class _Report:
    """Per-file results on stdout, failures on stderr, the counts for the summary."""

    json: bool
    quiet: bool
    progress: _Progress
    files: int = 0
    bytes: int = 0
    failed: int = 0

    def ok(self, path: str, key: Key, source: str | None, nbytes: int, uuid: str | None) -> None:
        self.files += 1
        if self.json:
            self._json(path, key, success=True, source=source, uuid=uuid, nbytes=nbytes)
        elif not self.quiet:
            via = f" (from {source})" if source else ""
            self.progress.write(sys.stdout, f"get {path}{via} ok")

    def fail(self, path: str, key: Key | None, why: str) -> None:
        self.failed += 1
        if self.json:
            self._json(path, key, success=False, error=why)
        self.progress.write(sys.stderr, f"get {path}: {why}")

    @staticmethod
    def _json(
        path: str,
        key: Key | None,
        *,
        success: bool,
        source: str | None = None,
        uuid: str | None = None,
        nbytes: int = 0,
        error: str | None = None,
    ) -> None:
        record = {
            "command": "get",
            "file": path,
            "key": None if key is None else str(key),
            "success": success,
            "from": source,
            "uuid": uuid,
            "bytes": nbytes,
            "error": error,
        }
        print(json.dumps(record), flush=True)

    def summary(self) -> None:
        self.progress.clear()
        sys.stderr.write(f"get: {self.files} files, {self.bytes} bytes, {self.failed} failed\n")


@dataclass
class _Progress:
    """One status line on stderr, redrawn at most ten times a second; off unless stderr is
    a terminal. Lines for stdout or stderr go through `write` so they never get mixed."""

    enabled: bool
    total_files: int = 0
    total_bytes: int = 0
    done_files: int = 0
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0
    _width: int = 0

    def add(self, n: int) -> None:
        self.done_bytes += n
        self._draw()

    def file_done(self) -> None:
        self.done_files += 1
        self._draw(force=True)

    def write(self, stream: IO[str], line: str) -> None:
        self.clear()
        stream.write(line + "\n")
        stream.flush()
        self._draw(force=True)

    def clear(self) -> None:
        if self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        rate = self.done_bytes / max(now - self.started, 1e-3)
        total = f"/{_size(self.total_bytes)}" if self.total_bytes else ""
        line = (
            f"get: {self.done_files}/{self.total_files} files, "
            f"{_size(self.done_bytes)}{total}, {_size(rate)}/s"
        )
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = max(self._width, len(line))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_get(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise Fatal("-J needs a number of jobs of at least 1")
    clone = find_clone()
    if clone.top is None:
        raise Fatal("get needs a work tree")
    top = clone.top
    scopes = [_scope(clone, p) for p in args.paths or ["."]]
    progress = _Progress(enabled=sys.stderr.isatty() and not args.json and not args.quiet)
    report = _Report(args.json, args.quiet, progress)
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
    report: _Report,
) -> list[Populated]:
    """Download every wanted key; returns the unlocked files filled in."""
    import trio  # noqa: PLC0415 (only a run with something to download needs it)

    from git_remote_annexproxy import annexget, discovery  # noqa: PLC0415

    assert clone.top is not None
    logs = discovery.BranchLogs(clone.commondir)
    views, errors = _views(clone, logs, None)
    for e in errors:
        report.progress.write(sys.stderr, f"warning: {e}")
    source: Repository | None = None
    if args.source is not None:
        source = next((r for v in views if (r := v.by_name(args.source))), None)
        if source is None:
            raise Fatal(f"no repository named {args.source} (see git annexproxy info)")
    client = discovery.client_uuid(clone.commondir, clone.config)
    dead = logs.dead()
    forward_retry = _int_config(clone.config, "annex.forward-retry", annexget.DEFAULT_FORWARD_RETRY)
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
    report: _Report,
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


def _int_config(config: GitConfig, key: str, default: int) -> int:
    value = config.get(key)
    if value is None:
        return default
    try:
        return max(0, int(value))
    except ValueError:
        raise Fatal(f"bad numeric config value {value!r} for {key}") from None


if __name__ == "__main__":
    sys.exit(main())
