"""End to end: the real git-annex client against our git-annex-shell, through the fake ssh.

The conformance harness's `plain` and `restrict` scenarios, as pytest tests: clone, copy
--to, get, drop (with the LOCKCONTENT proof), drop --from, move, fsck --from, sync, resume
after a cut connection in both directions, the restriction variables, and a final check
with real git-annex in the server repository (fsck clean, whereis sees what we recorded).

Every session reaches our shell through tests/cutrelay.py, which counts bytes per session
and can cut p2pstdio sessions or capture what the client sent. One "golden" world (a
server repository and a client clone with files already copied to it) is built per module;
each test works on its own copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, make_ssh_env

TESTS = Path(__file__).resolve().parent
CUTRELAY = TESTS / "cutrelay.py"

# Names that stress quoting and the AssociatedFile encoding (spaces, %, quotes, unicode).
FILES: dict[str, bytes] = {
    "hello.txt": b"hello world\n",
    "with space.txt": b"a file with a space\n",
    "odd 50%.txt": b"percent\n",
    "it's.txt": b"quote\n",
    "ünïcödé.txt": "unicode ✓\n".encode(),
    "empty.dat": b"",
    "deep/er/nested.bin": bytes(range(256)) * 64,
}
BIG_NAME = "big.bin"
BIG_SIZE = 6 << 20
CUT_AT = 2 << 20

RELAY_VARIABLES = ("CUTRELAY_LOG", "CUTRELAY_CUT_IN", "CUTRELAY_CUT_OUT", "CUTRELAY_CAPTURE")


def big_content() -> bytes:
    return hashlib.shake_256(b"e2e big").digest(BIG_SIZE)


@dataclass
class World:
    """A server repository and a client clone of it, reached through the fake ssh."""

    env: SshEnv
    repo: Path
    client: Path
    server_uuid: str

    @property
    def relay_log(self) -> Path:
        return self.env.root / "relay.jsonl"

    @property
    def capture(self) -> Path:
        return self.env.root / "capture"

    def git(self, *args: str, check: bool = True, env: SshEnv | None = None) -> str:
        return (env or self.env).run(["git", *args], cwd=self.client, check=check).stdout

    def annex(self, *args: str, check: bool = True, env: SshEnv | None = None) -> tuple[int, str]:
        proc = (env or self.env).run(["git", "annex", *args], cwd=self.client, check=check)
        return proc.returncode, proc.stdout + proc.stderr

    def admin(self, *args: str, check: bool = True) -> str:
        return self.env.run(list(args), cwd=self.repo, admin=True, check=check).stdout

    def key(self, name: str) -> str:
        return self.git("annex", "lookupkey", name).strip()

    def server_object(self, key: str) -> Path | None:
        out = self.admin("git", "annex", "contentlocation", key, check=False).strip()
        return self.repo / out if out else None

    def client_object(self, key: str) -> Path | None:
        out = self.git("annex", "contentlocation", key, check=False).strip()
        return self.client / out if out else None

    def whereis(self, key: str, *, on_server: bool) -> set[str]:
        """The UUIDs a repository's location log lists for `key`."""
        args = ("git", "annex", "whereis", "--json", "--key", key)
        out = self.admin(*args, check=False) if on_server else self.git(*args[1:], check=False)
        if not out.strip():
            return set()
        return {w["uuid"] for w in json.loads(out)["whereis"]}

    def relay_env(self, **values: str) -> SshEnv:
        """The client environment with relay settings (passed to the server's relay)."""
        return SshEnv({**self.env, **values}, self.env.root, self.env.annex_bin)

    def client_uuid(self) -> str:
        return self.git("config", "annex.uuid").strip()

    def relay_sessions(self) -> list[dict[str, object]]:
        if not self.relay_log.exists():
            return []
        lines = self.relay_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def sent_lines(self) -> list[str]:
        """Protocol lines the client sent in captured sessions (payload bytes ignored)."""
        lines: list[str] = []
        for path in sorted(self.capture.glob("*.in")):
            for raw in path.read_bytes().split(b"\n"):
                text = raw.decode("utf-8", "replace")
                if text[:1].isupper():
                    lines.append(text)
        return lines


def install_relay(env: SshEnv, our_shell: Path) -> SshEnv:
    """Make the server's `git-annex-shell` the relay in front of ours; pass its knobs."""
    wrapper = env.srvbin_dir / "git-annex-shell"
    wrapper.unlink()
    wrapper.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{CUTRELAY}" "{our_shell}" "$@"\n', encoding="utf-8"
    )
    wrapper.chmod(0o755)
    passenv = [*RELAY_VARIABLES]
    if "PYTHONPATH" in os.environ:
        passenv.append("PYTHONPATH")  # the server runs the code under test (mutation runs)
    values = dict(env)
    values["FAKESSH_PASSENV"] = " ".join(passenv)
    values["CUTRELAY_LOG"] = str(env.root / "relay.jsonl")
    (env.root / "capture").mkdir(exist_ok=True)
    values["CUTRELAY_CAPTURE"] = str(env.root / "capture")
    return SshEnv(values, env.root, env.annex_bin)


def build_world(root: Path, annex_bin: Path, our_shell: Path) -> World:
    env = install_relay(make_ssh_env(root, annex_bin, our_shell), our_shell)
    repo = env.make_server_repo("repo.git")
    server_uuid = env.run(["git", "config", "annex.uuid"], cwd=repo, admin=True).stdout.strip()
    client = root / "cli" / "client"
    client.parent.mkdir()
    env.run(["git", "clone", "-q", f"localhost:{repo}", str(client)])
    world = World(env, repo, client, server_uuid)
    world.annex("init", "client")
    for name, content in FILES.items():
        path = client / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (client / BIG_NAME).write_bytes(big_content())
    world.annex("add", ".")
    world.git("commit", "-q", "-m", "files")
    world.git("push", "-q", "origin", "main")
    world.annex("copy", "--to", "origin", *FILES)
    return world


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path, our_shell: Path) -> World:
    """Server + client, every small file copied to the server; big.bin only on the client."""
    return build_world(tmp_path_factory.mktemp("golden"), annex_bin, our_shell)


@pytest.fixture
def world(golden: World, tmp_path: Path, annex_bin: Path, our_shell: Path) -> Iterator[World]:
    """A private copy of the golden world (paths rewritten to the copy)."""
    root = tmp_path / "w"
    shutil.copytree(golden.env.root, root, symlinks=True)
    for stale in ("relay.jsonl", "ssh.jsonl"):
        (root / stale).unlink(missing_ok=True)
    for old in (root / "capture").glob("*"):
        old.unlink()
    env = install_relay(make_ssh_env(root, annex_bin, our_shell), our_shell)
    repo = root / golden.repo.relative_to(golden.env.root)
    client = root / golden.client.relative_to(golden.env.root)
    w = World(env, repo, client, golden.server_uuid)
    w.git("remote", "set-url", "origin", f"localhost:{repo}")
    yield w


def assert_server_consistent(w: World) -> None:
    """Real git-annex in the server: fsck of what it holds is clean (content hashes, and the
    location log agrees), and every object on disk is logged. `--in here`: plain `--all`
    also complains about keys whose other copies this repository was never told of."""
    fsck = w.env.run(
        ["git", "annex", "fsck", "--all", "--in", "here", "--quiet"], cwd=w.repo, admin=True
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    objects = w.repo / "annex" / "objects"
    for obj in objects.glob("*/*/*/*"):
        if obj.name.endswith((".lck", ".rtm", ".rtl")):
            continue
        assert w.server_uuid in w.whereis(obj.name, on_server=True), obj.name


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- clone, configlist, copy --to ----------------------------------------------------------


def test_clone_configlist_and_copy_to(golden: World, world: World) -> None:
    """The golden world's clone and `copy --to`: git came through the fake ssh, the client
    recorded the server's UUID (from configlist), every object is on the server with the
    right content, and both location logs list the server."""
    calls = [json.loads(line)["command"] for line in golden.env.log.read_text().splitlines()]
    assert any(c.startswith("git-upload-pack ") for c in calls), calls
    assert any(c.startswith("git-annex-shell 'configlist' ") for c in calls), calls
    assert world.git("config", "remote.origin.annex-uuid").strip() == world.server_uuid
    for name, content in FILES.items():
        key = world.key(name)
        obj = world.server_object(key)
        assert obj is not None and obj.read_bytes() == content, name
        assert world.server_uuid in world.whereis(key, on_server=True), name
        assert world.server_uuid in world.whereis(key, on_server=False), name
    big = world.key(BIG_NAME)
    assert world.server_object(big) is None
    assert world.server_uuid not in world.whereis(big, on_server=True)
    assert_server_consistent(world)


# -- get, drop (LOCKCONTENT proof), drop --from, move ------------------------------------------


def test_drop_local_with_lockcontent_proof_then_get(world: World) -> None:
    world.annex("drop", *FILES)
    for name in FILES:
        assert world.client_object(world.key(name)) is None, name
    # The proof that the server's copy exists was a content lock on it (numcopies 1).
    sent = world.sent_lines()
    locks = [line for line in sent if line.startswith("LOCKCONTENT ")]
    assert {line.split(" ", 1)[1] for line in locks} == {world.key(n) for n in FILES}
    assert "UNLOCKCONTENT" in sent
    world.annex("get", ".")
    for name, content in FILES.items():
        assert (world.client / name).read_bytes() == content, name
    assert (world.client / BIG_NAME).read_bytes() == big_content()
    assert_server_consistent(world)


def test_drop_local_fails_without_a_server_copy(world: World) -> None:
    """Control for the proof above: the server cannot lock what it lacks, so the only
    copy is kept."""
    code, out = world.annex("drop", BIG_NAME, check=False)
    assert code != 0, out
    assert world.client_object(world.key(BIG_NAME)) is not None


def test_drop_from_and_move_both_ways(world: World) -> None:
    client_uuid = world.client_uuid()
    hello = world.key("hello.txt")
    world.annex("drop", "--from", "origin", "hello.txt")
    assert world.server_object(hello) is None
    assert world.server_uuid not in world.whereis(hello, on_server=True)
    assert world.whereis(hello, on_server=False) == {client_uuid}

    big = world.key(BIG_NAME)
    world.annex("move", "--to", "origin", BIG_NAME)
    obj = world.server_object(big)
    assert obj is not None and obj.read_bytes() == big_content()
    assert world.client_object(big) is None
    assert world.whereis(big, on_server=True) == {world.server_uuid}
    assert world.whereis(big, on_server=False) == {world.server_uuid}

    world.annex("move", "--from", "origin", BIG_NAME)
    assert world.server_object(big) is None
    assert (world.client / BIG_NAME).read_bytes() == big_content()
    assert world.whereis(big, on_server=False) == {client_uuid}
    assert world.server_uuid not in world.whereis(big, on_server=True)
    assert_server_consistent(world)


# -- fsck --from --------------------------------------------------------------------------------


def test_fsck_from_fast_and_full(world: World) -> None:
    world.annex("fsck", "--from", "origin", "--fast", *FILES)
    world.annex("fsck", "--from", "origin", *FILES)
    # Control: corrupt one object on the server. The full check downloads and verifies,
    # so it fails; the fast one only asks whether the content is present.
    key = world.key("hello.txt")
    obj = world.server_object(key)
    assert obj is not None
    obj.parent.chmod(0o755)
    obj.chmod(0o644)
    obj.write_bytes(b"HELLO WORLD\n")
    world.annex("fsck", "--from", "origin", "--fast", "hello.txt")
    code, out = world.annex("fsck", "--from", "origin", "hello.txt", check=False)
    assert code != 0, out


# -- sync ----------------------------------------------------------------------------------------


def test_sync_records_uuid_log_and_branch_on_the_server(world: World) -> None:
    assert world.client_uuid() not in world.admin("git", "show", "git-annex:uuid.log")
    (world.client / "new.txt").write_bytes(b"synced\n")
    world.annex("add", "new.txt")
    world.git("commit", "-q", "-m", "new")
    world.annex("sync", "--no-content")
    uuid_log = world.admin("git", "show", "git-annex:uuid.log")
    assert world.client_uuid() in uuid_log
    assert world.admin("git", "rev-parse", "main").strip() == world.git("rev-parse", "HEAD").strip()
    assert_server_consistent(world)


# -- resume after a cut connection ------------------------------------------------------------


def _p2p_sessions(world: World) -> list[dict[str, object]]:
    return [s for s in world.relay_sessions() if any("p2pstdio" in a for a in s["argv"])]  # type: ignore[attr-defined]


def test_upload_resumes_after_cut_connections(world: World) -> None:
    """Every session is cut after 2 MiB from the client. git-annex retries while it makes
    progress, each retry resuming (PUT-FROM) where the partial ends; whatever that run
    leaves, a run without cuts finishes. The total sent stays near one copy of the file,
    which only resuming allows."""
    cut = world.relay_env(CUTRELAY_CUT_IN=str(CUT_AT))
    world.annex("copy", "--to", "origin", BIG_NAME, check=False, env=cut)
    sessions = _p2p_sessions(world)
    assert any(s["cut"] for s in sessions), sessions
    world.annex("copy", "--to", "origin", BIG_NAME)
    big = world.key(BIG_NAME)
    obj = world.server_object(big)
    assert obj is not None and obj.read_bytes() == big_content()
    total_in = sum(int(s["bytes_in"]) for s in _p2p_sessions(world))  # type: ignore[call-overload]
    assert total_in < BIG_SIZE + (1 << 20), total_in
    assert world.server_uuid in world.whereis(big, on_server=True)
    assert not list((world.repo / "annex" / "tmp").glob("*"))
    assert_server_consistent(world)


def test_download_resumes_after_cut_connections(world: World) -> None:
    world.annex("move", "--to", "origin", BIG_NAME)
    (world.relay_log).unlink()
    cut = world.relay_env(CUTRELAY_CUT_OUT=str(CUT_AT))
    world.annex("get", BIG_NAME, check=False, env=cut)
    assert any(s["cut"] for s in _p2p_sessions(world))
    world.annex("get", BIG_NAME)
    assert (world.client / BIG_NAME).read_bytes() == big_content()
    total_out = sum(int(s["bytes_out"]) for s in _p2p_sessions(world))  # type: ignore[call-overload]
    assert total_out < BIG_SIZE + (1 << 20), total_out
    # The server holds no lock or transfer record once the sessions are over.
    leftovers = [p for p in (world.repo / "annex" / "transfer").rglob("*") if p.is_file()]
    assert leftovers == []
    assert_server_consistent(world)


# -- the restriction variables (conformance README, `restrict` table) ----------------------


def _commit(world: World, message: str) -> str:
    world.git("commit", "-q", "--allow-empty", "-m", message)
    return world.git("rev-parse", "HEAD").strip()


def _server_main(world: World) -> str:
    return world.admin("git", "rev-parse", "main").strip()


def test_readonly(world: World) -> None:
    hello, big = world.key("hello.txt"), world.key(BIG_NAME)
    world.annex("drop", "hello.txt")  # unrestricted: so that there is something to get
    ro = world.env.with_server(GIT_ANNEX_SHELL_READONLY="true")
    world.annex("get", "hello.txt", env=ro)
    assert (world.client / "hello.txt").read_bytes() == FILES["hello.txt"]

    code, out = world.annex("copy", "--to", "origin", BIG_NAME, check=False, env=ro)
    assert code != 0, out
    assert world.server_object(big) is None
    assert world.server_uuid not in world.whereis(big, on_server=True)
    assert world.server_uuid not in world.whereis(big, on_server=False)

    code, out = world.annex("drop", "--from", "origin", "hello.txt", check=False, env=ro)
    assert code != 0 and "read-only" in out, out
    assert world.server_object(hello) is not None

    world.git("fetch", "-q", "origin", env=ro)
    # READONLY alone does not block git: "does not prevent passing commands on to
    # git-shell" (man page), and real git-annex-shell lets the push through.
    head = _commit(world, "pushed under READONLY")
    world.git("push", "-q", "origin", "main", env=ro)
    assert _server_main(world) == head
    assert_server_consistent(world)


def test_readonly_and_limited_lock_git_out(world: World) -> None:
    """The man page's lock-down: READONLY+LIMITED. git fetch and push are refused with the
    LIMITED message and main is unchanged; the annex is still readable."""
    world.annex("drop", "hello.txt")
    locked = world.env.with_server(GIT_ANNEX_SHELL_READONLY="1", GIT_ANNEX_SHELL_LIMITED="1")
    before = _server_main(world)
    _commit(world, "refused")
    for args in (["push", "origin", "main"], ["fetch", "origin"]):
        proc = locked.run(["git", *args], cwd=world.client, check=False)
        assert proc.returncode != 0, proc
        assert "GIT_ANNEX_SHELL_LIMITED" in proc.stderr, proc.stderr
    assert _server_main(world) == before
    world.annex("get", "hello.txt", env=locked)
    assert (world.client / "hello.txt").read_bytes() == FILES["hello.txt"]


def test_limited(world: World) -> None:
    limited = world.env.with_server(GIT_ANNEX_SHELL_LIMITED="1")
    proc = limited.run(["git", "fetch", "origin"], cwd=world.client, check=False)
    assert proc.returncode != 0 and "GIT_ANNEX_SHELL_LIMITED" in proc.stderr, proc.stderr
    world.annex("copy", "--to", "origin", BIG_NAME, env=limited)
    obj = world.server_object(world.key(BIG_NAME))
    assert obj is not None and sha(obj) == hashlib.sha256(big_content()).hexdigest()


def test_appendonly(world: World) -> None:
    ao = world.env.with_server(GIT_ANNEX_SHELL_APPENDONLY="1")
    world.annex("copy", "--to", "origin", BIG_NAME, env=ao)
    assert world.server_object(world.key(BIG_NAME)) is not None
    hello = world.key("hello.txt")
    code, out = world.annex("drop", "--from", "origin", "hello.txt", check=False, env=ao)
    assert code != 0 and "append-only" in out, out
    assert world.server_object(hello) is not None
    assert world.server_uuid in world.whereis(hello, on_server=True)
    world.annex("drop", "hello.txt")
    world.annex("get", "hello.txt", env=ao)
    assert (world.client / "hello.txt").read_bytes() == FILES["hello.txt"]
    assert_server_consistent(world)


def test_directory_elsewhere_refuses_everything(world: World) -> None:
    other = world.env.srv / "other.git"
    elsewhere = world.env.with_server(GIT_ANNEX_SHELL_DIRECTORY=str(other))
    world.annex("drop", "with space.txt")
    before_main = _server_main(world)
    before_objects = sorted(p.name for p in (world.repo / "annex" / "objects").rglob("*"))
    checks = [
        ["git", "annex", "get", "with space.txt"],
        ["git", "annex", "drop", "--from", "origin", "hello.txt"],
        ["git", "annex", "copy", "--to", "origin", BIG_NAME],
        ["git", "fetch", "origin"],
        ["git", "push", "origin", "main"],
    ]
    _commit(world, "refused")
    for args in checks:
        proc = elsewhere.run(args, cwd=world.client, check=False)
        assert proc.returncode != 0, (args, proc)
        assert "Only allowed to access" in proc.stdout + proc.stderr, (args, proc.stderr)
    assert _server_main(world) == before_main
    after_objects = sorted(p.name for p in (world.repo / "annex" / "objects").rglob("*"))
    assert after_objects == before_objects
    assert world.client_object(world.key("with space.txt")) is None


def test_directory_same_is_served(world: World) -> None:
    world.annex("drop", "with space.txt")
    for allowed in (str(world.repo), f"{world.repo}/"):
        same = world.env.with_server(GIT_ANNEX_SHELL_DIRECTORY=allowed)
        world.git("fetch", "-q", "origin", env=same)
        world.annex("get", "with space.txt", env=same)
        world.annex("drop", "with space.txt")  # unrestricted, for the next spelling
    world.annex("get", "with space.txt")
    assert (world.client / "with space.txt").read_bytes() == FILES["with space.txt"]


# -- both argv forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shell", "login"])
def test_shell_and_login_modes(world: World, mode: str) -> None:
    """/bin/sh as login shell gives our shell the multi-argument argv; as the login shell
    itself it gets `-c "<command>"` (without SSH_ORIGINAL_COMMAND)."""
    env = world.env.with_server(mode=mode)
    world.git("fetch", "-q", "origin", env=env)
    world.annex("copy", "--to", "origin", BIG_NAME, env=env)
    world.annex("drop", BIG_NAME, env=env)
    world.annex("get", BIG_NAME, env=env)
    assert (world.client / BIG_NAME).read_bytes() == big_content()
    first_words = {str(s["argv"][0]) for s in _p2p_sessions(world)}  # type: ignore[index]
    assert first_words == ({"p2pstdio"} if mode == "shell" else {"-c"})
    assert_server_consistent(world)
