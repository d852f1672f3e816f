#!/usr/bin/env python3
"""A fake `ssh` for annexproxy's tests and demo: runs the "remote" command on this machine.

git-annex runs `ssh` from PATH (it ignores GIT_SSH/GIT_SSH_COMMAND unless
GIT_ANNEX_USE_GIT_SSH=1), and git does the same when GIT_SSH/GIT_SSH_COMMAND are unset. Put a
directory whose `ssh` is this file first on the client's PATH and every `localhost:` remote
is served on this machine, the way sshd would serve it, with no network and no sshd.

Accepted argv (OpenSSH style):

    ssh [OPTIONS] HOST [OPTIONS] COMMAND...   run COMMAND (its words joined by single spaces)
    ssh ... -O CTL ... HOST                   connection-cache control: exit 0
    ssh ... -G HOST                           config probe: print a minimal config, exit 0

HOST must be loopback (`localhost`, `127.0.0.1`, `::1`, optionally `user@`); anything else is
refused with exit 255, so a test can never reach the network by mistake.

How the command runs, by FAKESSH_MODE (each imitates one sshd set-up):

    forced (default)  authorized_keys `command="git-annex-shell -c \"$SSH_ORIGINAL_COMMAND\""`:
                      git-annex-shell -c "<command>", with SSH_ORIGINAL_COMMAND=<command>
    login             git-annex-shell is the account's login shell:
                      git-annex-shell -c "<command>", without SSH_ORIGINAL_COMMAND
    shell             an ordinary account with /bin/sh as login shell: /bin/sh -c "<command>"

The server process gets a fresh environment, as from sshd: PATH=$FAKESSH_SERVER_PATH (it must
find our git-annex-shell first), HOME=$FAKESSH_SERVER_HOME (also the cwd), SHELL, USER,
LOGNAME, the locale and TZ, SSH_CONNECTION/SSH_CLIENT, GIT_PROTOCOL (git sends it with
`-o SendEnv=GIT_PROTOCOL`), the `VAR=value` words of FAKESSH_SERVER_ENV (restrictions such
as GIT_ANNEX_SHELL_READONLY=1), and the variables named in FAKESSH_PASSENV. Nothing else of
the client's environment (GIT_DIR, GIT_INDEX_FILE, GIT_ANNEX_*, ...) reaches the server.

FAKESSH_MODE, FAKESSH_SERVER_PATH, FAKESSH_SERVER_HOME, FAKESSH_PASSENV and FAKESSH_LOG are
passed on to the server, so that a server-side hop through this fake (a proxy reaching
another gateway as `localhost:...`) lands on the same fake server. FAKESSH_SERVER_ENV is
not: restrictions belong to one ssh key, as with real sshd.

FAKESSH_LOG=FILE appends one JSON line per call (argv, mode, command) to FILE.

Standard library only; the process replaces itself (exec) with the server command, so its
stdin/stdout are the session and its exit status is the command's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

# OpenSSH's option letters that take a value (ssh.c's getopt string), and its flags.
VALUE_OPTIONS = frozenset("BbcDEeFIiJLlmOoPpQRSWw")
FLAG_OPTIONS = frozenset("46AaCfGgKkMNnqsTtVvXxYy")

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

# sshd's default PATH for a session when nothing better is configured.
DEFAULT_SERVER_PATH = "/usr/local/bin:/usr/bin:/bin"

# Client variables a real sshd would also hand over (AcceptEnv LANG LC_* in Debian's
# sshd_config, plus what login(1) sets).
PASSED_VARIABLES = ("USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")

# Our own knobs, carried to the server so a second hop through this fake behaves the same.
HOP_VARIABLES = (
    "FAKESSH_MODE", "FAKESSH_SERVER_PATH", "FAKESSH_SERVER_HOME", "FAKESSH_PASSENV", "FAKESSH_LOG",
)  # fmt: skip

MODES = ("forced", "login", "shell")

# Exit status of a failed ssh connection; git-annex reads it as "could not connect".
SSH_FAILED = 255


class UsageError(Exception):
    """A command line real ssh would refuse (exit 255)."""


@dataclass
class Parsed:
    """An ssh command line: options in order, the host and the remote command words."""

    options: list[tuple[str, str | None]] = field(default_factory=list)
    host: str | None = None
    command: list[str] = field(default_factory=list)

    def has(self, letter: str) -> bool:
        return any(opt == letter for opt, _ in self.options)

    def value(self, letter: str) -> str | None:
        """The last value given for a value option (as ssh, later wins for most)."""
        found = None
        for opt, val in self.options:
            if opt == letter:
                found = val
        return found

    @property
    def remote_command(self) -> str:
        # ssh sends its words joined by single spaces; the remote shell splits them again.
        return " ".join(self.command)


def parse_args(argv: list[str]) -> Parsed:
    """Parse `ssh [opts] HOST [opts] COMMAND...` as OpenSSH's getopt loop does.

    Options may come before and after HOST; clustered flags (`-nT`) and attached values
    (`-p22`, `-oBatchMode=yes`) work; `--` ends the options; the first word that is not an
    option after HOST starts the command, and everything from there on is the command, even
    words that look like options.
    """
    parsed = Parsed()
    i = 0
    options_done = False
    while i < len(argv):
        word = argv[i]
        i += 1
        if not options_done and word == "--":
            options_done = True
            continue
        if not options_done and word.startswith("-") and len(word) > 1:
            j = 1
            while j < len(word):
                letter = word[j]
                j += 1
                if letter in VALUE_OPTIONS:
                    if j < len(word):
                        value = word[j:]
                    elif i < len(argv):
                        value = argv[i]
                        i += 1
                    else:
                        raise UsageError(f"option requires an argument -- {letter}")
                    parsed.options.append((letter, value))
                    break
                if letter in FLAG_OPTIONS:
                    parsed.options.append((letter, None))
                    continue
                raise UsageError(f"unknown option -- {letter}")
            continue
        if parsed.host is None:
            parsed.host = word
            continue
        parsed.command = argv[i - 1 :]
        break
    return parsed


def split_host(host: str) -> tuple[str | None, str]:
    """`user@host` -> (user, host); `[::1]` -> `::1`."""
    user, at, name = host.rpartition("@")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return (user if at else None), name


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    return split_host(host)[1] in LOOPBACK_HOSTS


def minimal_config(parsed: Parsed, env: dict[str, str]) -> str:
    """What `ssh -G HOST` prints, enough for git's ssh variant probe and git-annex."""
    assert parsed.host is not None
    user, name = split_host(parsed.host)
    user = parsed.value("l") or user or env.get("USER") or "user"
    port = parsed.value("p") or "22"
    return f"user {user}\nhostname {name}\nport {port}\n"


def server_environment(
    client: dict[str, str], mode: str, command: str, login_shell: str
) -> dict[str, str]:
    """The environment sshd would give the session, built from scratch."""
    env = {name: client[name] for name in PASSED_VARIABLES if name in client}
    for name in (*HOP_VARIABLES, "GIT_PROTOCOL", *client.get("FAKESSH_PASSENV", "").split()):
        if name in client:
            env[name] = client[name]
    env["PATH"] = client.get("FAKESSH_SERVER_PATH") or DEFAULT_SERVER_PATH
    env["HOME"] = server_home(client)
    env["SHELL"] = login_shell
    env["SSH_CONNECTION"] = "127.0.0.1 40000 127.0.0.1 22"
    env["SSH_CLIENT"] = "127.0.0.1 40000 22"
    for word in client.get("FAKESSH_SERVER_ENV", "").split():
        name, eq, value = word.partition("=")
        if name and eq:
            env[name] = value
    if mode == "forced":
        env["SSH_ORIGINAL_COMMAND"] = command
    return env


def server_home(client: dict[str, str]) -> str:
    return client.get("FAKESSH_SERVER_HOME") or client.get("HOME") or "/"


def log_call(client: dict[str, str], record: dict[str, object]) -> None:
    path = client.get("FAKESSH_LOG")
    if not path:
        return
    record.update(t=time.time(), pid=os.getpid())
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def fail(message: str) -> int:
    sys.stderr.write(f"fake ssh: {message}\n")
    return SSH_FAILED


def main(argv: list[str]) -> int:
    client = dict(os.environ)
    try:
        parsed = parse_args(argv)
    except UsageError as exc:
        return fail(str(exc))
    mode = client.get("FAKESSH_MODE") or "forced"
    log_call(client, {"argv": argv, "mode": mode, "command": parsed.remote_command})
    if parsed.has("V"):
        sys.stderr.write("OpenSSH_9.2p1 (fake)\n")
        return 0
    if parsed.host is None:
        return fail("no host given")
    if not is_loopback(parsed.host):
        return fail(f"refusing non-loopback host {parsed.host!r} (tests never use the network)")
    if parsed.has("O"):
        return 0  # no master connection exists, so every control command "succeeds"
    if parsed.has("G"):
        sys.stdout.write(minimal_config(parsed, client))
        return 0
    if mode not in MODES:
        return fail(f"FAKESSH_MODE must be one of {', '.join(MODES)}, not {mode!r}")
    command = parsed.remote_command
    if not command:
        return fail("interactive sessions are not supported")

    server_path = client.get("FAKESSH_SERVER_PATH") or DEFAULT_SERVER_PATH
    if mode == "shell":
        program, args, login_shell = "/bin/sh", ["/bin/sh", "-c", command], "/bin/sh"
    else:
        found = shutil.which("git-annex-shell", path=server_path)
        if found is None:
            # What the remote shell would answer; 127 is not 255, so git-annex reports the
            # missing git-annex-shell instead of a connection failure.
            sys.stderr.write(f"sh: 1: git-annex-shell: not found (server PATH {server_path})\n")
            return 127
        program, args = found, ["git-annex-shell", "-c", command]
        login_shell = found if mode == "login" else "/bin/sh"
    env = server_environment(client, mode, command, login_shell)
    home = env["HOME"]
    try:
        os.chdir(home)
    except OSError as exc:
        return fail(f"server HOME {home}: {exc.strerror}")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, args, env)
    except OSError as exc:
        return fail(f"cannot run {program}: {exc.strerror}")
    return SSH_FAILED  # not reached: execve returned without raising


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
