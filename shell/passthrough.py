"""Handing git's own commands to git-shell, after git-annex-shell's checks.

Only the single-string form reaches git in practice (`-c "git-upload-pack '/dir'"`, as ssh
delivers it). git-shell then parses that string itself and accepts only git's services, so
no word of the peer's string is ever an option to a program we run, and no shell runs.

Under GIT_ANNEX_SHELL_DIRECTORY, git-annex checks the last word of the last argument and
hands git-shell the client's string. We read the string as git-shell will (`git_request`),
check the directory git would open, and hand git-shell a string we wrote, naming the
checked absolute path (`restrict.check_directory`). git-annex's way has two holes: the
last word need not be the string git-shell gets (`git-annex-shell 'git-upload-pack
'"'"'/other'"'"'' -- '/allowed'`), and git resolves `..` after a symlink the client pushed.
"""

from __future__ import annotations

import os
import sys

from shell import restrict
from shell.errors import ShellError

# git-shell would run these; upload-archive is off unless the admin opts in, because `git
# archive` has been a remote attack surface (CVE-2022-41903) and annex clients never use it.
ALLOW_ARCHIVE_ENV = "ANNEXPROXY_ALLOW_UPLOAD_ARCHIVE"


# git-shell's services that take a directory (shell.c's cmd_list), and git's isspace.
GIT_SERVICES = ("git-receive-pack", "git-upload-pack", "git-upload-archive")
_GIT_SPACE = " \t\n\r"


def git_request(command: str) -> tuple[str, str | None] | None:
    """(service, directory) as git-shell reads its `-c` string; directory None when git-shell
    would refuse the argument; None when the string names no git service."""
    if command[:3] == "git" and command[3:4] and command[3] in _GIT_SPACE:
        command = "git-" + command[4:]  # git-shell accepts "git foo" as "git-foo"
    for service in GIT_SERVICES:
        if command.startswith(service):
            rest = command[len(service) :]
            if not rest:
                return service, None
            if rest[0] == " ":
                return service, sq_dequote(rest[1:])
    return None


def sq_dequote(text: str) -> str | None:
    """git's sq_dequote: one '...' word, where '\\'' and '\\!' may join two parts; None for
    anything else, or for a word git-shell refuses (one that starts with `-`)."""
    if not text.startswith("'"):
        return None
    out: list[str] = []
    i, n = 1, len(text)
    while True:
        close = text.find("'", i)
        if close < 0:
            return None
        out.append(text[i:close])
        i = close + 1
        if i == n:
            word = "".join(out)
            return None if word.startswith("-") else word
        if text[i : i + 3] in ("\\''", "\\!'"):
            out.append(text[i + 1])
            i += 3
            continue
        return None


def sq_quote(word: str) -> str:
    """git's sq_quote: what sq_dequote reads back as `word`."""
    return "'" + word.replace("'", "'\\''").replace("!", "'\\!'") + "'"


def _checked(git_params: list[str]) -> list[str]:
    """Under GIT_ANNEX_SHELL_DIRECTORY: a git service gets the checked path, in our words.

    Anything else is handed on as it is (git-shell refuses it, or runs the admin's
    ~/git-shell-commands, which git-annex's last-word check already covered).
    """
    request = git_request(git_params[0]) if len(git_params) == 1 else None
    if request is None:
        return git_params
    service, directory = request
    path = restrict.check_directory(directory)
    assert path is not None  # DIRECTORY is set
    return [f"{service} {sq_quote(path)}"]


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
    if restrict.DIRECTORY in os.environ and git_params:
        git_params = _checked(git_params)
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
