"""git-annex branch logs about repositories (not keys): proxy.log, cluster.log, trust.log,
remote.log, maxsize.log.

Pure module. Two line layouts exist (proxy-and-cluster.md §1): the old one,
`UUID VALUE timestamp=Ts`, and the new one, `Ts UUID VALUE`. After a union merge a file may
hold several lines for one UUID; the line with the greatest timestamp wins (the first one
on a tie, as git-annex's Map-based readers keep).
"""

from __future__ import annotations

from dataclasses import dataclass

from git_remote_annexproxy.annexlog import VectorClock, is_cluster_uuid


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _newest(entries: dict[str, tuple[VectorClock, str]], uuid: str, clock: VectorClock,
            value: str) -> None:
    old = entries.get(uuid)
    if old is None or clock > old[0]:
        entries[uuid] = (clock, value)


def parse_old_layout(data: bytes) -> dict[str, str]:
    """`UUID VALUE timestamp=Ts` lines -> {uuid: value}, newest per uuid."""
    entries: dict[str, tuple[VectorClock, str]] = {}
    for raw in data.splitlines():
        uuid, _, rest = raw.strip().partition(b" ")
        value, _, stamp = rest.rpartition(b" ")
        if not uuid or not stamp.startswith(b"timestamp="):
            continue
        clock = VectorClock.parse(stamp[len(b"timestamp=") :])
        if clock is not None:
            _newest(entries, _dec(uuid), clock, _dec(value))
    return {u: v for u, (_, v) in entries.items()}


def parse_new_layout(data: bytes) -> dict[str, str]:
    """`Ts UUID VALUE` lines -> {uuid: value}, newest per uuid."""
    entries: dict[str, tuple[VectorClock, str]] = {}
    for raw in data.splitlines():
        parts = raw.strip().split(b" ", 2)
        if len(parts) < 2:
            continue
        clock = VectorClock.parse(parts[0])
        if clock is not None and parts[1]:
            _newest(entries, _dec(parts[1]), clock, _dec(parts[2]) if len(parts) > 2 else "")
    return {u: v for u, (_, v) in entries.items()}


def legal_remote_name(name: str) -> bool:
    """What git accepts as a remote name; proxy.log entries with other names are ignored."""
    if not name or name.startswith("-") or name in (".", ".."):
        return False
    return not any(c in name for c in " \t\n:~^?*[\\") and ".." not in name and "/" not in name


def parse_proxy_log(data: bytes) -> dict[str, dict[str, str]]:
    """proxy.log -> {proxy uuid: {proxied uuid: remote name}}."""
    proxies: dict[str, dict[str, str]] = {}
    for proxy, value in parse_new_layout(data).items():
        proxied: dict[str, str] = {}
        for item in value.split():
            uuid, sep, name = item.partition(":")
            if sep and uuid and legal_remote_name(name):
                proxied[uuid] = name
        proxies[proxy] = proxied
    return proxies


def parse_cluster_log(data: bytes) -> dict[str, frozenset[str]]:
    """cluster.log -> {cluster uuid: node uuids}; only real cluster UUIDs are kept."""
    return {
        cluster: frozenset(value.split())
        for cluster, value in parse_new_layout(data).items()
        if is_cluster_uuid(cluster)
    }


@dataclass(frozen=True)
class Trust:
    TRUSTED = "1"
    UNTRUSTED = "0"
    DEAD = "X"
    SEMITRUSTED = "?"


def parse_trust_log(data: bytes) -> dict[str, str]:
    """trust.log -> {uuid: level}, level one of Trust's values."""
    return {u: v.strip() for u, v in parse_old_layout(data).items()}


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
    """maxsize.log -> {uuid: bytes}."""
    out: dict[str, int] = {}
    for uuid, value in parse_new_layout(data).items():
        size = value.strip()
        if size.isascii() and size.isdigit():
            out[uuid] = int(size)
    return out
