"""`git annexproxy add` against the real git-annex 10.20261026 as the oracle.

Our command always runs on a PATH without git-annex. The same files are added by the real
`git annex add` in a second repository; keys, symlink targets, staged entries and object
modes must be identical. Then the real git-annex, in our repository, must accept what it
finds: `fsck` all ok, `whereis` shows the client here, `info` works, and a later `git annex
add` has nothing to do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import GITCONFIG, SCRUBBED_NAMES, SCRUBBED_PREFIXES

from git_remote_annexproxy.annexadd import extension
from git_remote_annexproxy.annexlog import location_log_path
from git_remote_annexproxy.keys import Key

SCRIPT = Path(sys.executable).parent / "git-annexproxy"

FILES: dict[str, bytes] = {
    "a.txt": b"hello",
    "sp ace.tar.gz": b"a tarball, say",
    "ünï.çödé": b"unicode name, long extension",
    "empty": b"",
    "-lead.txt": b"a leading dash",
    "-dir/--x.y": b"dashes everywhere",
    "d/sub dir/x.verylongext": b"no extension kept",
    "d/big.bin": os.urandom(3 << 20),
    "d/dup.txt": b"hello",  # the same key as a.txt
    "d/run.sh": b"#!/bin/sh\necho hi\n",  # executable
    "noext": b"no extension at all",
    "a.b.c.": b"trailing dot",
    ".hidden": b"a dotfile goes to git",
    ".dd/inside": b"so does a file in a dot directory",
    "x/.dot.tar.gz": b"and a dotfile with extensions",
}
# Names for the key rules alone (git annex calckey is the oracle).
NAMES = [
    *FILES, "x.tar.gz", "y.tar.a b.gz", "x.a-b.gz", "x.12345.gz", "x.ab.cdefg", "a.ÄÄÄ.b",
    "a.Äb.c", "x.ÄB", "x.é", "..x.y", ".tar", ".a.b", "a..b..c", "x.a.b.c.d", "x.gz.",
    "x.A1", "x.TXT", "x.a_b.c", "x.", "x..y", "x.1.2", "a.b.c.d.e", "x.abcd", "x.abcde",
]  # fmt: skip

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def envs(tmp_path: Path, annex_bin: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(ours, annex): ours has only git and git-annexproxy on PATH, annex the real one."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(GITCONFIG)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SCRUBBED_PREFIXES) and k not in SCRUBBED_NAMES
    }
    base["HOME"] = str(home)
    only = tmp_path / "only-bin"
    only.mkdir()
    (only / SCRIPT.name).symlink_to(SCRIPT)
    ours = dict(base, PATH=f"{only}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert shutil.which("git-annex", path=ours["PATH"]) is None
    annex = dict(base, PATH=f"{annex_bin}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return ours, annex


def run(cwd: Path, env: dict[str, str], *args: str, ok: bool = True) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if (proc.returncode == 0) != ok:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"--- stderr\n{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def make_repo(path: Path, env: dict[str, str], files: dict[str, bytes]) -> Path:
    run(path.parent, env, "git", "init", "-q", str(path))
    write(path, files)
    return path


def write(repo: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
        if name.endswith(".sh"):
            (repo / name).chmod(0o755)


def snapshot(repo: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """(staged entries without stat data, symlink targets, objects with their modes)."""
    staged = subprocess.run(
        ["git", "ls-files", "-s", "-z"], cwd=repo, capture_output=True, check=True
    ).stdout.decode()
    links = {
        str(p.relative_to(repo)): os.readlink(p)
        for p in repo.rglob("*")
        if p.is_symlink() and ".git" not in p.parts
    }
    objects = sorted(
        f"{oct(p.lstat().st_mode)} {p.relative_to(repo / '.git/annex/objects')}"
        for p in (repo / ".git/annex/objects").rglob("*")
    )
    return sorted(staged.split("\0")), links, objects


def test_extension_rules_match_git_annex(
    tmp_path: Path, envs: tuple[dict[str, str], dict[str, str]]
) -> None:
    _, annex = envs
    repo = make_repo(tmp_path / "calc", annex, {})
    run(repo, annex, "git", "annex", "init", "-q")
    names = tmp_path / "names"
    names.mkdir()
    for i, name in enumerate(NAMES):
        file = names / f"{i}" / name.replace("/", "_")
        file.parent.mkdir()
        file.write_bytes(b"1")
        for maxlen in (4, 6):
            key = run(
                repo, annex, "git", "-c", f"annex.maxextensionlength={maxlen}",
                "annex", "calckey", str(file),
            ).strip()  # fmt: skip
            theirs = key.partition("--")[2][64:]
            assert extension(file.name, maxlen) == theirs, (name, maxlen)


def test_add_matches_git_annex_and_git_annex_accepts_it(
    tmp_path: Path, envs: tuple[dict[str, str], dict[str, str]]
) -> None:
    ours_env, annex = envs
    ours = make_repo(tmp_path / "ours", ours_env, FILES)
    theirs = make_repo(tmp_path / "theirs", annex, FILES)
    run(theirs, annex, "git", "annex", "init", "-q")
    run(theirs, annex, "git", "annex", "add", ".")

    out = run(ours / "d", ours_env, "git", "annexproxy", "add", "..")  # never initialised
    lines = out.splitlines()
    assert "add a.txt ok" in lines
    assert "add d/big.bin ok" in lines
    assert "add -lead.txt ok" in lines
    assert "add .hidden (dotfile; adding content to git repository) ok" in lines
    annexed = sum(len(data) for name, data in FILES.items() if "/." not in f"/{name}")
    assert lines[-1] == f"add: {len(FILES)} files, {annexed} bytes, 0 failed"

    assert snapshot(ours) == snapshot(theirs)
    assert (ours / "d/big.bin").read_bytes() == FILES["d/big.bin"]
    assert "??" not in run(ours, ours_env, "git", "status", "--porcelain", "--untracked-files=all")

    uuid = run(ours, ours_env, "git", "config", "annex.uuid").strip()
    assert run(ours, ours_env, "git", "config", "annex.version").strip() == "10"
    assert uuid in run(ours, ours_env, "git", "show", "git-annex:uuid.log")
    key = os.path.basename(os.readlink(ours / "a.txt"))
    log = run(ours, ours_env, "git", "show", f"git-annex:{_log_path(key)}")
    assert log.split()[1:] == ["1", uuid]

    fsck = run(ours, annex, "git", "annex", "fsck")
    assert fsck.count(" ok") >= 12 and "fail" not in fsck
    where = run(ours, annex, "git", "annex", "whereis", "d/big.bin")
    assert f"{uuid} -- " in where and "[here]" in where
    run(ours, annex, "git", "annex", "info")
    assert "add " not in run(ours, annex, "git", "annex", "add", ".")
    assert (
        run(ours, annex, "git", "status", "--porcelain", "--untracked-files=all").count("??") == 0
    )
    assert run(ours, annex, "git", "config", "annex.uuid").strip() == uuid


def _log_path(key: str) -> str:
    return location_log_path(Key.parse(key))


def test_largefiles_and_dotfiles_decided_as_git_annex_does(
    tmp_path: Path, envs: tuple[dict[str, str], dict[str, str]]
) -> None:
    ours_env, annex = envs
    files = {
        "small.txt": b"tiny",
        "large.txt": b"x" * 100,
        "keep/large.txt": b"y" * 100,
        "w.bin": b"z" * 100,
        "v.bin": b"v" * 3,
        ".dot": b"d" * 100,
        ".gitattributes": b"*.bin annex.largefiles=anything\n",
    }
    expr = "largerthan=10b and not include=keep/*"
    for name in ("ours", "theirs"):
        env = ours_env if name == "ours" else annex
        repo = make_repo(tmp_path / name, env, files)
        run(repo, env, "git", "config", "annex.dotfiles", "true")
        run(repo, env, "git", "config", "annex.largefiles", expr)
        if name == "theirs":
            run(repo, env, "git", "annex", "init", "-q")
            run(repo, env, "git", "annex", "add", ".")
        else:
            out = run(repo, env, "git", "annexproxy", "add", ".")
            assert "add small.txt (non-large file; adding content to git repository) ok" in out
    assert snapshot(tmp_path / "ours") == snapshot(tmp_path / "theirs")
    staged = snapshot(tmp_path / "ours")[0]
    assert any(e.startswith("120000") and e.endswith("\t.dot") for e in staged)
    assert any(e.startswith("100644") and e.endswith("\tkeep/large.txt") for e in staged)

    # .gitattributes applies when git config says nothing; config.log (git annex config)
    # when neither does.
    for repo, env in ((tmp_path / "ours", ours_env), (tmp_path / "theirs", annex)):
        run(repo, env, "git", "config", "--unset", "annex.largefiles")
        write(repo, {"u.bin": b"u", "t.txt": b"t" * 100})
    run(
        tmp_path / "theirs", annex, "git", "annex", "config", "--set", "annex.largefiles", "nothing"
    )
    run(tmp_path / "ours", annex, "git", "annex", "config", "--set", "annex.largefiles", "nothing")
    run(tmp_path / "theirs", annex, "git", "annex", "add", "u.bin", "t.txt")
    run(tmp_path / "ours", ours_env, "git", "annexproxy", "add", "u.bin", "t.txt")
    assert snapshot(tmp_path / "ours")[0] == snapshot(tmp_path / "theirs")[0]


def test_adding_to_a_repository_git_annex_made(
    tmp_path: Path, envs: tuple[dict[str, str], dict[str, str]]
) -> None:
    ours_env, annex = envs
    repo = make_repo(tmp_path / "repo", annex, {"old.txt": b"old", "git.txt": b"in git"})
    run(repo, annex, "git", "annex", "init", "-q", "theirs")
    run(repo, annex, "git", "-c", "annex.largefiles=exclude=git.txt", "annex", "add", ".")
    write(repo, {"u.dat": b"unlocked content"})
    run(repo, annex, "git", "-c", "annex.addunlocked=true", "annex", "add", "u.dat")
    run(repo, annex, "git", "commit", "-qm", "by git-annex")
    uuid = run(repo, annex, "git", "config", "annex.uuid").strip()
    old = (repo / "old.txt").resolve()
    before = old.stat()

    write(repo, {"new.txt": b"new", "copy-of-old.txt": b"old", "git.txt": b"in git, changed"})
    (repo / "u.dat").write_bytes(b"changed unlocked content")
    out = run(
        repo, ours_env, "git", "annexproxy", "add", "--json", "old.txt", ".", "nothere", ok=False
    )
    records = {r["file"]: r for r in map(json.loads, out.splitlines()[:-3])}
    assert set(records) == {"new.txt", "copy-of-old.txt", "git.txt", "u.dat", "nothere"}
    assert records["nothere"]["error"] == "not found"
    assert records["u.dat"]["success"] is False
    assert records["git.txt"]["success"] and records["git.txt"]["key"].startswith("SHA256E-s15--")
    assert "add nothere: not found" in out
    assert out.splitlines()[-1] == "add: 3 files, 21 bytes, 2 failed"

    # The existing object was used as it is (same inode), not re-added.
    assert (repo / "copy-of-old.txt").resolve() == old and old.stat().st_ino == before.st_ino
    assert run(repo, ours_env, "git", "config", "annex.uuid").strip() == uuid
    fsck = run(repo, annex, "git", "annex", "fsck")
    assert "fail" not in fsck and "new.txt" in fsck
    assert "[here]" in run(repo, annex, "git", "annex", "whereis", "new.txt")


def test_errors_are_one_line(tmp_path: Path, envs: tuple[dict[str, str], dict[str, str]]) -> None:
    ours_env, _ = envs
    repo = make_repo(tmp_path / "repo", ours_env, {"f.txt": b"f"})
    out = run(
        repo, ours_env, "git", "-c", "annex.largefiles=bogus", "annexproxy", "add", ".", ok=False
    )
    assert (
        out
        == 'fatal: bad annex.largefiles configuration in git config: Parse failure: near "bogus"\n'
    )
    out = run(
        repo,
        ours_env,
        "git",
        "-c",
        "annex.largefiles=mimetype=text/*",
        "annexproxy",
        "add",
        ".",
        ok=False,
    )
    assert out.startswith("fatal: annex.largefiles term mimetype=text/* ")
    out = run(repo, ours_env, "git", "annexproxy", "add", "../elsewhere", ok=False)
    assert out.startswith("fatal: ../elsewhere: outside repository")
    assert (repo / "f.txt").read_bytes() == b"f" and not (repo / ".git/annex").exists()
    out = run(repo, ours_env, "git", "annexproxy", "add", "-q", "--", "f.txt")
    assert out == "add: 1 files, 1 bytes, 0 failed\n"


def test_annex_on_another_filesystem(
    tmp_path: Path, envs: tuple[dict[str, str], dict[str, str]]
) -> None:
    """The git directory elsewhere (--separate-git-dir on /dev/shm): no rename is possible,
    the content is copied through the store's receive sequence instead."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem at /dev/shm")
    ours_env, annex = envs
    gitdir = Path(tempfile.mkdtemp(dir=shm, prefix="annexadd-"))
    try:
        repo = tmp_path / "repo"
        run(tmp_path, ours_env, "git", "init", "-q", f"--separate-git-dir={gitdir}", str(repo))
        write(repo, {"d/run.sh": b"#!/bin/sh\n", "a.txt": b"hello"})
        run(repo, ours_env, "git", "annexproxy", "add", ".")
        assert (repo / "d/run.sh").is_symlink() and (
            repo / "d/run.sh"
        ).read_bytes() == b"#!/bin/sh\n"
        assert oct((repo / "d/run.sh").stat().st_mode) == "0o100555"
        assert oct((repo / "a.txt").stat().st_mode) == "0o100444"
        assert not list((gitdir / "annex/tmp").iterdir())
        fsck = run(repo, annex, "git", "annex", "fsck")
        assert fsck.count(" ok") == 2 and "fail" not in fsck
    finally:
        for d in gitdir.rglob("*"):
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o755)
        shutil.rmtree(gitdir)
