"""Repository sizes and maxsizes, as git-annex's balanced preferred content sees them.

git-annex (``Annex/RepoSize.hs``) sums, per UUID, the sizes of the keys whose location log
says the UUID has them (cluster UUIDs never appear; a key without a size counts 0), starting
from every UUID in uuid.log at 0; then it adds what the journal changed. A repository with
no entry (not in uuid.log, holding nothing) or no maxsize is never "full".

``RepoSizes`` is the pure value the evaluator (``preferred.py``) gets. ``SizeTracker`` keeps
it current for one repository: the branch part is computed once per branch commit and kept
in ``annex/annexproxy-reposize.json`` (a later commit is reached by a tree diff, so a
gateway never rewalks a large branch), the journal part is re-read per decision but only
the journal files that changed since the last look. A gateway logs every store and removal
in the journal at once, so its next decision, and any concurrent session's, sees the new
size: that is our live update.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from git_remote_annexproxy.annexlog import (
    branch_path,
    is_cluster_uuid,
    parse_uuid_log,
    present_uuids,
)
from git_remote_annexproxy.keys import BadKey, Key
from git_remote_annexproxy.repologs import parse_maxsize_log

if TYPE_CHECKING:
    from git_remote_annexproxy.branch import AnnexBranch

CACHE_NAME = "annexproxy-reposize.json"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class RepoSizes:
    """Known repository sizes and configured maxsizes, in bytes."""

    sizes: Mapping[str, int] = field(default_factory=dict)
    maxsizes: Mapping[str, int] = field(default_factory=dict)

    def has_space(self, uuid: str, keysize: int, inrepo: bool) -> bool:
        """git-annex's repoHasSpace; True unless both a size and a maxsize are known.
        A repository that already has the key only needs to be within its maxsize."""
        size, maxsize = self.sizes.get(uuid), self.maxsizes.get(uuid)
        if size is None or maxsize is None:
            return True
        return size <= maxsize if inrepo else size + keysize <= maxsize

    def proportion_free(self, uuid: str, keysize: int, inrepo: bool) -> float | None:
        """Free space without the key, as a fraction of maxsize; None when the repository
        cannot be a sizebalanced candidate (no size/maxsize, maxsize 0, or no room)."""
        size, maxsize = self.sizes.get(uuid), self.maxsizes.get(uuid)
        if size is None or maxsize is None or not self.has_space(uuid, keysize, inrepo):
            return None
        if maxsize <= 0:
            return None
        free = maxsize - size + (keysize if inrepo else 0)
        return float(free) / float(maxsize)  # a Double division, as git-annex's

    def with_delta(self, deltas: Mapping[str, int]) -> RepoSizes:
        sizes = dict(self.sizes)
        for u, d in deltas.items():
            sizes[u] = sizes.get(u, 0) + d
        return RepoSizes(sizes, self.maxsizes)


# --- choosing among a group (Annex/Balanced.hs, Limit.hs) -------------------------------------


def balanced_pick(
    members: AbstractSet[str], candidates: AbstractSet[str], key: Key, n: int
) -> list[str]:
    """git-annex's balancedPicker: ``n`` of ``candidates`` (wrapping round, so repeats when
    ``n`` is larger), starting at a place fixed by the key. The start is an HMAC-SHA256 of
    the serialized key keyed with all group ``members``' UUIDs concatenated in order, so it
    moves only when the group changes, and nobody can craft keys that all land on one
    repository without knowing the group."""
    if not candidates or n <= 0:
        return []
    secret = "".join(sorted(members)).encode("utf-8", "surrogateescape")
    message = key.canonical().encode("utf-8", "surrogateescape")
    start = int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest(), "big")
    ordered = sorted(candidates)
    return [ordered[(start + i) % len(ordered)] for i in range(n)]


def with_space(
    sizes: RepoSizes, members: AbstractSet[str], key: Key, locations: AbstractSet[str]
) -> set[str]:
    """fullybalanced's candidates: the members that are not too full for the key."""
    ksz = key.size or 0
    return {u for u in members if sizes.has_space(u, ksz, u in locations)}


def emptiest(
    sizes: RepoSizes, members: AbstractSet[str], key: Key, locations: AbstractSet[str], n: int
) -> set[str]:
    """sizebalanced's candidates: the ``n`` members with the largest free fraction (only
    members with a known size and maxsize take part); among equals the greater UUID first,
    as git-annex's stable sort then reverse leaves them."""
    ksz = key.size or 0
    scored = []
    for u in sorted(members):
        free = sizes.proportion_free(u, ksz, u in locations)
        if free is not None:
            scored.append((u, free))
    scored.sort(key=lambda t: t[1])
    scored.reverse()
    return {u for u, _ in scored[: max(n, 0)]}


# --- location logs -> sizes ---------------------------------------------------------------------


def key_of_log_path(path: str) -> Key | None:
    """The key whose location log is at branch path ``path`` (``aaa/bbb/KEY.log``), else
    None (other logs, like ``KEY.log.met`` or top-level files, are not location logs)."""
    parts = path.split("/")
    if len(parts) != 3 or not parts[2].endswith(".log"):
        return None
    name = parts[2][: -len(".log")]
    text = name.replace("%", "/").replace("&c", ":").replace("&s", "%").replace("&a", "&")
    try:
        return Key.parse(text)
    except BadKey:
        return None


def holders(log: bytes | None) -> frozenset[str]:
    """UUIDs a location log says have the key, clusters left out (they are derived)."""
    if not log:
        return frozenset()
    return frozenset(u for u in present_uuids(log) if not is_cluster_uuid(u))


def add_change(sizes: dict[str, int], key: Key, old: frozenset[str], new: frozenset[str]) -> None:
    """Account for a location log going from ``old`` to ``new`` holders."""
    ksz = key.size or 0
    for u in new - old:
        sizes[u] = sizes.get(u, 0) + ksz
    for u in old - new:
        # git-annex only subtracts from a repository it has an entry for.
        if u in sizes:
            sizes[u] -= ksz


# --- the branch ----------------------------------------------------------------------------------


def _walk_logs(store: object, tree_id: bytes, prefix: str = "") -> Iterator[tuple[str, bytes]]:
    from dulwich.objects import Tree  # noqa: PLC0415

    tree = store[tree_id]  # type: ignore[index]
    assert isinstance(tree, Tree)
    for entry in tree.iteritems():
        name = entry.path.decode("utf-8", "surrogateescape")
        path = prefix + name
        if entry.mode & 0o170000 == 0o040000:
            if prefix.count("/") < 2:  # location logs are two directories deep
                yield from _walk_logs(store, entry.sha, path + "/")
        elif path.endswith(".log") and prefix.count("/") == 2:
            yield path, entry.sha


def _blob(store: object, sha: bytes | None) -> bytes | None:
    if sha is None:
        return None
    obj = store[sha]  # type: ignore[index]
    return bytes(obj.as_raw_string())


def sizes_from_scratch(store: object, tree_id: bytes) -> dict[str, int]:
    """Sizes from every location log in a branch tree (the journal not included)."""
    sizes: dict[str, int] = {}
    for path, sha in _walk_logs(store, tree_id):
        key = key_of_log_path(path)
        if key is not None:
            add_change(sizes, key, frozenset(), holders(_blob(store, sha)))
    return sizes


def sizes_by_diff(
    store: object, old_tree: bytes, new_tree: bytes, sizes: Mapping[str, int]
) -> dict[str, int]:
    """``sizes`` (of ``old_tree``) moved to ``new_tree`` by a tree diff."""
    from dulwich.diff_tree import tree_changes  # noqa: PLC0415

    out = dict(sizes)
    for change in tree_changes(store, old_tree, new_tree):  # type: ignore[arg-type]
        old, new = change.old, change.new
        path_b = (new.path if new is not None and new.path else None) or (
            old.path if old is not None else None
        )
        if path_b is None:
            continue
        key = key_of_log_path(path_b.decode("utf-8", "surrogateescape"))
        if key is None:
            continue
        before = holders(_blob(store, old.sha if old is not None else None))
        after = holders(_blob(store, new.sha if new is not None else None))
        add_change(out, key, before, after)
    return out


@dataclass
class _JournalEntry:
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size): a rename-replaced file changes
    key: Key
    before: frozenset[str]  # holders per the branch commit the base was computed for
    after: frozenset[str]  # holders per the journal file


class SizeTracker:
    """Sizes of every repository of one git-annex branch, kept current (see module doc)."""

    def __init__(self, branch: AnnexBranch) -> None:
        self.branch = branch
        self.cache_path = branch.annexdir / CACHE_NAME
        self._base_commit: bytes | None = None
        self._base_tree: bytes | None = None
        self._base: dict[str, int] = {}
        self._journal: dict[str, _JournalEntry] = {}
        # In-memory changes nobody logged (the placement simulator's pretend stores).
        self.offsets: dict[str, int] = {}

    def current(self) -> RepoSizes:
        """Sizes now: the branch head, the journal, uuid.log's repositories at 0."""
        self._refresh_base()
        sizes = dict(self._base)
        self._refresh_journal()
        for entry in self._journal.values():
            add_change(sizes, entry.key, entry.before, entry.after)
        for u in parse_uuid_log(self.branch.read("uuid.log") or b""):
            sizes.setdefault(u, 0)
        for u, d in self.offsets.items():
            sizes[u] = sizes.get(u, 0) + d
        return RepoSizes(sizes, parse_maxsize_log(self.branch.read("maxsize.log") or b""))

    # -- the branch part ----------------------------------------------------------------

    def _refresh_base(self) -> None:
        from dulwich.objects import Commit  # noqa: PLC0415

        head = self.branch.head()
        if head is None:
            self._base_commit, self._base_tree, self._base = None, None, {}
            self._journal.clear()
            return
        if head == self._base_commit:
            return
        store = self.branch._open().object_store
        commit = store[head]
        assert isinstance(commit, Commit)
        cached = self._load_cache() if self._base_commit is None else None
        if cached is not None:
            self._base_commit, self._base_tree, self._base = cached
        if self._base_commit == head:
            pass
        elif self._base_tree is not None:
            self._base = sizes_by_diff(store, self._base_tree, commit.tree, self._base)
        else:
            self._base = sizes_from_scratch(store, commit.tree)
        self._base_commit, self._base_tree = head, commit.tree
        self._journal.clear()  # its "before" sides were relative to the old commit
        self._save_cache()

    def _load_cache(self) -> tuple[bytes, bytes, dict[str, int]] | None:
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
            if data.get("version") != _CACHE_VERSION:
                return None
            sizes = {str(u): int(v) for u, v in data["sizes"].items()}
            return data["commit"].encode(), data["tree"].encode(), sizes
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # no cache, or a damaged one: recompute

    def _save_cache(self) -> None:
        if self._base_commit is None or self._base_tree is None:
            return
        data = {
            "version": _CACHE_VERSION,
            "commit": self._base_commit.decode(),
            "tree": self._base_tree.decode(),
            "sizes": self._base,
        }
        tmp = self.cache_path.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.cache_path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only repository: just no cache

    # -- the journal part ---------------------------------------------------------------

    def _refresh_journal(self) -> None:
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.branch.journal_dir))
        except FileNotFoundError:
            entries = []
        for de in entries:
            path = branch_path(de.name)
            key = key_of_log_path(path)
            if key is None:
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            seen.add(de.name)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            old = self._journal.get(de.name)
            if old is not None and old.stamp == stamp:
                continue
            try:
                data = Path(de.path).read_bytes()
            except FileNotFoundError:
                continue  # committed meanwhile; the next head change accounts for it
            before = holders(self._base_log(path)) if old is None else old.before
            self._journal[de.name] = _JournalEntry(stamp, key, before, holders(data))
        for name in set(self._journal) - seen:
            del self._journal[name]

    def _base_log(self, path: str) -> bytes | None:
        from dulwich.errors import NotTreeError  # noqa: PLC0415
        from dulwich.object_store import tree_lookup_path  # noqa: PLC0415

        if self._base_tree is None:
            return None
        store = self.branch._open().object_store
        tree: Any = self._base_tree  # dulwich wants its ObjectID type; it is the bytes
        try:
            _, sha = tree_lookup_path(store.__getitem__, tree, os.fsencode(path))
        except (KeyError, NotTreeError):
            return None
        return _blob(store, sha)
