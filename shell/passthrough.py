"""Handing git's own commands to git-shell, after git-annex-shell's checks.

Only the single-string form reaches git in practice (`-c "git-upload-pack '/dir'"`, as ssh
delivers it). git-shell then parses that string itself and accepts only git's services, so
no word of the peer's string is ever an option to a program we run, and no shell runs.
"""

from __future__ import annotations

import os
import sys

from shell import restrict
from shell.errors import ShellError

# git-shell would run these; upload-archive is off unless the admin opts in, because `git
# archive` has been a remote attack surface (CVE-2022-41903) and annex clients never use it.
ALLOW_ARCHIVE_ENV = "ANNEXPROXY_ALLOW_UPLOAD_ARCHIVE"


def _service(command: str) -> str:
    words = command.split()
    if not words:
        return ""
    if words[0] == "git" and len(words) > 1:
        return "git-" + words[1]
    return words[0]


def run(params: list[str]) -> int:
    from shell.cli import partition_params, shell_unescape  # noqa: PLC0415 - avoids a cycle

    last_words = shell_unescape(params[-1]) if params else []
    last_word = last_words[-1] if last_words else None
    git_params, _, _ = partition_params(params)
    restrict.check_directory(last_word)
    restrict.check_not_limited()
    if (
        git_params
        and _service(git_params[0]) == "git-upload-archive"
        and not os.environ.get(ALLOW_ARCHIVE_ENV)
    ):
        raise ShellError(f"git-upload-archive is disabled here (set {ALLOW_ARCHIVE_ENV}=1)")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.posix_spawnp("git-shell", ["git-shell", "-c", *git_params], os.environ)
    except OSError as exc:
        raise ShellError(f"cannot run git-shell: {exc.strerror}") from None
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.waitstatus_to_exitcode(status) != 0:
        raise ShellError("git-shell failed")
    return 0
