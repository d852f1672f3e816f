"""Repository logs of the git-annex branch, with lines as real git-annex writes them."""

from __future__ import annotations

from git_remote_annexproxy import repologs

CLUSTER = "ac41e7d0-ed00-86fd-acbf-9fd58f6e46eb"
NODE1 = "40de0000-0000-4000-8000-000000000001"
NODE2 = "40de0000-0000-4000-8000-000000000002"
NODE3 = "40de0000-0000-4000-8000-000000000003"
PROXY = "9a0c0000-0000-4000-8000-000000000001"


def test_proxy_log_newest_entry_wins_after_union_merge() -> None:
    data = (
        f"1795561918s {PROXY} {NODE1}:node1\n"
        f"1795561920s {PROXY} {NODE1}:node1 {NODE2}:node2 {CLUSTER}:mycluster\n"
    ).encode()
    assert repologs.parse_proxy_log(data) == {
        PROXY: {NODE1: "node1", NODE2: "node2", CLUSTER: "mycluster"}
    }


def test_proxy_log_ignores_illegal_remote_names() -> None:
    data = f"1795561918s {PROXY} {NODE1}:-evil {NODE2}:a..b {NODE3}:gw2-node3\n".encode()
    assert repologs.parse_proxy_log(data) == {PROXY: {NODE3: "gw2-node3"}}


def test_cluster_log_keeps_only_cluster_uuids_and_newest_nodes() -> None:
    data = (
        f"1795561971s {CLUSTER} {NODE1} {NODE2}\n"
        f"1795561990s {CLUSTER} {NODE1} {NODE2} {NODE3}\n"
        f"1795561990s {NODE1} {NODE2}\n"
    ).encode()
    assert repologs.parse_cluster_log(data) == {CLUSTER: frozenset({NODE1, NODE2, NODE3})}


def test_old_layout_logs() -> None:
    trust = f"{NODE1} X timestamp=1795562266s\n{NODE2} 1 timestamp=1795562266s\n".encode()
    assert repologs.dead_uuids(trust) == frozenset({NODE1})
    remote = (
        f"{NODE1} chunk=1MiB encryption=shared name=dirsr type=directory timestamp=1795562227s\n"
    ).encode()
    assert repologs.parse_remote_log(remote) == {
        NODE1: {"chunk": "1MiB", "encryption": "shared", "name": "dirsr", "type": "directory"}
    }


def test_old_layout_newest_wins_and_garbage_is_skipped() -> None:
    data = (
        f"{NODE1} 0 timestamp=1795562266s\n"
        "garbage line\n"
        f"{NODE1} X timestamp=1795562200s\n"
        f"{NODE2} ? timestamp=1795562267.5s\n"
    ).encode()
    assert repologs.parse_trust_log(data) == {NODE1: "0", NODE2: "?"}


def test_maxsize_log() -> None:
    data = f"1795562266s {NODE1} 10000000000\n1795562266s {NODE2} lots\n".encode()
    assert repologs.parse_maxsize_log(data) == {NODE1: 10000000000}
