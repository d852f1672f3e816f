"""`git annexproxy add PATH...`: annex files as git-annex 10.20261026 does, without git-annex.

Which files (as ``git annex add``): files git does not know yet (not ignored) and tracked
files whose content changed, under each PATH. A symlink is staged as it is (an annexed one
is never re-added). A dotfile (any path component starting with ".") goes to git unless
``annex.dotfiles`` is true; so does a file ``annex.largefiles`` does not match. Everything
else is annexed: a SHA256E key (``extension()`` has git-annex's rules), the file moved into
``.git/annex/objects/<hashdirmixed>/KEY/KEY`` (``AnnexStore.adopt``: read-only object in a
write-protected key directory, as git-annex leaves them), a relative symlink in its place,
the client's copy in the location log. Finally one ``git add`` stages symlinks and small
files, and the git-annex branch is committed ("update"), as git-annex does at its end.

Settings, each where git-annex looks for it: ``annex.largefiles`` in git config, else the
``annex.largefiles`` attribute, else ``git annex config`` (the branch's config.log);
supported terms are anything, nothing, include=, exclude=, largerthan=, smallerthan= with
and/or/not/parentheses (others, e.g. mimetype=, are refused). ``annex.dotfiles`` in git
config or config.log; ``annex.maxextensionlength``/``annex.maxextensions``;
``annex.backend`` (config or attribute) may only be SHA256E or SHA256. Refused:
``annex.addunlocked``, and modified unlocked files (they need git-annex's clean filter).

A repository git-annex never initialised gets what a later ``git annex`` needs
(``branch.initialize``): annex.uuid (the helper's, if it made one), annex.version 10, the
git-annex branch, uuid.log. The ``filter.annex`` settings of ``git annex init`` are not
written: without git-annex installed they would make every ``git add`` fail. For the same
reason our git commands run with those filters switched off.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING

from git_remote_annexproxy import clientrepo
from git_remote_annexproxy.clientrepo import Clone, Fatal, find_clone, int_config
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.report import Progress, Report
from git_remote_annexproxy.store import AnnexStore
from git_remote_annexproxy.worktree import POINTER_READ, parse_link_or_pointer, read_pointer

if TYPE_CHECKING:
    from git_remote_annexproxy.branch import AnnexBranch
    from git_remote_annexproxy.preferred import Expr

BACKENDS = ("SHA256E", "SHA256")
_READ_CHUNK = 1 << 20
# git-annex's filter (set by `git annex init`) cannot run here; git must not try.
_NO_ANNEX_FILTER = (
    "-c", "filter.annex.process=", "-c", "filter.annex.clean=",
    "-c", "filter.annex.smudge=", "-c", "filter.annex.required=false",
)  # fmt: skip
_LARGEFILES_TERMS = ("anything", "nothing")
_LARGEFILES_VALUES = ("include=", "exclude=", "largerthan=", "smallerthan=")
DOTFILE_NOTE = "dotfile; adding content to git repository"
SMALL_NOTE = "non-large file; adding content to git repository"


def extension(path: str, maxlen: int = 4, maxcount: int = 2) -> str:
    """git-annex's selectExtension (Backend/Utilities.hs), on the bytes of the file name.

    Leading dots of the name are dropped, the rest is split at every "." after the first
    one; from the end, extensions are taken while at most `maxlen` bytes long, those with
    ASCII other than letters and digits are then dropped, the last `maxcount` kept (empty
    ones count but vanish): ``x.tar.gz`` -> ``.tar.gz``, ``a.b.c.`` -> ``.c``,
    ``y.tar.a b.gz`` -> ``.tar.gz``, ``x.verylongext`` -> nothing.
    """
    name = os.fsencode(path).rpartition(b"/")[2].lstrip(b".")
    dot = name.find(b".")
    if dot < 0:
        return ""
    parts = list(reversed(name[dot:].split(b".")))
    short = takewhile(lambda e: len(e) <= maxlen, parts)
    valid = [e for e in short if all(c > 127 or chr(c).isalnum() for c in e)]
    kept = [e for e in reversed(valid[:maxcount]) if e]
    return os.fsdecode(b"".join(b"." + e for e in kept))


@dataclass
class _AddReport(Report):
    """Report with git-annex's notes (``add .x (dotfile; ...) ok``) and keyless results."""

    def added(self, path: str, key: Key | None, note: str | None, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        if self.json:
            self._record(path, key, success=True, note=note, nbytes=nbytes)
        elif not self.quiet:
            self.progress.write(sys.stdout, f"add {path}{f' ({note})' if note else ''} ok")

    def fail(self, path: str, key: Key | None, why: str) -> None:
        self.failed += 1
        if self.json:
            self._record(path, key, success=False, error=why)
        self.progress.write(sys.stderr, f"add {path}: {why}")

    def _record(self, path: str, key: Key | None, **fields: object) -> None:
        record: dict[str, object] = {"command": "add", "file": path}
        record.update(key=None if key is None else str(key), success=False, note=None)
        record.update(bytes=0, error=None)
        record.update(fields)
        print(json.dumps(record), flush=True)


@dataclass
class _Settings:
    clone: Clone
    top: Path
    attrs: dict[str, dict[str, str]]  # path -> annex.largefiles / annex.backend attribute
    branch_config: dict[str, str]
    maxlen: int = 4
    maxcount: int = 2
    dotfiles: bool = False
    exprs: dict[str, Expr] = field(default_factory=dict)

    def parse(self, text: str, where: str) -> Expr:
        from git_remote_annexproxy.preferred import PreferredContentError, parse  # noqa: PLC0415

        if text not in self.exprs:
            for word in text.replace("(", " ").replace(")", " ").split():
                if word.startswith(("mimetype=", "mimeencoding=")):  # valid, but not here
                    raise Fatal(f"annex.largefiles term {word} ({where}) is not supported here")
            try:
                expr = parse(text)
            except PreferredContentError as exc:
                raise Fatal(f"bad annex.largefiles configuration in {where}: {exc}") from None
            for leaf in expr.leaves():
                t = str(leaf)
                if t not in _LARGEFILES_TERMS and not t.startswith(_LARGEFILES_VALUES):
                    raise Fatal(f"annex.largefiles term {t} ({where}) is not supported here")
            self.exprs[text] = expr
        return self.exprs[text]

    def large(self, path: str, size: int) -> bool:
        from git_remote_annexproxy.preferred import MatchContext  # noqa: PLC0415

        text, where = self.clone.config.get("annex.largefiles"), "git config"
        if text is None:
            text, where = self.attrs.get(path, {}).get("annex.largefiles"), ".gitattributes"
        if text is None:
            text, where = self.branch_config.get("annex.largefiles"), "git annex config"
        if text is None:
            return True
        ctx = MatchContext(key=Key(BACKENDS[0], "", size=size), file=path, size=size)
        return self.parse(text, where).matches(ctx)

    def backend(self, path: str) -> str:
        name = self.attrs.get(path, {}).get("annex.backend")
        name = name or self.clone.config.get("annex.backend") or BACKENDS[0]
        if name not in BACKENDS:
            raise Fatal(f"annex.backend {name} is not supported here (only SHA256E, SHA256)")
        return name


def cmd_add(args: argparse.Namespace) -> int:
    clone = find_clone()
    if clone.top is None:
        raise Fatal("add needs a work tree")
    top = clone.top
    if (clone.config.get("annex.addunlocked") or "false").lower() not in (
        "false",
        "no",
        "off",
        "0",
    ):
        raise Fatal("annex.addunlocked is set: adding unlocked files needs git-annex")
    scopes = [clientrepo.scope(clone, p) for p in args.paths]
    paths, unlocked = _candidates(top, scopes)
    progress = Progress(sys.stderr.isatty() and not args.json and not args.quiet, verb="add")
    report = _AddReport(args.json, args.quiet, progress, verb="add")
    for arg, s in zip(args.paths, scopes, strict=True):
        if not os.path.lexists(top / s) and not any(_under(p, s) for p in paths):
            report.fail(arg, None, "not found")
    settings = _settings(clone, top, paths)
    adder = _Adder(clone, top, report)
    progress.total_files = len(paths)
    for path in paths:
        if path in unlocked:
            report.fail(path, None, "modified unlocked file: adding it needs git-annex")
        else:
            adder.add(path, settings)
        progress.file_done()
    adder.finish()
    report.summary()
    return 1 if report.failed else 0


def _under(path: str, scope: str) -> bool:
    return scope in ("", path) or path.startswith(scope + "/")


def _git(top: Path, *args: str, data: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["git", *_NO_ANNEX_FILTER, "--literal-pathspecs", *args],
        cwd=top, input=data, capture_output=True, check=False, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise Fatal(f"git {args[0]}: {said[-1] if said else f'exit {proc.returncode}'}")
    return proc.stdout


def _candidates(top: Path, scopes: Sequence[str]) -> tuple[list[str], set[str]]:
    """Top-relative paths to add (new files and changed ones, sorted), and which of the
    changed ones are unlocked files (staged as a pointer)."""
    specs = ["--", *(s or "." for s in scopes)]
    new = _git(top, "ls-files", "-z", "--others", "--exclude-standard", *specs)
    fmt = "--format=%(objectmode) %(objectname) %(path)"
    changed = _git(top, "ls-files", "-z", "--modified", fmt, *specs)
    paths = {os.fsdecode(p) for p in new.split(b"\0") if p}
    regular: dict[str, str] = {}  # changed files staged as regular files: path -> blob
    for item in changed.split(b"\0"):
        if item:
            mode, sha, path = os.fsdecode(item).split(" ", 2)
            paths.add(path)
            if mode in ("100644", "100755"):
                regular[path] = sha
    return sorted(paths), _pointers(top, regular)


def _pointers(top: Path, blobs: dict[str, str]) -> set[str]:
    """The paths whose staged blob is a git-annex pointer (an unlocked file)."""
    if not blobs:
        return set()
    query = "".join(f"{sha}\n" for sha in blobs.values()).encode()
    sizes = _git(top, "cat-file", "--batch-check=%(objectname) %(objectsize)", data=query)
    small = {s.split()[0].decode() for s in sizes.splitlines() if int(s.split()[1]) < POINTER_READ}
    if not small:
        return set()
    out = _git(top, "cat-file", "--batch", data="".join(f"{s}\n" for s in small).encode())
    pointers: set[str] = set()
    pos = 0
    while pos < len(out):  # "<sha> blob <size>\n<content>\n", or "<sha> missing\n"
        eol = out.index(b"\n", pos)
        head = out[pos:eol].split()
        size = int(head[2]) if len(head) == 3 else -1
        content = out[eol + 1 : eol + 1 + size] if size >= 0 else b""
        pos = eol + 1 + (size + 1 if size >= 0 else 0)
        if parse_link_or_pointer(content) is not None:
            pointers.add(head[0].decode())
    return {p for p, sha in blobs.items() if sha in pointers}


def _settings(clone: Clone, top: Path, paths: Sequence[str]) -> _Settings:
    attrs: dict[str, dict[str, str]] = {}
    if paths:
        data = b"".join(os.fsencode(p) + b"\0" for p in paths)
        out = _git(
            top, "check-attr", "-z", "--stdin", "annex.largefiles", "annex.backend", data=data
        )
        fields = out.split(b"\0")
        for i in range(0, len(fields) - 2, 3):
            value = os.fsdecode(fields[i + 2])
            if value not in ("unspecified", "unset", "set"):
                attrs.setdefault(os.fsdecode(fields[i]), {})[os.fsdecode(fields[i + 1])] = value
    branch_config = _branch_config(clone)
    config = clone.config
    dotfiles = config.get("annex.dotfiles") or branch_config.get("annex.dotfiles") or "false"
    settings = _Settings(
        clone, top, attrs, branch_config,
        maxlen=int_config(config, "annex.maxextensionlength", 4),
        maxcount=int_config(config, "annex.maxextensions", 2),
        dotfiles=dotfiles.lower() in ("true", "yes", "on", "1"),
    )  # fmt: skip
    # Every setting is checked before the first file is touched, as git-annex does.
    for text, where in (
        (config.get("annex.largefiles"), "git config"),
        (branch_config.get("annex.largefiles"), "git annex config"),
        *((a.get("annex.largefiles"), ".gitattributes") for a in attrs.values()),
    ):
        if text is not None:
            settings.parse(text, where)
    for path in paths:
        settings.backend(path)
    return settings


def _branch_config(clone: Clone) -> dict[str, str]:
    """`git annex config` settings: config.log, "<clock> <name> <value>", newest wins."""
    from git_remote_annexproxy.annexlog import VectorClock  # noqa: PLC0415
    from git_remote_annexproxy.branch import AnnexBranch  # noqa: PLC0415

    data = AnnexBranch(clone.commondir, clone.commondir / "annex").read("config.log") or b""
    newest: dict[str, tuple[VectorClock, str]] = {}
    for line in data.splitlines():
        clock, _, rest = line.partition(b" ")
        name, _, value = rest.decode("utf-8", "surrogateescape").partition(" ")
        when = VectorClock.parse(clock)
        if when is not None and (name not in newest or newest[name][0] <= when):
            newest[name] = (when, value)
    return {name: value for name, (_, value) in newest.items()}


class _Adder:
    """Adds one file at a time; stages and commits everything in `finish`."""

    def __init__(self, clone: Clone, top: Path, report: _AddReport) -> None:
        self.clone, self.top, self.report = clone, top, report
        self.store = AnnexStore(clone.commondir, bare=False)
        self.staged: list[str] = []
        self._branch: AnnexBranch | None = None
        self._uuid = ""

    def add(self, path: str, settings: _Settings) -> None:
        full = self.top / path
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return  # a deleted tracked file: nothing to add
        except OSError as exc:
            self.report.fail(path, None, exc.strerror or str(exc))
            return
        note: str | None = None
        nbytes = 0
        if stat.S_ISLNK(st.st_mode):  # staged as it is; an annexed one keeps its key
            key = parse_link_or_pointer(os.fsencode(os.readlink(full)))
        elif not stat.S_ISREG(st.st_mode):
            return  # git-annex skips sockets, fifos, devices
        elif (key := read_pointer(full)) is not None:
            pass  # already a pointer (an unlocked file): git stages it as it is
        elif any(c.startswith(".") for c in path.split("/")) and not settings.dotfiles:
            note = DOTFILE_NOTE
        elif not settings.large(path, st.st_size):
            note = SMALL_NOTE
        else:
            try:
                key = self._annex(path, settings)
            except OSError as exc:
                self.report.fail(path, None, exc.strerror or str(exc))
                return
            nbytes = key.size or 0
        self.staged.append(path)
        self.report.added(path, key, note, nbytes)

    def _annex(self, path: str, settings: _Settings) -> Key:
        if self._branch is None:  # before the first file is touched
            self._branch, self._uuid = _initialise(self.clone, self.top)
        full = self.top / path
        dirfd = os.open(full.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(full.name, flags, dir_fd=dirfd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                # git-annex's lockDown: write-protect first, so that no writer can open the
                # file while it is hashed; the mtime the hash is vouched for is taken after.
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o222)
                try:
                    key = self._key(fd, path, settings)
                    self._store(key, dirfd, full.name, fd, st.st_mtime_ns)
                except BaseException:
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))  # not in the store: as it was
                    raise
            finally:
                os.close(fd)
            os.symlink(self._link_target(path, key), full.name, dir_fd=dirfd)
        finally:
            os.close(dirfd)
        self._branch.log_presence(key, self._uuid, True)
        return key

    def _key(self, fd: int, path: str, settings: _Settings) -> Key:
        backend = settings.backend(path)
        os.set_blocking(fd, True)
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            self.report.progress.add(len(chunk))
        ext = extension(path, settings.maxlen, settings.maxcount) if backend.endswith("E") else ""
        return Key(backend, digest.hexdigest() + ext, size=size)

    def _store(self, key: Key, dirfd: int, name: str, fd: int, mtime_ns: int) -> None:
        try:
            self.store.adopt(key, dirfd, name, fd, mtime_ns)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # The annex is on another filesystem: copy through the store's receive sequence
        # (which verifies the hash again), then drop the work-tree file.
        with self.store.begin_receive(key) as receive:
            pos = receive.offset
            while chunk := os.pread(fd, _READ_CHUNK, pos):
                receive.write(chunk)
                pos += len(chunk)
            st = os.fstat(fd)
            if st.st_mtime_ns != mtime_ns or not receive.finish():
                raise OSError(errno.EAGAIN, "changed while it was being added")
        obj = self.store.find_object(key)
        if obj is not None and st.st_mode & 0o111:  # the partial was made without them
            os.chmod(obj, stat.S_IMODE(st.st_mode) & ~0o222, follow_symlinks=False)
        os.unlink(name, dir_fd=dirfd)

    def _link_target(self, path: str, key: Key) -> str:
        """The relative symlink git-annex makes: through ``.git`` at the top when there is
        one (``../../.git/annex/objects/Xx/Yy/KEY/KEY``), else to the git directory."""
        kf = key.keyfile()
        inner = f"annex/objects/{key.hashdir_mixed()}/{kf}/{kf}"
        up = "../" * path.count("/")
        if (self.top / ".git").is_dir():
            return f"{up}.git/{inner}"
        parent = os.path.dirname(os.path.realpath(self.top / path))
        return os.path.relpath(os.path.realpath(self.clone.commondir) + "/" + inner, parent)

    def finish(self) -> None:
        if self.staged:
            data = b"".join(os.fsencode(p) + b"\0" for p in self.staged)
            try:
                _git(self.top, "add", "--pathspec-from-file=-", "--pathspec-file-nul", data=data)
            except Fatal as exc:
                self.report.failed += len(self.staged)
                self.report.progress.write(sys.stderr, f"add: staging failed: {exc}")
        if self._branch is not None:
            self._branch.commit()


def _initialise(clone: Clone, top: Path) -> tuple[AnnexBranch, str]:
    """The client's UUID, after making the repository one a later git-annex accepts."""
    from git_remote_annexproxy import branch, discovery  # noqa: PLC0415

    uuid = discovery.client_uuid(clone.commondir, clone.config)
    annexdir = clone.commondir / "annex"
    branch.initialize(clone.commondir, annexdir, description=branch.default_description(top))
    return branch.AnnexBranch(clone.commondir, annexdir), uuid
