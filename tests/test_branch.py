"""Tests for git_remote_annexproxy.branch against real git and the real git-annex binary.

Every test works in its own repositories under tmp_path, with HOME pointing there, so the
git identity and config are the test's own.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_annexlog as vectors
from dulwich.objects import ObjectID

from git_remote_annexproxy import annexlog
from git_remote_annexproxy.branch import AnnexBranch, default_description, initialize
from git_remote_annexproxy.keys import Key

ABC = b"abc"
ABC_KEY = Key.parse(
    "SHA256E-s3--ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.txt"
)
K_UNDERSCORE = Key.parse("SHA256E-s3--abc_def.txt")
K_OTHER = Key.parse("SHA256E-s1--x")
A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"


def _git_annex_dir() -> Path:
    found = shutil.which("git-annex") or str(Path(sys.executable).parent / "git-annex")
    if not os.access(found, os.X_OK):
        pytest.skip("git-annex not installed")
    return Path(found).parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated HOME with a git identity, and git-annex on PATH."""
    monkeypatch.setenv("PATH", f"{_git_annex_dir()}{os.pathsep}{os.environ['PATH']}")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("USER", "tester")
    for var in list(os.environ):
        if var.startswith(("GIT_", "XDG_CONFIG_HOME", "EMAIL")) and var != "GIT_CONFIG_NOSYSTEM":
            monkeypatch.delenv(var)
    (home / ".gitconfig").write_text(
        "[user]\n\tname = Tester\n\temail = tester@example.com\n[init]\n\tdefaultBranch = main\n"
    )
    return home


def run(
    *args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def annex(repo: Path, *args: str, clock: str | None = None) -> subprocess.CompletedProcess[str]:
    """Real git-annex, leaving its journal uncommitted; ``clock`` pins its vector clock."""
    env = {"GIT_ANNEX_VECTOR_CLOCK": clock} if clock else None
    return run("git", "-c", "annex.alwayscommit=false", "annex", *args, cwd=repo, env=env)


def bare_annex(home: Path, name: str = "srv.git", description: str = "server") -> Path:
    repo = home / name
    run("git", "init", "-q", "--bare", str(repo), cwd=home)
    run("git", "annex", "init", "-q", description, cwd=repo)
    return repo


def branch_of(repo: Path) -> AnnexBranch:
    return AnnexBranch(repo, repo / "annex")


def uuid_of(repo: Path) -> str:
    return run("git", "config", "annex.uuid", cwd=repo).stdout.strip()


def show(repo: Path, path: str) -> str:
    return run("git", "show", f"git-annex:{path}", cwd=repo).stdout


def journal(repo: Path) -> list[str]:
    d = repo / "annex" / "journal"
    return sorted(os.listdir(d)) if d.exists() else []


def present(repo: Path, key: Key, uuid: str) -> bool:
    rc = run("git", "annex", "readpresentkey", str(key), uuid, cwd=repo, check=False).returncode
    assert rc in (0, 1)
    return rc == 0


def real_commit(repo: Path) -> None:
    """Make the real git-annex commit its journal (setpresentkey alone leaves it there)."""
    run("git", "annex", "merge", cwd=repo)
    assert journal(repo) == []


def assert_index_in_step(repo: Path) -> None:
    """git-annex's own index and index.lck describe the branch head, as after its commits."""
    head = run("git", "rev-parse", "refs/heads/git-annex", cwd=repo).stdout.strip()
    assert (repo / "annex" / "index.lck").read_text().strip() == head
    diff = run(
        "git",
        "diff-index",
        "--cached",
        "--name-only",
        head,
        cwd=repo,
        env={"GIT_INDEX_FILE": str(repo / "annex" / "index")},
    )
    assert diff.stdout == ""


# --- (a) our log + commit, seen by git-annex ------------------------------------------


def test_log_presence_seen_by_real_git_annex(home: Path) -> None:
    repo = bare_annex(home)
    u = uuid_of(repo)
    # The object itself, where git-annex keeps it in a bare repository.
    objdir = repo / "annex" / "objects" / ABC_KEY.hashdir_lower() / ABC_KEY.keyfile()
    objdir.mkdir(parents=True)
    (objdir / ABC_KEY.keyfile()).write_bytes(ABC)

    b = branch_of(repo)
    b.log_presence(ABC_KEY, u, present=True)
    path = annexlog.location_log_path(ABC_KEY)
    assert journal(repo) == [annexlog.journal_name(path)]
    assert b.commit() is True
    assert journal(repo) == []
    assert re.fullmatch(rf"[0-9]+s 1 {u}\n", show(repo, path))
    assert_index_in_step(repo)

    whereis = run("git", "annex", "whereis", "--key", str(ABC_KEY), cwd=repo).stdout
    assert f"{u} -- server [here]" in whereis
    assert present(repo, ABC_KEY, u)
    fsck = run("git", "annex", "fsck", "--key", str(ABC_KEY), cwd=repo)
    assert "fixing location log" not in fsck.stdout + fsck.stderr
    assert "(checksum...) ok" in fsck.stdout

    b.log_presence(ABC_KEY, u, present=False)
    assert b.commit() is True
    assert not present(repo, ABC_KEY, u)
    # fsck now finds the object although the log says missing, and repairs the log.
    fsck = run("git", "annex", "fsck", "--key", str(ABC_KEY), cwd=repo)
    assert "fixing location log" in fsck.stdout


def test_no_op_changes_write_nothing(home: Path) -> None:
    repo = bare_annex(home)
    b = branch_of(repo)
    assert b.commit() is False
    # A UUID never logged for the key, recorded missing: git-annex still writes its "0"
    # line (checked with setpresentkey), so we do too.
    b.log_presence(K_OTHER, A, present=False)
    assert journal(repo) != []
    assert b.commit() is True
    b.log_presence(K_OTHER, A, present=False)
    assert journal(repo) == []  # already missing: maybeAddLog writes nothing
    b.change("uuid.log", lambda old: old or b"")
    assert journal(repo) == []


def test_commit_creates_missing_branch_first(home: Path) -> None:
    repo = home / "plain.git"
    run("git", "init", "-q", "--bare", str(repo), cwd=home)
    b = branch_of(repo)
    assert b.read("uuid.log") is None
    b.log_presence(K_OTHER, A, present=True)
    assert b.commit() is True
    log = run("git", "log", "--format=%s|%P", "git-annex", cwd=repo).stdout.splitlines()
    assert [x.split("|")[0] for x in log] == ["update", "branch created"]
    assert log[1].endswith("|")  # a root commit, as git-annex makes it
    assert show(repo, annexlog.location_log_path(K_OTHER)).endswith(f" 1 {A}\n")


def test_cluster_uuid_not_logged(home: Path) -> None:
    repo = bare_annex(home)
    b = branch_of(repo)
    b.log_presence(K_OTHER, "ac41e7d0-ed00-86fd-acbf-9fd58f6e46eb", present=True)
    assert journal(repo) == []


# --- (b) journal files written by git-annex ------------------------------------------------


def test_commit_takes_real_journal(home: Path) -> None:
    repo = bare_annex(home)
    for key, u in ((K_UNDERSCORE, A), (K_OTHER, B)):
        annex(repo, "setpresentkey", str(key), u, "1")
    names = [annexlog.journal_name(annexlog.location_log_path(k)) for k in (K_UNDERSCORE, K_OTHER)]
    assert journal(repo) == sorted(names)
    assert "2ff_78e_SHA256E-s3--abc__def.txt.log" in names

    b = branch_of(repo)
    assert annexlog.present_uuids(b.read(annexlog.location_log_path(K_UNDERSCORE)) or b"") == {A}
    # A change on top of a journalled file sees the journal, not the (empty) branch.
    b.log_presence(K_UNDERSCORE, B, present=True)
    assert b.commit() is True
    assert journal(repo) == []
    assert_index_in_step(repo)
    got = show(repo, annexlog.location_log_path(K_UNDERSCORE)).encode()
    assert annexlog.present_uuids(got) == {A, B}
    assert present(repo, K_UNDERSCORE, A)
    assert present(repo, K_UNDERSCORE, B)
    assert present(repo, K_OTHER, B)
    assert not present(repo, K_OTHER, A)


def test_read_overlays_journal_and_drops_incomplete_line(home: Path) -> None:
    repo = bare_annex(home)
    b = branch_of(repo)
    assert b.read("uuid.log") == show(repo, "uuid.log").encode()
    assert b.read("no/such/file.log") is None
    name = annexlog.journal_name(annexlog.location_log_path(K_OTHER))
    (repo / "annex" / "journal" / name).write_bytes(f"1s 1 {A}\n2s 0 {A}".encode())
    assert b.read(annexlog.location_log_path(K_OTHER)) == f"1s 1 {A}\n".encode()
    with pytest.raises(ValueError):
        b.read("../escape")


# --- (c) a later real commit keeps our lines --------------------------------------------


def test_real_commit_after_ours_keeps_lines(home: Path) -> None:
    repo = bare_annex(home)
    annex(repo, "setpresentkey", str(ABC_KEY), A, "1", clock="1700000000")
    real_commit(repo)

    b = branch_of(repo)
    os.environ["GIT_ANNEX_VECTOR_CLOCK"] = "1700000100"
    try:
        b.log_presence(ABC_KEY, A, present=False)
        b.log_presence(K_OTHER, B, present=True)
    finally:
        del os.environ["GIT_ANNEX_VECTOR_CLOCK"]
    assert b.commit() is True
    ours = show(repo, annexlog.location_log_path(ABC_KEY))
    assert ours == f"1700000100s 0 {A}\n"

    annex(repo, "setpresentkey", str(K_UNDERSCORE), A, "1")
    real_commit(repo)
    log = run("git", "log", "--format=%s", "git-annex", cwd=repo).stdout.split("\n")
    assert log[:2] == ["update", "update"]
    # Exactly our bytes: git-annex's index was kept in step, so no union-merge residue.
    assert show(repo, annexlog.location_log_path(ABC_KEY)) == ours
    assert not present(repo, ABC_KEY, A)
    assert present(repo, K_OTHER, B)
    assert present(repo, K_UNDERSCORE, A)


def test_real_commit_after_push_and_ours(home: Path) -> None:
    """The branch moved under git-annex's index (a push), then we committed: git-annex's
    union merge must keep everything, and what the logs say must not change."""
    repo = bare_annex(home)
    annex(repo, "setpresentkey", str(ABC_KEY), A, "1", clock="1700000000")
    real_commit(repo)
    clone = home / "clone"
    run("git", "clone", "-q", str(repo), str(clone), cwd=home)
    run("git", "annex", "init", "-q", "client", cwd=clone)
    run("git", "annex", "setpresentkey", str(K_OTHER), B, "1", cwd=clone)
    run("git", "annex", "merge", cwd=clone)
    run("git", "push", "-q", "origin", "git-annex", cwd=clone)
    lck = (repo / "annex" / "index.lck").read_text().strip()
    assert lck != run("git", "rev-parse", "git-annex", cwd=repo).stdout.strip()

    b = branch_of(repo)
    os.environ["GIT_ANNEX_VECTOR_CLOCK"] = "1700000100"
    try:
        b.log_presence(ABC_KEY, A, present=False)
    finally:
        del os.environ["GIT_ANNEX_VECTOR_CLOCK"]
    assert b.commit() is True
    # The index was stale, so we left it (and index.lck) for git-annex to merge.
    assert (repo / "annex" / "index.lck").read_text().strip() == lck

    annex(repo, "setpresentkey", str(K_UNDERSCORE), A, "1")
    real_commit(repo)
    lines = show(repo, annexlog.location_log_path(ABC_KEY)).splitlines()
    assert f"1700000100s 0 {A}" in lines
    assert not present(repo, ABC_KEY, A)
    assert present(repo, K_OTHER, B)
    assert present(repo, K_UNDERSCORE, A)
    assert "client" in show(repo, "uuid.log")
    assert_index_in_step(repo)


# --- live oracles for the log formats -------------------------------------------------


def test_presence_sequence_matches_binary(home: Path) -> None:
    """Random operations applied by git-annex and by add_presence give the same bytes."""
    repo = bare_annex(home)
    name = annexlog.journal_name(annexlog.location_log_path(K_UNDERSCORE))
    jfile = repo / "annex" / "journal" / name
    jfile.write_bytes(b"junk\n+1600000000.250s 1 " + B.encode() + b"\r\n")
    rng = random.Random(4)
    uuids = [A, B, "cccccccc-0000-4000-8000-000000000003"]
    for _ in range(12):
        u, status = rng.choice(uuids), rng.choice("01")
        clock = rng.choice(["1500000000", "1600000000.5", "1700000000", "1600000000.25"])
        before = jfile.read_bytes()
        annex(repo, "setpresentkey", str(K_UNDERSCORE), u, status, clock=clock)
        now = annexlog.VectorClock.parse(clock.encode())
        assert now is not None
        mine = annexlog.add_presence(before, u, status == "1", now)
        assert jfile.read_bytes() == mine, (u, status, clock, before)


def test_describe_matches_binary(home: Path) -> None:
    repo = bare_annex(home)
    u = uuid_of(repo)
    jfile = repo / "annex" / "journal" / "uuid.log"
    messy = (
        f"{u} first  desc timestamp=2000000000s\n{B} b timestamp=1500000000s\n"
        f"{B} b2 timestamp=1500000000s\nffff\neeee  x  y  timestamp=7.50s\n"
    ).encode()
    jfile.write_bytes(messy)
    annex(repo, "describe", "here", "new  one", clock="1700000000")
    assert jfile.read_bytes() == annexlog.describe_uuid(messy, u, "new  one", 1700000000)


# --- the recorded vectors of test_annexlog.py, rerun --------------------------------------
#
# test_annexlog.py checks our code against fixed vectors that say what git-annex writes;
# here git-annex itself runs on each of them, so a vector that is not (or no longer) what
# git-annex does fails in CI instead of pinning our code to our own reading.

VECTOR_UUID = vectors.A


def _journal_file(repo: Path, key: Key = K_UNDERSCORE) -> Path:
    name = annexlog.journal_name(annexlog.location_log_path(key))
    return repo / "annex" / "journal" / name


def _real_presence(repo: Path, old: bytes | None, uuid: str, present: bool, clock: str) -> bytes:
    """What git-annex's setpresentkey makes of the location log `old` at clock `clock`."""
    jfile = _journal_file(repo)
    jfile.parent.mkdir(exist_ok=True)
    if old is None:
        jfile.unlink(missing_ok=True)
    else:
        jfile.write_bytes(old)
    annex(repo, "setpresentkey", str(K_UNDERSCORE), uuid, "1" if present else "0", clock=clock)
    return jfile.read_bytes()


def test_presence_vectors_are_git_annexs(home: Path) -> None:
    repo = bare_annex(home)
    old, uuid, present, seconds, wrote = vectors.EQUAL_CLOCK
    rows = [*vectors.PRESENCE_ORACLE, (old, uuid, present, str(seconds), wrote)]
    for old, uuid, present, now, wrote in rows:
        assert _real_presence(repo, old, uuid, present, now) == wrote, (old, uuid, present, now)


def test_clock_vectors_are_git_annexs(home: Path) -> None:
    """A clock git-annex reads shows in what it writes next: a status change at an older
    candidate clock is logged at the old line's clock + 1 s; a line whose clock it cannot
    read is dropped, and the candidate clock is used."""
    repo = bare_annex(home)
    a = VECTOR_UUID.encode()
    candidate = "-100"
    for text, picos in vectors.CLOCK_PARSE:
        real = _real_presence(repo, text + b" 1 " + a + b"\n", VECTOR_UUID, False, candidate)
        assert real == annexlog.VectorClock(picos + 10**12).format() + b" 0 " + a + b"\n", text
    for text in vectors.CLOCK_REJECTS:
        real = _real_presence(repo, text + b" 1 " + a + b"\n", VECTOR_UUID, False, candidate)
        assert real == b"-100s 0 " + a + b"\n", text
    for picos, text in vectors.CLOCK_FORMAT:
        if picos >= 0:  # written as given in GIT_ANNEX_VECTOR_CLOCK
            real = _real_presence(repo, None, VECTOR_UUID, True, text[:-1].decode())
            assert real == text + b" 1 " + a + b"\n", picos
        else:  # the environment cannot carry it (git-annex reads "-0.5" as 0.5): one below
            older = annexlog.VectorClock(picos - 10**12).format()
            real = _real_presence(repo, older + b" 1 " + a + b"\n", VECTOR_UUID, False, candidate)
            assert real == text + b" 0 " + a + b"\n", picos


def test_newest_wins_vectors_are_git_annexs(home: Path) -> None:
    repo = bare_annex(home)
    jfile = _journal_file(repo)
    jfile.parent.mkdir(exist_ok=True)
    for data, expected in vectors.NEWEST_WINS:
        jfile.write_bytes(data)
        assert present(repo, K_UNDERSCORE, VECTOR_UUID) is expected, data


def _branch_paths(repo: Path) -> set[str]:
    real_commit(repo)
    return set(run("git", "ls-tree", "-r", "--name-only", "git-annex", cwd=repo).stdout.split())


def test_log_path_vectors_are_git_annexs(home: Path) -> None:
    repo = bare_annex(home)
    for key, path, journal_name in vectors.LOG_PATHS:
        annex(repo, "setpresentkey", key, VECTOR_UUID, "1")
        assert journal(repo) == [journal_name]
        assert path in _branch_paths(repo)


def test_journal_quirk_vectors_are_git_annexs(home: Path) -> None:
    repo = bare_annex(home)
    for name, path in vectors.JOURNAL_QUIRKS:
        (repo / "annex" / "journal").mkdir(exist_ok=True)
        (repo / "annex" / "journal" / name).write_bytes(b"x\n")
        assert path in _branch_paths(repo), name


def test_describe_vectors_are_git_annexs(home: Path) -> None:
    repo = bare_annex(home)
    jfile = repo / "annex" / "journal" / "uuid.log"
    jfile.parent.mkdir(exist_ok=True)
    jfile.write_bytes(vectors.MESSY_UUID_LOG)
    uuid, description, clock = vectors.DESCRIBE_MESSY
    annex(repo, "describe", uuid, description, clock=str(clock))
    assert jfile.read_bytes() == vectors.DESCRIBE_MESSY_WROTE
    uuid, description, clock = vectors.DESCRIBE_AGAIN
    annex(repo, "describe", uuid, description, clock=str(clock))
    assert vectors.DESCRIBE_AGAIN_LINE in jfile.read_bytes()


# --- (d) initialisation ---------------------------------------------------------------------


def _real_git_annex_shell(tmp: Path) -> Path:
    """The real git-annex-shell (the venv's may be ours): the multicall binary, by name."""
    spec = importlib.util.find_spec("git_annex")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the git-annex python package is not installed")
    binary = Path(next(iter(spec.submodule_search_locations))) / "git-annex"
    link = tmp / "realbin" / "git-annex-shell"
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(binary)
    return link


def _state(repo: Path) -> dict[str, object]:
    config = run("git", "config", "--file", "config", "--list", cwd=repo).stdout.splitlines()
    commits = run(
        "git", "log", "--format=%an <%ae>|%cn <%ce>|%P|%T|%B", "git-annex", cwd=repo
    ).stdout
    uuid_log = (repo / "annex" / "journal" / "uuid.log").read_text()
    uuid_log = re.sub(r"timestamp=[0-9]+s", "T", uuid_log.replace(uuid_of(repo), "UUID"))
    # uuid.log is sorted by UUID, and ours is random: compare the lines, not their order.
    uuid_log = "".join(sorted(uuid_log.splitlines(keepends=True)))
    return {
        "config": sorted(re.sub(r"=[0-9a-f-]{36}$", "=UUID", c) for c in config),
        "commits": commits,
        "annex": sorted(os.listdir(repo / "annex")),
        "journal": journal(repo),
        "uuid.log": uuid_log,
        "index": run(
            "git",
            "ls-files",
            "--stage",
            cwd=repo,
            env={"GIT_INDEX_FILE": str(repo / "annex" / "index")},
        ).stdout,
        "index.lck": (repo / "annex" / "index.lck").exists()
        and (repo / "annex" / "index.lck").read_text().strip()
        == run("git", "rev-parse", "git-annex", cwd=repo).stdout.strip(),
    }


@pytest.mark.parametrize("identity", [True, False])
def test_initialize_like_real_autoinit(home: Path, tmp_path: Path, identity: bool) -> None:
    if not identity:
        # No configured identity, as on a server: git guesses one from the user and host
        # name, and fails when the host name has no domain; git-annex then writes
        # user.name and user.email into the repository config. Either way we must match.
        # (user.useConfigOnly would make the real git-annex-shell fail outright.)
        (home / ".gitconfig").write_text("")
    shell = _real_git_annex_shell(tmp_path)
    real, ours = home / "real.git", home / "ours.git"
    for r in (real, ours):
        run("git", "init", "-q", "--bare", str(r), cwd=home)
    out = run(str(shell), "configlist", str(real), "--", "autoinit=1", "--", cwd=home).stdout
    assert out.startswith("annex.uuid=") and len(out.split("\n")[0]) == len("annex.uuid=") + 36

    u = initialize(ours, ours / "annex", description=default_description(ours))
    assert u == uuid_of(ours)
    want, got = _state(real), _state(ours)
    # git-annex also probes sqlite (annex/fsck/) and caches merged refs (mergedrefs); both
    # are made again whenever missing, and neither is branch state.
    assert isinstance(want["annex"], list)
    want["annex"] = [f for f in want["annex"] if f not in ("fsck", "mergedrefs")]
    got["uuid.log"] = str(got["uuid.log"]).replace("ours.git", "real.git")
    assert got == want
    cache = (ours / "annex" / "sentinal.cache").read_text()
    st = os.stat(ours / "annex" / "sentinal")
    assert cache.split(" ")[:2] == [str(st.st_ino), "0"]

    # Real git-annex is happy with the result.
    assert f"uuid: {u}" in run("git", "annex", "info", "--fast", "here", cwd=ours).stdout
    annex(ours, "setpresentkey", str(K_OTHER), u, "1")
    assert present(ours, K_OTHER, u)
    # Publish the journal (git-annex-shell leaves it there too) and let a client look.
    branch_of(ours).commit()
    (home / ".gitconfig").write_text("[user]\n\tname = C\n\temail = c@example.com\n")
    client = home / "client"
    run("git", "clone", "-q", str(ours), str(client), cwd=home)
    run("git", "annex", "init", "-q", "client", cwd=client)
    info = run("git", "annex", "info", "--fast", u, cwd=client).stdout
    assert f"description: {default_description(ours)}" in info
    assert run("git", "annex", "whereis", "--key", str(K_OTHER), cwd=client).returncode == 0


def test_initialize_after_push_like_real_autoinit(home: Path, tmp_path: Path) -> None:
    """A client pushed its git-annex branch into a bare repo with no annex.uuid yet."""
    shell = _real_git_annex_shell(tmp_path)
    client = home / "client"
    run("git", "init", "-q", str(client), cwd=home)
    run("git", "annex", "init", "-q", "client", cwd=client)
    real, ours = home / "real.git", home / "ours.git"
    for r in (real, ours):
        run("git", "init", "-q", "--bare", str(r), cwd=home)
        run("git", "push", "-q", str(r), "git-annex", cwd=client)
    run(str(shell), "configlist", str(real), cwd=home)  # the pushed branch triggers autoinit
    initialize(ours, ours / "annex", description=default_description(ours))
    want, got = _state(real), _state(ours)
    assert isinstance(want["annex"], list)
    want["annex"] = [f for f in want["annex"] if f not in ("fsck", "mergedrefs")]
    got["uuid.log"] = str(got["uuid.log"]).replace("ours.git", "real.git")
    assert got == want
    assert "branch created" in str(got["commits"])  # the client's, not a new one
    assert str(got["commits"]).count("branch created") == 1


def test_initialize_keeps_existing_uuid_and_description(home: Path) -> None:
    repo = bare_annex(home, description="kept")
    u = uuid_of(repo)
    assert initialize(repo, repo / "annex", description="other") == u
    assert annexlog.parse_uuid_log(branch_of(repo).read("uuid.log") or b"")[u] == "kept"


def test_default_description(home: Path) -> None:
    host = os.uname().nodename
    assert default_description(home / "a" / "x.git") == f"tester@{host}:~/a/x.git"
    assert default_description(Path("/srv/../srv/r.git")) == f"tester@{host}:/srv/r.git"


# --- (e) concurrency --------------------------------------------------------------------


def _writer(repo: str, prefix: str, n: int) -> None:
    b = AnnexBranch(Path(repo), Path(repo) / "annex")
    for i in range(n):
        b.log_presence(K_OTHER, f"{prefix}-{i:04d}", present=True)


def test_concurrent_changes_lose_nothing(home: Path) -> None:
    repo = bare_annex(home)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(repo), p, 100)) for p in ("p1", "p2")]
    for p in procs:
        p.start()
    # Real git-annex writes the same file meanwhile, under the same journal lock.
    for i in range(8):
        annex(repo, "setpresentkey", str(K_OTHER), f"real-{i}", "1")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    b = branch_of(repo)
    assert b.commit() is True
    got = annexlog.present_uuids(show(repo, annexlog.location_log_path(K_OTHER)).encode())
    expected = {f"p{j}-{i:04d}" for j in (1, 2) for i in range(100)}
    expected |= {f"real-{i}" for i in range(8)}
    assert got == expected
    assert present(repo, K_OTHER, "p2-0099")


def _committer(repo: str, n: int) -> None:
    b = AnnexBranch(Path(repo), Path(repo) / "annex")
    for i in range(n):
        b.log_presence(K_OTHER, f"ours-{i:03d}", present=True)
        b.commit()


def test_concurrent_commits_with_real_git_annex(home: Path) -> None:
    """Our commits and git-annex's interleave (same journal lock, index kept in step):
    every line reaches the branch, and the history is one line of commits."""
    repo = bare_annex(home)
    proc = multiprocessing.get_context("fork").Process(target=_committer, args=(str(repo), 30))
    proc.start()
    for i in range(6):
        annex(repo, "setpresentkey", str(K_OTHER), f"real-{i}", "1")
        run("git", "annex", "merge", cwd=repo)  # commits (our writer may add more meanwhile)
    proc.join(60)
    assert proc.exitcode == 0
    real_commit(repo)
    got = annexlog.present_uuids(show(repo, annexlog.location_log_path(K_OTHER)).encode())
    assert got == {f"ours-{i:03d}" for i in range(30)} | {f"real-{i}" for i in range(6)}
    parents = run("git", "log", "--format=%P", "git-annex", cwd=repo).stdout.split()
    assert len(parents) == len(set(parents))  # no merges, nothing forked off
    assert_index_in_step(repo)


def test_commit_retries_when_ref_moves(home: Path) -> None:
    """A push landing between our read of the head and our ref update is not lost."""
    repo = bare_annex(home)
    b = branch_of(repo)
    b.log_presence(K_OTHER, A, present=True)
    head = b.head
    moved = False

    def racing_head() -> ObjectID | None:
        nonlocal moved
        h = head()
        if not moved:
            moved = True
            # Another writer commits a new file on top of the branch.
            (home / "f").write_text(f"9s 1 {B}\n")
            blob = run("git", "hash-object", "-w", str(home / "f"), cwd=repo).stdout.strip()
            idx = str(home / "tmpindex")
            run("git", "read-tree", "git-annex", cwd=repo, env={"GIT_INDEX_FILE": idx})
            run(
                "git",
                "update-index",
                "--add",
                "--cacheinfo",
                f"100644,{blob},pushed.log",
                cwd=repo,
                env={"GIT_INDEX_FILE": idx},
            )
            tree = run("git", "write-tree", cwd=repo, env={"GIT_INDEX_FILE": idx}).stdout.strip()
            c = run(
                "git", "commit-tree", tree, "-p", "git-annex", "-m", "pushed", cwd=repo
            ).stdout.strip()
            run("git", "update-ref", "refs/heads/git-annex", c, cwd=repo)
        return h

    b.head = racing_head  # type: ignore[method-assign]
    assert b.commit() is True
    log = run("git", "log", "--format=%s", "git-annex", cwd=repo).stdout.split("\n")
    assert log[:2] == ["update", "pushed"]
    assert show(repo, "pushed.log") == f"9s 1 {B}\n"
    assert present(repo, K_OTHER, A)


# --- git-side details ---------------------------------------------------------------------


def test_reflog_hook_and_message_in_non_bare_repo(home: Path) -> None:
    repo = home / "work"
    run("git", "init", "-q", str(repo), cwd=home)
    run("git", "annex", "init", "-q", "work", cwd=repo)
    run("git", "config", "annex.commitmessage", "custom message", cwd=repo)
    gitdir = repo / ".git"
    hook = gitdir / "hooks" / "post-update-annex"
    hook.write_text(f"#!/bin/sh\necho ran >> {home / 'hook-ran'}\n")
    hook.chmod(0o755)
    reflog = gitdir / "logs" / "refs" / "heads" / "git-annex"
    before = reflog.read_text().splitlines()

    b = AnnexBranch(gitdir, gitdir / "annex")
    b.log_presence(K_OTHER, A, present=True)
    old = b.head()
    assert b.commit() is True
    new = b.head()
    assert old is not None and new is not None
    lines = reflog.read_text().splitlines()
    assert lines[:-1] == before
    # Same shape as the lines git wrote for git-annex's own commits (no message, no tab).
    assert re.fullmatch(
        r"[0-9a-f]{40} [0-9a-f]{40} Tester <tester@example.com> \d+ [+-]\d{4}", before[-1]
    )
    assert re.fullmatch(
        rf"{old.decode()} {new.decode()} Tester <tester@example.com> \d+ [+-]\d{{4}}", lines[-1]
    )
    message = run("git", "log", "-1", "--format=%B", "git-annex", cwd=repo).stdout
    assert message == "custom message\n\n"
    assert (home / "hook-ran").read_text() == "ran\n"
    assert present(repo, K_OTHER, A)


def test_commit_of_journal_already_on_branch(home: Path) -> None:
    """A run that died after moving the ref leaves the journal: it is cleared, no empty commit."""
    repo = bare_annex(home)
    b = branch_of(repo)
    b.log_presence(K_OTHER, A, present=True)
    name = annexlog.journal_name(annexlog.location_log_path(K_OTHER))
    saved = (repo / "annex" / "journal" / name).read_bytes()
    assert b.commit() is True
    head = b.head()
    (repo / "annex" / "journal" / name).write_bytes(saved)
    assert b.commit() is False
    assert b.head() == head
    assert journal(repo) == []
