"""Annexed files in a checkout: links and pointers as git-annex writes them, filling in
unlocked files, and restaging them so git sees no change. (Against git-annex itself in
tests/test_annexcmd.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.worktree import (
    AnnexedFile,
    annexed_files,
    key_from_keyfile,
    parse_link_or_pointer,
    populate,
    restage,
)

K = Key.parse("SHA256E-s6--5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03.txt")
# Every character keyFile escapes, in a URL key.
ODD = Key.parse("URL--http&c//ex.com/a%20b&c.txt")


@pytest.mark.parametrize("key", [K, ODD], ids=["sha", "url"])
def test_keyfile_round_trip(key: Key) -> None:
    assert "/" not in key.keyfile()
    assert key_from_keyfile(key.keyfile()) == key


def test_links_and_pointers() -> None:
    link = f"../../.git/annex/objects/pX/Z8/{K.keyfile()}/{K.keyfile()}"
    assert parse_link_or_pointer(link.encode()) == K
    assert parse_link_or_pointer(f"/annex/objects/{ODD.keyfile()}\r\n".encode()) == ODD
    assert parse_link_or_pointer(f"/annex/objects/{K}\nmore lines\n".encode()) == K
    assert parse_link_or_pointer(b"annex/objects/" + str(K).encode()) is None  # no leading /
    assert parse_link_or_pointer(b"/annex/objects/not a key") is None
    assert parse_link_or_pointer(b"hello\n/annex/objects/" + str(K).encode()) is None


def git(repo: Path, *args: str) -> str:
    who = {
        f"GIT_{r}_{f}": v
        for r in ("AUTHOR", "COMMITTER")
        for f, v in (("NAME", "t"), ("EMAIL", "t@t"))
    }
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", **who}
    return subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout as git-annex leaves it: a locked file, an unlocked (executable) one, a
    plain git file and a file that only looks like a pointer to git-annex after the fact."""
    r = tmp_path / "repo"
    git(tmp_path, "init", "--quiet", str(r))
    (r / "d").mkdir()
    os.symlink(f"../.git/annex/objects/pX/Z8/{K.keyfile()}/{K.keyfile()}", r / "d/locked.txt")
    (r / "unlocked.sh").write_text(f"/annex/objects/{K.keyfile()}\n")
    (r / "unlocked.sh").chmod(0o755)
    (r / "plain.txt").write_text("not annexed\n")
    git(r, "add", ".")
    git(r, "commit", "--quiet", "-m", "files")
    return r


def test_annexed_files_are_found_in_scope(repo: Path) -> None:
    gitdir = repo / ".git"
    matched: set[str] = set()
    found = {f.path: f for f in annexed_files(repo, gitdir, ["", "nosuch"], matched)}
    assert set(found) == {"d/locked.txt", "unlocked.sh"}
    assert (found["d/locked.txt"].key, found["d/locked.txt"].unlocked) == (K, False)
    assert (found["unlocked.sh"].unlocked, found["unlocked.sh"].mode) == (True, 0o100755)
    assert matched == {""}
    assert [f.path for f in annexed_files(repo, gitdir, ["d"])] == ["d/locked.txt"]
    assert list(annexed_files(repo, gitdir, ["plain.txt"])) == []


def test_populate_and_restage_leave_git_status_clean(repo: Path, tmp_path: Path) -> None:
    obj = tmp_path / "object"
    obj.write_bytes(b"hello\n")
    f = AnnexedFile("unlocked.sh", K, True, 0o100755)
    done = populate(repo, f, obj)
    assert done is not None
    assert (repo / "unlocked.sh").read_bytes() == b"hello\n"
    assert os.access(repo / "unlocked.sh", os.X_OK)
    assert git(repo, "status", "--porcelain") == " M unlocked.sh\n"
    assert restage(repo, repo / ".git", [done]) is None
    assert git(repo, "status", "--porcelain") == ""
    # The index still holds the pointer: nothing of the content went into git.
    assert git(repo, "show", ":unlocked.sh") == f"/annex/objects/{K.keyfile()}\n"
    # No longer a pointer: found no more, and never overwritten.
    assert list(annexed_files(repo, repo / ".git", ["unlocked.sh"])) == []
    assert populate(repo, f, obj) is None


def test_a_file_changed_by_the_user_is_left_alone(repo: Path, tmp_path: Path) -> None:
    obj = tmp_path / "object"
    obj.write_bytes(b"hello\n")
    f = AnnexedFile("unlocked.sh", K, True, 0o100755)
    done = populate(repo, f, obj)
    assert done is not None
    (repo / "unlocked.sh").write_bytes(b"edited by the user\n")
    assert restage(repo, repo / ".git", [done]) is None
    assert git(repo, "status", "--porcelain") == " M unlocked.sh\n"

    (repo / "unlocked.sh").write_text("my own notes about /annex/objects/ layouts\n")
    assert populate(repo, f, obj) is None
    assert (repo / "unlocked.sh").read_text().startswith("my own notes")
