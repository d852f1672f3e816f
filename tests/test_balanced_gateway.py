"""Issue 7: `balanced=` / `sizebalanced=` placement through a cluster gateway, ours against
git-annex's own.

Two identical deployments are built by an admin with the real git-annex (tests/clusterbuild.py):
a bare gateway and three bare nodes whose UUIDs are fixed, nodes in group `grp`, cluster
`mycluster` made with initcluster/updatecluster, preferred content and maxsizes set with
`git annex wanted` / `git annex maxsize` in the gateway. One gateway is served by git-annex's
own git-annex-shell, the other by ours; the real client reaches each through the fake ssh and
sends the same 320 files (1 byte to 1.5 MiB, 16 MB in all) with
`git annex copy --to origin-mycluster`. Then, per key, the nodes holding it are read from the
nodes' object stores (objects hashed against their keys), cross-checked with each node's own
`git annex findkeys` and with the gateway's location logs (`git annex whereis`), and the real
placement is compared with ours key by key.

What git-annex 10.20261026 was observed to do (each real run repeated twice while writing this
test, with identical results; the checks below pin it down):

* `balanced=grp:N` without maxsizes is a pure function of the key and the group's member
  UUIDs (Annex/Balanced.hs): HMAC-SHA256 keyed with the concatenated sorted member UUIDs, of
  the serialised key, read as a big-endian integer `h`; the picked nodes are the sorted
  candidates at `(h + i) mod len(candidates)` for `i < N`. No randomness and no dependence on
  the order of the transfers. `balanced_pick()` is that formula; the real gateway's placement
  must equal it exactly, and so must ours, with -J1 and with -J4.
* `sizebalanced=grp:1` (every node with a maxsize) depends on the repository sizes, hence on
  the order the keys arrive in: it is deterministic with -J1 (one gateway session, keys in
  the client's file order) and `sizebalanced_model()` reproduces all 320 observed placements.
  The gateway checks the nodes' preferred content one after another in descending order of
  remote name: node3, node2, node1 here (also so with the remotes added as node2, node3,
  node1; and remotes named zeta, alpha, mid for node1, node2, node3 were checked zeta, mid,
  alpha). A node whose check says "wanted" is counted at once as holding the key (the live
  repository-size update, `needLiveUpdate` in git-annex's Limit.hs) before the next node is
  checked, so the "most free space" node changes between the checks and a key usually goes
  to *two* nodes although N is 1. A node is a candidate only while its logged size plus the
  key fits its maxsize; among candidates the highest proportion of free space wins, ties
  going to the highest UUID. When no node wants a key the gateway falls back to sending it
  to every node (Annex/Cluster.hs: "PUT to no nodes doesn't work"), which would overfill a
  full node: the maxsizes here are chosen so that it never happens. (With maxsizes too small
  for the data, the placement also stopped following this model once every node was over
  its maxsize; such a configuration is not tested.)
* With -J4 the real gateway hangs, for `balanced=` as well as `sizebalanced=`: the client's
  four gateway sessions block on the gateway's `annex/reposize/lock` while the session
  holding it waits forever (seen in /proc/locks; no progress for minutes, 0 to 145 of the
  expected objects stored), whereas the same cluster with `wanted include=*` copies with -J4
  in seconds: it is the repository-size machinery of the balanced terms. So the real gateway
  always runs with -J1. Ours also runs with -J4 for the `balanced=` cases, where the
  placement cannot depend on the interleaving and the real -J1 placement is the reference;
  `sizebalanced` depends on the interleaving, so it is compared with -J1 only.

Set ANNEXPROXY_PLACEMENT_REPORT=FILE to append the per-node table (files, bytes; real and
ours) of every case to FILE; it is printed to stdout in any case (`pytest -s` shows it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from clusterbuild import NODE_UUIDS, NODES, Deployment, deploy, make_files, real_shell

FILES = make_files(320, seed=7)
TOTAL_BYTES = sum(len(d) for d in FILES.values())

Placement = dict[str, frozenset[str]]  # key -> names of the nodes holding it


@dataclass(frozen=True)
class Case:
    id: str
    wanted: str
    maxsize: Mapping[str, int] | None = None


# node1's maxsize is a sixteenth of the data: it fills up (to within 0.4 %) about 80 % of
# the way through the run, and the other two still have room for every later key (with the
# double placement described above they end about 94 % full), so no key ever falls back to
# all nodes.
MAXSIZES = {"node1": 1_000_000, "node2": 16_000_000, "node3": 17_000_000}

CASES = {
    c.id: c
    for c in (
        Case("balanced1", "balanced=grp:1"),
        Case("balanced2", "balanced=grp:2"),
        Case("sizebalanced1-maxsize", "sizebalanced=grp:1", MAXSIZES),
    )
}
# (case, -J for our gateway's run); the real gateway always runs -J1 (see the docstring).
RUNS = [
    ("balanced1", "-J1"),
    ("balanced1", "-J4"),
    ("balanced2", "-J1"),
    ("balanced2", "-J4"),
    ("sizebalanced1-maxsize", "-J1"),
]


# --- git-annex's choice, as documented and observed -----------------------------------------


def balanced_pick(key: str, count: int, candidates: Iterable[str] = NODES) -> frozenset[str]:
    """Annex/Balanced.hs: the `count` nodes `balanced=grp:count` picks for `key` when none
    is full (all group members are candidates)."""
    members = sorted(NODE_UUIDS.values())
    pool = sorted(NODE_UUIDS[n] for n in candidates)
    secret = "".join(members).encode()
    h = int.from_bytes(hmac.new(secret, key.encode(), hashlib.sha256).digest(), "big")
    by_uuid = {u: n for n, u in NODE_UUIDS.items()}
    return frozenset(by_uuid[pool[(h + i) % len(pool)]] for i in range(count))


# The order the real gateway checks the nodes' preferred content in: descending remote name
# (observed; see the module docstring).
CHECK_ORDER = ("node3", "node2", "node1")


def sizebalanced_model(
    sequence: Iterable[tuple[str, int]], maxsizes: Mapping[str, int]
) -> tuple[Placement, int]:
    """Where git-annex's gateway puts each key under `sizebalanced=grp:1` when the keys
    come one at a time in `sequence` (key, size), nodes starting empty; and how many keys
    fell back to all nodes. See the module docstring for the rules."""
    by_uuid_order = sorted(NODES, key=NODE_UUIDS.__getitem__)
    sizes = dict.fromkeys(NODES, 0)
    placed: Placement = {}
    fallbacks = 0

    def most_free(live: Mapping[str, int], size: int) -> str | None:
        ranked = [
            (n, (maxsizes[n] - live[n]) / maxsizes[n])
            for n in by_uuid_order
            if live[n] + size <= maxsizes[n]
        ]
        ranked.sort(key=lambda c: c[1])  # stable, then reversed: ties go to the highest UUID
        ranked.reverse()
        return ranked[0][0] if ranked else None

    for key, size in sequence:
        if key in placed:
            continue  # a duplicate file: the client already sent its key
        live = dict(sizes)
        chosen = set()
        for node in CHECK_ORDER:
            if most_free(live, size) == node:
                chosen.add(node)
                live[node] += size  # the live size update, seen by the next node's check
        if not chosen:
            chosen = set(NODES)
            fallbacks += 1
        for node in chosen:
            sizes[node] += size
        placed[key] = frozenset(chosen)
    return placed, fallbacks


# --- running one deployment -------------------------------------------------------------------


@dataclass
class Run:
    dep: Deployment
    placement: Placement
    seconds: float


def send_and_collect(dep: Deployment, jobs: str) -> Run:
    start = time.monotonic()
    dep.at_client(
        "git", "annex", "copy", "--quiet", "--to", "origin-mycluster", jobs, ".", timeout=240
    )
    seconds = time.monotonic() - start
    # The client did go through the fake ssh to the gateway's cluster endpoint.
    sessions = [json.loads(line)["command"] for line in dep.env.log.read_text().splitlines()]
    assert any(
        "p2pstdio" in c and str(dep.gateway) in c and f"--uuid {dep.cluster_uuid}" in c
        for c in sessions
    ), f"[{dep.label}] no p2pstdio session to the cluster in the ssh log"
    placement = on_disk(dep)
    check_consistent(dep, placement)
    return Run(dep, placement, seconds)


def on_disk(dep: Deployment) -> Placement:
    """{key: nodes whose object store holds it}; every object must hash to its key
    (SHA256E-s<size>--<sha256>[.ext])."""
    holders: dict[str, set[str]] = {key: set() for key in dep.keys.values()}
    for node, objects in dep.node_objects().items():
        for key, path in objects.items():
            assert key in holders, f"[{dep.label}] {node} holds {key}, which was never sent"
            digest = key.split("--", 1)[1].split(".", 1)[0]
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"[{dep.label}] {node}: bad {key}"
            assert key.startswith(f"SHA256E-s{len(data)}--"), f"[{dep.label}] {node}: bad {key}"
            holders[key].add(node)
    return {key: frozenset(nodes) for key, nodes in holders.items()}


def check_consistent(dep: Deployment, placement: Placement) -> None:
    """Every key reached some node, each node's own log agrees with its disk, the gateway's
    location logs agree with the disks, and no log names the cluster UUID."""
    missing = sorted(k for k, nodes in placement.items() if not nodes)
    assert not missing, f"[{dep.label}] {len(missing)} keys reached no node: {missing[:5]}"
    for node, keys in dep.node_findkeys().items():
        held = {k for k, nodes in placement.items() if node in nodes}
        assert keys == held, f"[{dep.label}] {node}: findkeys and the object store disagree"
    logged = dep.gateway_locations(sorted(placement))
    wrong = sorted(k for k in placement if logged[k] != placement[k])
    assert not wrong, (
        f"[{dep.label}] the gateway's location logs disagree with the nodes' disks for "
        f"{len(wrong)} keys, e.g. {wrong[0]}: logged {sorted(logged[wrong[0]])}, "
        f"on disk {sorted(placement[wrong[0]])}"
    )
    assert dep.cluster_uuid_in_logs() == [], f"[{dep.label}] cluster UUID in a location log"


def per_node(placement: Placement, sizes: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """{node: (keys, bytes)}."""
    return {
        node: (
            sum(1 for nodes in placement.values() if node in nodes),
            sum(sizes[k] for k, nodes in placement.items() if node in nodes),
        )
        for node in NODES
    }


def key_sizes(dep: Deployment) -> dict[str, int]:
    return {key: len(FILES[name]) for name, key in dep.keys.items()}


def copy_order(dep: Deployment) -> list[tuple[str, int]]:
    """(key, size) in the order `git annex copy .` sends them: the files' path order."""
    return [(dep.keys[name], len(FILES[name])) for name in sorted(dep.keys)]


def report(case: Case, jobs: str, real: Run, ours: Run | None, differing: int | None) -> str:
    sizes = key_sizes(real.dep)
    r = per_node(real.placement, sizes)
    o = per_node(ours.placement, sizes) if ours else None
    lines = [
        f"== {case.id}: wanted {case.wanted}, {len(sizes)} files, {TOTAL_BYTES} bytes; "
        f"real -J1 {real.seconds:.1f} s, "
        + (f"ours {jobs} {ours.seconds:.1f} s" if ours else "ours: not run or failed"),
        f"{'node':6} {'real files':>10} {'real bytes':>11} {'ours files':>10} "
        f"{'ours bytes':>11} {'maxsize':>10}",
    ]
    for node in NODES:
        of, ob = (str(o[node][0]), str(o[node][1])) if o else ("-", "-")
        limit = str(case.maxsize[node]) if case.maxsize else "-"
        lines.append(f"{node:6} {r[node][0]:>10} {r[node][1]:>11} {of:>10} {ob:>11} {limit:>10}")
    copies = sum(len(n) for n in real.placement.values())
    lines.append(
        f"copies stored: real {copies}"
        + (f", ours {sum(len(n) for n in ours.placement.values())}" if ours else "")
        + (f"; keys placed differently: {differing}" if differing is not None else "")
    )
    return "\n".join(lines) + "\n"


def publish(text: str) -> None:
    print("\n" + text, end="")
    target = os.environ.get("ANNEXPROXY_PLACEMENT_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(text + "\n")


# --- the real gateway's behaviour, pinned down --------------------------------------------------


def check_real_behaviour(case: Case, real: Run) -> None:
    if case.maxsize is None:
        count = int(case.wanted.rsplit(":", 1)[1])
        expected = {key: balanced_pick(key, count) for key in real.placement}
        off = sorted(k for k in expected if expected[k] != real.placement[k])
        assert not off, (
            f"git-annex's balanced placement is not the documented formula for {len(off)} "
            f"keys, e.g. {off[0]}: {sorted(real.placement[off[0]])} vs {sorted(expected[off[0]])}"
        )
        # Balanced: every node gets a share (a sanity check on the data set, 320 keys).
        assert all(keys > 40 for keys, _ in per_node(real.placement, key_sizes(real.dep)).values())
    else:
        expected, fallbacks = sizebalanced_model(copy_order(real.dep), case.maxsize)
        assert fallbacks == 0, "the maxsizes must leave room for every key (see MAXSIZES)"
        off = sorted(k for k in expected if expected[k] != real.placement[k])
        assert not off, (
            f"git-annex's sizebalanced placement differs from the model for {len(off)} keys, "
            f"e.g. {off[0]}: {sorted(real.placement[off[0]])} vs {sorted(expected[off[0]])}"
        )


def check_full_node(case: Case, run: Run, node: str = "node1") -> None:
    """A node at its maxsize receives nothing more while the others keep accepting."""
    assert case.maxsize is not None
    order = copy_order(run.dep)
    sizes = key_sizes(run.dep)
    totals = per_node(run.placement, sizes)
    label = run.dep.label
    for name, (_, used) in totals.items():
        assert used <= case.maxsize[name], f"[{label}] {name} holds {used} > its maxsize"
    limit = case.maxsize[node]
    assert totals[node][1] >= limit * 0.99, f"[{label}] {node} never filled up: {totals[node]}"
    last = max(i for i, (key, _) in enumerate(order) if node in run.placement[key])
    later = order[last + 1 :]
    # Once full, it got nothing more, not even the small keys that would still have fitted...
    assert all(node not in run.placement[key] for key, _ in later)
    free = limit - totals[node][1]
    assert any(size <= free for _, size in later), f"[{label}] no key under {free} came later"
    # ...while the others kept accepting every key that came after.
    assert len(later) >= 30, f"[{label}] {node} filled up too late (key {last}) to show this"
    assert all(run.placement[key] - {node} for key, _ in later), f"[{label}] a key was lost"


# --- the test -----------------------------------------------------------------------------------


class RealRuns:
    """The real gateway's run of each case, made once per module and shared by the
    comparisons with our -J1 and -J4 runs."""

    def __init__(self, root: Path, annex_bin: Path) -> None:
        self.root = root
        self.annex_bin = annex_bin
        self.runs: dict[str, Run] = {}

    def get(self, case: Case) -> Run:
        run = self.runs.get(case.id)
        if run is None:
            shell = real_shell(self.root / "realbin", self.annex_bin)
            root = Path(tempfile.mkdtemp(prefix=f"{case.id}-", dir=self.root))
            dep = deploy(root, self.annex_bin, shell, f"real {case.id}",
                         wanted=case.wanted, maxsize=maxsize_args(case), files=FILES)  # fmt: skip
            run = self.runs[case.id] = send_and_collect(dep, "-J1")
        try:
            check_real_behaviour(case, run)
            if case.maxsize:
                check_full_node(case, run)
        except AssertionError:
            publish(report(case, "", run, None, None))
            raise
        return run


def maxsize_args(case: Case) -> dict[str, str] | None:
    return {n: str(v) for n, v in case.maxsize.items()} if case.maxsize else None


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path) -> RealRuns:
    pytest.importorskip("git_annex")
    return RealRuns(tmp_path_factory.mktemp("real"), annex_bin)


@pytest.mark.parametrize(("case_id", "jobs"), RUNS, ids=[f"{c}-{j}" for c, j in RUNS])
def test_same_placement_as_git_annex(
    case_id: str, jobs: str, real_runs: RealRuns, tmp_path: Path, annex_bin: Path,
    our_shell: Path,
) -> None:  # fmt: skip
    case = CASES[case_id]
    real = real_runs.get(case)

    ours_dep = deploy(tmp_path / "ours", annex_bin, our_shell, f"ours {case.id} {jobs}",
                      wanted=case.wanted, maxsize=maxsize_args(case), files=FILES)  # fmt: skip
    assert ours_dep.keys == real.dep.keys
    try:
        ours = send_and_collect(ours_dep, jobs)
    except (AssertionError, subprocess.TimeoutExpired):
        publish(report(case, jobs, real, None, None))
        raise
    differing = sorted(k for k in real.placement if real.placement[k] != ours.placement[k])
    publish(report(case, jobs, real, ours, len(differing)))

    examples = "\n".join(
        f"  {k}: real {sorted(real.placement[k])}, ours {sorted(ours.placement[k])}"
        for k in differing[:10]
    )
    problems = []
    if differing:
        problems.append(f"{len(differing)} keys placed differently, e.g.\n{examples}")
    elif ours_dep.gateway_locations(sorted(ours.placement)) != real.dep.gateway_locations(
        sorted(real.placement)
    ):
        # Cannot happen while each equals its own disks; kept as the explicit comparison of
        # the two gateways' location logs.
        problems.append("the gateways' location logs differ")
    if case.maxsize:
        try:
            check_full_node(case, ours)
        except AssertionError as exc:
            problems.append(f"maxsize: {exc}")
    assert not problems, "\n".join(problems)
