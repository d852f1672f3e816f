"""`annexproxy::` URLs and the argv that reaches the server for one.

A URL names a repository served by a git-annex-shell (ours or git-annex's): over ssh, or on
this machine. This module parses the URL forms git users know, and builds the two command
lines the client needs, the way git itself builds them (connect.c):

* `shell_argv(u, words)`: `git-annex-shell WORD...` on the server (the P2P session);
* `git_service_argv(u, service)`: `git-upload-pack '/path'` directly (the fallback for a
  server that cannot tunnel git through P2P).

Safety rules, all enforced here so callers cannot forget them:

* no user- or peer-controlled string is ever in option position: the host, user and path are
  refused when they start with `-` (as git refuses them: "strange hostname blocked"), and the
  remote command always starts with a fixed program name, because OpenSSH reads options
  after the host too;
* no shell ever sees one of those strings in its script: `GIT_SSH_COMMAND` runs as
  `sh -c '<command> "$@"' <command> ARGS...` (git's own form), ARGS as positionals;
* the remote command is one string of single-quoted words, quoted so that both a POSIX
  shell and git-annex-shell's own `-c` splitter (no backslash escapes) read the same words.

Pure: no I/O apart from looking `git-annex-shell` up for a local URL.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

PREFIX = "annexproxy::"

# git's service names that may be run through the fallback; nothing else is ever spawned.
GIT_SERVICES = frozenset({"git-upload-pack", "git-receive-pack", "git-upload-archive"})

# The remote program; `remote.NAME.annex-shell` in git-annex, fixed here.
ANNEX_SHELL = "git-annex-shell"

# Characters that would make a host or user name mean something else to ssh or to a shell
# reading our log lines: whitespace, controls, and the URL/scp separators.
_BAD_NAME = re.compile(r"[\s\x00-\x1f\x7f/@]")
_PORT = re.compile(r"[0-9]{1,5}")
# A word of the git-annex-shell command line that is one of our own flags, never data.
_OWN_FLAGS = frozenset({"--", "--debug", "--uuid"})

# ssh programs git recognises by name (connect.c's determine_ssh_variant); anything else is
# assumed to be OpenSSH-compatible (git would probe it with `-G`; we do not spawn a probe).
_VARIANTS = {
    "ssh": "ssh",
    "plink": "plink",
    "putty": "putty",
    "tortoiseplink": "tortoiseplink",
    "simple": "simple",
}


@dataclass(frozen=True)
class ProxyURL:
    """A parsed URL.

    `path` is what git-annex sends as DIR: absolute (`/srv/repo.git`) or home-relative
    `/~/rel.git` (also `/~user/rel.git`). `host` has no IPv6 brackets. For kind "local",
    user, host and port are None and path is absolute.
    """

    kind: Literal["ssh", "local"]
    user: str | None
    host: str | None
    port: int | None
    path: str


def _refuse(reason: str) -> ValueError:
    return ValueError(reason)


def _check_path(raw: str, url: str) -> None:
    if not raw:
        raise _refuse(f"no repository path in URL {url!r}")
    if raw.startswith("-"):
        raise _refuse(f"strange repository path blocked: {raw!r}")
    if "\n" in raw or "\x00" in raw:
        raise _refuse(f"newline or NUL in repository path of {url!r}")


def _check_name(value: str, what: str) -> None:
    if not value:
        raise _refuse(f"empty {what}")
    if value.startswith("-"):
        raise _refuse(f"strange {what} blocked: {value!r}")
    if _BAD_NAME.search(value):
        raise _refuse(f"bad character in {what} {value!r}")


def _split_host(hostport: str, url: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` -> (host without brackets, port).

    (The scp-like form never gets here with a port: its host ends at the first colon.)
    """
    port_text: str | None = None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise _refuse(f"unclosed '[' in host of {url!r}")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if host.count(":") == 1:
            # git's `[host:port]:path`; one way to give a port is enough: ssh://host:port/.
            raise _refuse(f"brackets are for IPv6 addresses; use ssh://host:port/path: {url!r}")
        if rest:
            if not rest.startswith(":"):
                raise _refuse(f"junk after ']' in host of {url!r}")
            port_text = rest[1:]
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:
        # More than one colon and no brackets: git reads that as an IPv6 address, no port.
        host = hostport
    port: int | None = None
    # An empty port (`ssh://host:/path`) means the default, as in git.
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise _refuse(f"bad port {port_text!r} in {url!r}")
        port = int(port_text)
    _check_name(host, "hostname")
    return host, port


def _split_user(authority: str) -> tuple[str | None, str]:
    user, at, rest = authority.rpartition("@")
    if not at:
        return None, authority
    _check_name(user, "user name")
    return user, rest


def _dir_of(raw: str) -> str:
    """git-annex's DIR for a path as written in the URL (annex-shell.md §1)."""
    if raw.startswith("/~"):
        return raw
    if raw.startswith("~"):
        return "/" + raw
    if raw.startswith("/"):
        return raw
    return "/~/" + raw


def parse_url(url: str) -> ProxyURL:
    """Parse one URL form; ValueError with a one-line reason for anything else."""
    text = url.removeprefix(PREFIX)
    if not text:
        raise _refuse("empty URL")
    if "\n" in text or "\x00" in text:
        raise _refuse("newline or NUL in URL")
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme == "file":
            if not rest.startswith("/"):
                raise _refuse(f"file:// URL needs an absolute path: {url!r}")
            _check_path(rest, url)
            return ProxyURL("local", None, None, None, rest)
        if scheme not in ("ssh", "git+ssh", "ssh+git"):
            raise _refuse(f"unsupported URL scheme {scheme!r} (ssh:// or file:// only)")
        authority, slash, path = rest.partition("/")
        if not slash:
            raise _refuse(f"no repository path in URL {url!r}")
        user, hostport = _split_user(authority)
        host, port = _split_host(hostport, url)
        _check_path(path, url)
        return ProxyURL("ssh", user, host, port, _dir_of("/" + path))
    if text.startswith("/"):
        _check_path(text, url)
        return ProxyURL("local", None, None, None, text)
    # scp-like `[user@]host:path`: git's rule is a colon before any slash (a bracketed host
    # may hold colons of its own).
    at = text.find("@")
    at_end = at + 1 if 0 <= at < text.find(":") else 0
    if text.startswith("[", at_end):
        colon = text.find("]:", at_end)
        colon = colon + 1 if colon >= 0 else -1
    else:
        colon = text.find(":")
    first_slash = text.find("/")
    if colon < 0 or (0 <= first_slash < colon):
        raise _refuse(f"a local path must be absolute: {url!r}")
    user, hostpart = _split_user(text[:colon])
    host, _ = _split_host(hostpart, url)
    raw = text[colon + 1 :]
    _check_path(raw, url)
    return ProxyURL("ssh", user, host, None, _dir_of(raw))


def quote_word(word: str) -> str:
    """Single-quote a word so sh and git-annex-shell's splitter both read it back whole.

    An embedded `'` becomes `'"'"'` (git-annex's own quoting), not `'\\''`: git-annex-shell
    treats a backslash as an ordinary character.
    """
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _find_local_shell(env: Mapping[str, str]) -> str:
    beside = os.path.join(os.path.dirname(sys.executable), ANNEX_SHELL)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(ANNEX_SHELL, path=env.get("PATH", os.defpath))
    if found is None:
        raise _refuse(f"{ANNEX_SHELL} not found next to {sys.executable} or on PATH")
    return found


def _ssh_variant(program: str, env: Mapping[str, str]) -> str:
    forced = env.get("GIT_SSH_VARIANT", "")
    if forced:
        if forced not in _VARIANTS:
            raise _refuse(f"unknown GIT_SSH_VARIANT {forced!r}")
        return forced
    name = os.path.basename(program).lower().removesuffix(".exe")
    return _VARIANTS.get(name, "ssh")


def _ssh_argv(u: ProxyURL, remote_command: str, env: Mapping[str, str]) -> list[str]:
    """ssh to u's host running `remote_command`, launched exactly as git launches ssh."""
    assert u.host is not None
    command = env.get("GIT_SSH_COMMAND", "")
    program = env.get("GIT_SSH", "") or "ssh"
    if command:
        # git reads the variant from the command's first word.
        words = command.split()
        variant = _ssh_variant(words[0] if words else "ssh", env)
    else:
        variant = _ssh_variant(program, env)
    args: list[str] = []
    if variant == "ssh":
        args += ["-o", "SendEnv=GIT_PROTOCOL"]
    if u.port is not None:
        if variant == "simple":
            raise _refuse("ssh variant 'simple' does not support setting a port")
        args += ["-P" if variant in ("plink", "putty", "tortoiseplink") else "-p", str(u.port)]
    if variant == "tortoiseplink":
        args.append("-batch")
    args.append(f"{u.user}@{u.host}" if u.user else u.host)
    args.append(remote_command)
    if command:
        # git's run-command: the user's command is the script, our words its positionals.
        return ["sh", "-c", f'{command} "$@"', command, *args]
    return [program, *args]


def shell_argv(u: ProxyURL, words: list[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """The argv running `git-annex-shell WORD...` for u (WORDS like `p2pstdio DIR UUID`)."""
    if not words or not re.fullmatch(r"[a-z0-9]+", words[0]):
        raise _refuse(f"not a git-annex-shell command: {words[:1]!r}")
    for word in words[1:]:
        if word.startswith("-") and word not in _OWN_FLAGS:
            raise _refuse(f"option-like word blocked: {word!r}")
        if "\n" in word or "\x00" in word:
            raise _refuse("newline or NUL in a command word")
    if u.kind == "local":
        return [_find_local_shell(env), *words]
    remote = " ".join([ANNEX_SHELL, *(quote_word(w) for w in words)])
    return _ssh_argv(u, remote, env)


def git_service_argv(u: ProxyURL, service: str, env: Mapping[str, str] = os.environ) -> list[str]:
    """The argv running git's `service` on u's repository without git-annex-shell's P2P.

    Over ssh this is `git-upload-pack '/path'`, what git itself would send (git-annex-shell
    passes it on to git-shell); `/~/rel` goes back to `~/rel`, which git expands.
    """
    if service not in GIT_SERVICES:
        raise _refuse(f"not a git service: {service!r}")
    if u.kind == "local":
        return [service, u.path]
    path = u.path[1:] if u.path.startswith("/~") else u.path
    return _ssh_argv(u, f"{service} {quote_word(path)}", env)


def annexurl(u: ProxyURL) -> str:
    """The URL git-annex itself would use for u (for `remote.NAME.annexurl`)."""
    if u.kind == "local":
        return u.path
    assert u.host is not None
    host = f"[{u.host}]" if ":" in u.host else u.host
    user = f"{u.user}@" if u.user else ""
    port = f":{u.port}" if u.port is not None else ""
    return f"ssh://{user}{host}{port}{u.path}"
