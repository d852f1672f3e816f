"""Where a gateway's upload goes: the nodes' preferred content, read from the branch.

The expression language lives in `git_remote_annexproxy.preferred`; this module feeds it
what a gateway knows (the branch's policy logs, the key's logged locations with git-annex's
cluster rule) and turns an expression it cannot evaluate into a reported error rather than
a silent "yes".
"""

from __future__ import annotations

from dataclasses import dataclass

from git_remote_annexproxy.annexlog import location_log_path, present_uuids
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.preferred import PreferredContentError, RepoPolicy
from git_remote_annexproxy.repologs import dead_uuids, parse_cluster_log
from shell.p2pserver import warn
from shell.repo import Repo


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

    @classmethod
    def load(cls, branch: AnnexBranch, repo: Repo) -> Placement:
        del repo  # policy comes from the branch only, as for a real gateway
        policy = RepoPolicy.from_logs(
            preferred_content=_text(branch, "preferred-content.log"),
            group=_text(branch, "group.log"),
            group_preferred_content=_text(branch, "group-preferred-content.log"),
            required_content=_text(branch, "required-content.log"),
        )
        numcopies = 1
        for line in _text(branch, "numcopies.log").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                numcopies = int(parts[1])
        return cls(
            branch=branch,
            policy=policy,
            clusters=parse_cluster_log(branch.read("cluster.log") or b""),
            dead=dead_uuids(branch.read("trust.log") or b""),
            numcopies=numcopies,
            reported=set(),
        )

    def locations(self, key: Key) -> frozenset[str]:
        """git-annex's loggedLocations: the location log plus every cluster one of whose
        live nodes has the key (cluster UUIDs are never written to the log itself)."""
        logged = set(present_uuids(self.branch.read(location_log_path(key)) or b""))
        for cluster, nodes in self.clusters.items():
            if any(u in logged and u not in self.dead for u in nodes):
                logged.add(cluster)
        return frozenset(logged)

    def wants(self, uuid: str, key: Key, af: str | None) -> bool:
        """Does repository `uuid` want `key` (stored as file `af`)? No expression: yes."""
        ctx = self.policy.context(
            uuid, key, file=af, present_uuids=self.locations(key), numcopies=self.numcopies
        )
        try:
            return self.policy.wants(ctx, default=True)
        except PreferredContentError as exc:
            if uuid not in self.reported:
                self.reported.add(uuid)
                warn(f"git-annex-shell: cannot evaluate preferred content of {uuid}: {exc}")
            return False
