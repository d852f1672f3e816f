"""Finding and opening the repository a command names, without searching upwards.

DIR comes from the client (the path part of its remote URL), so it is resolved exactly as
git-annex does (`/~/` and `~user/` prefixes, relative to HOME) and then opened as that
directory only: a bare repository, or a work tree with `.git` directly inside. No parent
directory is ever considered (CVE-2022-24765), and a repository owned by another user is
refused as git refuses it, unless `safe.directory` allows it.
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from git_remote_annexproxy.gitconfig import ConfigError, GitConfig, global_config_paths
from shell.errors import ShellError


@dataclass(frozen=True)
class Repo:
    """An opened repository: where its git data and annex data live, and its config."""

    path: Path  # the directory the client named, resolved
    gitdir: Path  # bare: == path; non-bare: path/.git (or where a gitfile points)
    bare: bool
    config: GitConfig

    @property
    def annexdir(self) -> Path:
        return self.gitdir / "annex"

    @property
    def uuid(self) -> str | None:
        return self.config.get("annex.uuid") or None


def resolve_dir(directory: str, home: str | None = None) -> Path:
    """Turn the DIR a client sent into an absolute path (annex-shell.md §1)."""
    if home is None:
        home = os.environ.get("HOME", "/")
    if directory.startswith("/~/") or directory == "/~":
        return Path(home, directory[3:])
    if directory.startswith("/~") or directory.startswith("~"):
        rest = directory[2:] if directory.startswith("/~") else directory[1:]
        user, _, tail = rest.partition("/")
        if not user:
            return Path(home, tail)
        try:
            user_home = pwd.getpwnam(user).pw_dir
        except KeyError:
            raise ShellError(f"unknown user in directory {directory}") from None
        return Path(user_home, tail)
    return Path(home, directory)  # an absolute directory replaces home here


def _not_a_repo(path: Path) -> ShellError:
    return ShellError(
        f"failed to read git config of git repository in {socket.gethostname()} on {path}; "
        "perhaps this repository is not set up correctly or has moved"
    )


def _looks_like_gitdir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "config").is_file()


def _gitfile_target(dotgit: Path) -> Path | None:
    """The directory a `.git` file (as in worktrees and submodules) points to."""
    try:
        with open(dotgit, "rb") as fh:
            text = fh.read(4096).decode("utf-8", "surrogateescape").strip()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    target = Path(text[len("gitdir:") :].strip())
    return target if target.is_absolute() else dotgit.parent / target


def _check_ownership(path: Path, config: GitConfig) -> None:
    """git's safe.directory rule: a repository owned by someone else is not ours to run."""
    try:
        owner = os.stat(path).st_uid
    except OSError:
        raise _not_a_repo(path) from None
    if owner == os.geteuid():
        return
    allowed = config.get_all("safe.directory")
    if "*" in allowed or str(path) in allowed or str(path).rstrip("/") + "/" in allowed:
        return
    raise ShellError(
        f"detected dubious ownership in repository at {path} (owned by uid {owner}); "
        "refusing to use it (see git-config safe.directory)"
    )


def open_repo(directory: str) -> Repo:
    """Open the repository DIR names, or raise the error git-annex gives."""
    path = resolve_dir(directory)
    try:
        st = os.stat(path)
    except OSError:
        raise _not_a_repo(path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _not_a_repo(path)
    dotgit = path / ".git"
    if dotgit.is_dir():
        gitdir, bare = dotgit, False
    elif dotgit.is_file():
        target = _gitfile_target(dotgit)
        if target is None:
            raise _not_a_repo(path)
        gitdir, bare = target, False
    else:
        gitdir, bare = path, True
    if not _looks_like_gitdir(gitdir):
        raise _not_a_repo(path)
    try:
        system_and_user = GitConfig.read(global_config_paths())
        _check_ownership(gitdir, system_and_user)
        config = GitConfig.read([*global_config_paths(), gitdir / "config"])
    except ConfigError as exc:
        raise ShellError(f"bad git config in {path}: {exc}") from None
    if bare and config.get_bool("core.bare", True) is False and (path / ".git").exists():
        bare = False
    return Repo(path=path, gitdir=gitdir, bare=bare, config=config)


def has_annex_branch(gitdir: Path) -> bool:
    """Whether a `git-annex` branch exists locally or as any `*/git-annex` ref.

    Read from the ref files directly: this runs inside `configlist`, which must stay cheap.
    """
    refs = gitdir / "refs"
    if (refs / "heads" / "git-annex").is_file():
        return True
    for pattern in ("heads/*/git-annex", "remotes/*/git-annex"):
        if any(p.is_file() for p in refs.glob(pattern)):
            return True
    try:
        with open(gitdir / "packed-refs", "rb") as fh:
            for line in fh:
                name = line.rstrip(b"\n").partition(b" ")[2]
                if name == b"refs/heads/git-annex" or (
                    name.startswith(b"refs/") and name.endswith(b"/git-annex")
                ):
                    return True
    except FileNotFoundError:
        pass
    return False
