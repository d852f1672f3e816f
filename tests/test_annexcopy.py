"""`git annexproxy copy --to` and `git push` with content, end to end, without git-annex.

The server side is real: an admin sets up, with the real git-annex, a gateway `proxy.git`
with two nodes forming the cluster `mycluster` (as tests/test_annexcmd.py does), served by
our git-annex-shell through the fake ssh. A seed clone with git-annex annexes the files
(locked and unlocked) and pushes the commits but no content. The client under test is a
plain `git clone annexproxy::ssh://...` on a PATH without git-annex; the seed's object
store is copied into it (a setup step: the content is "here" but never was on a server).

Every upload is checked where it landed (the node's object store, read with the real
`git annex contentlocation`), in the server's location log and the client's (journal), and
finally by the real git-annex in another clone, which must get the files from there.
The same client also runs against git-annex's own git-annex-shell (plain and gateway).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, SshEnvFactory, make_ssh_env
from test_e2e_proxy import Site, placement, write_script

from git_remote_annexproxy import annexlog
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.pushcontent import PushWatch, RefUpdate

TESTS = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent

BIG = 3 << 20
LOCKED: dict[str, bytes] = {
    "plain.txt": b"a plain locked file\n",
    "sub dir/spaced name 50%.txt": b"spaces and a percent sign\n",
    "big.bin": os.urandom(BIG),
    "empty": b"",
    "dup-a.txt": b"the same content twice\n",
    "dup-b.txt": b"the same content twice\n",
}
UNLOCKED = {"unlocked.dat": os.urandom(70_000)}
FILES = {**LOCKED, **UNLOCKED}
LATER = {"later.txt": b"committed after the clone\n", "later.bin": os.urandom(200_000)}


@dataclass
class World:
    site: Site
    cl: Path  # the gateway/proxy repository
    nodes: dict[str, Path]
    uuids: dict[str, str]  # seed, proxy, node1, node2, mycluster
    keys: dict[str, str]  # file -> key, FILES and LATER
    client: Path
    env: dict[str, str]  # the client's: no git-annex on PATH

    def where_client(self, name: str) -> set[str]:
        """UUIDs the client's location log (its journal, over the fetched branches, as
        `get`/`info` read it) says have `name`'s key, the seed left out."""
        path = annexlog.location_log_path(Key.parse(self.keys[name]))
        journal = self.client / ".git/annex/journal" / annexlog.journal_name(path)
        data = journal.read_bytes() if journal.exists() else b""
        return annexlog.present_uuids(data) - {self.uuids["seed"]}


def client_env(env: SshEnv) -> dict[str, str]:
    """`env` with only git, the fake ssh and our two programs on PATH."""
    only = env.root / "annexproxy-only-bin"
    only.mkdir(exist_ok=True)
    for name in ("git-annexproxy", "git-remote-annexproxy"):
        link = only / name
        if not link.exists():
            link.symlink_to(VENV_BIN / name)
    out = dict(env)
    out["PATH"] = os.pathsep.join((str(env.bin_dir), str(only), "/usr/bin", "/bin"))
    assert shutil.which("git-annex", path=out["PATH"]) is None
    return out


def run(
    cwd: Path, env: Mapping[str, str], *args: str, check: bool | None = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; `check` True: must succeed, False: must fail, None: either."""
    proc = subprocess.run(
        list(args), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=300, check=False
    )
    if check is not None and (proc.returncode == 0) != check:
        raise AssertionError(
            f"({cwd}) {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
        )
    return proc


def make_world(site: Site, *, url_prefix: str = "annexproxy::ssh://localhost") -> World:
    cl = site.cluster(gateway="proxy", nodes=("node1", "node2"))
    # A directory special remote behind the proxy too.
    store = site.env.root / "dirsr-store"
    store.mkdir()
    site.admin(cl.gateway, "git", "annex", "initremote", "-q", "dirsr", "type=directory",
               f"directory={store}", "encryption=none")  # fmt: skip
    site.admin(cl.gateway, "git", "config", "remote.dirsr.annex-proxy", "true")
    site.admin(cl.gateway, "git", "annex", "updateproxy", "-q")
    seed = site.clone(cl.gateway, "seed")
    (seed / "sub dir").mkdir()
    keys = site.add_files(seed, LOCKED)
    keys |= site.add_files(seed, UNLOCKED)
    site.client(seed, "git", "annex", "unlock", "--quiet", *UNLOCKED)
    site.client(seed, "git", "commit", "--quiet", "-m", "unlocked")
    site.client(seed, "git", "annex", "sync", "--quiet", "--no-content", "origin")
    # One more commit the server does not have yet (for `git push` with content).
    keys |= site.add_files(seed, LATER)

    env = client_env(site.env)
    client = site.env.root / "client"
    run(site.env.root, env, "git", "clone", "--quiet", f"{url_prefix}{cl.gateway}", str(client))
    run(client, env, "git", "pull", "--quiet", "--ff-only", str(seed), "main")
    shutil.copytree(seed / ".git/annex/objects", client / ".git/annex/objects")
    uuids = {
        "dirsr": site.admin(cl.gateway, "git", "config", "remote.dirsr.annex-uuid").stdout.strip(),
        "seed": site.uuid(seed),
        "proxy": site.uuid(cl.gateway),
        "mycluster": cl.uuid,
        **{n: site.uuid(p) for n, p in cl.nodes.items()},
    }
    return World(site, cl.gateway, cl.nodes, uuids, keys, client, env)


@pytest.fixture
def world(ssh_env: SshEnvFactory) -> World:
    return make_world(Site(ssh_env()))


def contents(names: list[str]) -> dict[str, bytes]:
    return {n: {**FILES, **LATER}[n] for n in names}


def on_disk(w: World, names: list[str]) -> dict[str, set[str]]:
    """{file: the server repositories holding its content}."""
    repos = {"proxy": w.cl, **w.nodes}
    found = placement(w.site, repos, {w.keys[n]: d for n, d in contents(names).items()})
    return {n: found[w.keys[n]] for n in names}


def summary(stderr: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"copy: (\d+) files, (\d+) bytes, (\d+) failed", stderr.splitlines()[-1])
    assert m is not None, stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


# --- a cluster ---------------------------------------------------------------------------------


def test_copy_to_a_cluster_then_another_clone_gets_it(world: World) -> None:
    w, u = world, world.uuids
    proc = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-mycluster")
    names = list(FILES) + list(LATER)
    assert set(proc.stdout.splitlines()) == {f"copy {n} (to origin-mycluster) ok" for n in names}
    # dup-a and dup-b share a key: sent once.
    unique = {w.keys[n]: d for n, d in contents(names).items()}
    assert summary(proc.stderr) == (len(names), sum(map(len, unique.values())), 0)
    assert on_disk(w, names) == {n: {"node1", "node2"} for n in names}
    nodes = {u["node1"], u["node2"]}
    for n in names:
        # The client logs what SUCCESS-PLUS listed: the nodes, never the cluster.
        assert w.where_client(n) == nodes, n
        assert nodes <= w.site.whereis(w.cl, w.keys[n]), n

    # Again: the log says the cluster has everything, CHECKPRESENT agrees, nothing is sent.
    again = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-mycluster")
    assert (again.stdout, again.stderr) == ("", "copy: 0 files, 0 bytes, 0 failed\n")

    # With the client's log forgotten, PUT is answered ALREADY-HAVE-PLUS with the nodes:
    # nothing is sent, and the log learns them again.
    shutil.rmtree(w.client / ".git/annex/journal")
    again = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-mycluster", "big.bin")
    assert again.stdout == "copy big.bin (to origin-mycluster) ok\n"
    assert summary(again.stderr) == (1, 0, 0)
    assert w.where_client("big.bin") == nodes

    # Another clone, with the real git-annex, learns it from the server and gets it.
    other = w.site.clone(w.cl, "other")
    w.site.client(other, "git", "pull", "--quiet", "--ff-only", str(w.client), "main")
    w.site.client(other, "git", "annex", "get", "--quiet", "--from", "origin-mycluster", ".")
    for n, data in contents(names).items():
        assert (other / n).read_bytes() == data, n


# --- a node, the proxy itself, -J, --json, errors ------------------------------------------------


def test_copy_to_a_node_in_parallel_with_json(world: World) -> None:
    w, u = world, world.uuids
    sessions = ssh_sessions(w)
    proc = run(
        w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-node1", "-J", "4", "--json"
    )
    records = {r["file"]: r for r in map(json.loads, proc.stdout.splitlines())}
    names = list(FILES) + list(LATER)
    assert set(records) == set(names)
    assert records["big.bin"] == {
        "command": "copy",
        "file": "big.bin",
        "key": w.keys["big.bin"],
        "success": True,
        "to": "origin-node1",
        "uuid": u["node1"],
        "bytes": BIG,
        "error": None,
    }
    # The two files of one key: one upload, its bytes counted once.
    assert sorted(records[n]["bytes"] for n in ("dup-a.txt", "dup-b.txt")) == [0, 23]
    assert on_disk(w, names) == {n: {"node1"} for n in names}
    assert all(w.where_client(n) == {u["node1"]} for n in names)
    assert 2 <= ssh_sessions(w) - sessions <= 4  # pooled: at most one per job

    # The real git-annex, started later in the same clone, adopts what copy logged.
    annex_env = dict(w.site.env)
    run(w.client, annex_env, "git", "annex", "init", "--quiet", "later")
    where = run(w.client, annex_env, "git", "annex", "whereis", "--json", "big.bin").stdout
    assert u["node1"] in {r["uuid"] for r in json.loads(where)["whereis"]}


def test_copy_to_the_proxy_itself_from_a_subdirectory(world: World) -> None:
    w, u = world, world.uuids
    sub = w.client / "sub dir"
    proc = run(sub, w.env, "git", "annexproxy", "copy", "--to", "origin", ".", "../plain.txt")
    assert set(proc.stdout.splitlines()) == {
        "copy sub dir/spaced name 50%.txt (to origin) ok",
        "copy plain.txt (to origin) ok",
    }
    names = ["sub dir/spaced name 50%.txt", "plain.txt"]
    assert on_disk(w, names) == {n: {"proxy"} for n in names}
    assert all(w.where_client(n) == {u["proxy"]} for n in names)
    assert u["proxy"] in w.site.whereis(w.cl, w.keys["plain.txt"])

    bad = run(sub, w.env, "git", "annexproxy", "copy", "--to", "origin", "nosuch", check=False)
    assert bad.stderr.splitlines()[0] == "copy nosuch: did not match any file known to git"
    assert bad.returncode == 1


def test_unknown_target_and_a_read_only_server(world: World) -> None:
    w = world
    bad = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "nosuch", check=False)
    assert (bad.returncode, bad.stdout) == (1, "")
    assert bad.stderr == "fatal: no repository named nosuch (see git annexproxy info)\n"

    ro = client_env(w.site.env.with_server(GIT_ANNEX_SHELL_READONLY="1"))
    proc = run(
        w.client, ro, "git", "annexproxy", "copy", "--to", "origin-node1", "plain.txt",
        "big.bin", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    why = "origin-node1: this repository is read-only; write access denied"
    # One line per file, with the server's own words, then the summary.
    *lines, last = proc.stderr.splitlines()
    assert sorted(lines) == [f"copy big.bin: {why}", f"copy plain.txt: {why}"]
    assert last == "copy: 0 files, 0 bytes, 2 failed"
    assert on_disk(w, ["plain.txt", "big.bin"]) == {"plain.txt": set(), "big.bin": set()}


def test_copy_to_a_special_remote_behind_the_proxy(world: World) -> None:
    w, u = world, world.uuids
    names = ["big.bin", "unlocked.dat"]
    proc = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-dirsr", *names)
    assert set(proc.stdout.splitlines()) == {f"copy {n} (to origin-dirsr) ok" for n in names}
    stored = {p.name for p in (w.site.env.root / "dirsr-store").rglob("*") if p.is_file()}
    assert {w.keys[n] for n in names} <= stored
    assert all(w.where_client(n) == {u["dirsr"]} for n in names)
    # The real git-annex in another clone gets them from there, through the proxy.
    other = w.site.clone(w.cl, "other")
    w.site.client(other, "git", "annex", "get", "--quiet", "--from", "origin-dirsr", *names)
    assert all((other / n).read_bytes() == FILES[n] for n in names)


def ssh_sessions(w: World) -> int:
    log = w.site.env.log
    lines = log.read_text().splitlines() if log.exists() else []
    return sum("p2pstdio" in line for line in lines)


# --- resume --------------------------------------------------------------------------------------

CUT = 1 << 20  # client->server bytes per session before the relay drops it


def relay_env(w: World, name: str, cut: int) -> dict[str, str]:
    """The client's environment with the server's git-annex-shell behind tests/cutrelay.py,
    which drops each p2pstdio session after `cut` bytes from the client."""
    root = w.site.env.root
    relay_bin = root / "relay-bin"
    relay_bin.mkdir(exist_ok=True)
    write_script(
        relay_bin / "git-annex-shell",
        f'#!/bin/sh\nexec "{sys.executable}" "{TESTS / "cutrelay.py"}" '
        f'"{w.site.env.srvbin_dir}/git-annex-shell" "$@"\n',
    )
    (root / name).mkdir()
    out = dict(w.env)
    out["FAKESSH_SERVER_PATH"] = f"{relay_bin}{os.pathsep}{w.env['FAKESSH_SERVER_PATH']}"
    out["FAKESSH_PASSENV"] = "CUTRELAY_CUT_IN CUTRELAY_LOG"
    out["CUTRELAY_LOG"] = str(root / name / "log.jsonl")
    out["CUTRELAY_CUT_IN"] = str(cut)
    return out


def test_resume_after_a_cut_connection(world: World) -> None:
    w = world
    first = relay_env(w, "relay-first", CUT)
    proc = run(
        w.client, first, "git", "-c", "annex.forward-retry=0", "annexproxy", "copy",
        "--to", "origin-node1", "big.bin", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].startswith("copy big.bin: origin-node1: ")
    assert 0 < summary(proc.stderr)[1] <= CUT  # what we wrote before the cut
    assert on_disk(w, ["big.bin"]) == {"big.bin": set()}
    partial = w.nodes["node1"] / "annex/tmp" / w.keys["big.bin"]
    kept = partial.stat().st_size  # the node kept what reached it, through the proxy
    assert 0 < kept < CUT

    # git-annex's default forward-retry: each cut session is followed by one that resumes.
    second = relay_env(w, "relay-second", CUT)
    proc = run(w.client, second, "git", "annexproxy", "copy", "--to", "origin-node1", "big.bin")
    assert proc.stdout == "copy big.bin (to origin-node1) ok\n"
    resent = summary(proc.stderr)[1]
    assert on_disk(w, ["big.bin"]) == {"big.bin": {"node1"}}
    assert w.where_client("big.bin") == {w.uuids["node1"]}
    # Only the rest crossed the wire (plus what each cut session wrote into the void).
    assert BIG - kept <= resent < BIG - kept + CUT
    assert not partial.exists()


# --- git push with content -----------------------------------------------------------------------


def test_push_sends_the_content_of_the_pushed_commits(world: World) -> None:
    w = world
    # Off by default: a push sends no content.
    proc = run(w.client, w.env, "git", "push", "--quiet", "origin", "main:refs/heads/plain")
    assert "annexproxy" not in proc.stderr
    assert on_disk(w, list(LATER)) == {n: set() for n in LATER}

    # On: the keys new in the pushed tip go to the proxy's own repository.
    run(w.client, w.env, "git", "config", "remote.origin.annexproxy-push-content", "true")
    proc = run(w.client, w.env, "git", "push", "origin", "main")
    later_bytes = sum(map(len, LATER.values()))
    assert f"annexproxy: sent the content of 2 files ({later_bytes} bytes) to origin\n" in (
        proc.stderr
    )
    assert on_disk(w, list(LATER)) == {n: {"proxy"} for n in LATER}
    assert on_disk(w, ["plain.txt"]) == {"plain.txt": set()}  # not new in this push

    # Nothing new: nothing sent, nothing said.
    proc = run(w.client, w.env, "git", "push", "origin", "main")
    assert "annexproxy" not in proc.stderr

    # A new ref: its whole tree, here to the cluster the config names.
    run(
        w.client, w.env, "git", "config", "remote.origin.annexproxy-push-content-to",
        "origin-mycluster",
    )  # fmt: skip
    proc = run(w.client, w.env, "git", "push", "origin", "main:refs/heads/other")
    names = list(FILES) + list(LATER)
    assert f"sent the content of {len(names)} files" in proc.stderr
    assert all(placed >= {"node1", "node2"} for placed in on_disk(w, names).values())

    # A target that does not exist: the push itself went through, the helper says why not.
    run(w.client, w.env, "git", "config", "remote.origin.annexproxy-push-content-to", "nosuch")
    proc = run(w.client, w.env, "git", "push", "origin", "main:refs/heads/third", check=False)
    assert "annexproxy: no content sent: no repository named nosuch" in proc.stderr
    heads = run(w.client, w.env, "git", "ls-remote", "origin", "refs/heads/third").stdout
    assert heads.strip()


# --- git-annex's own git-annex-shell as the server -----------------------------------------------


def real_shell(root: Path) -> Path:
    """A `git-annex-shell` symlink to the real multicall binary (it picks its personality
    from argv[0]'s name)."""
    git_annex = pytest.importorskip("git_annex")
    binary = Path(git_annex.__file__).resolve().parent / "git-annex"
    root.mkdir(parents=True, exist_ok=True)
    link = root / "git-annex-shell"
    link.symlink_to(binary)
    return link


def test_against_the_real_git_annex_shell(tmp_path: Path, annex_bin: Path) -> None:
    env = make_ssh_env(tmp_path / "ssh", annex_bin, real_shell(tmp_path / "realbin"))
    w = make_world(Site(env))
    u = w.uuids
    # The gateway's own repository (a plain repository to the client) ...
    proc = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin", "plain.txt")
    assert proc.stdout == "copy plain.txt (to origin) ok\n"
    assert on_disk(w, ["plain.txt"]) == {"plain.txt": {"proxy"}}
    # ... and the cluster behind git-annex's own gateway.
    names = ["big.bin", "unlocked.dat", "empty"]
    proc = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-mycluster", *names)
    assert summary(proc.stderr) == (3, BIG + len(UNLOCKED["unlocked.dat"]), 0)
    assert on_disk(w, names) == {n: {"node1", "node2"} for n in names}
    assert all(w.where_client(n) == {u["node1"], u["node2"]} for n in names)
    # A push with content: git's own transport (the server cannot tunnel git), watched.
    run(w.client, w.env, "git", "config", "remote.origin.annexproxy-push-content", "true")
    proc = run(w.client, w.env, "git", "push", "origin", "main")
    assert "annexproxy: sent the content of 2 files" in proc.stderr
    assert on_disk(w, list(LATER)) == {n: {"proxy"} for n in LATER}


# --- what a push updated, from its bytes (sans-IO) -----------------------------------------------


def pkt(payload: bytes) -> bytes:
    return b"%04x" % (len(payload) + 4) + payload


def feed(watch: PushWatch, to_server: bytes, to_git: bytes, piece: int) -> None:
    for i in range(0, max(len(to_server), len(to_git)), piece):
        watch.from_git(to_server[i : i + piece])
        watch.to_git(to_git[i : i + piece])


A, B, C = "a" * 40, "b" * 40, "c" * 40
ZERO = "0" * 40


@pytest.mark.parametrize("piece", [1, 7, 1 << 16])
@pytest.mark.parametrize("sideband", [True, False])
def test_push_watch_follows_commands_and_the_report(piece: int, sideband: bool) -> None:
    caps = b"report-status" + (b" side-band-64k" if sideband else b"")
    to_server = (
        pkt(f"{ZERO} {A} refs/heads/new".encode() + b"\0" + caps + b"\n")
        + pkt(f"{A} {B} refs/heads/refused\n".encode())
        + pkt(f"{B} {ZERO} refs/heads/deleted\n".encode())
        + pkt(f"{B} {C} refs/heads/main\n".encode())
        + b"0000PACK\x00\x00\x00\x020000 binary that looks like pkt-lines 0000"
    )
    report = (
        pkt(b"unpack ok\n")
        + pkt(b"ok refs/heads/new\n")
        + pkt(b"ng refs/heads/refused pre-receive hook declined\n")
        + pkt(b"ok refs/heads/deleted\n")
        + pkt(b"ok refs/heads/main\n")
        + b"0000"
    )
    if sideband:
        report = pkt(b"\2Resolving deltas\n") + pkt(b"\1" + report) + b"0000"
    advert = pkt(f"{A} refs/heads/refused\0report-status side-band-64k\n".encode()) + b"0000"
    watch = PushWatch()
    feed(watch, to_server, advert + report, piece)
    assert watch.updated(0) == [
        RefUpdate(ZERO, A, "refs/heads/new"),
        RefUpdate(B, C, "refs/heads/main"),
    ]


def test_push_watch_without_report_status_trusts_the_exit_status() -> None:
    watch = PushWatch()
    watch.from_git(pkt(f"{A} {B} refs/heads/main\0ofs-delta\n".encode()) + b"0000")
    watch.to_git(pkt(f"{A} refs/heads/main\0ofs-delta\n".encode()) + b"0000")
    assert watch.updated(0) == [RefUpdate(A, B, "refs/heads/main")]
    assert watch.updated(1) == []
    signed = PushWatch()
    signed.from_git(pkt(b"push-cert\0report-status\n") + pkt(b"certificate version 0.1\n"))
    assert signed.updated(0) == [] and signed.unsupported is not None


# --- the whole path without git-annex: add, commit, push, copy --------------------------------


def test_add_then_copy_to_a_cluster_then_real_git_annex_gets_it(world: World) -> None:
    """Issue 6's first proof: a client without git-annex annexes new files itself, pushes
    the commit through the helper, uploads the content to the cluster; another clone, with
    the real git-annex, fetches from the server and gets every file from there."""
    w, u = world, world.uuids
    new = {
        "fresh/data.csv": b"a,b\n1,2\n" * 5000,
        "fresh/image.tar.gz": os.urandom(300_000),
        "fresh/-dash.bin": os.urandom(1_000),
    }
    for name, data in new.items():
        (w.client / name).parent.mkdir(parents=True, exist_ok=True)
        (w.client / name).write_bytes(data)
    added = run(w.client, w.env, "git", "annexproxy", "add", "fresh")
    assert set(added.stdout.splitlines()) == {f"add {n} ok" for n in new}
    for name in new:
        assert (w.client / name).is_symlink(), name
    run(w.client, w.env, "git", "commit", "--quiet", "-m", "fresh files")
    run(w.client, w.env, "git", "push", "--quiet", "origin", "HEAD:main")

    proc = run(w.client, w.env, "git", "annexproxy", "copy", "--to", "origin-mycluster", "fresh")
    assert set(proc.stdout.splitlines()) == {f"copy {n} (to origin-mycluster) ok" for n in new}
    assert summary(proc.stderr) == (len(new), sum(map(len, new.values())), 0)

    # The server logged the nodes in its git-annex branch; a clone with git-annex sees it
    # and gets the content from the cluster.
    other = w.site.clone(w.cl, "other-after-add")
    w.site.client(other, "git", "annex", "get", "--quiet", "--from", "origin-mycluster", "fresh")
    for name, data in new.items():
        assert (other / name).read_bytes() == data, name
    where = w.site.client(other, "git", "annex", "whereis", "--json", "fresh").stdout
    for record in map(json.loads, where.splitlines()):
        holders = {r["uuid"] for r in record["whereis"]}
        assert {u["node1"], u["node2"]} <= holders, record["file"]
