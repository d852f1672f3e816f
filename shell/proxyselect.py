"""Deciding whether `--uuid` names a repository this one proxies for (p2p-protocol.md §9).

Proxying is decided by git config (a remote with that UUID configured for proxying), and
the git-annex branch (proxy.log, uuid.log) only confirms it; until proxying is configured,
a UUID other than ours is refused with git-annex's own messages.
"""

from __future__ import annotations

from git_remote_annexproxy.annexlog import parse_uuid_log
from git_remote_annexproxy.branch import AnnexBranch
from shell.errors import ShellError
from shell.repo import Repo


def select(repo: Repo, wanted: str) -> str:
    branch = AnnexBranch(repo.gitdir, repo.annexdir)
    descriptions = parse_uuid_log(branch.read("uuid.log") or b"")
    if wanted in descriptions:
        raise ShellError(f"not configured to proxy for repository {descriptions[wanted]}")
    raise ShellError(f"expected repository UUID {wanted} but found UUID {repo.uuid}")
