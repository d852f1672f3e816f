"""Annexed files of a checkout, and putting their content where git-annex would.

Which files are annexed, as git-annex decides (``Annex/Link.hs``):

* a locked file is a symlink whose target contains ``/annex/objects/``; its last path
  component is the key, keyFile-escaped (``../../.git/annex/objects/Xx/Yy/KEY/KEY``);
* an unlocked file is staged as a pointer file, whose first line is
  ``/annex/objects/KEY``. Only a work-tree file that still *is* the pointer needs content:
  once populated it holds the content itself, and git-annex cannot tell either.

The index (read with dulwich) says which paths are tracked and how; the work tree says
what is there now. A work-tree file is only ever replaced while it is still exactly the
pointer, so nothing a user wrote is overwritten.

After content replaces a pointer, git sees the file as modified (the index holds the
pointer, git-annex's clean filter would turn the content back into it, but git-annex is not
installed). `restage` does what git-annex's restagePointerFile does, with a clean filter
that answers with the staged pointer, so `git status` stays clean and `git commit -a`
cannot put the content into git.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from git_remote_annexproxy.gitenv import without_local_repo
from git_remote_annexproxy.keys import BadKey, Key

# git-annex reads this much of a file that may be a pointer (unpaddedMaxPointerSz).
POINTER_READ = 8192
_OBJECTS = b"/annex/objects/"
_S_IFLNK = 0o120000
_S_IFREG = 0o100000
_COPY_CHUNK = 1 << 20
# Populated files are dated this far back before git refreshes its index entry, so the
# entry is not "racily clean" (same second as the index file) and git never re-hashes the
# file later without the filter (which would show it modified after all).
_RACY_BACKDATE_NS = 2 * 10**9


def key_from_keyfile(name: str) -> Key | None:
    """git-annex's fileKey: undo keyFile's escaping (``%`` -> ``/``, ``&c`` -> ``:``,
    ``&s`` -> ``%``, ``&a`` -> ``&``, in that order); None if it is no key."""
    text = name.replace("%", "/").replace("&c", ":").replace("&s", "%").replace("&a", "&")
    try:
        return Key.parse(text)
    except BadKey:
        return None


def parse_link_or_pointer(data: bytes) -> Key | None:
    """git-annex's parseLinkTargetOrPointer: the first line, if it points into
    annex/objects, names the key in its last component."""
    line = data.split(b"\n", 1)[0].split(b"\r", 1)[0]
    if _OBJECTS not in line or b"\0" in line:
        return None
    return key_from_keyfile(os.fsdecode(line.rsplit(b"/", 1)[-1]))


@dataclass(frozen=True)
class AnnexedFile:
    path: str  # relative to the top of the work tree, "/"-separated
    key: Key
    unlocked: bool  # a pointer file (else a symlink)
    mode: int  # the index entry's mode (0o100755 keeps the exec bit)


def in_scope(path: str, scopes: Sequence[str]) -> bool:
    """Is `path` one of `scopes` or under one (scopes are top-relative; "" is the top)?"""
    return any(s in ("", path) or path.startswith(s + "/") for s in scopes)


def annexed_files(
    top: Path, gitdir: Path, scopes: Sequence[str], matched: set[str] | None = None
) -> Iterator[AnnexedFile]:
    """Annexed files in `scopes` whose content is not in the work tree yet: symlinks (which
    resolve once the object exists) and unpopulated pointer files. `matched` collects the
    scopes that named at least one tracked path."""
    from dulwich.index import ConflictedIndexEntry, Index  # noqa: PLC0415

    index_path = gitdir / "index"
    if not index_path.exists():
        return
    for raw_path, entry in Index(str(index_path)).iteritems():
        if isinstance(entry, ConflictedIndexEntry):
            continue
        path = os.fsdecode(raw_path)
        if not in_scope(path, scopes):
            continue
        if matched is not None:
            matched.update(s for s in scopes if in_scope(path, [s]))
        kind = entry.mode & 0o170000
        if kind == _S_IFLNK:
            key = _link_key(top / path)
            if key is not None:
                yield AnnexedFile(path, key, False, entry.mode)
        elif kind == _S_IFREG:
            key = read_pointer(top / path)
            if key is not None:
                yield AnnexedFile(path, key, True, entry.mode)


def _link_key(path: Path) -> Key | None:
    try:
        target = os.readlink(path)
    except OSError:  # deleted, or not a symlink in this work tree: nothing to do
        return None
    return parse_link_or_pointer(os.fsencode(target))


def read_pointer(path: Path) -> Key | None:
    """The key if `path` is a regular file that is a pointer (never follows a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return parse_link_or_pointer(os.read(fd, POINTER_READ))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Populated:
    """A work-tree file we filled, with what it looked like just after (git-annex's
    InodeCache), so a change made by someone else before restaging is noticed."""

    path: str
    ino: int
    size: int
    mtime_ns: int


def populate(top: Path, f: AnnexedFile, obj: Path) -> Populated | None:
    """Replace the pointer file `f` with a copy of the object `obj`.

    None (nothing done) when the file is no longer that pointer: the user changed it. The
    copy goes to a temporary file beside it and is renamed over the pointer, so a reader
    sees either; the mode keeps the index's exec bit, under the umask, as git checks out.
    """
    dest = top / f.path
    if read_pointer(dest) != f.key:
        return None
    tmp = dest.with_name(f".{dest.name[:64]}.annexproxy-{secrets.token_hex(4)}")
    mode = 0o777 if f.mode & 0o111 else 0o666
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as out, open(obj, "rb") as src:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
        # The pointer may have changed while we copied; a last check narrows the window
        # to the rename itself (git-annex has the same one).
        if read_pointer(dest) != f.key:
            os.unlink(tmp)
            return None
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    then = time.time_ns() - _RACY_BACKDATE_NS
    os.utime(dest, ns=(then, then), follow_symlinks=False)
    st = os.lstat(dest)
    return Populated(f.path, st.st_ino, st.st_size, st.st_mtime_ns)


def _unchanged(top: Path, p: Populated) -> bool:
    try:
        st = os.lstat(top / p.path)
    except OSError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (p.ino, p.size, p.mtime_ns)


# git runs the clean filter through the shell with %f replaced by the quoted path; it prints
# the pointer staged for that path, which tells git the file matches the index.
_CLEAN_FILTER = "cat >/dev/null && git cat-file blob :%f"


def restage(top: Path, gitdir: Path, files: Sequence[Populated]) -> str | None:
    """Stage populated files (still as we left them) again through a clean filter that
    answers with the pointer already staged: the index keeps the pointer, with the new
    file's stat data, so git sees the file unmodified. Returns None, or why it could not
    be done (git status then shows those files modified until `git annex init`).

    This is git-annex's restagePointerFile, and leaves the same small window: a change
    made between our check and git reading the file would be staged as the pointer.
    The filter is defined for this one command and sees only these paths. (`git add
    --refresh` cannot do it: git takes a size change for a modification unseen.)
    """
    paths = [p.path for p in files if _unchanged(top, p) and "\0" not in p.path]
    if not paths:
        return None
    with tempfile.NamedTemporaryFile("w", dir=gitdir, prefix="annexproxy-attributes") as attrs:
        attrs.write("* filter=annex\n")
        attrs.flush()
        proc = subprocess.run(
            [
                "git", f"--git-dir={gitdir}", f"--work-tree={top}",
                "-c", f"core.attributesFile={attrs.name}",
                "-c", f"filter.annex.clean={_CLEAN_FILTER}",
                "-c", "filter.annex.smudge=cat",
                "-c", "filter.annex.required=true",
                "update-index", "-q", "-z", "--stdin",
            ],
            cwd=top,
            env=without_local_repo(),
            input=b"".join(os.fsencode(p) + b"\0" for p in paths),
            capture_output=True,
            timeout=600,
            check=False,
        )  # fmt: skip
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        return said[-1] if said else f"git update-index exited {proc.returncode}"
    return None
