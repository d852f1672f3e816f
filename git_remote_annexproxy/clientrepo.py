"""The client repository a `git annexproxy` command runs in, and what every subcommand shares.

`find_clone()` finds it as git does; `scope()` turns a PATH argument into a work-tree path;
`views()` lists the annexproxy remotes and what is behind each (`discovery.py`). Errors for
the user are `Fatal` (one `fatal: ...` line, exit 1, as git's).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from git_remote_annexproxy.gitconfig import GitConfig, parse_list_z

if TYPE_CHECKING:
    from git_remote_annexproxy.discovery import BranchLogs, RemoteView


class Fatal(Exception):
    """A one-line usage or setup error: `fatal: <message>`, exit 1."""


@dataclass(frozen=True)
class Clone:
    gitdir: Path  # this work tree's: its index
    commondir: Path  # shared by linked work trees: refs, config, the annex (as git-annex)
    top: Path | None  # None for a bare repository
    prefix: str  # cwd relative to top, "" or ending in "/"
    config: GitConfig


def find_clone() -> Clone:
    """The repository around the current directory, found as git finds it."""

    def rev_parse(*what: str) -> list[str] | None:
        proc = subprocess.run(
            ["git", "rev-parse", *what], capture_output=True, text=True, check=False, timeout=30
        )
        return proc.stdout.split("\n") if proc.returncode == 0 else None

    found = rev_parse("--absolute-git-dir", "--git-common-dir", "--is-inside-work-tree")
    if found is None:
        raise Fatal("not a git repository (or any of the parent directories)")
    gitdir = Path(found[0])
    commondir = Path.cwd() / found[1]  # relative to the current directory, or absolute
    top: Path | None = None
    prefix = ""
    if found[2] == "true":
        inside = rev_parse("--show-toplevel", "--show-prefix")
        if inside is not None:
            top, prefix = Path(inside[0]), inside[1]
    return Clone(gitdir, commondir, top, prefix, git_config())


def git_config() -> GitConfig:
    """Every setting git would apply here, `git -c` ones and includes too: git reads it.

    (The server reads config files itself to start fast; a client command can afford git.)
    """
    proc = subprocess.run(
        ["git", "config", "--list", "-z"], capture_output=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise Fatal(said[-1].removeprefix("fatal: ") if said else "cannot read git config")
    return GitConfig(parse_list_z(proc.stdout))


def scope(clone: Clone, path: str) -> str:
    """A PATH argument as a path relative to the top of the work tree ("" = the top)."""
    assert clone.top is not None
    full = os.path.normpath(os.path.join(clone.top, clone.prefix, path))
    rel = os.path.relpath(full, clone.top)
    if rel == os.curdir:
        return ""
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise Fatal(f"{path}: outside repository at '{clone.top}'")
    return rel.replace(os.sep, "/")


def views(clone: Clone, logs: BranchLogs, only: str | None) -> tuple[list[RemoteView], list[str]]:
    """The remotes to use and what is behind each; plus one error line per unusable one."""
    from git_remote_annexproxy import discovery  # noqa: PLC0415

    names = discovery.annex_remotes(clone.config, logs.refs)
    if only is not None:
        if not clone.config.get(f"remote.{only}.url"):
            raise Fatal(f"'{only}' does not appear to be a git remote")
        if only not in names:
            raise Fatal(f"no git-annex branch fetched from {only} (git fetch {only} git-annex)")
        names = [only]
    views, errors = [], []
    for name in names:
        try:
            url = discovery.remote_url(clone.config, name)
            uuid = discovery.remote_uuid(clone.commondir, clone.config, name, url)
        except discovery.DiscoveryError as exc:
            errors.append(str(exc))
            continue
        views.append(discovery.discover(logs, name, url, uuid))
    return views, errors


def int_config(config: GitConfig, key: str, default: int) -> int:
    value = config.get(key)
    if value is None:
        return default
    try:
        return max(0, int(value))
    except ValueError:
        raise Fatal(f"bad numeric config value {value!r} for {key}") from None
