"""Hostile clients against every kind of p2pstdio session we serve, for the rows that concern
them all: a plain repository, a proxy in front of a git repository (reached by our node
worker, `noderpc`, or over a P2P link to its git-annex-shell), a special remote behind the
proxy, and a cluster gateway. Each test drives our `git-annex-shell p2pstdio` byte-exactly
(tests/p2pdriver.py); where real git-annex-shell 10.20261026 answers the same input without
dying, we answer as it does (checked with the binary, each row says how).

Rows (probe -> expected):

- S1  keys too long for a file name: 300 characters; long only once escaped (`&` -> `&a`);
      an object that fits but whose location log does not (its journal file name doubles
      every `_`); an object present whose `.lck` would not fit -> each request answered
      FAILURE or ERROR, the next one served, exit 0. git-annex: the same FAILUREs where it
      survives (an unloggable PUT: PUT-FROM, then FAILURE, the object kept), and it dies on
      a 300-character PUT, a proxied REMOVE, a GET or REMOVE of such a present object.
- S2  DATA where no payload is expected (before VERSION, as a request, after LOCKCONTENT,
      in place of a GET verdict or of VALID) -> answered at once, none of its bytes read
      (however many it announces). A plain session, and a proxy holding a lock, answer
      ERROR and read the bytes after the header as lines, as git-annex-shell does; a proxy
      elsewhere answers `ERROR protocol error` and hangs up, as git-annex's proxy does.
- S3  a session killed mid-GET (the connection cut: sshd or systemd end the session's
      processes) -> no `<key>.lck` beside the object, in the repository served or on the
      node: like git-annex (Annex/Content.hs, sendAnnex), sending takes no content lock,
      so there is none to leave behind; a special remote has no lock files at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, make_ssh_env
from p2pdriver import ShellSession, p2pstdio_argv

from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.store import AnnexStore

TARGETS = ("plain", "node1", "node2", "special", "cluster")
PROXIED = ("node1", "node2", "special", "cluster")
HELLO = b"hello"
# Well past what pipes between client, proxy and node hold, so a GET stalls mid-transfer.
BIG = hashlib.shake_256(b"annexproxy sessions big").digest(4 << 20)
QUICK = 5.0  # seconds an answer that must come "at once" may take


@dataclass
class World:
    env: SshEnv
    proxy: Path
    holders: dict[str, Path]  # where a target's objects live (none for the special remote)
    uuids: dict[str, str | None]  # --uuid for each target; None: the proxy's own annex

    def session(self, target: str, *, own_group: bool = False) -> ShellSession:
        argv = p2pstdio_argv(
            self.env.srvbin_dir / "git-annex-shell", self.proxy, uuid=self.uuids[target]
        )
        env = self.env.admin_env()
        env["PATH"] = f"{self.env.srvbin_dir}{os.pathsep}{env['PATH']}"
        env["ANNEXPROXY_DEBUG_LINKS"] = str(self.env.root / "links.jsonl")
        # own_group: the session and the node processes it starts can be killed together,
        # as sshd (or systemd, ending the login) ends a session whose connection died.
        return ShellSession(
            argv, env=env, cwd=self.proxy, timeout=60, preexec_fn=os.setsid if own_group else None
        )

    def open(
        self, target: str, *, version: int | None = 4, own_group: bool = False
    ) -> ShellSession:
        s = self.session(target, own_group=own_group)
        s.handshake(version)
        return s

    def key_dir(self, target: str, key: str) -> list[str]:
        """What lies beside `key`'s object where `target` keeps it (the key file, `.lck`…)."""
        kf = Key.parse(key).keyfile()
        found = [p for p in (self.holders[target] / "annex" / "objects").rglob(kf) if p.is_dir()]
        assert len(found) == 1, found
        return sorted(n.replace(kf, "K") for n in os.listdir(found[0]))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path) -> World:
    root = tmp_path_factory.mktemp("secsessions")
    env = make_ssh_env(root / "ssh", annex_bin, our_shell)
    proxy = env.make_server_repo("proxy.git", "proxy")

    def admin(*args: str) -> str:
        return env.run(list(args), cwd=proxy, admin=True).stdout

    nodes = {n: env.make_server_repo(f"{n}.git", n) for n in ("node1", "node2", "node3")}
    for name, path in nodes.items():
        admin("git", "remote", "add", name, str(path))
    admin("git", "annex", "sync", "--quiet", "--no-content", *nodes)
    for name in ("node1", "node2"):
        admin("git", "config", f"remote.{name}.annex-proxy", "true")
    # node1 is reached by our node worker (the default for a local path), node2 over P2P.
    admin("git", "config", "remote.node2.annexproxy-link", "p2p")
    store = root / "store"
    store.mkdir()
    admin("git", "annex", "initremote", "-q", "special", "type=directory",
          f"directory={store}", "encryption=none")  # fmt: skip
    admin("git", "config", "remote.special.annex-proxy", "true")
    admin("git", "annex", "initcluster", "mycluster")
    admin("git", "config", "remote.node3.annex-cluster-node", "mycluster")
    admin("git", "annex", "updatecluster")
    admin("git", "annex", "updateproxy", "-q")

    def config(name: str) -> str:
        return admin("git", "config", name).strip()

    uuids: dict[str, str | None] = {"plain": None, "cluster": config("annex.cluster.mycluster")}
    uuids |= {n: config(f"remote.{n}.annex-uuid") for n in ("node1", "node2", "special")}
    holders = {"plain": proxy, "node1": nodes["node1"], "node2": nodes["node2"],
               "cluster": nodes["node3"]}  # fmt: skip
    return World(env, proxy, holders, uuids)


def put(s: ShellSession, key: str, content: bytes) -> list[str]:
    """PUT and, if asked for, the content from the offset the server names."""
    answers = [s.request(f"PUT f {key}")]
    if answers[0].startswith("PUT-FROM "):
        s.send_data(content[int(answers[0].split()[1]) :])
        answers.append(s.request("VALID"))
    return answers


def hello_key(target: str) -> str:
    digest = hashlib.sha256(HELLO + target.encode()).hexdigest()
    return f"SHA256E-s{len(HELLO) + len(target)}--{digest}.txt"


def stored_hello(world: World, target: str) -> tuple[str, bytes]:
    """A small key stored on (and logged for) `target`, through a session."""
    content = HELLO + target.encode()
    key = hello_key(target)
    with world.open(target) as s:
        assert put(s, key, content)[-1].split()[0] in {
            "SUCCESS", "SUCCESS-PLUS", "ALREADY-HAVE", "ALREADY-HAVE-PLUS"
        }  # fmt: skip
        assert s.finish().code == 0
    return key, content


def in_step(s: ShellSession) -> None:
    assert s.request("GETTIMESTAMP").startswith("TIMESTAMP "), "session out of step"


def test_sessions_reach_their_nodes_as_configured(world: World) -> None:
    """The rows below cover each kind of link: node1 by our node worker, node2 over P2P,
    the special remote in-process, the cluster's node by our node worker."""
    log = world.env.root / "links.jsonl"
    log.unlink(missing_ok=True)
    for target in PROXIED:
        with world.open(target) as s:
            in_step(s)
            s.request(f"CHECKPRESENT {hello_key('nowhere')}")
            assert s.finish().code == 0
    links = {r["remote"]: r["link"] for r in map(json.loads, log.read_text().splitlines())}
    assert links == {"node1": "RpcLink", "node2": "P2PLink", "special": "SpecialLink",
                     "node3": "RpcLink"}  # fmt: skip


def worm(target: str, tail: str, length: int | None = None) -> str:
    """A WORM key of size 5 (HELLO's), unique to `target`, named `tail` (padded with `x`
    to `length` characters when given)."""
    key = f"WORM-s5-m1--{target}{tail}"
    return key if length is None else key + "x" * (length - len(key))


# -- S1: keys too long for a file name ---------------------------------------------------------


def requests(s: ShellSession, key: str) -> list[str]:
    """CHECKPRESENT, PUT (+ its DATA), LOCKCONTENT, GET (+ the content's validity, then
    FAILURE as the verdict), REMOVE: one answer each, and the session still in step."""
    answers = [s.request(f"CHECKPRESENT {key}"), *put(s, key, HELLO)]
    lock = s.request(f"LOCKCONTENT {key}")
    if lock == "SUCCESS":
        s.send("UNLOCKCONTENT")
    answers.append(lock)
    get = s.request(f"GET 0 f {key}")
    if get.startswith("DATA "):
        s.read_exact(int(get.split()[1]))
        get += " " + s.readline()
        s.send("FAILURE")
    answers += [get, s.request(f"REMOVE {key}")]
    in_step(s)
    return ["ERROR" if a.startswith("ERROR ") else a for a in answers]


# No file can be named after the key: the object, its partial, locks and log all fail.
UNSTORABLE = {
    "plain": ["FAILURE", "ERROR", "FAILURE", "DATA 0 INVALID", "SUCCESS"],
    "node1": ["FAILURE", "ERROR", "FAILURE", "DATA 0 INVALID", "FAILURE"],
    "node2": ["FAILURE", "ERROR", "FAILURE", "DATA 0 INVALID", "FAILURE"],
    "special": ["FAILURE", "PUT-FROM 0", "ERROR", "FAILURE", "ERROR", "FAILURE"],
    "cluster": ["FAILURE", "ERROR", "FAILURE", "DATA 0 INVALID", "FAILURE"],
}
# The object fits, the location log does not: the content is stored and kept but the PUT
# fails, as git-annex does it (plain, node, cluster alike); a REMOVE fails the same way.
UNLOGGABLE = {
    "plain": ["FAILURE", "PUT-FROM 0", "FAILURE", "SUCCESS", "DATA 5 VALID", "FAILURE"],
    "node1": ["FAILURE", "PUT-FROM 0", "FAILURE", "SUCCESS", "DATA 5 VALID", "FAILURE"],
    "node2": ["FAILURE", "PUT-FROM 0", "FAILURE", "SUCCESS", "DATA 5 VALID", "FAILURE"],
    "special": ["FAILURE", "PUT-FROM 0", "FAILURE", "FAILURE", "DATA 5 VALID", "FAILURE"],
    "cluster": ["FAILURE", "PUT-FROM 0", "FAILURE", "FAILURE", "DATA 0 INVALID", "FAILURE"],
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("kind", "tail", "length"),
    [
        ("unstorable", "-300-", 300),
        # About 150 characters, over 270 once escaped (git-annex's keyFile: & -> &a).
        ("unstorable", "-amp-" + "&" * 130, None),
        # The key file fits (about 165 characters); the journal file of its location log,
        # <hash dirs>_<keyfile>.log with every "_" doubled, is over 300.
        ("unloggable", "-under-" + "_" * 140, None),
    ],
    ids=["300-chars", "long-once-escaped", "log-too-long"],
)
def test_s1_overlong_keys_are_refused_and_the_session_goes_on(
    world: World, target: str, kind: str, tail: str, length: int | None
) -> None:
    key = worm(target, tail, length)
    with world.open(target) as s:
        got = requests(s, key)
        assert s.request(f"CHECKPRESENT {hello_key('nowhere')}") == "FAILURE"
        result = s.finish()
    expected = (UNSTORABLE if kind == "unstorable" else UNLOGGABLE)[target]
    assert got == expected, result.stderr
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr, result.stderr
    if kind == "unloggable":  # said on stderr, by us or by the node that failed
        assert "File name too long" in result.stderr, result.stderr


@pytest.mark.parametrize("target", ["plain", "node1", "node2"])
def test_s1_present_object_whose_lock_file_name_is_too_long(world: World, target: str) -> None:
    """A key file of 253 bytes fits, its `.lck` (257) does not; such an object can only
    have come from elsewhere (a PUT of it fails on the download lock, `lck.<keyfile>`), so
    the test places it. git-annex answers LOCKCONTENT with FAILURE and dies on GET and
    REMOVE; we serve the GET (sending takes no lock) and answer REMOVE with FAILURE."""
    key = worm(target, "-lck-", 253)
    path = AnnexStore(world.holders[target], bare=True).object_path(Key.parse(key))
    path.parent.mkdir(parents=True)
    path.write_bytes(HELLO)
    path.chmod(0o444)
    path.parent.chmod(0o555)
    with world.open(target) as s:
        assert s.request(f"CHECKPRESENT {key}") == "SUCCESS"
        assert s.request(f"LOCKCONTENT {key}") == "FAILURE"
        assert s.request(f"GET 0 f {key}") == "DATA 5"
        assert s.read_exact(5) == HELLO and s.readline() == "VALID"
        s.send("SUCCESS")
        assert s.request(f"REMOVE {key}") == "FAILURE"
        in_step(s)
        result = s.finish()
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert world.key_dir(target, key) == ["K"]


# -- S2: DATA where no payload is expected -----------------------------------------------------

# A DATA that announces this much: if the server waited for it, the test would time out.
STRAY = "DATA 1000000000"


def answer_at_once(s: ShellSession) -> str:
    try:
        return s.readline(timeout=QUICK)
    except TimeoutError:
        pytest.fail(f"no answer to {STRAY} within {QUICK}s: the server waits for its bytes")


def _position(world: World, target: str, s: ShellSession, where: str) -> None:
    """Bring session `s` to the point where the stray DATA is sent."""
    if where == "lock":
        key, _ = stored_hello(world, target)
        assert s.request(f"LOCKCONTENT {key}") == "SUCCESS"
    elif where == "verdict":
        key, content = stored_hello(world, target)
        assert s.request(f"GET 0 f {key}") == f"DATA {len(content)}"
        assert s.read_exact(len(content)) == content and s.readline() == "VALID"
    elif where == "validity":
        key = hashlib.sha256(f"validity {target}".encode()).hexdigest()
        assert s.request(f"PUT f SHA256E-s5--{key}") == "PUT-FROM 0"
        s.send_data(HELLO)


# Positions: where the stray DATA comes, and what a plain session answers there.
POSITIONS = {
    "before-version": "ERROR unexpected command",
    "request": "ERROR unexpected command",
    "lock": "ERROR expected UNLOCKCONTENT",
    "verdict": "ERROR unexpected command",
    "validity": "ERROR expected VALID or INVALID",
}


@pytest.mark.parametrize("where", list(POSITIONS))
@pytest.mark.parametrize("target", TARGETS)
def test_s2_out_of_turn_data_is_answered_at_once_never_read(
    world: World, target: str, where: str
) -> None:
    if where == "lock" and target in {"special", "cluster"}:
        pytest.skip("LOCKCONTENT always fails here: a special remote or a cluster is not locked")
    with world.open(target, version=None if where == "before-version" else 4) as s:
        _position(world, target, s, where)
        s.send(STRAY)
        first = answer_at_once(s)
        if target == "plain" or where == "lock":
            # Answered, and the bytes after the header are the next request.
            assert first == POSITIONS[where]
            s.send("GETTIMESTAMP")
            assert s.readline(timeout=QUICK).startswith("TIMESTAMP ")
            in_step(s)
            assert s.finish().code == 0
            return
        # A proxy: a message it cannot relay ends the session, as git-annex's proxy does.
        expect = (
            "ERROR expected VALID or INVALID" if where == "validity" else "ERROR protocol error"
        )
        assert first == expect
        assert s.at_eof(timeout=QUICK)
        result = s.finish()
    assert result.code == 1 and "Traceback" not in result.stderr, result.stderr


# -- S3: no lock file left by a session killed mid-GET -----------------------------------------


@pytest.mark.parametrize("target", ["plain", "node1", "node2", "cluster"])
def test_s3_session_killed_mid_get_leaves_no_lock_file(world: World, target: str) -> None:
    content = BIG + target.encode()
    key = f"SHA256E-s{len(content)}--{hashlib.sha256(content).hexdigest()}.bin"
    with world.open(target) as s:
        assert put(s, key, content)[-1].split()[0] in {"SUCCESS", "SUCCESS-PLUS"}
        assert s.finish().code == 0
    assert world.key_dir(target, key) == ["K"]

    s = world.open(target, own_group=True)
    group = s.proc.pid
    try:
        with s:
            assert s.request(f"GET 0 f {key}") == f"DATA {len(content)}"
            assert s.read_exact(1 << 16) == content[: 1 << 16]
            # Stalled mid-transfer (the client reads no more): nothing beside the object.
            time.sleep(0.5)
            assert world.key_dir(target, key) == ["K"]
            # The connection is cut: the session and the node processes it started end.
            os.killpg(group, signal.SIGTERM)
            s.wait()
            deadline = time.monotonic() + 20
            while _group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)  # only what outlived the bound above
    assert world.key_dir(target, key) == ["K"]
    # And nothing holds the content: it can be removed at once.
    with world.open(target) as s2:
        assert s2.request(f"REMOVE {key}").split()[0] in {"SUCCESS", "SUCCESS-PLUS"}
        assert s2.finish().code == 0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
