"""git-annex-shell's command line: argv grammar, checks, and dispatch.

This module is on every ssh session's start-up path, so it imports only the standard
library and small modules of ours; trio, dulwich and msgpack are imported by the commands
that need them (see annex-shell.md §1 for the grammar reproduced here).
"""

from __future__ import annotations

import os
import sys

from shell import restrict
from shell.errors import ShellError

# Bounds on what a peer can make us parse (security.md rows 3 and 4): real commands are a
# few hundred bytes and a handful of words.
MAX_ARGV_BYTES = 64 * 1024
MAX_ARGS = 4096

USAGE = """\
Usage: git-annex-shell [-c] command [parameters ...] [option ...]

Plumbing commands:

configlist directory                    outputs relevant git configuration
p2pstdio directory uuid                 communicate in P2P protocol over stdio
notifychanges directory                 sends notification when git refs are changed
inannex directory [KEY ...]             checks if keys are present in the annex
sendkey directory KEY                   runs rsync in server mode to send content
recvkey directory KEY                   runs rsync in server mode to receive content
dropkey directory [KEY ...]             drops annexed content for specified keys
gcryptsetup directory gcryptid          sets up gcrypt repository
noderpc directory                       serve a proxy's node RPC on stdio (annexproxy)
"""

# Command name -> least mode it needs (annex-shell.md §2, security.md).
BUILTINS: dict[str, int] = {
    "configlist": restrict.Mode.READONLY,
    "p2pstdio": restrict.Mode.READONLY,
    "notifychanges": restrict.Mode.READONLY,
    "inannex": restrict.Mode.READONLY,
    "sendkey": restrict.Mode.READONLY,
    "recvkey": restrict.Mode.APPENDONLY,
    "dropkey": restrict.Mode.READWRITE,
    "gcryptsetup": restrict.Mode.READWRITE,
    # Our node worker; it enforces the write restrictions per call, like p2pstdio.
    "noderpc": restrict.Mode.READONLY,
}

# git-annex's common options that git-annex-shell accepts and ignores (or uses, for --force).
FLAG_OPTIONS = frozenset(
    {
        "--debug", "--no-debug", "--quiet", "-q", "--verbose", "-v", "--force", "--fast",
        "--json", "--json-progress", "--json-error-messages", "--batch", "-z",
        "--mincopies", "--numcopies",
    }
)  # fmt: skip
VALUE_OPTIONS = frozenset({"--uuid", "--debugfilter", "-c", "--config", "--time-limit"})


def shell_unescape(text: str) -> list[str]:
    """Split a command string as git-annex's shellUnEscape does (not as POSIX sh does).

    Every single space ends a word (two spaces give an empty word), '...' and "..." quote
    literally, and backslash has no meaning. Nothing here is ever given to a shell.
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        word: list[str] = []
        while i < n:
            ch = text[i]
            i += 1
            if ch == " ":
                break
            if ch in "'\"":
                close = text.find(ch, i)
                if close < 0:
                    word.append(text[i:])
                    i = n
                else:
                    word.append(text[i:close])
                    i = close + 1
                continue
            word.append(ch)
        words.append("".join(word))
    return words


def partition_params(params: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split `PARAMS -- FIELDS -- EXTRA` at the `--` markers."""
    segments: list[list[str]] = [[]]
    for p in params:
        if p == "--":
            segments.append([])
        else:
            segments[-1].append(p)
    if len(segments) == 1:
        return segments[0], [], []
    extra: list[str] = []
    for seg in segments[2:]:
        if extra:
            extra.append("--")
        extra.extend(seg)
    return segments[0], segments[1], extra


def allowed_fields(fieldparams: list[str]) -> dict[str, str]:
    """Keep only the whitelisted `name=value` fields; drop the rest silently, as git-annex."""
    fields: dict[str, str] = {}
    for fp in fieldparams:
        name, eq, value = fp.partition("=")
        if not eq:
            continue
        uuid_ok = name == "remoteuuid" and value and all(c.isalnum() or c == "-" for c in value)
        if uuid_ok or (name == "autoinit" and value == "1"):
            fields[name] = value
    return fields


class Invocation:
    """A parsed builtin command line.

    A plain class rather than a dataclass: importing dataclasses costs several
    milliseconds, and this module is on every session's start-up path.
    """

    __slots__ = ("args", "command", "debug", "directory", "extra", "fields", "force", "uuid")

    def __init__(
        self,
        command: str,
        directory: str,
        args: list[str],
        *,
        fields: dict[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.command = command
        self.directory = directory
        self.args = args
        self.uuid: str | None = None
        self.force = False
        self.debug = False
        self.fields = fields if fields is not None else {}
        self.extra = extra if extra is not None else []


def parse_builtin(command: str, directory: str, params: list[str]) -> Invocation:
    plain, fieldparams, extra = partition_params(params)
    inv = Invocation(command, directory, [], fields=allowed_fields(fieldparams), extra=extra)
    i = 0
    while i < len(plain):
        word = plain[i]
        i += 1
        name, eq, inline = word.partition("=")
        if word.startswith("-") and word != "-":
            if name in VALUE_OPTIONS:
                if eq:
                    value = inline
                elif i < len(plain):
                    value = plain[i]
                    i += 1
                else:
                    raise ShellError(f"option {name} needs a value")
                if name == "--uuid":
                    inv.uuid = value
            elif word in FLAG_OPTIONS:
                inv.force |= word == "--force"
                inv.debug |= word == "--debug"
            elif word.startswith("-J") or name == "--jobs":
                if name == "--jobs" and not eq:
                    i += 1
            else:
                raise ShellError(f"invalid option {word}")
        else:
            inv.args.append(word)
    return inv


def run_builtin(inv: Invocation) -> int:
    # Order as git-annex: mode checks, then the directory check, then the repository.
    restrict.check_mode(BUILTINS[inv.command])
    restrict.check_directory(inv.directory)
    from shell import commands  # noqa: PLC0415 - keeps argument errors cheap

    return commands.run(inv)


def external(params: list[str]) -> int:
    from shell import passthrough  # noqa: PLC0415

    return passthrough.run(params)


def dispatch(argv: list[str], command_string: bool = False) -> int:
    # command_string: the command came as sshd hands it to a forced command or login shell
    # (after `-c`, or as one string); only noderpc cares (restrict.check_noderpc).
    while argv and argv[0] == "-c":
        argv = argv[1:]
        command_string = True
    if not argv:
        raise ShellError("bad parameters\n\n" + USAGE)
    if len(argv) == 1:
        cmd = argv[0]
        if cmd.startswith("git-annex-shell "):
            words = shell_unescape(cmd)[1:]
            # The byte cap in main() still lets 64 KiB of spaces become 64k words.
            if len(words) > MAX_ARGS:
                raise ShellError("command line too long")
            return dispatch(words, command_string=True)
        if cmd in BUILTINS:
            raise ShellError("bad parameters\n\n" + USAGE)
        return external(argv)
    cmd, directory, *params = argv
    if cmd == "noderpc":
        # Before anything else, so a refused key learns nothing about directories.
        restrict.check_noderpc(command_string)
    if cmd in BUILTINS:
        return run_builtin(parse_builtin(cmd, directory, params))
    return external(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        if len(argv) > MAX_ARGS or sum(len(a) + 1 for a in argv) > MAX_ARGV_BYTES:
            raise ShellError("command line too long")
        if any("\0" in a for a in argv):
            # execve cannot pass one, but main() may be called directly; a NUL would only
            # reach os.stat as a ValueError traceback.
            raise ShellError("NUL byte in command line")
        return dispatch(argv)
    except ShellError as exc:
        sys.stdout.flush()
        # git-annex-shell ends every error with a blank line (its giveup; the byte-exact
        # comparison is tests/test_cli.py's test_error_output_is_git_annex_shells).
        sys.stderr.write(f"git-annex-shell: {exc.message}\n\n")
        sys.stderr.flush()
        return exc.exit_code
    except KeyboardInterrupt:
        return 1
    except BrokenPipeError:
        # The client went away; nothing useful can be said to it.
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def entry() -> None:
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        code = code or 1
    sys.exit(code)


if __name__ == "__main__":
    entry()
