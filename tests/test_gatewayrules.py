"""The gateway's placement and reply rules (shell/gatewayrules.py) and proxy selection
(shell/proxyselect.py), as tables: no I/O, no repository.

Every row says where its expectation comes from:

* `trace` rows: the expected line is read from ../shared/spec/traces/cluster.txt (what
  git-annex's own gateway sent in that step, to that session; `TraceLine`), and the inputs
  are that step's node answers, with its UUIDs. A row that disagrees with git-annex fails
  here rather than only in the conformance run.
* `protocol` rows: git-annex's P2P protocol as its documentation gives it (no -PLUS
  message below version 2).
* `ours` rows: our own design, for cases the traces never show (an ERROR from a node,
  nested gateways, clock skew, empty clusters); nothing claims git-annex does the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest
from traces import said

from git_remote_annexproxy import p2p
from git_remote_annexproxy.gitconfig import GitConfig, parse_config
from git_remote_annexproxy.keys import Key
from shell import gatewayrules as rules
from shell.errors import ShellError
from shell.gatewayrules import NodeReply
from shell.proxyselect import EXPENSIVE_COST, Selection

# The UUIDs of cluster.txt.
N1 = "40de0000-0000-4000-8000-000000000001"
N2 = "40de0000-0000-4000-8000-000000000002"
N3 = "40de0000-0000-4000-8000-000000000003"
GW1 = "9a7e0000-0000-4000-8000-000000000001"
GW2 = "9a7e0000-0000-4000-8000-000000000002"
CU = "ac8fad45-873b-8322-9d01-7c563dab1f32"  # cluster UUID: `ac`, version digit 8
UNKNOWN = "0bad0000-0000-4000-8000-000000000000"


def wire(msg: p2p.Message) -> bytes:
    return p2p.serialize(msg)


@dataclass(frozen=True)
class TraceLine:
    """The first line starting with `verb` that git-annex's gateway (session `session`)
    sent in step `step` of cluster.txt."""

    step: str
    session: str
    verb: str
    direction: str = "S>"

    def text(self) -> str:
        return said("cluster.txt", self.step, self.session, self.direction, self.verb)


def expected_line(expected: str | TraceLine) -> bytes:
    return (expected.text() if isinstance(expected, TraceLine) else expected).encode()


# --- put_targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    uuid: str
    wants: bool


# Which nodes a PUT goes to: no wire line shows it, so every row here is a rule. The
# fallback to every node without the key is git-annex's (proxy-and-cluster.md, "Stores");
# the rest is ours.
def targets(nodes: Sequence[Node], logged: set[str]) -> list[str]:
    chosen = rules.put_targets(nodes, lambda n: n.uuid, frozenset(logged), lambda n: n.wants)
    return [n.uuid for n in chosen]


@pytest.mark.parametrize(
    ("nodes", "logged", "expected"),
    [
        # The cluster scenario: node1 wants *.txt, node2 *.dat.
        pytest.param([Node(N1, True), Node(N2, False)], set(), [N1], id="x.txt->node1"),
        pytest.param([Node(N1, False), Node(N2, True)], set(), [N2], id="y.dat->node2"),
        # Nobody wants z.bin: every node not known to have it (git-annex's fallback).
        pytest.param([Node(N1, False), Node(N2, False)], set(), [N1, N2], id="unwanted->all"),
        # A node logged as having it is never a target, even if it wants it.
        pytest.param(
            [Node(N1, True), Node(N2, True), Node(N3, True)], {N1}, [N2, N3], id="skip-logged"
        ),
        # The only wanting node already has it: fall back to the missing ones, not to it.
        pytest.param(
            [Node(N1, True), Node(N2, False), Node(N3, False)],
            {N1},
            [N2, N3],
            id="wanted-has-it->missing",
        ),
        # Everybody is logged (a stale log, a re-PUT): all nodes, so they can say ALREADY-HAVE.
        pytest.param([Node(N1, True), Node(N2, False)], {N1, N2}, [N1, N2], id="all-logged->all"),
        # A second gateway's remote carries the cluster UUID, which loggedLocations adds as
        # soon as one node has the key: it then counts as having it.
        pytest.param(
            [Node(N1, False), Node(N2, False), Node(CU, True)],
            {N1, CU},
            [N2],
            id="sub-gateway-counts-as-cluster",
        ),
        pytest.param([Node(N2, False), Node(N1, False)], set(), [N2, N1], id="keeps-cost-order"),
        pytest.param([], set(), [], id="no-nodes"),
        pytest.param([], {N1}, [], id="no-nodes-logged"),
    ],
)
def test_put_targets(nodes: list[Node], logged: set[str], expected: list[str]) -> None:
    assert targets(nodes, logged) == expected


# --- already_have_reply -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "version", "expected"),
    [
        # trace, step 13: BYPASS gw2; node2 (S16), then node1 (S17) answer ALREADY-HAVE.
        pytest.param(
            [NodeReply(N2, True), NodeReply(N1, True)],
            4,
            TraceLine("13", "S15", "ALREADY-HAVE-PLUS"),
            id="trace-step13",
        ),
        # ours: a second gateway's ALREADY-HAVE-PLUS (the reply git-annex's own gateway
        # chokes on, step 12) merges in; its cluster UUID is the one the client addressed:
        # left out.
        pytest.param(
            [NodeReply(N2, True), NodeReply(N1, True), NodeReply(CU, True, (N3,))],
            4,
            f"ALREADY-HAVE-PLUS {N2} {N1} {N3}\n",
            id="ours-nested-gateway",
        ),
        pytest.param(
            [NodeReply(N1, True, (N1,))], 2, f"ALREADY-HAVE-PLUS {N1}\n", id="ours-no-duplicates"
        ),
        # protocol: no -PLUS below version 2.
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, True)], 1, "ALREADY-HAVE\n", id="protocol-v1"
        ),
        pytest.param([NodeReply(N1, True)], 0, "ALREADY-HAVE\n", id="protocol-v0"),
    ],
)
def test_already_have_reply(
    replies: list[NodeReply], version: int, expected: str | TraceLine
) -> None:
    assert wire(rules.already_have_reply(replies, version, CU)) == expected_line(expected)


# --- put_reply --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "version", "expected"),
    [
        # trace, step 11: node2 (S6), node1 (S7), then gw2 (S8; remote UUID = the cluster)
        # with SUCCESS-PLUS node3. The cluster UUID stays in, as git-annex sends it.
        pytest.param(
            [NodeReply(N2, True), NodeReply(N1, True), NodeReply(CU, True, (N3,))],
            4,
            TraceLine("11", "S5", "SUCCESS-PLUS"),
            id="trace-step11-gw1",
        ),
        # trace: gw2's own answer in that step, its one node (S9).
        pytest.param(
            [NodeReply(N3, True)], 4, TraceLine("11", "S8", "SUCCESS-PLUS"), id="trace-step11-gw2"
        ),
        # ours: a failed node is not named; the others still are.
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, False)], 4, f"SUCCESS-PLUS {N1}\n", id="ours-1"
        ),
        pytest.param(
            [NodeReply(N1, False), NodeReply(N2, True)], 2, f"SUCCESS-PLUS {N2}\n", id="ours-2"
        ),
        # ours: nodes that said ALREADY-HAVE count as holding it (cluster.put passes them in).
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, True, (N3,))],
            3,
            f"SUCCESS-PLUS {N1} {N2} {N3}\n",
            id="ours-already-have",
        ),
        pytest.param(
            [NodeReply(N1, False), NodeReply(N2, False)], 4, "FAILURE\n", id="ours-all-failed"
        ),
        pytest.param([], 4, "FAILURE\n", id="ours-no-nodes"),
        # protocol: version 0/1 clients know no -PLUS.
        pytest.param([NodeReply(N1, True), NodeReply(N2, True)], 1, "SUCCESS\n", id="protocol-v1"),
        pytest.param([NodeReply(N1, True)], 0, "SUCCESS\n", id="protocol-v0"),
        pytest.param([NodeReply(N1, False)], 1, "FAILURE\n", id="protocol-v1-failure"),
    ],
)
def test_put_reply(replies: list[NodeReply], version: int, expected: str | TraceLine) -> None:
    assert wire(rules.put_reply(replies, version)) == expected_line(expected)


# --- remove_reply -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replies", "version", "first_error", "expected"),
    [
        # trace, step 16: node2 (S23) is locked and dies without a reply, node1 (S24)
        # removes, gw2 (S25, the cluster UUID) answers SUCCESS-PLUS node3. The error text
        # is ours (git-annex's gateway says nothing of it on the wire).
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, False), NodeReply(CU, True, (N3,))],
            4,
            "cluster node node2 failed",
            TraceLine("16", "S22", "FAILURE-PLUS"),
            id="trace-step16",
        ),
        # trace, step 17: everybody removes.
        pytest.param(
            [NodeReply(N2, True), NodeReply(N1, True), NodeReply(CU, True, (N3,))],
            4,
            None,
            TraceLine("17", "S27", "SUCCESS-PLUS"),
            id="trace-step17",
        ),
        # ours: a sub-gateway's FAILURE-PLUS: its list counts, its own (cluster) UUID does not.
        pytest.param(
            [NodeReply(N1, True), NodeReply(CU, False, (N3,), plus_only=True)],
            4,
            None,
            f"FAILURE-PLUS {N1} {N3}\n",
            id="ours-nested-failure-plus",
        ),
        # protocol: below version 2, plain SUCCESS / FAILURE.
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, True)], 1, None, "SUCCESS\n", id="protocol-v1"
        ),
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, False)],
            1,
            None,
            "FAILURE\n",
            id="protocol-v1-failure",
        ),
        # ours: only the addressed UUID in the list (a lone sub-gateway): plain as well.
        pytest.param([NodeReply(CU, True)], 4, None, "SUCCESS\n", id="ours-lone-gateway"),
        pytest.param(
            [NodeReply(CU, False, (CU,), plus_only=True)],
            4,
            None,
            "FAILURE\n",
            id="ours-lone-gateway-failure",
        ),
        # ours: nothing removed anywhere.
        pytest.param(
            [NodeReply(N1, False), NodeReply(N2, False)], 4, None, "FAILURE\n", id="ours-none"
        ),
        # ours: ... and a node said ERROR: its text goes to the client.
        pytest.param(
            [NodeReply(N1, False), NodeReply(N2, False)],
            4,
            "this repository is append-only; removal denied",
            "ERROR this repository is append-only; removal denied\n",
            id="ours-error",
        ),
        pytest.param(
            [NodeReply(N1, False)], 1, "node1 refused", "ERROR node1 refused\n", id="ours-error-v1"
        ),
        # ours: an error does not hide what did get removed.
        pytest.param(
            [NodeReply(N1, True), NodeReply(N2, False)],
            4,
            "node2 refused",
            f"FAILURE-PLUS {N1}\n",
            id="ours-error-and-removed",
        ),
        # ours: no nodes at all.
        pytest.param([], 4, None, "FAILURE\n", id="ours-no-nodes"),
        pytest.param([], 1, "ignored", "FAILURE\n", id="ours-no-nodes-v1"),
    ],
)
def test_remove_reply(
    replies: list[NodeReply], version: int, first_error: str | None, expected: str | TraceLine
) -> None:
    assert wire(rules.remove_reply(replies, version, CU, first_error)) == expected_line(expected)


# --- REMOVE-BEFORE deadlines ------------------------------------------------------------------


def test_translate_deadline_as_in_the_trace() -> None:
    """trace, step 19: the client's REMOVE-BEFORE to gw1 (S35), gw1's and node2's clocks
    (their TIMESTAMP answers) and what gw1 sent node2 (S36)."""

    def number(line: TraceLine) -> int:
        return int(line.text().split()[1])

    deadline = number(TraceLine("19", "S35", "REMOVE-BEFORE", "C>"))
    gateway_now = number(TraceLine("19", "S35", "TIMESTAMP"))
    node_now = number(TraceLine("19", "S36", "TIMESTAMP"))
    sent = number(TraceLine("19", "S36", "REMOVE-BEFORE", "C>"))
    assert rules.translate_deadline(deadline, gateway_now, node_now) == sent


@pytest.mark.parametrize(
    ("deadline", "gateway_now", "node_now", "expected"),
    [
        # ours: the trace shows only clocks that agree (test above); these are our rule.
        (7472, 6873, 6873, 7472),
        (6830, 6231, 6230, 6829),  # the node read its clock a second "earlier"
        (700, 100, 5000, 5600),  # a node on another host, booted long before the gateway
        (600, 600, 10, 10),  # deadline now: now on the node too
        # An expired deadline stays expired, and never goes negative (a negative number
        # cannot be sent; the node must simply refuse).
        (5, 1000, 10, 0),
        (0, 50, 0, 0),
    ],
)
def test_translate_deadline(deadline: int, gateway_now: int, node_now: int, expected: int) -> None:
    assert rules.translate_deadline(deadline, gateway_now, node_now) == expected
    # Whatever comes out must be sendable to the node.
    line = wire(p2p.RemoveBefore(rules.translate_deadline(deadline, gateway_now, node_now), KEY))
    assert line.startswith(f"REMOVE-BEFORE {expected} ".encode())


KEY = Key.parse("SHA256E-s14--1a42c88f1037599322ad70e9a19fd6798db093f64ca33cd21e2f0945906a7f20.txt")


# --- proxy selection --------------------------------------------------------------------------


class Branch:
    """A git-annex branch as selection reads it: a few files."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.files = {k: v.encode() for k, v in files.items()}

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)


UUID_LOG = (
    f"{N1} node1 timestamp=1795562611s\n"
    f"{N2} node2 timestamp=1795562611s\n"
    f"{N3} node3 timestamp=1795562611s\n"
    f"{GW1} gw1 timestamp=1795562611s\n"
    f"{GW2} gw2 timestamp=1795562611s\n"
    f"{CU} cluster mycluster timestamp=1795562612s\n"
)


def selection(config: str, proxy_log: str, *, own: str = GW1, **files: str) -> Selection:
    branch = {"uuid.log": UUID_LOG, "proxy.log": proxy_log}
    branch.update({name.replace("_", "."): text for name, text in files.items()})
    return Selection.from_sources(GitConfig(parse_config(config)), own, Branch(branch))


PROXY_CONFIG = f"""
[remote "node1"]
\turl = /srv/node1.git
\tannex-uuid = {N1}
\tannex-proxy = true
[remote "node2"]
\turl = /srv/node2.git
\tannex-uuid = {N2}
"""
PROXY_LOG = f"1795561918s {GW1} {N1}:node1 {N2}:node2\n"

# gw1 of cluster.txt's appendix, verbatim in substance.
GW1_CONFIG = f"""
[annex]
\tuuid = {GW1}
[annex "cluster"]
\tmycluster = {CU}
[remote "node1"]
\turl = /srv/node1.git
\tannex-uuid = {N1}
\tannex-cluster-node = mycluster
[remote "node2"]
\turl = /srv/node2.git
\tannex-uuid = {N2}
\tannex-cluster-node = mycluster
[remote "gw2"]
\turl = localhost:/srv/gw2.git
\tannex-uuid = {GW2}
\tannex-cluster-gateway = {CU}
"""
GW_PROXY_LOG = (
    f"1795562614s {GW1} {N1}:node1 {N2}:node2 {N3}:gw2-node3 {CU}:mycluster\n"
    f"1795562614s {GW2} {N1}:gw1-node1 {N2}:gw1-node2 {N3}:node3 {CU}:mycluster\n"
)
GW_CLUSTER_LOG = f"1795562613s {CU} {N1} {N2} {N3}\n"


def test_select_proxied_node() -> None:
    target = selection(PROXY_CONFIG, PROXY_LOG).select(N1)
    assert target.uuid == N1
    assert [n.name for n in target.nodes] == ["node1"]
    assert target.nodes[0].is_local
    assert target.cluster is None


@pytest.mark.parametrize(
    ("config", "proxy_log", "wanted", "message"),
    [
        # In proxy.log, but the remote lacks annex-proxy: the config decides. git-annex's
        # case and message (edgecases.txt, 14a); the rows below reuse its message for cases
        # no trace shows (ours), except the unknown UUID, whose message test_cli.py compares
        # with git-annex's own git-annex-shell.
        (PROXY_CONFIG, PROXY_LOG, N2, "not configured to proxy for repository node2"),
        # Configured, but our proxy.log entry does not list it (updateproxy not run).
        (
            PROXY_CONFIG,
            f"1795561918s {GW1} {N2}:node2\n",
            N1,
            "not configured to proxy for repository node1",
        ),
        # Listed under another name than the remote's.
        (
            PROXY_CONFIG,
            f"1795561918s {GW1} {N1}:othername\n",
            N1,
            "not configured to proxy for repository node1",
        ),
        # Listed under another proxy's UUID only.
        (
            PROXY_CONFIG,
            f"1795561918s {GW2} {N1}:node1\n",
            N1,
            "not configured to proxy for repository node1",
        ),
        # A UUID nobody knows.
        (
            PROXY_CONFIG,
            PROXY_LOG,
            UNKNOWN,
            f"expected repository UUID {UNKNOWN} but found UUID {GW1}",
        ),
        # A cluster we are not a gateway of (no annex.cluster.NAME) is no cluster for us.
        (PROXY_CONFIG, PROXY_LOG, CU, "not configured to proxy for repository cluster mycluster"),
    ],
)
def test_select_refused(config: str, proxy_log: str, wanted: str, message: str) -> None:
    sel = selection(config, proxy_log)
    with pytest.raises(ShellError) as info:
        sel.select(wanted)
    assert info.value.message == message


def test_select_cluster_node_by_annex_cluster_node() -> None:
    sel = selection(GW1_CONFIG, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG)
    target = sel.select(N2)
    assert [n.name for n in target.nodes] == ["node2"]


def test_cluster_node_of_a_cluster_we_do_not_serve_is_refused() -> None:
    config = GW1_CONFIG.replace("annex-cluster-node = mycluster", "annex-cluster-node = other")
    sel = selection(config, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG)
    with pytest.raises(ShellError, match="not configured to proxy for repository node1"):
        sel.select(N1)


def test_select_node_behind_another_gateway() -> None:
    """`gw2-node3`: instantiated from gw2's proxy.log entry, reached through remote gw2,
    allowed because gw2 is a gateway of our cluster; it costs gw2's cost + 0.1."""
    sel = selection(GW1_CONFIG, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG)
    (node3,) = sel.select(N3).nodes
    assert node3.name == "gw2-node3"
    assert node3.via is not None and node3.via.name == "gw2"
    assert node3.url == "localhost:/srv/gw2.git"
    assert not node3.is_local
    assert node3.cost == pytest.approx(EXPENSIVE_COST + 0.1)


def test_node_behind_a_remote_that_is_no_gateway_or_proxy_is_refused() -> None:
    config = GW1_CONFIG.replace(f"annex-cluster-gateway = {CU}", "annex-sync = false")
    sel = selection(config, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG)
    with pytest.raises(ShellError, match="not configured to proxy for repository node3"):
        sel.select(N3)


def test_node_behind_a_proxy_remote_is_selected() -> None:
    """A chain of plain proxies: remote P has annex-proxy, its proxy.log lists X."""
    config = (
        f'[remote "p"]\n\turl = localhost:/srv/p.git\n\tannex-uuid = {GW2}\n\tannex-proxy = true\n'
    )
    log = f"1s {GW2} {N3}:node3\n2s {GW1} {N3}:p-node3\n"
    (node,) = selection(config, log).select(N3).nodes
    assert (node.name, node.via is not None) == ("p-node3", True)


def test_explicit_remote_hides_the_instantiated_one() -> None:
    """A configured `gw2-node3` wins over the one instantiated from gw2's entry
    (proxy-and-cluster.md §4 rule 2); it is then selected only if it proxies itself."""
    config = GW1_CONFIG + (
        f'[remote "gw2-node3"]\n\turl = /srv/elsewhere.git\n\tannex-uuid = {N3}\n'
        "\tannex-proxy = true\n"
    )
    sel = selection(config, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG)
    (node,) = sel.select(N3).nodes
    assert (node.name, node.url, node.via) == ("gw2-node3", "/srv/elsewhere.git", None)


def test_select_cluster_nodes_cheapest_first() -> None:
    """The cluster's nodes: both direct nodes and the cluster as instantiated through gw2,
    sorted by cost; an explicit annex-cost reorders them."""
    sel = selection(GW1_CONFIG, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG)
    target = sel.select(CU)
    assert target.cluster == "mycluster"
    assert [(n.name, n.uuid) for n in target.nodes] == [
        ("node1", N1),
        ("node2", N2),
        ("gw2-mycluster", CU),
    ]
    cheap_gw2 = GW1_CONFIG.replace(
        "\tannex-uuid = " + N1, "\tannex-uuid = " + N1 + "\n\tannex-cost = 500"
    ).replace("\tannex-uuid = " + GW2, "\tannex-uuid = " + GW2 + "\n\tannex-cost = 50")
    target = selection(cheap_gw2, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG).select(CU)
    assert [n.name for n in target.nodes] == ["gw2-mycluster", "node2", "node1"]


def test_cluster_nodes_must_be_in_cluster_log_and_alive() -> None:
    # node2 not (yet) in cluster.log: updatecluster was not run after adding it.
    only_n1 = f"1795562613s {CU} {N1} {N3}\n"
    target = selection(GW1_CONFIG, GW_PROXY_LOG, cluster_log=only_n1).select(CU)
    assert [n.name for n in target.nodes] == ["node1", "gw2-mycluster"]
    # node1 marked dead in trust.log: dropped from the cluster.
    trust = f"{N1} X timestamp=1795562700s\n"
    sel = selection(GW1_CONFIG, GW_PROXY_LOG, cluster_log=GW_CLUSTER_LOG, trust_log=trust)
    assert [n.name for n in sel.select(CU).nodes] == ["node2", "gw2-mycluster"]


@pytest.mark.parametrize(
    ("url", "want"),
    [("../node1.git", "/srv/node1.git"), ("sub/n.git", "/srv/gw.git/sub/n.git"),
     ("/abs/n.git", "/abs/n.git"), ("file:///abs/n.git", "file:///abs/n.git"),
     ("localhost:n.git", "localhost:n.git"), ("ssh://h/~/n.git", "ssh://h/~/n.git")],
)  # fmt: skip
def test_relative_node_url_is_relative_to_the_repository(url: str, want: str) -> None:
    """A local path remote's relative URL names a path from the proxy repository, as git
    and git-annex read it, not from our cwd or HOME (where the node would be another)."""
    config = PROXY_CONFIG.replace("url = /srv/node1.git", f"url = {url}")
    branch = Branch({"uuid.log": UUID_LOG, "proxy.log": PROXY_LOG})
    sel = Selection.from_sources(GitConfig(parse_config(config)), GW1, branch, base="/srv/gw.git")
    [node] = sel.select(N1).nodes
    assert node.url == want
