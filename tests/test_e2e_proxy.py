"""Proxies and clusters end to end: the real git-annex client, through the fake ssh, to our
git-annex-shell in front of node repositories.

Servers are laid out by an admin with the real git-annex exactly as the conformance
harness and cluster.txt do (`updateproxy`, `initcluster`, `updatecluster`,
`extendcluster`); then a client clones and works through `origin-node1`,
`origin-mycluster`, `origin-gw2-node3`. Results are checked on disk (object bytes, found
with the real `git annex contentlocation`) and in every location log involved (the real
`git annex whereis`), so a wrong answer on the wire cannot hide behind a zero exit status.

The helpers here (`Site`, `Cluster`, ...) are shared with tests/test_faults.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, SshEnvFactory

# A cluster UUID (git-annex's rule: `ac` first, version digit 8 at index 14).
CLUSTER_UUID_RE = re.compile(r"^ac[0-9a-f]{6}-[0-9a-f]{4}-8")


def real_git_annex_binary() -> Path:
    """The real git-annex multicall binary, from the git-annex wheel (derived, not
    hard-coded: wherever the test environment installed it)."""
    git_annex = pytest.importorskip("git_annex")
    binary = Path(git_annex.__file__).resolve().parent / "git-annex"
    if not binary.is_file():
        pytest.skip(f"the git-annex wheel has no binary at {binary}")
    return binary


def write_script(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@dataclass
class Cluster:
    gateway: Path
    nodes: dict[str, Path]
    uuid: str


class Site:
    """One fake host: server repositories set up by an admin, and clients.

    Admin commands run with the server's HOME and with the fake ssh first on PATH, like a
    server account that can `ssh localhost` (needed for `extendcluster`, where one gateway
    fetches another).
    """

    def __init__(self, env: SshEnv) -> None:
        self.env = env
        self.cli = env.root / "cli"
        self.cli.mkdir(exist_ok=True)

    # -- running things ------------------------------------------------------------------------

    def _run(
        self,
        args: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        *,
        check: bool,
        timeout: float,
        input: str | None = None,
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
                f"({cwd}) {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
            )
        return proc

    def admin(
        self,
        repo: Path,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "HOME": str(self.env.server_home)}
        return self._run(args, repo, env, check=check, timeout=timeout, input=input)

    def client(
        self,
        repo: Path,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self._run(args, repo, self.env, check=check, timeout=timeout, input=input)

    def popen_client(self, repo: Path, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(args),
            cwd=repo,
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # -- server layouts ------------------------------------------------------------------------

    def bare(self, name: str) -> Path:
        return self.env.make_server_repo(f"{name}.git", name)

    def uuid(self, repo: Path) -> str:
        return self.admin(repo, "git", "config", "annex.uuid").stdout.strip()

    def add_nodes(self, repo: Path, names: Sequence[str]) -> dict[str, Path]:
        """Bare node repositories as local-path remotes of `repo`, UUIDs learnt by sync."""
        nodes = {n: self.bare(n) for n in names}
        for name, path in nodes.items():
            self.admin(repo, "git", "remote", "add", name, str(path))
        self.admin(repo, "git", "annex", "sync", "--quiet", "--no-content", *names)
        return nodes

    def proxy(self, name: str = "proxy", nodes: Sequence[str] = ("node1", "node2")) -> Cluster:
        """A plain proxy (remote.NODE.annex-proxy=true + updateproxy); `uuid` is the
        proxy's own."""
        px = self.bare(name)
        paths = self.add_nodes(px, nodes)
        for n in nodes:
            self.admin(px, "git", "config", f"remote.{n}.annex-proxy", "true")
        out = self.admin(px, "git", "annex", "updateproxy").stdout
        assert all(f"Started proxying for {n}" in out for n in nodes), out
        return Cluster(px, paths, self.uuid(px))

    def cluster(
        self,
        gateway: str = "gw",
        nodes: Sequence[str] = ("node1", "node2"),
        wanted: Mapping[str, str] | None = None,
    ) -> Cluster:
        """initcluster + annex-cluster-node + updatecluster, as cluster.txt steps 1-2."""
        gw = self.bare(gateway)
        paths = self.add_nodes(gw, nodes)
        self.admin(gw, "git", "annex", "initcluster", "mycluster")
        for n in nodes:
            self.admin(gw, "git", "config", f"remote.{n}.annex-cluster-node", "mycluster")
        out = self.admin(gw, "git", "annex", "updatecluster").stdout
        assert all(f"Added node {n} to cluster" in out for n in nodes), out
        for node, expr in (wanted or {}).items():
            self.admin(gw, "git", "annex", "wanted", node, expr)
        cu = self.admin(gw, "git", "config", "annex.cluster.mycluster").stdout.strip()
        assert CLUSTER_UUID_RE.match(cu), cu
        return Cluster(gw, paths, cu)

    def extend_cluster(self, gw1: Cluster, gateway: str = "gw2", node: str = "node3") -> Cluster:
        """A second gateway with one more node, extending gw1's cluster both ways
        (cluster.txt steps 3-8)."""
        gw2 = self.bare(gateway)
        self.admin(gw2, "git", "remote", "add", "gw1", f"localhost:{gw1.gateway}")
        self.admin(gw2, "git", "fetch", "--quiet", "gw1")
        paths = self.add_nodes(gw2, [node])
        self.admin(gw2, "git", "annex", "extendcluster", "gw1", "mycluster")
        self.admin(gw2, "git", "config", f"remote.{node}.annex-cluster-node", "mycluster")
        out = self.admin(gw2, "git", "annex", "updatecluster").stdout
        assert f"Added node {node} to cluster" in out, out
        self.admin(gw1.gateway, "git", "remote", "add", gateway, f"localhost:{gw2}")
        self.admin(gw1.gateway, "git", "annex", "sync", "--quiet", "--no-content", gateway)
        self.admin(gw1.gateway, "git", "annex", "extendcluster", gateway, "mycluster")
        self.admin(gw1.gateway, "git", "annex", "updatecluster")
        return Cluster(gw2, paths, gw1.uuid)

    # -- clients -------------------------------------------------------------------------------

    def clone(self, server: Path, name: str = "client") -> Path:
        path = self.cli / name
        self.client(self.cli, "git", "clone", "--quiet", f"localhost:{server}", str(path))
        self.client(path, "git", "annex", "init", "--quiet", name)
        return path

    def add_files(self, client: Path, files: Mapping[str, bytes]) -> dict[str, str]:
        """Add and commit files in a client; returns {file name: key}."""
        for name, data in files.items():
            (client / name).write_bytes(data)
        self.client(client, "git", "annex", "add", "--quiet", *files)
        self.client(client, "git", "commit", "--quiet", "-m", "add " + " ".join(files))
        found = self.client(
            client, "git", "annex", "find", "--format=${file}\t${key}\n", *files
        ).stdout
        keys = dict(line.split("\t") for line in found.splitlines())
        assert set(keys) == set(files), found
        return keys

    # -- what is where -------------------------------------------------------------------------

    def where(self, repo: Path, keys: Sequence[str], *, server: bool = True) -> dict[str, set[str]]:
        """{key: UUIDs the repository's location log says have it}, read with git-annex's
        own rules (e.g. the virtual cluster UUID); one whereis for all the keys."""
        run = self.admin if server else self.client
        proc = run(
            repo, "git", "annex", "whereis", "--json", "--batch-keys",
            check=False, input="".join(k + "\n" for k in keys),
        )  # fmt: skip
        found = {}
        for line in proc.stdout.splitlines():
            record = json.loads(line)
            found[record["key"]] = {e["uuid"] for e in record["whereis"] + record["untrusted"]}
        assert set(found) == set(keys), f"whereis in {repo}: {proc.stdout}{proc.stderr}"
        return found

    def whereis(self, repo: Path, key: str, *, server: bool = True) -> set[str]:
        return self.where(repo, [key], server=server)[key]

    def objects(self, repo: Path, keys: Sequence[str]) -> dict[str, bytes | None]:
        """{key: its object's content in a server repository, or None if absent}."""
        proc = self.admin(
            repo, "git", "annex", "contentlocation", "--batch",
            input="".join(k + "\n" for k in keys),
        )  # fmt: skip
        paths = proc.stdout.split("\n")[: len(keys)]
        assert len(paths) == len(keys), proc.stdout
        return {k: (repo / p).read_bytes() if p else None for k, p in zip(keys, paths, strict=True)}

    def location_log_lines(self, repo: Path, uuid: str) -> list[str]:
        """Per-key location log lines (branch and journal) that mention `uuid`."""
        hits = []
        grep = self.admin(repo, "git", "grep", "-F", uuid, "git-annex", "--", check=False)
        for line in grep.stdout.splitlines():
            if re.match(r"git-annex:[0-9a-f]{3}/[0-9a-f]{3}/[^:]*\.log:", line):
                hits.append(line)
        journal = repo / "annex" / "journal"
        if journal.is_dir():
            for entry in journal.iterdir():
                if re.match(r"[0-9a-f]{3}_[0-9a-f]{3}_.*\.log$", entry.name):
                    hits += [
                        ln for ln in entry.read_text(errors="replace").splitlines() if uuid in ln
                    ]
        return hits

    def fsck_clean(self, repo: Path) -> None:
        """Real fsck of what the repository's own log claims, and every object on disk
        logged as present."""
        proc = self.admin(repo, "git", "annex", "fsck", "--in", "here", "--quiet", check=False)
        assert proc.returncode == 0, f"fsck in {repo}: {proc.stdout}{proc.stderr}"
        assert not re.search(r"fixing location log|bad file", proc.stdout + proc.stderr)
        own = self.uuid(repo)
        objects = repo / "annex" / "objects"
        present = [
            obj.name
            for obj in (objects.rglob("*") if objects.is_dir() else ())
            if obj.is_file() and obj.parent.name == obj.name
        ]
        for key, uuids in self.where(repo, present).items():
            assert own in uuids, f"{key} is in {repo} but not logged there"


def holders(site: Site, repos: Mapping[str, Path], key: str, content: bytes) -> set[str]:
    """Names of the repositories holding `key` on disk; any object there must be whole
    and right."""
    return placement(site, repos, {key: content})[key]


def placement(
    site: Site, repos: Mapping[str, Path], contents: Mapping[str, bytes]
) -> dict[str, set[str]]:
    """{key: names of the repositories holding it on disk}; every object found must be
    whole and right."""
    found: dict[str, set[str]] = {key: set() for key in contents}
    for name, repo in repos.items():
        for key, data in site.objects(repo, list(contents)).items():
            if data is not None:
                assert data == contents[key], f"{name} holds a corrupt {key}"
                found[key].add(name)
    return found


@pytest.fixture
def site(ssh_env: SshEnvFactory) -> Site:
    return Site(ssh_env())


@pytest.fixture
def shell_site(ssh_env: SshEnvFactory) -> Site:
    """sshd with /bin/sh as the login shell: `remote.NAME.annex-shell` then names the
    program run on the server, which is how tests put wrappers (a relay, a sleeper, the
    real git-annex-shell) on one hop only."""
    return Site(ssh_env(mode="shell"))


def uuids_of(site: Site, repos: Mapping[str, Path]) -> dict[str, str]:
    return {name: site.uuid(path) for name, path in repos.items()}


# --- a proxy: copy, get, drop through origin-node1 ---------------------------------------------


def test_proxy_copy_get_drop_through_a_node(site: Site) -> None:
    px = site.proxy()
    u = uuids_of(site, px.nodes)
    client = site.clone(px.gateway)
    me = site.uuid(client)
    files = {"a file.txt": b"hello\n", "odd 50%.txt": b"percent\n", "big.bin": os.urandom(3 << 20)}
    keys = site.add_files(client, files)
    everywhere = {**px.nodes, "proxy": px.gateway}

    site.client(client, "git", "annex", "copy", "--to", "origin-node1", *files)
    for name, key in keys.items():
        assert holders(site, everywhere, key, files[name]) == {"node1"}
        assert site.whereis(client, key, server=False) == {u["node1"], me}
        assert site.whereis(px.gateway, key) == {u["node1"]}
        assert site.whereis(px.nodes["node1"], key) == {u["node1"]}

    # Drop the local copies: the proof is LOCKCONTENT relayed to node1.
    site.client(client, "git", "annex", "drop", *files)
    site.client(client, "git", "annex", "get", "--from", "origin-node1", "big.bin", "a file.txt")
    assert (client / "big.bin").read_bytes() == files["big.bin"]
    assert (client / "a file.txt").read_bytes() == files["a file.txt"]

    # Drop from the node: gone from its disk and from every log.
    site.client(client, "git", "annex", "drop", "--from", "origin-node1", "big.bin", "a file.txt")
    for name in ("big.bin", "a file.txt"):
        key = keys[name]
        assert holders(site, everywhere, key, files[name]) == set()
        assert site.whereis(client, key, server=False) == {me}
        assert site.whereis(px.gateway, key) == set()
        assert site.whereis(px.nodes["node1"], key) == set()
    # "odd 50%.txt" was dropped locally and stays only on node1.
    assert site.whereis(client, keys["odd 50%.txt"], server=False) == {u["node1"]}
    for repo in (*px.nodes.values(), px.gateway):
        site.fsck_clean(repo)


# --- a cluster: fan-out by preferred content, get, drop ---------------------------------------


def test_cluster_fanout_get_drop(site: Site) -> None:
    cl = site.cluster(wanted={"node1": "include=*.txt", "node2": "include=*.dat"})
    u = uuids_of(site, cl.nodes)
    client = site.clone(cl.gateway)
    me = site.uuid(client)
    files = {
        "x.txt": b"wanted by node1\n",
        "y.dat": os.urandom(300_000),
        "z.bin": os.urandom(2 << 20),
    }
    keys = site.add_files(client, files)
    everywhere = {**cl.nodes, "gw": cl.gateway}

    site.client(client, "git", "annex", "copy", "--to", "origin-mycluster", *files)
    # node1 wants *.txt, node2 *.dat, nobody z.bin: it goes to every node.
    expected = {"x.txt": {"node1"}, "y.dat": {"node2"}, "z.bin": {"node1", "node2"}}
    for name, key in keys.items():
        assert holders(site, everywhere, key, files[name]) == expected[name], name
        nodes = {u[n] for n in expected[name]}
        # The client logs the nodes the gateway named; reading adds the cluster UUID.
        assert site.whereis(client, key, server=False) == nodes | {cl.uuid, me}
        assert site.whereis(cl.gateway, key) == nodes | {cl.uuid}
        for n in expected[name]:
            assert site.whereis(cl.nodes[n], key) == {u[n]}
    for repo in (cl.gateway, *cl.nodes.values()):
        assert site.location_log_lines(repo, cl.uuid) == [], "cluster UUID written to a log"

    # Drop locally (proof: node locks through the gateway), get back from the cluster.
    site.client(client, "git", "annex", "drop", "x.txt", "z.bin")
    assert not (client / "z.bin").exists()
    site.client(client, "git", "annex", "get", "--from", "origin-mycluster", "x.txt", "z.bin")
    assert (client / "z.bin").read_bytes() == files["z.bin"]
    assert (client / "x.txt").read_bytes() == files["x.txt"]

    # Drop from the cluster: every node drops it, every log follows.
    site.client(client, "git", "annex", "drop", "--from", "origin-mycluster", "z.bin", "y.dat")
    for name in ("z.bin", "y.dat"):
        key = keys[name]
        assert holders(site, everywhere, key, files[name]) == set()
        assert site.whereis(client, key, server=False) == {me}
        assert site.whereis(cl.gateway, key) == set()
    # Through a single node of the cluster: the gateway proxies it too.
    site.client(client, "git", "annex", "copy", "--to", "origin-node2", "x.txt")
    assert holders(site, everywhere, keys["x.txt"], files["x.txt"]) == {"node1", "node2"}
    assert site.whereis(cl.gateway, keys["x.txt"]) == {u["node1"], u["node2"], cl.uuid}

    # The only other copy is the gateway's own annex, so the drop from the cluster is
    # proven by a lock held elsewhere: GETTIMESTAMP fans out to the nodes and each gets
    # REMOVE-BEFORE in its own clock (cluster.txt step 19).
    gw_uuid = site.uuid(cl.gateway)
    site.client(client, "git", "annex", "move", "--to", "origin", "x.txt")
    site.client(client, "git", "annex", "drop", "--from", "origin-mycluster", "x.txt")
    assert holders(site, everywhere, keys["x.txt"], files["x.txt"]) == {"gw"}
    assert site.whereis(client, keys["x.txt"], server=False) == {gw_uuid}
    assert site.whereis(cl.gateway, keys["x.txt"]) == {gw_uuid}
    for repo in (cl.gateway, *cl.nodes.values()):
        site.fsck_clean(repo)
        assert site.location_log_lines(repo, cl.uuid) == []


# --- two gateways, one of them git-annex's own ------------------------------------------------


def real_shell_wrapper(site: Site) -> Path:
    """A program that runs the real git-annex-shell with the real binary first on PATH,
    so that the real gateway's own hops to its local nodes are real git-annex too."""
    realbin = site.env.root / "realbin"
    realbin.mkdir(exist_ok=True)
    link = realbin / "git-annex-shell"
    if not link.is_symlink():
        # The multicall binary picks its personality from argv[0]'s name.
        link.symlink_to(real_git_annex_binary())
    # Each call is noted, so the test can tell the real shell did serve the hop.
    return write_script(
        realbin / "real-annex-shell",
        f'#!/bin/sh\necho "$*" >> "{realbin}/calls"\nPATH="{realbin}:$PATH"\nexport PATH\n'
        f'exec "{link}" "$@"\n',
    )


@pytest.mark.parametrize("first", ["ours", "real"])
def test_two_gateways_with_the_real_git_annex_shell(shell_site: Site, first: str) -> None:
    """gw1 and gw2 extend one cluster; one of them is git-annex's own git-annex-shell.
    Content fans out through both, comes back from node3 through both, and drops
    everywhere; the chain is cycle-free (BYPASS) in both directions."""
    site = shell_site
    gw1 = site.cluster("gw1", ("node1", "node2"))
    gw2 = site.extend_cluster(gw1)
    nodes = {**gw1.nodes, **gw2.nodes}
    u = uuids_of(site, nodes)
    wrapper = real_shell_wrapper(site)
    client = site.clone(gw1.gateway)
    me = site.uuid(client)
    if first == "ours":
        # gw1 (ours) reaches gw2 through ssh with the real shell on the far side.
        site.admin(gw1.gateway, "git", "config", "remote.gw2.annex-shell", str(wrapper))
    else:
        # The client reaches gw1 with the real shell; gw1 reaches gw2 (ours) from PATH.
        site.client(client, "git", "config", "remote.origin.annex-shell", str(wrapper))
    files = {"f.bin": os.urandom(1 << 20), "g.txt": b"ggg\n"}
    keys = site.add_files(client, files)
    all_nodes = {u[n] for n in nodes}

    site.client(client, "git", "annex", "copy", "--to", "origin-mycluster", *files)
    real_gateway = gw2.gateway if first == "ours" else gw1.gateway
    calls = (wrapper.parent / "calls").read_text()
    assert f"p2pstdio {real_gateway} " in calls and f"--uuid {gw1.uuid}" in calls, calls
    for name, key in keys.items():
        assert holders(site, nodes, key, files[name]) == {"node1", "node2", "node3"}
        assert site.whereis(client, key, server=False) == all_nodes | {gw1.uuid, me}
        assert site.whereis(gw1.gateway, key) == all_nodes | {gw1.uuid}
        assert u["node3"] in site.whereis(gw2.gateway, key)
    for repo in (gw1.gateway, gw2.gateway, *nodes.values()):
        assert site.location_log_lines(repo, gw1.uuid) == []

    if first == "ours":
        # cluster.txt step 12: a stale client log and --fast make the client PUT to the
        # cluster; gw2 (real) answers ALREADY-HAVE-PLUS node3. git-annex's own gw1 sends
        # `ERROR protocol error` here; ours must merge it into ALREADY-HAVE-PLUS.
        key = keys["g.txt"]
        for uuid in (*all_nodes, gw1.uuid):
            site.client(client, "git", "annex", "setpresentkey", key, uuid, "0")
        proc = site.client(
            client, "git", "annex", "copy", "--fast", "--to", "origin-mycluster", "g.txt"
        )
        assert "protocol error" not in proc.stdout + proc.stderr
        assert site.whereis(client, key, server=False) == all_nodes | {gw1.uuid, me}

    # Drop everywhere through the cluster: REMOVE crosses both gateways.
    site.client(client, "git", "annex", "drop", "--from", "origin-mycluster", "f.bin")
    assert holders(site, nodes, keys["f.bin"], files["f.bin"]) == set()
    assert site.whereis(client, keys["f.bin"], server=False) == {me}
    assert site.whereis(gw1.gateway, keys["f.bin"]) == set()

    # A file only on node3, fetched through both gateways.
    site.client(client, "git", "annex", "drop", "--from", "origin-node1", "g.txt")
    site.client(client, "git", "annex", "drop", "--from", "origin-node2", "g.txt")
    site.client(client, "git", "annex", "drop", "g.txt")  # proof: node3's lock via gw1, gw2
    site.client(client, "git", "annex", "get", "--from", "origin-mycluster", "g.txt")
    assert (client / "g.txt").read_bytes() == files["g.txt"]
    for repo in (gw1.gateway, gw2.gateway, *nodes.values()):
        site.fsck_clean(repo)
