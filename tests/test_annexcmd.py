"""`git annexproxy info` and `get` end to end, on a client that has no git-annex at all.

The server side is real: an admin sets up, with the real git-annex, a gateway `proxy.git`
whose two nodes form the cluster `mycluster` (as the conformance harness's setup_cluster
does), served through the fake ssh by our git-annex-shell and, in a second round of every
test, by git-annex's own. A seed client with git-annex adds files (locked, unlocked,
executable, empty, duplicated) and copies them to the cluster, to single nodes, to the
gateway's own repository (a plain remote to the client), and one to a repository the proxy
does not reach, then syncs.

Each test clones that server with plain `git clone` on a PATH where `git-annex` does not
exist, and runs our `git-annexproxy` console script. Results are checked on disk (bytes,
modes, symlinks that resolve), in git (`git status`), and finally by the real git-annex in
the same clone (`init`, `fsck --fast`, `whereis`), which must agree with what is there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import ANY

import pytest
from conftest import SshEnv, make_ssh_env
from test_e2e_proxy import Site, write_script

TESTS = Path(__file__).resolve().parent
SCRIPT = Path(sys.executable).parent / "git-annexproxy"
HELPER = Path(sys.executable).parent / "git-remote-annexproxy"

BIG = 3 << 20
FILES: dict[str, bytes] = {
    "plain.txt": b"a plain locked file\n",
    "sub dir/spaced name 50%.txt": b"spaces and a percent sign\n",
    "big.bin": os.urandom(BIG),
    "empty": b"",
    "dup-a.txt": b"the same content twice\n",
    "dup-b.txt": b"the same content twice\n",
    "node1only.txt": b"only node1 has this\n",
    "node2only.txt": b"only node2 has this\n",
    "gateway.txt": b"only the gateway's own repository has this\n",
    "outside.txt": b"only a repository the proxy does not reach has this\n",
}
UNLOCKED = {"unlocked.dat": os.urandom(70_000), "run.sh": b"#!/bin/sh\necho hi\n"}
ALL = {**FILES, **UNLOCKED}
REACHABLE = {name: data for name, data in ALL.items() if name != "outside.txt"}


@dataclass
class World:
    site: Site
    proxy: Path
    uuids: dict[str, str]  # proxy, node1, node2, mycluster, outside
    keys: dict[str, str]  # file -> key

    @property
    def env(self) -> SshEnv:
        return self.site.env


@pytest.fixture(scope="module", params=["ours", "git-annex"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    annex_bin: Path,
    our_shell: Path,
    real_annex_shell: Path,
) -> World:
    shell = our_shell if request.param == "ours" else real_annex_shell
    env = make_ssh_env(tmp_path_factory.mktemp("annexcmd"), annex_bin, shell)
    site = Site(env)
    cl = site.cluster(gateway="proxy", nodes=("node1", "node2"))
    outside = site.bare("outside")
    seed = site.clone(cl.gateway, "seed")
    (seed / "sub dir").mkdir()
    keys = site.add_files(seed, FILES)
    for name, data in UNLOCKED.items():
        (seed / name).write_bytes(data)
    (seed / "run.sh").chmod(0o755)
    site.client(seed, "git", "annex", "add", "--quiet", *UNLOCKED)
    site.client(seed, "git", "annex", "unlock", "--quiet", *UNLOCKED)
    site.client(seed, "git", "commit", "--quiet", "-m", "unlocked files")
    found = site.client(seed, "git", "annex", "find", "--format=${file}\t${key}\n", *UNLOCKED)
    for line in found.stdout.splitlines():
        name, key = line.split("\t")
        keys[name] = key

    single = ("node1only.txt", "node2only.txt", "gateway.txt", "outside.txt")
    cluster_files = [n for n in ALL if n not in single]
    site.client(seed, "git", "annex", "copy", "--quiet", "--to", "origin-mycluster", *cluster_files)
    site.client(seed, "git", "annex", "copy", "--quiet", "--to", "origin-node1", "node1only.txt")
    site.client(seed, "git", "annex", "copy", "--quiet", "--to", "origin-node2", "node2only.txt")
    site.client(seed, "git", "annex", "copy", "--quiet", "--to", "origin", "gateway.txt")
    site.client(seed, "git", "remote", "add", "outside", f"localhost:{outside}")
    site.client(seed, "git", "annex", "sync", "--quiet", "--no-content", "outside")
    site.client(seed, "git", "annex", "copy", "--quiet", "--to", "outside", "outside.txt")
    # The seed's own copies must not count: a client could never reach them anyway, but
    # the "only in ..." message should name just the outside repository.
    site.client(seed, "git", "annex", "drop", "--quiet", "--force", ".")
    site.client(seed, "git", "annex", "sync", "--quiet", "--no-content", "origin")
    uuids = {
        "proxy": site.uuid(cl.gateway),
        "mycluster": cl.uuid,
        "outside": site.uuid(outside),
        **{n: site.uuid(p) for n, p in cl.nodes.items()},
    }
    return World(site, cl.gateway, uuids, keys)


# --- a client without git-annex ----------------------------------------------------------------


def bare_client_env(world: World) -> dict[str, str]:
    """The client's environment with only git, the fake ssh and git-annexproxy on PATH."""
    for script in (SCRIPT, HELPER):
        if not script.is_file():
            pytest.fail(f"{script} is missing: install the project (pip install -e '.[test]')")
    only = world.env.root / "annexproxy-only-bin"
    only.mkdir(exist_ok=True)
    for script in (SCRIPT, HELPER):
        link = only / script.name
        if not link.exists():
            link.symlink_to(script)
    env = dict(world.env)
    env["PATH"] = os.pathsep.join((str(world.env.bin_dir), str(only), "/usr/bin", "/bin"))
    assert shutil.which("git-annex", path=env["PATH"]) is None, "git-annex must not be found"
    assert shutil.which("git-annexproxy", path=env["PATH"]) is not None
    return env


def run(
    cwd: Path, env: dict[str, str], *args: str, check: bool | None = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; `check` True: must succeed, False: must fail, None: either."""
    proc = subprocess.run(
        list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if check is not None and (proc.returncode == 0) != check:
        raise AssertionError(
            f"({cwd}) {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
        )
    return proc


_counter = iter(range(1000))


@pytest.fixture
def client(world: World) -> Iterator[tuple[Path, dict[str, str]]]:
    env = bare_client_env(world)
    path = world.env.root / f"client{next(_counter)}"
    run(world.env.root, env, "git", "clone", "--quiet", f"localhost:{world.proxy}", str(path))
    yield path, env


def ssh_calls(world: World) -> int:
    log = world.env.log
    return len(log.read_text().splitlines()) if log.exists() else 0


def content_ok(path: Path, name: str) -> None:
    """The file reads as its content, through a symlink into .git/annex/objects or as an
    unlocked file."""
    f = path / name
    assert f.read_bytes() == ALL[name], name
    if name in UNLOCKED:
        assert not f.is_symlink(), name
    else:
        assert f.is_symlink(), name
        assert "/.git/annex/objects/" in str(f.resolve()), name


# --- info --------------------------------------------------------------------------------------


def test_info_lists_the_proxy_its_nodes_and_the_cluster(
    world: World, client: tuple[Path, dict[str, str]]
) -> None:
    path, env = client
    u = world.uuids
    proc = run(path, env, "git", "annexproxy", "info", "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    got = {r["name"]: (r["uuid"], r["kind"]) for r in rows}
    assert got == {
        "origin": (u["proxy"], "proxy"),
        "origin-node1": (u["node1"], "node"),
        "origin-node2": (u["node2"], "node"),
        "origin-mycluster": (u["mycluster"], "cluster"),
    }
    cluster = next(r for r in rows if r["kind"] == "cluster")
    assert sorted(cluster["nodes"]) == sorted([u["node1"], u["node2"]])
    assert cluster["description"] == "cluster mycluster"
    # The proxy's UUID was learnt once and recorded where git-annex keeps it.
    config = run(path, env, "git", "config", "remote.origin.annex-uuid").stdout.strip()
    assert config == u["proxy"]

    calls = ssh_calls(world)
    table = run(path, env, "git", "annexproxy", "info", "origin").stdout
    assert ssh_calls(world) == calls, "info asked the server again"
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "UUID", "DESCRIPTION"]
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    assert by_name["origin-mycluster"][:3] == ["origin-mycluster", "cluster", u["mycluster"]]
    assert "[nodes: origin-node1, origin-node2]" in table
    assert by_name["origin-node2"][:3] == ["origin-node2", "node", u["node2"]]

    bad = run(path, env, "git", "annexproxy", "info", "nosuch", check=False)
    assert bad.stderr == "fatal: 'nosuch' does not appear to be a git remote\n"
    assert bad.stdout == ""


# --- get ---------------------------------------------------------------------------------------


def test_get_everything_reachable_then_nothing_to_do(
    world: World, client: tuple[Path, dict[str, str]]
) -> None:
    path, env = client
    proc = run(path, env, "git", "annexproxy", "get", "-J", "3", ".", check=False)
    assert proc.returncode == 1, proc.stderr
    for name in REACHABLE:
        content_ok(path, name)
    assert not (path / "outside.txt").exists()  # still a dangling symlink
    # One line for the file that cannot be had, naming it and why.
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("get ")]
    assert errors == [
        f"get outside.txt: not available: only in outside ({world.uuids['outside']}), "
        "which origin does not reach"
    ]
    ok_lines = set(proc.stdout.splitlines())
    assert "get node2only.txt (from origin-mycluster) ok" in ok_lines
    assert "get gateway.txt (from origin) ok" in ok_lines  # a plain p2pstdio session
    assert len(ok_lines) == len(REACHABLE)
    big_key = world.keys["big.bin"]
    summary = proc.stderr.splitlines()[-1]
    m = re.fullmatch(r"get: (\d+) files, (\d+) bytes, 1 failed", summary)
    assert m is not None, summary
    assert int(m.group(1)) == len(REACHABLE)
    # dup-a and dup-b share a key: fetched once.
    assert int(m.group(2)) == sum(len(d) for n, d in REACHABLE.items() if n != "dup-b.txt")

    # As git-annex lays objects out: read-only file in a read-only key directory.
    obj = (path / "big.bin").resolve()
    assert obj.name == big_key
    assert stat.S_IMODE(obj.stat().st_mode) == 0o444
    assert stat.S_IMODE(obj.parent.stat().st_mode) == 0o555
    assert not any((path / ".git/annex/tmp").iterdir())
    # The unlocked executable kept its exec bit; git sees no change anywhere.
    assert os.access(path / "run.sh", os.X_OK)
    assert run(path, env, "git", "status", "--porcelain").stdout == ""

    # Nothing left to do: no server contacted, success, a zero summary.
    calls = ssh_calls(world)
    again = run(path, env, "git", "annexproxy", "get", "plain.txt", "sub dir", "unlocked.dat")
    assert again.stdout == ""
    assert again.stderr == "get: 0 files, 0 bytes, 0 failed\n"
    assert ssh_calls(world) == calls

    # From a subdirectory, paths are relative to it; an unknown path is an error.
    sub = run(path / "sub dir", env, "git", "annexproxy", "get", "nosuch", ".", check=False)
    assert sub.returncode == 1
    assert "get nosuch: did not match any file known to git" in sub.stderr


def test_get_json_and_from_a_named_node(world: World, client: tuple[Path, dict[str, str]]) -> None:
    path, env = client
    proc = run(
        path, env, "git", "annexproxy", "get", "--json", "--from", "origin-node1",
        "node1only.txt", "node2only.txt", "unlocked.dat", check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    records = {r["file"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert records["node1only.txt"] == {
        "command": "get",
        "file": "node1only.txt",
        "key": world.keys["node1only.txt"],
        "success": True,
        "from": "origin-node1",
        "uuid": world.uuids["node1"],
        "bytes": len(ALL["node1only.txt"]),
        "error": None,
    }
    failed = records["node2only.txt"]
    assert (failed["success"], failed["error"]) == (False, "not present in origin-node1")
    assert (records["unlocked.dat"]["success"], records["unlocked.dat"]["from"]) == (
        True,
        "origin-node1",
    )
    content_ok(path, "node1only.txt")
    content_ok(path, "unlocked.dat")
    assert not (path / "node2only.txt").exists()
    assert run(path, env, "git", "status", "--porcelain").stdout == ""

    bad = run(path, env, "git", "annexproxy", "get", "--from", "nosuch", ".", check=False)
    assert bad.stderr == "fatal: no repository named nosuch (see git annexproxy info)\n"
    usage = run(path, env, "git", "annexproxy", "get", "-J", "0", check=False)
    assert usage.stderr == "fatal: -J needs a number of jobs of at least 1\n"
    assert run(path, env, "git", "annexproxy", "frob", check=False).stderr.startswith("fatal: ")


# --- resume ------------------------------------------------------------------------------------

CUT = 1 << 20  # server->client bytes per session before the relay drops it


@dataclass(frozen=True)
class Relayed:
    """One p2pstdio session as tests/cutrelay.py saw it."""

    bytes_out: int  # server -> client
    cut: bool


def relay_env(world: World, env: dict[str, str], name: str, cut: int | None) -> dict[str, str]:
    """`env` with the server's git-annex-shell behind tests/cutrelay.py, which drops each
    p2pstdio session after `cut` bytes towards the client (None: never) and logs them."""
    relay_bin = world.env.root / "relay-bin"
    relay_bin.mkdir(exist_ok=True)
    write_script(
        relay_bin / "git-annex-shell",
        f'#!/bin/sh\nexec "{sys.executable}" "{TESTS / "cutrelay.py"}" "{world.env.srvbin_dir}'
        '/git-annex-shell" "$@"\n',
    )
    (world.env.root / name).mkdir()
    out = dict(env)
    out["FAKESSH_SERVER_PATH"] = f"{relay_bin}{os.pathsep}{env['FAKESSH_SERVER_PATH']}"
    out["FAKESSH_PASSENV"] = "CUTRELAY_CUT_OUT CUTRELAY_CAPTURE CUTRELAY_LOG"
    out["CUTRELAY_CAPTURE"] = str(world.env.root / name)
    out["CUTRELAY_LOG"] = str(world.env.root / name / "log.jsonl")
    if cut is not None:
        out["CUTRELAY_CUT_OUT"] = str(cut)
    return out


def relayed(world: World, name: str) -> list[Relayed]:
    """The client's sessions the relay logged (through the fake ssh: `-c COMMAND`; git-annex's
    own gateway also runs its nodes' git-annex-shell through the relay). A cut session is
    logged only if it lives until its server side exits; our client kills a broken session
    at once, so those may be missing."""
    log = world.env.root / name / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [
        Relayed(r["bytes_out"], r["cut"]) for r in map(json.loads, lines) if r["argv"][0] == "-c"
    ]


def get_offsets(world: World, name: str) -> list[int]:
    """Offsets of the GETs the relay saw the client send. (It saves a session's input
    reliably only when the session was not cut.)"""
    offsets = []
    for sent in (world.env.root / name).glob("*.in"):
        offsets += [int(m) for m in re.findall(rb"^GET (\d+) ", sent.read_bytes(), re.M)]
    return offsets


def summary_bytes(stderr: str) -> int:
    m = re.fullmatch(r"get: \d+ files, (\d+) bytes, \d+ failed", stderr.splitlines()[-1])
    assert m is not None, stderr
    return int(m.group(1))


def test_resume_after_a_cut_connection(world: World, client: tuple[Path, dict[str, str]]) -> None:
    path, env = client
    partial = path / ".git/annex/tmp" / world.keys["big.bin"]

    # Without retries the cut ends the run: the file fails and the partial stays.
    first = relay_env(world, env, "relay-first", CUT)
    proc = run(
        path, first, "git", "-c", "annex.forward-retry=0", "annexproxy", "get",
        "--from", "origin-mycluster", "big.bin", check=False,
    )  # fmt: skip
    assert proc.stderr.splitlines()[0].startswith("get big.bin: origin-mycluster: ")
    kept = partial.stat().st_size
    assert 0 < kept < CUT
    assert [s.cut for s in relayed(world, "relay-first")] in ([True], [])
    assert summary_bytes(proc.stderr) == kept

    # With git-annex's default forward-retry, each cut session is followed by one that
    # resumes where it stopped, until the file is whole; only the rest crosses the wire.
    second = relay_env(world, env, "relay-second", CUT)
    calls = ssh_calls(world)
    proc = run(path, second, "git", "annexproxy", "get", "big.bin")
    content_ok(path, "big.bin")
    assert not partial.exists()
    assert summary_bytes(proc.stderr) == BIG - kept
    # Each session carries up to CUT bytes of the rest, protocol lines included.
    assert ssh_calls(world) - calls == 1 + (BIG - kept) // CUT
    assert [s for s in relayed(world, "relay-second") if not s.cut] == [Relayed(ANY, False)]
    assert max(get_offsets(world, "relay-second")) > kept


# --- the real git-annex agrees afterwards ------------------------------------------------------


def test_real_git_annex_agrees_with_what_get_left(
    world: World, client: tuple[Path, dict[str, str]]
) -> None:
    path, env = client
    run(path, env, "git", "annexproxy", "get", ".", check=False)
    me = run(path, env, "git", "config", "annex.uuid").stdout.strip()
    assert me

    annex_env = dict(world.env)  # the same clone, now with git-annex on PATH
    run(path, annex_env, "git", "annex", "init", "--quiet", "later")
    assert run(path, annex_env, "git", "config", "annex.uuid").stdout.strip() == me
    fsck = run(path, annex_env, "git", "annex", "fsck", "--fast", "--quiet", check=None)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert not re.search(r"fixing|bad file|expected to be present", fsck.stdout + fsck.stderr)
    found = run(path, annex_env, "git", "annex", "find", "--format=${file}\n").stdout
    assert set(found.splitlines()) == set(REACHABLE)
    where = json.loads(
        run(path, annex_env, "git", "annex", "whereis", "--json", "node2only.txt").stdout
    )
    uuids = {w["uuid"] for w in where["whereis"]}
    assert uuids == {me, world.uuids["node2"], world.uuids["mycluster"]}
    assert run(path, annex_env, "git", "status", "--porcelain").stdout == ""


# --- a clone made by our remote helper -----------------------------------------------------------


def test_clone_with_the_annexproxy_url_then_get(world: World) -> None:
    env = bare_client_env(world)
    path = world.env.root / "helper-clone"
    url = f"annexproxy::ssh://localhost{world.proxy}"
    run(world.env.root, env, "git", "clone", "--quiet", url, str(path))
    # The content command reaches the proxy through the annexurl the helper recorded.
    annexurl = run(path, env, "git", "config", "remote.origin.annexurl").stdout.strip()
    assert annexurl == f"ssh://localhost{world.proxy}"
    proc = run(path, env, "git", "annexproxy", "get", ".", check=False)
    assert proc.returncode == 1
    failed = [ln for ln in proc.stderr.splitlines() if re.match("get [^:]*: ", ln)]
    assert len(failed) == 1 and failed[0].startswith("get outside.txt: not available: ")
    for name in REACHABLE:
        content_ok(path, name)
