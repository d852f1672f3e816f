"""Which repository `--uuid` selects, and how to reach the nodes behind it (p2p-protocol.md
§9-10, proxy-and-cluster.md §2-4).

Proxying is decided by git config: a remote with that UUID configured for proxying (or a
cluster this repository is a gateway of). The git-annex branch only names and confirms:
proxy.log maps our UUID to the remote names we proxy for, cluster.log lists a cluster's
nodes, and other gateways' proxy.log entries let us reach repositories behind them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from git_remote_annexproxy.annexlog import is_cluster_uuid, parse_uuid_log
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.gitconfig import GitConfig
from git_remote_annexproxy.repologs import (
    dead_uuids,
    parse_cluster_log,
    parse_proxy_log,
    parse_remote_log,
)
from shell.errors import ShellError
from shell.repo import Repo

# git-annex's default costs: a local path remote is cheap, an ssh one expensive.
CHEAP_COST = 100.0
EXPENSIVE_COST = 200.0


@dataclass(frozen=True)
class Remote:
    """A git remote of the proxy as git-annex sees it, configured or instantiated."""

    name: str
    uuid: str
    url: str
    cost: float
    config: dict[str, str] = field(default_factory=dict, compare=False)
    # For a remote instantiated from another proxy's proxy.log: that proxy's remote.
    via: Remote | None = None
    # For a special remote (no url; the proxy serves it itself, shell/speciallink.py):
    # its remote.log fields.
    special: dict[str, str] | None = field(default=None, compare=False)

    def get(self, key: str) -> str | None:
        """`remote.NAME.annex-KEY`, inherited from the proxy remote when instantiated."""
        value = self.config.get(key)
        if value is None and self.via is not None:
            return self.via.get(key)
        return value

    @property
    def is_local(self) -> bool:
        return self.via is None and self.special is None and is_local_url(self.url)


@dataclass(frozen=True)
class Target:
    """What a p2pstdio session with `--uuid` serves: a node, or a cluster."""

    uuid: str
    nodes: tuple[Remote, ...]  # one for a proxied node; all candidates for a cluster
    cluster: str | None = None  # the cluster's name in annex.cluster.NAME
    special: dict[str, str] | None = None  # remote.log fields of a special remote


def is_local_url(url: str) -> bool:
    if url.startswith("file://"):
        return True
    if url.startswith("/"):
        return True
    # `host:path` (scp-like) has a colon before any slash; a relative path does not.
    return ":" not in url.split("/", 1)[0]


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def absolute_url(url: str, base: str) -> str:
    """A local path remote's URL as git-annex reads it: `~` expanded, a relative path taken
    from the repository's top directory `base` (not from our cwd or HOME) with `..` by name,
    as git-annex shows it; other URLs unchanged."""
    if not is_local_url(url) or url.startswith(("file://", "/")):
        return url
    if url.startswith("~"):
        return os.path.expanduser(url)
    return os.path.normpath(os.path.join(base, url))


def _cost(config: GitConfig, name: str, url: str) -> float:
    value = config.get(f"remote.{name}.annex-cost")
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    return CHEAP_COST if is_local_url(url) else EXPENSIVE_COST


def configured_remotes(config: GitConfig, base: str | None = None) -> list[Remote]:
    """The git remotes with an annex-uuid; `base` is the repository's top directory, which
    a relative path URL is relative to."""
    remotes = []
    for name in config.subsections("remote"):
        url = config.get(f"remote.{name}.url")
        uuid = config.get(f"remote.{name}.annex-uuid")
        if not url or not uuid or config.get_bool(f"remote.{name}.annex-ignore"):
            continue
        if base is not None:
            url = absolute_url(url, base)
        prefix = f"remote.{name}.annex-"
        conf = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
        remotes.append(Remote(name, uuid, url, _cost(config, name, url), conf))
    return remotes


def special_remotes(config: GitConfig, remote_log: dict[str, dict[str, str]]) -> list[Remote]:
    """Special remotes, as git-annex finds them: a remote with an annex-uuid but no url,
    whose UUID has a remote.log entry (its type, chunking, encryption)."""
    remotes = []
    for name in config.subsections("remote"):
        uuid = config.get(f"remote.{name}.annex-uuid")
        fields = remote_log.get(uuid or "")
        if config.get(f"remote.{name}.url") or not uuid or fields is None:
            continue
        if config.get_bool(f"remote.{name}.annex-ignore"):
            continue
        prefix = f"remote.{name}.annex-"
        conf = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
        remotes.append(Remote(name, uuid, "", _cost(config, name, ""), conf, special=fields))
    return remotes


def instantiated_remotes(
    remotes: list[Remote], proxy_log: dict[str, dict[str, str]]
) -> list[Remote]:
    """Remotes reachable through other proxies: `R-NAME` for each `U:NAME` of R's entry."""
    names = {r.name for r in remotes}
    out = []
    for r in remotes:
        for uuid, name in proxy_log.get(r.uuid, {}).items():
            inst = f"{r.name}-{name}"
            if inst in names:
                continue  # an explicitly configured remote of that name wins
            out.append(Remote(inst, uuid, r.url, r.cost + 0.1, {}, via=r))
    return out


def cluster_names(config: GitConfig) -> dict[str, str]:
    """annex.cluster.NAME = UUID -> {uuid: name} for the clusters we are a gateway of."""
    out = {}
    for key, value in config.items():
        if key.startswith("annex.cluster.") and value:
            out[value] = key[len("annex.cluster.") :]
    return out


def _words(value: str | None) -> list[str]:
    return value.split() if value else []


class BranchReader(Protocol):
    """What selection needs of the git-annex branch: a file's content, or None."""

    def read(self, path: str) -> bytes | None: ...


@dataclass
class Selection:
    """Everything selection reads, gathered once per session.

    Built from a git config, our own UUID and a branch reader only (not a Repo), so that
    selection is a pure function of its inputs and can be tested without a repository.
    """

    config: GitConfig
    own_uuid: str
    branch: BranchReader
    remotes: list[Remote]
    proxy_log: dict[str, dict[str, str]]
    cluster_log: dict[str, frozenset[str]]
    clusters: dict[str, str]
    dead: frozenset[str]

    @classmethod
    def load(cls, repo: Repo) -> Selection:
        return cls.from_sources(
            repo.config,
            repo.uuid or "",
            AnnexBranch(repo.gitdir, repo.annexdir),
            base=repo.path_str,
        )

    @classmethod
    def from_sources(
        cls, config: GitConfig, own_uuid: str, branch: BranchReader, base: str | None = None
    ) -> Selection:
        configured = configured_remotes(config, base)
        proxy_log = parse_proxy_log(branch.read("proxy.log") or b"")
        remotes = configured + instantiated_remotes(configured, proxy_log)
        remotes += special_remotes(config, parse_remote_log(branch.read("remote.log") or b""))
        return cls(
            config=config,
            own_uuid=own_uuid,
            branch=branch,
            remotes=remotes,
            proxy_log=proxy_log,
            cluster_log=parse_cluster_log(branch.read("cluster.log") or b""),
            clusters=cluster_names(config),
            dead=dead_uuids(branch.read("trust.log") or b""),
        )

    def proxies_for(self, remote: Remote) -> bool:
        """Whether this repository is configured to proxy for `remote`."""
        if remote.via is None:
            if self.config.get_bool(f"remote.{remote.name}.annex-proxy"):
                return True
            nodes_of = _words(remote.config.get("cluster-node"))
            return any(c in self.clusters.values() for c in nodes_of)
        # Reached through another proxy: allowed when that remote is a proxy we use or a
        # gateway of one of our clusters.
        via = remote.via
        if self.config.get_bool(f"remote.{via.name}.annex-proxy"):
            return True
        return any(c in self.clusters for c in _words(via.config.get("cluster-gateway")))

    def cluster_nodes(self, cluster_uuid: str) -> list[Remote]:
        """A cluster's nodes as this gateway reaches them, cheapest first.

        Direct nodes: remotes whose annex-cluster-node names the cluster and whose UUID
        cluster.log lists. Other gateways: the cluster itself as instantiated through a
        remote whose annex-cluster-gateway names it (filtered by BYPASS later).
        """
        name = self.clusters[cluster_uuid]
        logged = self.cluster_log.get(cluster_uuid, frozenset())
        nodes: dict[str, Remote] = {}
        for r in self.remotes:
            if r.uuid in self.dead:
                continue
            if r.via is None and name in _words(r.config.get("cluster-node")):
                if r.uuid in logged:
                    nodes.setdefault(r.uuid + " " + r.name, r)
            elif (
                r.via is not None
                and r.uuid == cluster_uuid
                and cluster_uuid in _words(r.via.config.get("cluster-gateway"))
            ):
                nodes.setdefault(r.via.uuid + " " + r.name, r)
        return sorted(nodes.values(), key=lambda r: (r.cost, r.name))

    def select(self, wanted: str) -> Target:
        if is_cluster_uuid(wanted) and wanted in self.clusters:
            return Target(wanted, tuple(self.cluster_nodes(wanted)), cluster=self.clusters[wanted])
        own = self.own_uuid
        listed = self.proxy_log.get(own, {})
        name = listed.get(wanted)
        if name is not None:
            candidates = [
                r
                for r in self.remotes
                if r.uuid == wanted and r.name == name and self.proxies_for(r)
            ]
            if candidates:
                best = min(candidates, key=lambda r: (r.cost, r.name))
                special = parse_remote_log(self.branch.read("remote.log") or b"").get(wanted)
                return Target(wanted, (best,), special=special)
        descriptions = parse_uuid_log(self.branch.read("uuid.log") or b"")
        if wanted in descriptions:
            raise ShellError(
                f"not configured to proxy for repository {descriptions[wanted] or wanted}"
            )
        raise ShellError(f"expected repository UUID {wanted} but found UUID {own}")


def select(repo: Repo, wanted: str) -> Target:
    return Selection.load(repo).select(wanted)
