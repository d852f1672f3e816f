"""git-annex branch logs about repositories (not keys): proxy.log, cluster.log, trust.log,
remote.log, maxsize.log.

Pure module. The line layouts, and which line wins when a union merge leaves several for
one UUID, are maplog.py's: each log here only adds git-annex's parser for its values (a
line whose value does not parse is skipped before the newest one is chosen).
"""

from __future__ import annotations

from dataclasses import dataclass

from git_remote_annexproxy import maplog
from git_remote_annexproxy.annexlog import is_cluster_uuid


def parse_old_layout(data: bytes) -> dict[str, str]:
    """`UUID VALUE timestamp=Ts` lines -> {uuid: value}, newest per uuid (maplog's rules)."""
    return maplog.parse_old(data, maplog.text_value)


def parse_new_layout(data: bytes) -> dict[str, str]:
    """`Ts UUID VALUE` lines -> {uuid: value}, newest per uuid (maplog's rules)."""
    return maplog.parse_new(data, maplog.text_value)


def legal_remote_name(name: str) -> bool:
    """What git accepts as a remote name; proxy.log entries with other names are ignored."""
    if not name or name.startswith("-") or name in (".", ".."):
        return False
    return not any(c in name for c in " \t\n:~^?*[\\") and ".." not in name and "/" not in name


def _proxy_list(raw: bytes) -> list[tuple[str, str]] | None:
    """parseProxyList: `UUID:NAME` words; a word without both parts spoils the line."""
    words = maplog.word_set(raw)
    if words is None:
        return None
    out = []
    for word in sorted(words):
        uuid, sep, name = word.partition(":")
        if not (sep and uuid and name):
            return None
        out.append((uuid, name))
    return out


def parse_proxy_log(data: bytes) -> dict[str, dict[str, str]]:
    """proxy.log -> {proxy uuid: {proxied uuid: remote name}}; entries whose name git would
    not accept as a remote name are dropped (validateProxies)."""
    return {
        proxy: {uuid: name for uuid, name in items if legal_remote_name(name)}
        for proxy, items in maplog.parse_new(data, _proxy_list).items()
    }


def parse_cluster_log(data: bytes) -> dict[str, frozenset[str]]:
    """cluster.log -> {cluster uuid: node uuids}; only real cluster UUIDs are kept."""
    return {
        cluster: nodes
        for cluster, nodes in maplog.parse_new(data, maplog.word_set).items()
        if is_cluster_uuid(cluster)
    }


@dataclass(frozen=True)
class Trust:
    TRUSTED = "1"
    UNTRUSTED = "0"
    DEAD = "X"
    SEMITRUSTED = "?"


def _trust_level(raw: bytes) -> str | None:
    """trustLevelParser: one character (1, 0, X; any other is semitrusted), or nothing at
    all, which old git-annex wrote for a trusted repository."""
    if not raw:
        return Trust.TRUSTED
    if len(raw) != 1:
        return None
    level = raw.decode("latin-1")
    return level if level in (Trust.TRUSTED, Trust.UNTRUSTED, Trust.DEAD) else Trust.SEMITRUSTED


def parse_trust_log(data: bytes) -> dict[str, str]:
    """trust.log -> {uuid: level}, level one of Trust's values."""
    return maplog.parse_old(data, _trust_level)


def dead_uuids(trust_log: bytes) -> frozenset[str]:
    return frozenset(u for u, level in parse_trust_log(trust_log).items() if level == Trust.DEAD)


def parse_remote_log(data: bytes) -> dict[str, dict[str, str]]:
    """remote.log -> {uuid: {field: value}} (special remotes' configuration)."""
    out: dict[str, dict[str, str]] = {}
    for uuid, value in parse_old_layout(data).items():
        fields: dict[str, str] = {}
        for word in value.split():
            k, eq, v = word.partition("=")
            if eq:
                fields[k] = v
        out[uuid] = fields
    return out


def parse_maxsize_log(data: bytes) -> dict[str, int]:
    """maxsize.log -> {uuid: bytes} (parseMaxSize: `readish` of the value)."""
    return maplog.parse_new(data, maplog.readish_int)
