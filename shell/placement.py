"""Where a gateway's upload goes: the nodes' preferred content, read from the branch.

The expression language lives in `git_remote_annexproxy.preferred`; this module feeds it
what a gateway knows (the branch's policy logs, the key's logged locations with git-annex's
cluster rule) and turns an expression it cannot evaluate into a reported error rather than
a silent "yes". Repository sizes (the ``balanced`` family) come from a
``reposize.SizeTracker``, computed only when some node's expression needs them, and anew for
each upload so that what this or a concurrent session just stored counts at once.

``targets`` is THE placement decision, shared by the gateway and ``bench/placement.py``;
the simulator pretends stores with ``pretend_stored`` instead of writing any log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from git_remote_annexproxy import maplog
from git_remote_annexproxy.annexlog import location_log_path, present_uuids
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.preferred import PreferredContentError, RepoPolicy
from git_remote_annexproxy.repologs import dead_uuids, parse_cluster_log
from git_remote_annexproxy.reposize import RepoSizes, SizeTracker
from shell import gatewayrules as rules
from shell.p2pserver import warn
from shell.repo import Repo

N = TypeVar("N")


def _text(branch: AnnexBranch, path: str) -> str:
    return (branch.read(path) or b"").decode("utf-8", "surrogateescape")


@dataclass
class Placement:
    branch: AnnexBranch
    policy: RepoPolicy
    clusters: dict[str, frozenset[str]]
    dead: frozenset[str]
    numcopies: int
    reported: set[str]
    tracker: SizeTracker | None = None
    # Simulated holders per key (bench/placement.py); the gateway logs real ones instead.
    pretend: dict[Key, set[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, branch: AnnexBranch, repo: Repo | None = None) -> Placement:
        del repo  # policy comes from the branch only, as for a real gateway
        policy = RepoPolicy.from_logs(
            preferred_content=_text(branch, "preferred-content.log"),
            group=_text(branch, "group.log"),
            group_preferred_content=_text(branch, "group-preferred-content.log"),
            required_content=_text(branch, "required-content.log"),
            trust_log=_text(branch, "trust.log"),
        )
        numcopies = maplog.configured_copies(branch.read("numcopies.log") or b"") or 1
        return cls(
            branch=branch,
            policy=policy,
            clusters=parse_cluster_log(branch.read("cluster.log") or b""),
            dead=dead_uuids(branch.read("trust.log") or b""),
            numcopies=numcopies,
            reported=set(),
            tracker=SizeTracker(branch),
        )

    def locations(self, key: Key) -> frozenset[str]:
        """git-annex's loggedLocations: the location log plus every cluster one of whose
        live nodes has the key (cluster UUIDs are never written to the log itself)."""
        logged = set(present_uuids(self.branch.read(location_log_path(key)) or b""))
        logged |= self.pretend.get(key, set())
        for cluster, nodes in self.clusters.items():
            if any(u in logged and u not in self.dead for u in nodes):
                logged.add(cluster)
        return frozenset(logged)

    def sizes(self, uuids: Sequence[str]) -> RepoSizes:
        """Current sizes if any of these repositories' expressions needs them, else none
        (so a cluster without balanced terms never walks the branch)."""
        if self.tracker is None:
            return RepoSizes()
        for u in uuids:
            try:
                m = self.policy.matcher(u)
            except PreferredContentError:
                continue
            if m is not None and m.needs_sizes():
                return self.tracker.current()
        return RepoSizes()

    def targets(
        self,
        nodes: Sequence[N],
        uuid_of: Callable[[N], str],
        key: Key,
        af: str | None,
        name_of: Callable[[N], str] | None = None,
    ) -> list[N]:
        """The nodes a PUT of `key` goes to (gatewayrules.put_targets with our wants).

        As a real gateway: the nodes are asked in descending order of their remote names,
        and a node that wants the key counts its size at once (git-annex's live size
        update for a transfer it has decided on), so the next node is judged with that
        node fuller. With sizebalanced this is why a key often goes to two nodes; with
        maxsize it is what keeps a nearly full node from being picked twice over.
        Locations are one snapshot: a node that wants the key is not yet counted as
        having it (tests/test_balanced_gateway.py shows both against git-annex)."""
        logged = self.locations(key)
        order = sorted(nodes, key=name_of, reverse=True) if name_of is not None else nodes
        sizes = self.sizes([uuid_of(n) for n in order])
        planned: dict[str, int] = {}

        def wants(n: N) -> bool:
            u = uuid_of(n)
            now = sizes.with_delta(planned) if planned else sizes
            if not self.wants(u, key, af, now, logged):
                return False
            if u in sizes.sizes:  # an unknown size stays unknown (has_space: yes)
                planned[u] = planned.get(u, 0) + (key.size or 0)
            return True

        return rules.put_targets(order, uuid_of, logged, wants)

    def pretend_stored(self, key: Key, uuids: Sequence[str]) -> None:
        """Simulate a store (no log written): later decisions see the key there."""
        have = self.pretend.setdefault(key, set())
        logged = self.locations(key)
        for u in uuids:
            if u not in logged and self.tracker is not None:
                self.tracker.offsets[u] = self.tracker.offsets.get(u, 0) + (key.size or 0)
            have.add(u)

    def wants(
        self,
        uuid: str,
        key: Key,
        af: str | None,
        sizes: RepoSizes | None = None,
        logged: frozenset[str] | None = None,
    ) -> bool:
        """Does repository `uuid` want `key` (stored as file `af`)? No expression: yes."""
        ctx = self.policy.context(
            uuid,
            key,
            file=af,
            present_uuids=self.locations(key) if logged is None else logged,
            numcopies=self.numcopies,
            sizes=sizes if sizes is not None else self.sizes([uuid]),
        )
        try:
            return self.policy.wants(ctx, default=True)
        except PreferredContentError as exc:
            if uuid not in self.reported:
                self.reported.add(uuid)
                warn(f"git-annex-shell: cannot evaluate preferred content of {uuid}: {exc}")
            return False
