"""Where would a cluster gateway put these keys? A placement simulator for admins.

Reads a gateway repository's git-annex branch (groups, preferred content, maxsize.log,
location logs, numcopies) and a list of keys, and decides each key's nodes exactly as the
gateway does: ``shell.placement.Placement.targets`` is the one decision both use. Each
decision counts the ones before it (the simulated stores change sizes and locations in
memory only; nothing is written to the repository except the size cache).

    python bench/placement.py GATEWAY_REPO SIZES_FILE [--cluster UUID] [--quiet]

SIZES_FILE has one size in bytes per line (a made-up SHA256E key of that size each) or a
key per line (``SHA256E-s1234--...``); blank lines and ``#`` comments are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from git_remote_annexproxy.annexlog import parse_uuid_log
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.gitconfig import read_repo_config
from git_remote_annexproxy.keys import BadKey, Key
from shell.placement import Placement
from shell.proxyselect import configured_remotes


def read_keys(path: Path) -> list[Key]:
    keys = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.isdigit():
            digest = hashlib.sha256(f"{path}:{n}".encode()).hexdigest()
            keys.append(Key.parse(f"SHA256E-s{int(line)}--{digest}"))
            continue
        try:
            keys.append(Key.parse(line))
        except BadKey:
            raise SystemExit(f"{path}:{n}: neither a size nor a key: {line!r}") from None
    return keys


def gitdir_of(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").is_dir() else repo


def pick_cluster(placement: Placement, wanted: str | None) -> tuple[str, list[str]]:
    if wanted is not None:
        if wanted not in placement.clusters:
            raise SystemExit(f"no cluster {wanted} in cluster.log")
        return wanted, sorted(placement.clusters[wanted])
    if len(placement.clusters) != 1:
        raise SystemExit(f"{len(placement.clusters)} clusters in cluster.log: use --cluster")
    uuid, nodes = next(iter(placement.clusters.items()))
    return uuid, sorted(nodes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", type=Path, help="the cluster gateway repository")
    ap.add_argument("sizes", type=Path, help="one size or key per line")
    ap.add_argument("--cluster", help="cluster UUID (when the branch has several)")
    ap.add_argument("--quiet", action="store_true", help="only the per-node summary")
    args = ap.parse_args(argv)

    gitdir = gitdir_of(args.repo)
    branch = AnnexBranch(gitdir, gitdir / "annex")
    placement = Placement.load(branch)
    cluster, nodes = pick_cluster(placement, args.cluster)
    names = parse_uuid_log(branch.read("uuid.log") or b"")
    # The gateway asks its nodes in the order of its remote names (Placement.targets).
    remotes = {r.uuid: r.name for r in configured_remotes(read_repo_config(gitdir))}

    def remote_name(u: str) -> str:
        return remotes.get(u, u)

    tracker = placement.tracker
    assert tracker is not None
    files = dict.fromkeys(nodes, 0)
    added = dict.fromkeys(nodes, 0)
    for key in read_keys(args.sizes):
        targets = placement.targets(nodes, lambda u: u, key, None, name_of=remote_name)
        placement.pretend_stored(key, targets)
        for u in targets:
            files[u] += 1
            added[u] += key.size or 0
        if not args.quiet:
            print(key, " ".join(names.get(u) or u for u in targets))
    after = tracker.current()
    print(f"cluster {cluster}")
    print(f"{'node':<24} {'files':>7} {'added':>14} {'bytes':>14} {'maxsize':>14}")
    for u in nodes:
        maxsize = after.maxsizes.get(u)
        print(
            f"{(names.get(u) or u)[:24]:<24} {files[u]:>7} {added[u]:>14} "
            f"{after.sizes.get(u, 0):>14} {maxsize if maxsize is not None else '-':>14}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
