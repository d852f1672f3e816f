"""The four GIT_ANNEX_SHELL_* restriction variables, in one place.

An admin sets them in the forced command of an ssh key. "Set" means present and non-empty,
as in git-annex. The messages are git-annex's own, because clients show them to users and
scripts match on them.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping

from shell import dirpath
from shell.errors import ShellError

READONLY = "GIT_ANNEX_SHELL_READONLY"
APPENDONLY = "GIT_ANNEX_SHELL_APPENDONLY"
LIMITED = "GIT_ANNEX_SHELL_LIMITED"
DIRECTORY = "GIT_ANNEX_SHELL_DIRECTORY"

# P2P answers in p2pstdio (p2p-protocol.md §8).
READONLY_DENIED = "this repository is read-only; write access denied"
APPENDONLY_DENIED = "this repository is append-only; removal denied"


class Mode:
    """What a session may do; ordered so that `mode >= needed` means allowed.

    Plain int constants rather than an IntEnum: importing enum costs milliseconds on
    every ssh session's start-up path.
    """

    READONLY = 0
    APPENDONLY = 1
    READWRITE = 2


def _is_set(env: Mapping[str, str], name: str) -> bool:
    return bool(env.get(name))


def server_mode(env: Mapping[str, str] = os.environ) -> int:
    # READONLY takes precedence over APPENDONLY.
    if _is_set(env, READONLY):
        return Mode.READONLY
    if _is_set(env, APPENDONLY):
        return Mode.APPENDONLY
    return Mode.READWRITE


def check_mode(needed: int, env: Mapping[str, str] = os.environ) -> None:
    """Refuse a builtin that needs more than the session's mode allows."""
    if needed > Mode.READONLY and _is_set(env, READONLY):
        raise ShellError(f"Action blocked by {READONLY}")
    if needed > Mode.APPENDONLY and _is_set(env, APPENDONLY):
        raise ShellError(f"Action blocked by {APPENDONLY}")


def check_not_limited(env: Mapping[str, str] = os.environ) -> None:
    if _is_set(env, LIMITED):
        raise ShellError(f"Action blocked by {LIMITED}")


def _canonical(home: str, path: str) -> str:
    """git-annex's canonical form for comparing directories: `~/...` relative to HOME.

    `..` is resolved lexically; symlinks are deliberately not followed, so an alias through
    a symlink does not match (the admin named one path, only that path is allowed).
    """
    if path.startswith("~/"):
        return path
    if path.startswith("/~/"):
        return path[1:]
    absolute = dirpath.normalize(posixpath.join(home, path))
    home_norm = posixpath.normpath(home) if home else ""
    if home_norm and home_norm != "/":
        if absolute == home_norm:
            return "~/"
        if absolute.startswith(home_norm + "/"):
            return "~/" + absolute[len(home_norm) + 1 :]
    return absolute


def check_directory(directory: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """Enforce GIT_ANNEX_SHELL_DIRECTORY against the directory a command names.

    Returns the absolute path that may be opened (shell/dirpath.py), or None when the
    variable is absent. Unlike the other three, an empty value is set: git-annex then allows
    only HOME, and so do we.

    First git-annex's own comparison, with its messages. Then two checks it lacks: the path
    we open must be the one the allowed directory names (`~` alone, `~user/...` and `/~` are
    compared by name above but resolved differently), and no `..` may climb out of a
    symlink: in a non-bare DIRECTORY a client can push `evil -> /srv/other/.git`, and
    `/srv/wt/evil/..` is `/srv/wt` by name but `/srv/other` to the kernel.
    """
    allowed = env.get(DIRECTORY)
    if allowed is None:
        return None
    home = env.get("HOME", "")
    if directory is None:
        raise ShellError(
            f"Only allowed to access {allowed} and could not determine directory from command line"
        )
    canon_allowed = _canonical(home, allowed)
    if allowed != directory:
        canon_dir = _canonical(home, directory)
        if canon_allowed.rstrip("/") != canon_dir.rstrip("/"):
            raise ShellError(f"Only allowed to access {canon_allowed} not {canon_dir}")
    path = dirpath.directory_path(directory, home or "/")
    if path != dirpath.directory_path(allowed, home or "/"):
        raise ShellError(f"Only allowed to access {canon_allowed} not {directory}")
    if dirpath.leaves_through_symlink(directory, home or "/"):
        raise ShellError(
            f"Only allowed to access {canon_allowed} not {directory}"
            " (a symlink before its `..` leads elsewhere)"
        )
    return path


# noderpc (shell/noderpc.py) serves a proxy, not users: a key whose forced command runs
# git-annex-shell would otherwise get it too (git-annex's own git-annex-shell hands the word
# to git-shell, which refuses it). The proxy starts local nodes directly, as
# `python -m shell noderpc DIR UUID` without restrictions or SSH_ORIGINAL_COMMAND
# (nodelink.child_env); an ssh node's forced command must opt in for the proxy's key.
ALLOW_NODERPC = "ANNEXPROXY_ALLOW_NODERPC"
NODERPC_REFUSED = (
    "noderpc is refused to a forced command or restricted key (it serves annexproxy's proxy); "
    f"set {ALLOW_NODERPC}=1 in the forced command of the proxy's key to allow it"
)


def check_noderpc(command_string: bool, env: Mapping[str, str] = os.environ) -> None:
    """Refuse noderpc to a forced command unless the admin allowed it for that key.

    `command_string`: the command came through `-c` or as one string, as sshd passes it to a
    forced command or a login shell. SSH_ORIGINAL_COMMAND and the restriction variables
    also mean a forced command, whatever form it uses."""
    if _is_set(env, ALLOW_NODERPC):
        return
    # DIRECTORY restricts even when empty (to HOME, as git-annex reads it: check_directory).
    restricted = DIRECTORY in env or any(_is_set(env, n) for n in (READONLY, APPENDONLY, LIMITED))
    if command_string or restricted or "SSH_ORIGINAL_COMMAND" in env:
        raise ShellError(NODERPC_REFUSED)
