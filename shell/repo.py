"""Finding and opening the repository a command names, without searching upwards.

DIR comes from the client (the path part of its remote URL), so it is resolved exactly as
git-annex does (`/~/` and `~user/` prefixes, relative to HOME; shell/dirpath.py, the path
GIT_ANNEX_SHELL_DIRECTORY was checked against) and then opened as that directory only: a
bare repository, or a work tree with `.git` directly inside. No parent directory is ever
considered (CVE-2022-24765), and a repository owned by another user is refused as git
refuses it, unless `safe.directory` allows it.
"""

from __future__ import annotations

import os
import stat

from git_remote_annexproxy.gitconfig import ConfigError, GitConfig, global_config_paths
from shell.dirpath import directory_path
from shell.errors import ShellError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from pathlib import Path


class Repo:
    """An opened repository: where its git data and annex data live, and its config.

    A plain class holding strings: dataclasses and pathlib each cost milliseconds to
    import, and `configlist` runs this on every ssh session. `path`, `gitdir` and
    `annexdir` give pathlib objects for the commands that want them.
    """

    __slots__ = ("bare", "config", "gitdir_str", "path_str")

    def __init__(self, path: str, gitdir: str, bare: bool, config: GitConfig) -> None:
        self.path_str = path  # the directory the client named, resolved
        self.gitdir_str = gitdir  # bare: == path; non-bare: path/.git (or a gitfile's target)
        self.bare = bare
        self.config = config

    @property
    def path(self) -> Path:
        from pathlib import Path  # noqa: PLC0415

        return Path(self.path_str)

    @property
    def gitdir(self) -> Path:
        from pathlib import Path  # noqa: PLC0415

        return Path(self.gitdir_str)

    @property
    def annexdir(self) -> Path:
        return self.gitdir / "annex"

    @property
    def uuid(self) -> str | None:
        return self.config.get("annex.uuid") or None


def _not_a_repo(path: str) -> ShellError:
    import socket  # noqa: PLC0415 - only this error needs the host name

    return ShellError(
        f"failed to read git config of git repository in {socket.gethostname()} on {path}; "
        "perhaps this repository is not set up correctly or has moved"
    )


def _looks_like_gitdir(path: str) -> bool:
    return (
        os.path.isfile(os.path.join(path, "HEAD"))
        and os.path.isdir(os.path.join(path, "objects"))
        and os.path.isfile(os.path.join(path, "config"))
    )


def _gitfile_target(dotgit: str) -> str | None:
    """The directory a `.git` file (as in worktrees and submodules) points to."""
    try:
        with open(dotgit, "rb") as fh:
            text = fh.read(4096).decode("utf-8", "surrogateescape").strip()
    except OSError:
        return None
    if not text.startswith("gitdir:"):
        return None
    target = text[len("gitdir:") :].strip()
    return target if os.path.isabs(target) else os.path.join(os.path.dirname(dotgit), target)


def _check_ownership(path: str, config: GitConfig) -> None:
    """git's safe.directory rule: a repository owned by someone else is not ours to run."""
    try:
        st = os.stat(path)
    except OSError:
        raise _not_a_repo(path) from None
    owner = st.st_uid
    allowed = config.get_all("safe.directory")
    if "*" in allowed or path in allowed or path.rstrip("/") + "/" in allowed:
        return
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        # Any local user could plant config or hooks that we would then obey (security.md
        # row 9); git itself does not check this, so safe.directory overrides it as well.
        raise ShellError(
            f"refusing to use world-writable repository at {path} (see git-config safe.directory)"
        )
    if owner == os.geteuid():
        return
    raise ShellError(
        f"detected dubious ownership in repository at {path} (owned by uid {owner}); "
        "refusing to use it (see git-config safe.directory)"
    )


def open_repo(directory: str) -> Repo:
    """Open the repository DIR names, or raise the error git-annex gives."""
    path = directory_path(directory)
    try:
        st = os.stat(path)
    except OSError:
        raise _not_a_repo(path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _not_a_repo(path)
    dotgit = os.path.join(path, ".git")
    if os.path.isdir(dotgit):
        gitdir, bare = dotgit, False
    elif os.path.isfile(dotgit):
        target = _gitfile_target(dotgit)
        if target is None:
            raise _not_a_repo(path)
        gitdir, bare = target, False
    else:
        gitdir, bare = path, True
    if not _looks_like_gitdir(gitdir):
        raise _not_a_repo(path)
    try:
        _check_ownership(gitdir, GitConfig.read(global_config_paths()))
        config = GitConfig.read([*global_config_paths(), os.path.join(gitdir, "config")], gitdir)
    except ConfigError as exc:
        raise ShellError(f"bad git config in {path}: {exc}") from None
    return Repo(path=path, gitdir=gitdir, bare=bare, config=config)


def has_annex_branch(gitdir: str) -> bool:
    """Whether a `git-annex` branch exists locally or as any `*/git-annex` ref.

    Read from the ref files directly: this runs inside `configlist`, which must stay cheap.
    """
    refs = os.path.join(gitdir, "refs")
    if os.path.isfile(os.path.join(refs, "heads", "git-annex")):
        return True
    for kind in ("heads", "remotes"):
        try:
            names = os.listdir(os.path.join(refs, kind))
        except OSError:
            continue
        for name in names:
            if os.path.isfile(os.path.join(refs, kind, name, "git-annex")):
                return True
    try:
        with open(os.path.join(gitdir, "packed-refs"), "rb") as fh:
            for line in fh:
                ref = line.rstrip(b"\n").partition(b" ")[2]
                if ref.startswith(b"refs/") and ref.endswith(b"/git-annex"):
                    return True
    except FileNotFoundError:
        pass
    return False
