"""A cluster deployment built by an admin with the real git-annex, for comparisons.

`deploy()` lays out, under its own fake-ssh root, a bare gateway and three bare node
repositories whose UUIDs are fixed (`git config annex.uuid` before `git annex init`), so that
two deployments (one served by git-annex's own git-annex-shell, one by ours) have the same
node UUIDs and therefore the same `balanced=` choices. The cluster is made as cluster.txt
documents it (`initcluster`, `remote.NODE.annex-cluster-node`, `updatecluster`); groups,
preferred content and maxsizes are set in the gateway with git-annex's own commands
(`git annex group / wanted / maxsize`), and a client clones the gateway afterwards.

What a deployment can tell afterwards: the keys each node holds, read from the node's own
object store and from the node's `git annex findkeys`, and the locations the gateway's
git-annex branch (journal included) records for each key, read with `git annex whereis`.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from conftest import SshEnv, make_ssh_env

NODES = ("node1", "node2", "node3")
# Fixed, valid version-4 UUIDs, deliberately not in the nodes' name order once sorted
# (git-annex's balanced picker indexes the *sorted* set of UUIDs).
NODE_UUIDS = {
    "node1": "6f1c2a58-3b1e-4c0d-9a7e-1d2b3c4d5e01",
    "node2": "2a9e7d10-8c4b-4f3a-b1d2-6e5f4a3b2c02",
    "node3": "c3d4e5f6-1a2b-4c3d-8e9f-0a1b2c3d4e03",
}
GATEWAY_UUID = "9b8a7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c00"
CLIENT_UUID = "0c11e0c1-1e0c-4c1e-8c1e-0c11e0c1e0c1"
CLUSTER = "mycluster"
GROUP = "grp"


def git_annex_multicall(annex_bin: Path) -> Path:
    """The real git-annex multicall binary behind `annex_bin/git-annex` (the wheel's
    console script wraps it; the binary sits in the `git_annex` package directory)."""
    import git_annex  # the git-annex wheel, a test dependency

    binary = Path(git_annex.__file__).resolve().parent / "git-annex"
    if not binary.is_file():
        raise FileNotFoundError(f"the git-annex wheel has no binary at {binary}")
    return binary


def real_shell(root: Path, annex_bin: Path) -> Path:
    """A `git-annex-shell` symlink to the real multicall binary (it picks its personality
    from argv[0]'s name, and the fake ssh execs it as `git-annex-shell`)."""
    root.mkdir(parents=True, exist_ok=True)
    link = root / "git-annex-shell"
    if not link.is_symlink():
        link.symlink_to(git_annex_multicall(annex_bin))
    return link


def make_files(count: int, seed: int) -> dict[str, bytes]:
    """`count` files of deterministic pseudo-random content and mixed sizes: mostly 1 byte
    to 64 KiB (log-uniform), a tenth up to 400 KiB, and every 50th one of 1 MiB or more.
    Names carry a few extensions (SHA256E keys keep them)."""
    rng = random.Random(seed)
    exts = (".bin", ".dat", ".txt", "")
    files: dict[str, bytes] = {}
    for i in range(count):
        if i % 50 == 49:
            size = rng.randint(1 << 20, (3 << 20) // 2)
        elif i % 10 == 9:
            size = rng.randint(64 << 10, 400 << 10)
        else:
            size = max(1, int(2 ** rng.uniform(0, 16)))
        files[f"f{i:03d}{exts[i % len(exts)]}"] = rng.randbytes(size)
    return files


@dataclass
class Deployment:
    """One gateway, its nodes and a client, under one fake-ssh root."""

    label: str
    env: SshEnv
    gateway: Path
    nodes: dict[str, Path]
    client: Path
    cluster_uuid: str = ""
    keys: dict[str, str] = field(default_factory=dict)  # file name -> key

    # -- running things ------------------------------------------------------------------------

    def _run(
        self,
        args: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        *,
        check: bool = True,
        input: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(args),
            cwd=cwd,
            env=dict(env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"[{self.label}] ({cwd}) {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout[-4000:]}--- stderr\n{proc.stderr[-4000:]}"
            )
        return proc

    def admin(
        self, repo: Path, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A server admin's command (real git/git-annex, the server's HOME)."""
        env = {**self.env, "HOME": str(self.env.server_home)}
        return self._run(args, repo, env, check=check, input=input)

    def at_client(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self._run(args, self.client, self.env, check=check, timeout=timeout)

    # -- what is where -------------------------------------------------------------------------

    def node_objects(self) -> dict[str, dict[str, Path]]:
        """{node: {key: object file}} from each node's object store (annex/objects of a
        bare repository: hashdirlower/KEY/KEY)."""
        found: dict[str, dict[str, Path]] = {}
        for name, repo in self.nodes.items():
            objects = repo / "annex" / "objects"
            found[name] = {
                obj.name: obj
                for obj in (objects.rglob("*") if objects.is_dir() else ())
                if obj.is_file() and obj.parent.name == obj.name
            }
        return found

    def node_findkeys(self) -> dict[str, set[str]]:
        """{node: keys} as each node's own git-annex lists them (`findkeys`: present here)."""
        return {
            name: set(self.admin(repo, "git", "annex", "findkeys").stdout.split())
            for name, repo in self.nodes.items()
        }

    def gateway_locations(self, keys: Sequence[str]) -> dict[str, set[str]]:
        """{key: node names} the gateway's git-annex branch (and journal) logs as present,
        read with the real `git annex whereis`; the cluster UUID is git-annex's virtual
        addition on reading and is left out."""
        by_uuid = {u: n for n, u in NODE_UUIDS.items()}
        proc = self.admin(
            self.gateway, "git", "annex", "whereis", "--json", "--batch-keys",
            check=False, input="".join(k + "\n" for k in keys),
        )  # fmt: skip
        found: dict[str, set[str]] = {}
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            uuids = {e["uuid"] for e in record["whereis"] + record["untrusted"]}
            found[record["key"]] = {by_uuid.get(u, u) for u in uuids if u != self.cluster_uuid}
        assert set(found) == set(keys), f"whereis in the gateway: {proc.stderr[-2000:]}"
        return found

    def cluster_uuid_in_logs(self) -> list[str]:
        """Per-key location log lines of the gateway's branch naming the cluster UUID."""
        grep = self.admin(
            self.gateway, "git", "grep", "-F", self.cluster_uuid, "git-annex", "--", check=False
        )
        hits = [ln for ln in grep.stdout.splitlines() if ".log:" in ln and "/" in ln]
        journal = self.gateway / "annex" / "journal"
        for entry in journal.iterdir() if journal.is_dir() else ():
            if entry.name.endswith(".log") and "_" in entry.name:
                text = entry.read_text(errors="replace")
                hits += [ln for ln in text.splitlines() if self.cluster_uuid in ln]
        return hits


def deploy(
    root: Path,
    annex_bin: Path,
    shell: Path,
    label: str,
    *,
    wanted: str,
    maxsize: Mapping[str, str] | None = None,
    files: Mapping[str, bytes],
) -> Deployment:
    """Gateway `gw.git` + `node1..3.git` (fixed UUIDs) in cluster `mycluster`, nodes in group
    `grp` wanting `wanted`, optional maxsizes; served through the fake ssh by `shell`; a
    client clone holding `files` (added and committed, not yet sent anywhere)."""
    env = make_ssh_env(root, annex_bin, shell)
    dep = Deployment(label, env, env.srv / "gw.git", {n: env.srv / f"{n}.git" for n in NODES},
                     env.root / "client")  # fmt: skip

    def bare(path: Path, uuid: str, description: str) -> None:
        dep.admin(env.srv, "git", "init", "--quiet", "--bare", str(path))
        dep.admin(path, "git", "config", "annex.uuid", uuid)
        dep.admin(path, "git", "annex", "init", "--quiet", description)
        got = dep.admin(path, "git", "config", "annex.uuid").stdout.strip()
        assert got == uuid, f"{path}: git annex init replaced the fixed UUID {uuid} by {got}"

    bare(dep.gateway, GATEWAY_UUID, "gw")
    for name, path in dep.nodes.items():
        bare(path, NODE_UUIDS[name], name)
        dep.admin(dep.gateway, "git", "remote", "add", name, str(path))
    dep.admin(dep.gateway, "git", "annex", "sync", "--quiet", "--no-content", *NODES)
    dep.admin(dep.gateway, "git", "annex", "initcluster", CLUSTER)
    for name in NODES:
        dep.admin(dep.gateway, "git", "config", f"remote.{name}.annex-cluster-node", CLUSTER)
    out = dep.admin(dep.gateway, "git", "annex", "updatecluster").stdout
    assert all(f"Added node {n} to cluster" in out for n in NODES), out
    dep.cluster_uuid = dep.admin(
        dep.gateway, "git", "config", f"annex.cluster.{CLUSTER}"
    ).stdout.strip()
    for name in NODES:
        dep.admin(dep.gateway, "git", "annex", "group", name, GROUP)
        dep.admin(dep.gateway, "git", "annex", "wanted", name, wanted)
    for name, size in (maxsize or {}).items():
        dep.admin(dep.gateway, "git", "annex", "maxsize", name, size)

    env.run(["git", "clone", "--quiet", f"localhost:{dep.gateway}", str(dep.client)])
    dep.at_client("git", "config", "annex.uuid", CLIENT_UUID)
    dep.at_client("git", "annex", "init", "--quiet", "client")
    for name, data in files.items():
        (dep.client / name).write_bytes(data)
    dep.at_client("git", "annex", "add", "--quiet", ".")
    dep.at_client("git", "commit", "--quiet", "-m", "files")
    found = dep.at_client("git", "annex", "find", "--format=${file}\t${key}\n").stdout
    dep.keys = dict(line.split("\t") for line in found.splitlines())
    assert set(dep.keys) == set(files), "git annex add missed files"
    return dep
