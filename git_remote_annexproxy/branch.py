"""The git-annex branch of one repository: journal overlay, locked changes, commits, init.

Behaves like git-annex 10.20261026 (``Annex/Branch.hs``, ``Annex/Journal.hs``,
``Annex/Init.hs``) so that a real git-annex working in the same repository at the same time
sees nothing unusual:

* Changes go to ``annex/journal/<journal_name(path)>``, written whole under an exclusive
  POSIX ``fcntl`` lock on ``annex/journal.lck`` (the lock git-annex takes for the same
  purpose), via a temp file in ``annex/othertmp/`` (held with a shared lock on
  ``othertmp.lck``, so git-annex's cleanup of that directory skips it) and a rename.
* Readers see a journal file when there is one, else the blob on ``refs/heads/git-annex``.
  Unlike git-annex we do not first merge ``refs/remotes/*/git-annex`` into the branch, and
  the private journal (``annex.private``) is not supported.
* ``commit`` stages every journal file on top of the branch tree with dulwich, commits
  (message ``annex.commitmessage`` or ``update``, identity from ``git var`` as ``git
  commit-tree`` would resolve it), moves the ref with compare-and-swap and then deletes the
  committed journal files, all under the journal lock.

git-annex's own index. git-annex builds its commits in ``annex/index`` and records in
``annex/index.lck`` the branch commit that index reflects. After moving the branch we stage
the same files into that index with ``git update-index`` and record the new commit, exactly
the state git-annex's own commit leaves; but only when index.lck named the commit we built
on. Otherwise (a client pushed to the branch since git-annex last committed, or there is
no index yet) we leave both alone: before its next commit git-annex sees index.lck differ
from the branch and union-merges the branch into its index (``updateIndex`` ->
``mergeIndex``), which keeps every line we committed. In that case a file we compacted can
regain the older lines we dropped; readers take the newest line per UUID, so what the log
says is unchanged, and git-annex itself does the same after a push. Writing the index
file with dulwich instead was rejected: a stale cache-tree, or an index lagging the
branch, would make git-annex's next commit silently revert changes. All checked against
the binary in ``tests/test_branch.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

from git_remote_annexproxy import annexlog
from git_remote_annexproxy.annexlog import VectorClock
from git_remote_annexproxy.gitconfig import read_repo_config
from git_remote_annexproxy.keys import Key

if TYPE_CHECKING:  # dulwich costs ~30 ms to import; only the paths that read git load it
    from dulwich.object_store import BaseObjectStore
    from dulwich.objects import ObjectID
    from dulwich.refs import Ref
    from dulwich.repo import Repo

BRANCH_REF = cast("Ref", b"refs/heads/git-annex")
_ORIGIN_REF = cast("Ref", b"refs/remotes/origin/git-annex")
_ZERO_SHA = b"0" * 40
_FILE_MODE = 0o100644
_DIR_MODE = 0o040000
# A ref that keeps moving under us (pushes racing our commit) is retried this often.
_CAS_ATTEMPTS = 20

# fcntl locks belong to the process, not the file descriptor: a second lock taken by
# another thread of this process would succeed at once, and closing any descriptor of the
# lock file drops the lock. So the threads of one process queue on this first.
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.abspath(path), threading.Lock())


@contextmanager
def _fcntl_lock(path: Path, *, exclusive: bool, wait: bool = True) -> Iterator[bool]:
    """Hold a POSIX record lock on the whole file, as git-annex's lockExclusive/lockShared.

    Yields False, holding nothing, when ``wait`` is off and someone else has a lock.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            fcntl.lockf(fd, op if wait else op | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # releases the lock


def current_clock() -> VectorClock:
    """git-annex's candidate clock: ``GIT_ANNEX_VECTOR_CLOCK`` if it parses (tests pin it),
    else the current time truncated to whole seconds (what the binary writes)."""
    pinned = os.environ.get("GIT_ANNEX_VECTOR_CLOCK")
    if pinned:
        clock = VectorClock.parse(os.fsencode(pinned))
        if clock is not None:
            return clock
    return VectorClock.from_seconds(int(time.time()))


def _valid_branch_path(path: str) -> bool:
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and "\0" not in path


def _discard_incomplete_append(data: bytes) -> bytes:
    # Annex/Journal.hs: an interrupted append can leave a partial last line; readers drop
    # it. (Commits take the file verbatim, as git-annex's stageJournal does.)
    if not data or data.endswith(b"\n"):
        return data
    return data[: data.rfind(b"\n") + 1]


class AnnexBranch:
    """The git-annex branch and journal of the repository whose git directory is ``gitdir``."""

    def __init__(self, gitdir: Path, annexdir: Path) -> None:
        self.gitdir = Path(gitdir)
        self.annexdir = Path(annexdir)
        self.journal_dir = self.annexdir / "journal"
        self._repo: Repo | None = None

    # --- reading ----------------------------------------------------------------------

    def _open(self) -> Repo:
        if self._repo is None:
            from dulwich.repo import Repo  # noqa: PLC0415

            self._repo = Repo(str(self.gitdir))
        return self._repo

    def head(self) -> ObjectID | None:
        """The commit ``refs/heads/git-annex`` points to, or None if there is no branch."""
        try:
            return self._open().refs[BRANCH_REF]
        except KeyError:
            return None

    def read(self, path: str) -> bytes | None:
        """Current content of a branch file: the journal's if it has one, else the branch's."""
        if not _valid_branch_path(path):
            raise ValueError(f"not a git-annex branch path: {path!r}")
        try:
            data = (self.journal_dir / annexlog.journal_name(path)).read_bytes()
        except FileNotFoundError:
            return self._read_branch(path)
        except OSError as exc:
            # A journal file name longer than the filesystem allows (a long key, or one
            # long only once escaped: "_" is doubled) can never have been written.
            if exc.errno != errno.ENAMETOOLONG:
                raise
            return self._read_branch(path)
        return _discard_incomplete_append(data)

    def _read_branch(self, path: str) -> bytes | None:
        from dulwich.errors import NotTreeError  # noqa: PLC0415
        from dulwich.object_store import tree_lookup_path  # noqa: PLC0415
        from dulwich.objects import Blob, Commit  # noqa: PLC0415

        head = self.head()
        if head is None:
            return None
        store = self._open().object_store
        commit = store[head]
        assert isinstance(commit, Commit)
        try:
            _, sha = tree_lookup_path(store.__getitem__, commit.tree, os.fsencode(path))
        except (KeyError, NotTreeError):
            return None
        blob = store[sha]
        return blob.as_raw_string() if isinstance(blob, Blob) else None

    # --- changing -------------------------------------------------------------------

    @contextmanager
    def journal_locked(self) -> Iterator[None]:
        """Hold the journal lock (shared with real git-annex) for a read-modify-write."""
        self.annexdir.mkdir(exist_ok=True)
        lock = self.annexdir / "journal.lck"
        with _thread_lock(lock), _fcntl_lock(lock, exclusive=True):
            yield

    def change(self, path: str, fn: Callable[[bytes | None], bytes]) -> None:
        """Replace a branch file's content by ``fn(current)``, in the journal, atomically.

        Nothing is written when the content does not change (git-annex's maybeChange; a
        missing file counts as empty), so no-op updates never reach the branch.
        """
        with self.journal_locked():
            current = self.read(path)
            new = fn(current)
            if new != (current or b""):
                self._write_journal(path, new)

    def _write_journal(self, path: str, content: bytes) -> None:
        name = annexlog.journal_name(path)
        tmpdir = self.annexdir / "othertmp"
        with _fcntl_lock(self.annexdir / "othertmp.lck", exclusive=False):
            tmpdir.mkdir(exist_ok=True)
            # Same temp name as git-annex uses; the journal lock we hold makes it ours.
            tmp = tmpdir / name
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o666)
            try:
                # No fsync, as git-annex: the rename keeps readers from seeing a torn
                # file, and a crash can at worst lose a log line about content that is
                # already durable (present but unlogged, which fsck repairs); never the
                # reverse. An fsync here doubled the cost of storing a small file.
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
                try:
                    os.replace(tmp, self.journal_dir / name)
                except FileNotFoundError:
                    self.journal_dir.mkdir(exist_ok=True)
                    os.replace(tmp, self.journal_dir / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        # git-annex removes othertmp/ when it is done, if nobody uses it (exclusive lock).
        with _fcntl_lock(self.annexdir / "othertmp.lck", exclusive=True, wait=False) as mine:
            if mine:
                with contextlib.suppress(OSError):  # not empty: someone's leftovers
                    tmpdir.rmdir()

    def log_presence(self, key: Key, uuid: str, present: bool) -> None:
        """Record in the location log that ``uuid`` has (or no longer has) ``key``."""
        if annexlog.is_cluster_uuid(uuid):
            return  # git-annex never logs cluster UUIDs; they are derived from the nodes
        clock = current_clock()
        self.change(
            annexlog.location_log_path(key),
            lambda old: annexlog.add_presence(old, uuid, present, clock),
        )

    # --- committing -------------------------------------------------------------------

    def commit(self, message: str | None = None) -> bool:
        """Commit every journal file to the branch; True if a commit was made.

        ``message`` defaults to ``annex.commitmessage`` or ``update``, as in git-annex.
        Journal files whose name does not map to a valid path are left alone (git-annex
        would fail on them too). If the journal only repeats what the branch already holds
        (say an earlier run died after moving the ref), the files are removed and no empty
        commit is made, where git-annex would make one: the branch content is the same.
        """
        with self.journal_locked():
            try:
                names = sorted(e.name for e in os.scandir(self.journal_dir) if e.is_file())
            except FileNotFoundError:
                return False
            files: dict[str, bytes] = {}
            taken: list[str] = []
            for name in names:
                path = annexlog.branch_path(name)
                if _valid_branch_path(path):
                    files[path] = (self.journal_dir / name).read_bytes()
                    taken.append(name)
            if not files:
                return False
            committed = self._commit_files(files, message)
            for name in taken:
                (self.journal_dir / name).unlink(missing_ok=True)
            return committed

    def _commit_files(self, files: dict[str, bytes], message: str | None) -> bool:
        from dulwich.objects import Blob, Commit  # noqa: PLC0415

        repo = self._open()
        store = repo.object_store
        blobs: dict[bytes, ObjectID] = {}
        for path, content in files.items():
            blob = Blob.from_string(content)
            store.add_object(blob)
            blobs[os.fsencode(path)] = blob.id
        changes = {tuple(path.split(b"/")): sha for path, sha in blobs.items()}
        config = read_repo_config(self.gitdir)
        if message is None:
            message = config.get("annex.commitmessage") or "update"
        if self.head() is None:  # git-annex always starts the branch with "branch created"
            _create_branch(self)
        for _ in range(_CAS_ATTEMPTS):
            parent = self.head()
            base_tree = None
            if parent is not None:
                parent_commit = store[parent]
                assert isinstance(parent_commit, Commit)
                base_tree = parent_commit.tree
            tree = _apply_changes(store, base_tree, changes)
            if tree == base_tree:
                return False
            committer = self._ident("COMMITTER")
            sha = _make_commit(
                store,
                tree,
                parent,
                author=self._ident("AUTHOR"),
                committer=committer,
                message=message,
            )
            if parent is None:
                ok = repo.refs.add_if_new(BRANCH_REF, sha)
            else:
                ok = repo.refs.set_if_equals(BRANCH_REF, parent, sha)
            if ok:
                self._after_ref_update(parent, sha, committer)
                if parent is not None:
                    self._sync_annex_index(parent, sha, blobs)
                return True
        raise RuntimeError("refs/heads/git-annex kept changing; commit abandoned, journal kept")

    def _ident(self, kind: str) -> bytes:
        """``Name <email> <time> <tz>`` exactly as ``git commit-tree`` would use it."""
        return git_ident(self.gitdir, kind)

    def _sync_annex_index(self, parent: bytes, new: bytes, blobs: dict[bytes, ObjectID]) -> None:
        """Stage our files into git-annex's ``annex/index`` and record ``new`` in
        ``annex/index.lck``, which is what git-annex's own commit leaves behind.

        Only when the index reflects exactly the commit we built on (its index.lck names
        ``parent``); otherwise the index is left stale for git-annex to union-merge, as it
        does after a push (see the module docstring). ``git update-index`` does the
        staging, as in git-annex, so every index format and extension stays right.
        """
        index = self.annexdir / "index"
        try:
            recorded = (self.annexdir / "index.lck").read_bytes().split(b"\n", 1)[0].strip()
        except FileNotFoundError:
            return
        if recorded != parent or not index.exists():
            return
        # git-annex's prepareModifyIndex: under the journal lock any index.lock is stale.
        (self.annexdir / "index.lock").unlink(missing_ok=True)
        info = b"".join(b"100644 %s\t%s\0" % (sha, path) for path, sha in blobs.items())
        proc = subprocess.run(
            ["git", f"--git-dir={self.gitdir}", "update-index", "-z", "--index-info"],
            input=info,
            env=dict(os.environ, GIT_INDEX_FILE=str(index.absolute())),
            capture_output=True,
            check=False,
        )
        if proc.returncode == 0:
            _write_atomic(self.annexdir / "index.lck", new + b"\n")

    def _after_ref_update(self, old: bytes | None, new: bytes, committer: bytes) -> None:
        """What git does besides moving the ref (reflog), and what git-annex does (hook)."""
        config = read_repo_config(self.gitdir)
        # git's reflog rule: append when the log exists or logAllRefUpdates says so (its
        # default is on for non-bare, off for bare repositories). git-annex moves the ref
        # with `git update-ref` and no message, which leaves no tab either.
        reflog = self.gitdir / "logs" / "refs" / "heads" / "git-annex"
        mode = (config.get("core.logallrefupdates") or "").lower()
        if not mode:
            mode = "false" if config.get_bool("core.bare") else "true"
        if reflog.exists() or mode in ("true", "yes", "on", "1", "always"):
            reflog.parent.mkdir(parents=True, exist_ok=True)
            with open(reflog, "ab") as fh:
                fh.write(b"%s %s %s\n" % (old or _ZERO_SHA, new, committer))
        # git-annex runs the post-update-annex hook whenever it updates the branch.
        hooks = Path(config.get("core.hookspath") or self.gitdir / "hooks")
        hook = hooks / "post-update-annex"
        if os.access(hook, os.X_OK):
            subprocess.run(
                [str(hook)], cwd=self.gitdir, stdin=subprocess.DEVNULL, stdout=2, check=False
            )


def _apply_changes(
    store: BaseObjectStore,
    tree_id: ObjectID | None,
    changes: dict[tuple[bytes, ...], ObjectID],
) -> ObjectID:
    """Store the tree ``tree_id`` with files replaced or added; returns the new tree id.

    ``changes`` maps path components to blob ids. Only the trees on changed paths are
    rewritten; a file where a directory is needed (or the reverse) is replaced.
    """
    from dulwich.objects import Tree  # noqa: PLC0415

    tree = Tree()
    if tree_id is not None:
        old = store[tree_id]
        assert isinstance(old, Tree)
        for item in old.items():
            tree.add(item.path, item.mode, item.sha)
    subdirs: dict[bytes, dict[tuple[bytes, ...], ObjectID]] = {}
    for parts, blob_id in changes.items():
        if len(parts) == 1:
            tree[parts[0]] = (_FILE_MODE, blob_id)
        else:
            subdirs.setdefault(parts[0], {})[parts[1:]] = blob_id
    for name, sub in subdirs.items():
        existing = None
        if name in tree:
            mode, sha = tree[name]
            existing = sha if mode == _DIR_MODE else None
        tree[name] = (_DIR_MODE, _apply_changes(store, existing, sub))
    if tree.id != tree_id:
        store.add_object(tree)
    return tree.id


def _make_commit(
    store: BaseObjectStore,
    tree: ObjectID,
    parent: ObjectID | None,
    *,
    author: bytes,
    committer: bytes,
    message: str,
) -> ObjectID:
    from dulwich.objects import Commit, parse_timezone  # noqa: PLC0415

    c = Commit()
    c.tree = tree
    c.parents = [parent] if parent is not None else []
    who, when, tz = author.rsplit(b" ", 2)
    c.author, c.author_time, (c.author_timezone, _) = who, int(when), parse_timezone(tz)
    who, when, tz = committer.rsplit(b" ", 2)
    c.committer, c.commit_time, (c.commit_timezone, _) = who, int(when), parse_timezone(tz)
    # git-annex feeds the message to `git commit-tree`, which stores it newline-terminated.
    c.message = message.encode("utf-8", "surrogateescape") + b"\n"
    store.add_object(c)
    return c.id


# --- identity --------------------------------------------------------------------------


def _user_name() -> str | None:
    """Utility/UserInfo.hs myUserName: $USER, $LOGNAME, then the password database."""
    for var in ("USER", "LOGNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


def _git_var_ident(gitdir: Path, kind: str) -> bytes | None:
    """``git var GIT_<kind>_IDENT`` in the repository, with git-annex's adjustment: as
    Annex/Environment.hs does, without user.name and without a GECOS name the user name
    stands in for the name. None when git cannot make an identity (no email it can guess).
    """
    env = dict(os.environ)
    if not read_repo_config(gitdir).get("user.name"):
        try:
            gecos = pwd.getpwuid(os.getuid()).pw_gecos.split(",")[0]
        except KeyError:
            gecos = ""
        if not gecos:
            user = _user_name() or "unknown"
            env.setdefault("GIT_AUTHOR_NAME", user)
            env.setdefault("GIT_COMMITTER_NAME", user)
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", "var", f"GIT_{kind}_IDENT"],
        env=env,
        capture_output=True,
        check=False,
    )
    ident = proc.stdout.strip()
    return ident if proc.returncode == 0 and ident else None


def git_ident(gitdir: Path, kind: str) -> bytes:
    """``Name <email> <time> <tz>`` exactly as ``git commit-tree`` would use it.

    When git has no identity, git-annex's init sets user.name = user.email = the user name
    in the repo config (see ``initialize``); for a later commit we use that same identity
    rather than fail and let the journal grow.
    """
    ident = _git_var_ident(gitdir, kind)
    if ident is not None:
        return ident
    user = _user_name() or "unknown"
    offset = time.localtime().tm_gmtoff
    sign = "-" if offset < 0 else "+"
    tz = f"{sign}{abs(offset) // 3600:02d}{abs(offset) % 3600 // 60:02d}"
    return f"{user} <{user}> {int(time.time())} {tz}".encode("utf-8", "surrogateescape")


# --- initialisation --------------------------------------------------------------------


def default_description(repo_path: Path) -> str:
    """git-annex's genDescription for a repository initialised without one:
    ``user@host:path``, the path shown as ``~/…`` when it is under $HOME. ``repo_path`` is
    what git-annex calls the repository's path: the git directory of a bare repository,
    the work tree of a non-bare one."""
    import socket  # noqa: PLC0415  (only initialisation needs it)

    path = os.path.abspath(repo_path)
    home = os.environ.get("HOME")
    if not home:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = None
    if home:
        home = os.path.abspath(home)
        if path == home or path.startswith(home.rstrip("/") + "/"):
            rel = os.path.relpath(path, home)
            path = "~/" + ("" if rel == "." else rel)
    host = socket.gethostname()
    user = _user_name()
    where = f"{host}:{path}"
    return f"{user}{'@' if host else ''}{where}" if user else where


def _git_config_set(gitdir: Path, key: str, value: str) -> None:
    subprocess.run(["git", "config", "--file", str(gitdir / "config"), key, value], check=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def initialize(gitdir: Path, annexdir: Path, *, description: str) -> str:
    """Initialise the repository as ``git-annex-shell configlist … autoinit=1`` does.

    Observed with the binary on a fresh bare repository, and reproduced here in its order:
    create ``refs/heads/git-annex`` if missing (from ``origin/git-annex`` if that exists,
    else a parentless commit "branch created" with the empty tree; if git has no identity
    for that commit, ``user.name`` and ``user.email`` are first set to the user name in
    the repo config, git-annex's ensureCommit); ``annex/index`` and ``annex/index.lck``
    reflecting the branch, if missing; ``annex.uuid`` = a fresh random
    UUID (kept if one is already set); ``annex.version`` = 10; the inode sentinal files;
    and ``uuid.log`` describing the UUID, left in the journal like the binary leaves it
    (the next commit publishes it). A description already in uuid.log is kept.
    Returns the UUID.
    """
    import uuid as uuidlib  # noqa: PLC0415  (only initialisation needs it)

    gitdir, annexdir = Path(gitdir), Path(annexdir)
    annexdir.mkdir(exist_ok=True)
    branch = AnnexBranch(gitdir, annexdir)
    with branch.journal_locked():  # two of us racing to initialise agree on one UUID
        config = read_repo_config(gitdir)
        if branch.head() is None:
            _create_branch(branch)
        _create_index(branch)
        uuid = config.get("annex.uuid") or str(uuidlib.uuid4())
        if not config.get("annex.uuid"):
            _git_config_set(gitdir, "annex.uuid", uuid)
        if not config.get("annex.version"):
            _git_config_set(gitdir, "annex.version", "10")
        _write_sentinal(annexdir)
    clock = current_clock()

    def describe(old: bytes | None) -> bytes:
        if uuid in annexlog.parse_uuid_log(old or b""):
            return old or b""
        return annexlog.describe_uuid(old, uuid, description, clock)

    branch.change("uuid.log", describe)
    return uuid


def _create_branch(branch: AnnexBranch) -> None:
    from dulwich.objects import Tree  # noqa: PLC0415

    repo = branch._open()
    try:
        origin = repo.refs[_ORIGIN_REF]
    except KeyError:
        origin = None
    if origin is not None:  # git-annex: git branch --no-track git-annex origin/git-annex
        repo.refs.add_if_new(BRANCH_REF, origin)
        return
    if _git_var_ident(branch.gitdir, "COMMITTER") is None:  # git-annex's ensureCommit
        user = _user_name() or "unknown"
        _git_config_set(branch.gitdir, "user.name", user)
        _git_config_set(branch.gitdir, "user.email", user)
    empty = Tree()
    repo.object_store.add_object(empty)
    committer = branch._ident("COMMITTER")
    message = read_repo_config(branch.gitdir).get("annex.commitmessage") or "branch created"
    sha = _make_commit(
        repo.object_store,
        empty.id,
        None,
        author=branch._ident("AUTHOR"),
        committer=committer,
        message=message,
    )
    if repo.refs.add_if_new(BRANCH_REF, sha):
        branch._after_ref_update(None, sha, committer)


def _create_index(branch: AnnexBranch) -> None:
    """git-annex's genIndex + setIndexSha: ``annex/index`` = the branch tree, and
    ``annex/index.lck`` naming the commit, made the first time git-annex reads the branch
    (the binary's autoinit ends in that state, with or without a pre-existing branch)."""
    head = branch.head()
    index = branch.annexdir / "index"
    if head is None or index.exists():
        return
    subprocess.run(
        ["git", f"--git-dir={branch.gitdir}", "read-tree", head.decode()],
        env=dict(os.environ, GIT_INDEX_FILE=str(index.absolute())),
        check=True,
        capture_output=True,
    )
    _write_atomic(branch.annexdir / "index.lck", head + b"\n")


def _write_sentinal(annexdir: Path) -> None:
    """Annex/InodeSentinal.hs: an empty ``sentinal`` file and its inode cache, written
    once, and not in a repository that already has objects (as createInodeSentinalFile)."""
    sentinal = annexdir / "sentinal"
    if sentinal.exists() or (annexdir / "objects").exists():
        return
    sentinal.write_bytes(b"")
    st = sentinal.stat()
    secs, nanos = divmod(st.st_mtime_ns, 10**9)
    # showInodeCache: "inode size seconds fraction", the fraction as Haskell shows it
    # (no trailing zeros; empty, leaving a trailing space, for a whole second).
    frac = f"{nanos:09d}".rstrip("0")
    (annexdir / "sentinal.cache").write_bytes(f"{st.st_ino} {st.st_size} {secs} {frac}".encode())
