"""What directory the DIR of a command names, as one absolute path.

DIR comes from the client (the path part of its remote URL, or the argument of a git
command). It is resolved as git-annex resolves it (annex-shell.md §1): a leading `/~/` or
`~/` is HOME, `/~user/` or `~user/` that user's home, a relative path is relative to HOME;
then `.`, `..` and repeated slashes are removed by name. The builtins open that path, and
under GIT_ANNEX_SHELL_DIRECTORY git is handed that path (shell/passthrough.py), so what was
checked is what is opened and nothing is interpreted a second time.

On the start-up path of every ssh session: standard library only, `pwd` only for `~user`.
"""

from __future__ import annotations

import os
import posixpath

from shell.errors import ShellError


def resolve_dir(directory: str, home: str | None = None) -> str:
    """Turn the DIR a client sent into an absolute path, `..` not yet resolved."""
    if home is None:
        home = os.environ.get("HOME", "/")
    if directory.startswith("/~/") or directory == "/~":
        return posixpath.join(home, directory[3:])
    if directory.startswith(("/~", "~")):
        rest = directory[2:] if directory.startswith("/~") else directory[1:]
        user, _, tail = rest.partition("/")
        if not user:
            return posixpath.join(home, tail)
        import pwd  # noqa: PLC0415 - only `~user` needs the password database

        try:
            user_home = pwd.getpwnam(user).pw_dir
        except KeyError:
            raise ShellError(f"unknown user in directory {directory}") from None
        return posixpath.join(user_home, tail)
    return posixpath.join(home, directory)  # an absolute directory replaces home here


def normalize(path: str) -> str:
    """`.`, `..` and repeated slashes removed by name (no file system access)."""
    path = posixpath.normpath(path)
    if path.startswith("//"):
        # POSIX lets normpath keep a leading `//`; on Linux it is `/`.
        path = "/" + path.lstrip("/")
    return path


def directory_path(directory: str, home: str | None = None) -> str:
    """The one absolute path DIR names: what is checked, opened, and handed to git."""
    return normalize(resolve_dir(directory, home))


def leaves_through_symlink(directory: str, home: str | None = None) -> bool:
    """Whether the kernel would reach another directory than `directory_path` names.

    Only `..` can make them differ: `link/..` is the parent of the link's target, not the
    directory holding the link. Without a `..` this reads nothing from the file system.
    """
    resolved = resolve_dir(directory, home)
    if ".." not in resolved.split("/"):
        return False
    return os.path.realpath(resolved) != os.path.realpath(normalize(resolved))
