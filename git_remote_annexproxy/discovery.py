"""What sits behind a proxy remote, read from a clone's git-annex branches, and who has a key.

A client learns this the way git-annex does (proxy-and-cluster.md §4): from the git-annex
branches it fetched (`refs/remotes/*/git-annex`, plus a local `git-annex` branch and the
journal if the clone has them), merged by union as git-annex merges them, and from the
remote's UUID. The files read:

* proxy.log: `PROXYUUID UUID:NAME ...` -> the repositories the remote proxies for, which the
  client calls `<remote>-<NAME>` (git-annex's names, so `--from origin-node1` means the same
  thing with or without git-annex);
* cluster.log: a cluster's nodes (a cluster UUID is in proxy.log like a node);
* remote.log: an entry with `type=` makes a UUID a special remote;
* uuid.log: descriptions; trust.log: dead repositories, which are never chosen.

The remote's UUID is `remote.<name>.annex-uuid` (the key git-annex uses). A clone made
without git-annex does not have it yet: `remote_uuid` asks the server once with
`git-annex-shell configlist` and records it there.

Reading uses dulwich; no trio here.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from git_remote_annexproxy import annexlog, repologs, urls
from git_remote_annexproxy.gitconfig import GitConfig
from git_remote_annexproxy.gitenv import without_local_repo
from git_remote_annexproxy.keys import Key

if TYPE_CHECKING:
    from dulwich.objects import ObjectID, Tree
    from dulwich.repo import Repo

Kind = Literal["repository", "proxy", "node", "cluster", "special"]

LOCAL_BRANCH = b"refs/heads/git-annex"
HELPER_UUID = "annexproxy.uuid"  # where git-remote-annexproxy keeps a UUID it made
CONFIGLIST_TIMEOUT = 60.0
OUTPUT_LIMIT = 65536  # bytes kept of a server command's stdout, and of its stderr
# Trees of the git-annex branch kept parsed: the root (a few thousand entries) and the
# hash directories a run touches. Bounded so a huge branch cannot eat memory.
_TREE_CACHE_SIZE = 4096


class DiscoveryError(Exception):
    """A one-line reason why a remote cannot be used (shown to the user as is)."""


# --- reading the branches -----------------------------------------------------------------


class BranchLogs:
    """Files of the git-annex branch as the union of several refs and the journal.

    Concatenating the versions of a file is exactly git-annex's union merge: every log
    format keeps the newest line per UUID, whichever copy it came from.
    """

    def __init__(self, gitdir: Path, refs: Sequence[bytes] | None = None) -> None:
        from dulwich.objects import Commit  # noqa: PLC0415 (dulwich is slow to import)
        from dulwich.repo import Repo  # noqa: PLC0415

        self.gitdir = gitdir
        self.repo: Repo = Repo(str(gitdir))
        if refs is None:
            refs = annex_branch_refs(self.repo)
        self.refs = tuple(refs)
        self._roots: list[ObjectID] = []
        for ref in self.refs:
            commit = self.repo[self.repo.refs[ref]]  # type: ignore[index]
            if isinstance(commit, Commit):
                self._roots.append(commit.tree)
        self._trees: dict[bytes, Tree] = {}
        self._journal = gitdir / "annex" / "journal"

    def _tree(self, sha: ObjectID) -> Tree | None:
        from dulwich.objects import Tree  # noqa: PLC0415

        tree = self._trees.get(sha)
        if tree is None:
            obj = self.repo.object_store[sha]
            if not isinstance(obj, Tree):
                return None
            if len(self._trees) >= _TREE_CACHE_SIZE:
                self._trees.clear()
            tree = self._trees[sha] = obj
        return tree

    def _blob(self, root: ObjectID, path: str) -> bytes | None:
        from dulwich.objects import Blob  # noqa: PLC0415

        *dirs, name = os.fsencode(path).split(b"/")
        sha = root
        for part in dirs:
            tree = self._tree(sha)
            if tree is None or part not in tree:
                return None
            sha = tree[part][1]
        tree = self._tree(sha)
        if tree is None or name not in tree:
            return None
        blob = self.repo.object_store[tree[name][1]]
        return blob.as_raw_string() if isinstance(blob, Blob) else None

    def read(self, path: str) -> bytes:
        """The union of every version of branch file `path` (b"" if none has it)."""
        parts = [b for b in (self._blob(root, path) for root in self._roots) if b]
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            parts.append((self._journal / annexlog.journal_name(path)).read_bytes())
        return b"\n".join(parts)

    def present(self, key: Key) -> set[str]:
        """UUIDs the location logs say have `key` (never a cluster UUID; see Proxied)."""
        return annexlog.present_uuids(self.read(annexlog.location_log_path(key)))

    def dead(self) -> frozenset[str]:
        return repologs.dead_uuids(self.read("trust.log"))

    def descriptions(self) -> dict[str, str]:
        return annexlog.parse_uuid_log(self.read("uuid.log"))


def annex_branch_refs(repo: Repo) -> list[bytes]:
    """The local git-annex branch and every remote-tracking one, in a stable order."""
    names: list[bytes] = list(repo.refs.allkeys())
    refs = sorted(r for r in names if r.startswith(b"refs/remotes/") and r.endswith(b"/git-annex"))
    if LOCAL_BRANCH in names:
        refs.insert(0, LOCAL_BRANCH)
    return refs


# --- what is behind a remote ----------------------------------------------------------


@dataclass(frozen=True)
class Repository:
    """One repository reachable through a git remote: the remote's own, or one it proxies."""

    name: str  # as the client calls it: "origin", "origin-node1"
    uuid: str
    kind: Kind
    description: str
    remote: str  # the git remote it is reached through
    proxied_name: str | None = None  # the name in proxy.log ("node1")
    nodes: tuple[str, ...] = ()  # a cluster's node UUIDs (cluster.log)
    special_type: str | None = None  # remote.log type= of a special remote
    dead: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "remote": self.remote,
            "name": self.name,
            "uuid": self.uuid,
            "kind": self.kind,
            "description": self.description,
            "proxied_name": self.proxied_name,
            "nodes": list(self.nodes),
            "type": self.special_type,
            "dead": self.dead,
        }


@dataclass(frozen=True)
class RemoteView:
    """A git remote and the repositories reachable through it (its own first)."""

    remote: str
    url: urls.ProxyURL
    uuid: str
    repositories: tuple[Repository, ...]
    _by_uuid: dict[str, Repository] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_uuid.update((r.uuid, r) for r in self.repositories)

    def by_uuid(self, uuid: str) -> Repository | None:
        return self._by_uuid.get(uuid)

    def by_name(self, name: str) -> Repository | None:
        return next((r for r in self.repositories if r.name == name), None)


def discover(logs: BranchLogs, remote: str, url: urls.ProxyURL, uuid: str) -> RemoteView:
    """The repositories behind `remote`, whose own UUID is `uuid`."""
    descriptions = logs.descriptions()
    dead = logs.dead()
    proxied = repologs.parse_proxy_log(logs.read("proxy.log")).get(uuid)
    clusters = repologs.parse_cluster_log(logs.read("cluster.log"))
    specials = {
        u: fields for u, fields in repologs.parse_remote_log(logs.read("remote.log")).items()
        if "type" in fields
    }  # fmt: skip
    own = Repository(
        name=remote,
        uuid=uuid,
        kind="proxy" if proxied is not None else "repository",
        description=descriptions.get(uuid, ""),
        remote=remote,
        dead=uuid in dead,
    )
    behind = []
    for u, pname in (proxied or {}).items():
        if u == uuid:
            continue  # a proxy listing itself is served locally: it is `remote` already
        kind: Kind = "node"
        special_type = None
        nodes: tuple[str, ...] = ()
        if annexlog.is_cluster_uuid(u):
            kind = "cluster"
            # Dead nodes leave the cluster when git-annex loads it.
            nodes = tuple(sorted(clusters.get(u, frozenset()) - dead))
        elif u in specials:
            kind = "special"
            special_type = specials[u].get("type")
        behind.append(
            Repository(
                name=f"{remote}-{pname}",
                uuid=u,
                kind=kind,
                description=descriptions.get(u, ""),
                remote=remote,
                proxied_name=pname,
                nodes=nodes,
                special_type=special_type,
                dead=u in dead,
            )
        )
    behind.sort(key=lambda r: r.name)
    return RemoteView(remote, url, uuid, (own, *behind))


# --- the remotes of a clone -----------------------------------------------------------------


def remote_url(config: GitConfig, remote: str) -> urls.ProxyURL:
    """The URL to reach `remote`'s git-annex-shell: `annexurl` if set (the ssh form our
    remote helper records), else `url`. DiscoveryError if neither is usable."""
    text = config.get(f"remote.{remote}.annexurl") or config.get(f"remote.{remote}.url")
    if not text:
        raise DiscoveryError(f"{remote}: no such remote")
    try:
        return urls.parse_url(text)
    except ValueError as exc:
        raise DiscoveryError(f"{remote}: unusable URL: {exc}") from None


def annex_remotes(config: GitConfig, refs: Iterable[bytes]) -> list[str]:
    """Configured remotes whose git-annex branch was fetched, in config order."""
    have = {r.decode("utf-8", "surrogateescape") for r in refs}
    return [
        name
        for name in config.subsections("remote")
        if config.get(f"remote.{name}.url") and f"refs/remotes/{name}/git-annex" in have
    ]


def git_config_set(gitdir: Path, key: str, value: str) -> None:
    subprocess.run(
        ["git", f"--git-dir={gitdir}", "config", key, value],
        env=without_local_repo(),
        check=True,
        capture_output=True,
        timeout=30,
    )


def remote_uuid(
    gitdir: Path,
    config: GitConfig,
    remote: str,
    url: urls.ProxyURL,
    env: Mapping[str, str] | None = None,
) -> str:
    """`remote.<remote>.annex-uuid`; if unset, asked once with `configlist` and recorded.

    configlist over ssh is a few milliseconds on the server and needs no P2P session. It
    runs without autoinit: a server that is no git-annex repository is an error here, not
    something to initialise from a client.
    """
    key = f"remote.{remote}.annex-uuid"
    known = config.get(key)
    if known:
        return known
    env = without_local_repo(os.environ if env is None else env)
    try:
        argv = urls.shell_argv(url, ["configlist", url.path], env)
        code, out, err = run_bounded(argv, env, timeout=CONFIGLIST_TIMEOUT)
    except ValueError as exc:
        raise DiscoveryError(f"{remote}: {exc}") from None
    except OSError as exc:
        raise DiscoveryError(f"{remote}: cannot run {exc.filename}: {exc.strerror}") from None
    except subprocess.TimeoutExpired:
        raise DiscoveryError(f"{remote}: no answer within {CONFIGLIST_TIMEOUT:.0f}s") from None
    found = ""
    for line in out.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition("=")
        if name == "annex.uuid":
            found = value.strip()
    if code != 0 or not found:
        said = [ln for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
        why = said[-1].strip() if said else "not a git-annex repository"
        raise DiscoveryError(f"{remote}: cannot learn its UUID: {why}")
    git_config_set(gitdir, key, found)
    return found


def run_bounded(
    argv: Sequence[str], env: Mapping[str, str], *, timeout: float, limit: int = OUTPUT_LIMIT
) -> tuple[int, bytes, bytes]:
    """Run a command that talks to a server: (exit status, the first `limit` bytes of its
    stdout, the last `limit` bytes of its stderr). Killed after `timeout` seconds
    (TimeoutExpired); whatever it writes beyond the limits is read and dropped."""
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    with proc, selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise subprocess.TimeoutExpired(list(argv), timeout)
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data is out:
                    out += chunk[: max(0, limit - len(out))]
                else:
                    err += chunk
                    del err[:-limit]
        try:
            code = proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return code, bytes(out), bytes(err)


def client_uuid(gitdir: Path, config: GitConfig) -> str:
    """This clone's UUID: `annex.uuid`, made and recorded on first use.

    A server wants one in every p2pstdio session. It goes where git-annex keeps its own, so
    a later `git annex init` adopts it (init keeps an existing annex.uuid) and the location
    log lines we wrote for this clone stay true. A clone made by our remote helper may
    already have one in `annexproxy.uuid`: that identity is kept, so the server sees one
    client, not two.
    """
    known = config.get("annex.uuid")
    if known:
        return known
    made = config.get(HELPER_UUID) or str(uuidlib.uuid4())
    git_config_set(gitdir, "annex.uuid", made)
    return made
