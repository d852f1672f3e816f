"""git-remote-annexproxy: git's remote helper for `annexproxy::` URLs (gitremote-helpers(7)).

    git clone annexproxy::ssh://host/srv/data.git

git starts `git-remote-annexproxy REMOTE URL` and asks for `capabilities`; we offer only
`connect` (and `option`), so git speaks its native protocol through us: on
`connect git-upload-pack` (or receive-pack) we open `git-annex-shell p2pstdio DIR UUID` on
the server, tunnel the service through the P2P session's CONNECT (gittunnel.py), answer
git with an empty line and become the pipe. A server that cannot tunnel git (git-annex's
own git-annex-shell) ends the session at CONNECT; we then run `git-upload-pack '/dir'` over
ssh directly, as git itself would, so the helper works with any git-annex server.

After a successful fetch into a configured remote, `remote.NAME.annexurl` is set to the
equivalent ssh URL: git-annex cannot parse an `annexproxy::` URL, and reads annexurl in its
place, so a clone made by this helper works with a real git-annex client as is.

With `remote.NAME.annexproxy-push-content=true`, a successful push is followed by an upload
of the annexed content of what it updated (pushcontent.py); the helper watches the
receive-pack session's bytes to learn which refs that was.

Errors are one `fatal: ...` line on stderr and exit status 1, as git's own helpers do.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from git_remote_annexproxy import urls
from git_remote_annexproxy.gitconfig import GitConfig, parse_list_z
from git_remote_annexproxy.gitenv import without_local_repo

if TYPE_CHECKING:
    from git_remote_annexproxy.pushcontent import PushWatch

# Services we tunnel; git-upload-archive is not offered (git-annex-shell disables it too).
SERVICES = ("git-upload-pack", "git-receive-pack")
MAX_COMMAND = 4096  # bytes of one helper command line; git's are a few dozen
IDLE_TIMEOUT_CONFIG = "annexproxy.idletimeout"
UUID_CONFIG = "annexproxy.uuid"
# git's configuration for ssh, applied when the environment does not say otherwise.
SSH_SETTINGS = (("GIT_SSH_COMMAND", "core.sshcommand"), ("GIT_SSH_VARIANT", "ssh.variant"))


class Fatal(Exception):
    """One line for the user; exit status 1."""


class Helper:
    def __init__(self, remote: str, url: str, env: Mapping[str, str]) -> None:
        self.remote = remote
        self.env = dict(env)
        # `annexproxy://host/path` reaches us whole when written without `::`.
        if url.startswith("annexproxy://"):
            url = "ssh://" + url.removeprefix("annexproxy://")
        try:
            self.url = urls.parse_url(url)
        except ValueError as exc:
            raise Fatal(str(exc)) from None
        self.in_repo = bool(env.get("GIT_DIR"))
        self.config = read_config(self.env)
        self.verbosity = 1

    # -- the helper protocol ------------------------------------------------------------

    def serve(self) -> int:
        while True:
            line = read_command()
            if not line:
                return 0  # git is done (empty line or end of input)
            if line == "capabilities":
                reply(b"connect\noption\n\n")
            elif line.startswith("option "):
                reply(self.option(line.removeprefix("option ")) + b"\n")
            elif line.startswith("connect "):
                return self.connect(line.removeprefix("connect "))
            else:
                raise Fatal(f"unknown helper command {line[:80]!r}")

    def option(self, text: str) -> bytes:
        name, _, value = text.partition(" ")
        if name == "verbosity" and value.isdigit():
            self.verbosity = int(value)
            return b"ok"
        if name == "progress" and value in ("true", "false"):
            # git's progress comes from the service itself (side-band), through the tunnel.
            return b"ok"
        return b"unsupported"

    def connect(self, service: str) -> int:
        if service not in SERVICES:
            raise Fatal(f"{service} is not supported by annexproxy")
        env = self.session_env(service)
        watch = self.push_watch(service)
        code = self.tunnel(service, env, watch)
        if code is None:
            code = self.fallback(service, env, watch)
        if code == 0 and service == "git-upload-pack":
            self.remember_annexurl()
        if watch is not None:
            from git_remote_annexproxy import pushcontent  # noqa: PLC0415

            verbose = self.verbosity >= 2
            sent = pushcontent.send_content(self.remote, self.config, watch, code, verbose=verbose)
            code = code or sent
        return code

    def push_watch(self, service: str) -> PushWatch | None:
        """A watch on a push whose content is to be sent afterwards, else None."""
        if service != "git-receive-pack" or not self.in_repo:
            return None
        from git_remote_annexproxy import pushcontent  # noqa: PLC0415

        return pushcontent.PushWatch() if pushcontent.enabled(self.config, self.remote) else None

    # -- the two transports -------------------------------------------------------------

    def tunnel(self, service: str, env: dict[str, str], watch: PushWatch | None) -> int | None:
        """git through CONNECT; None when the server cannot do that (nothing sent to git)."""
        import trio  # noqa: PLC0415 - only this path needs it

        from git_remote_annexproxy import gittunnel  # noqa: PLC0415

        try:
            argv = urls.shell_argv(self.url, ["p2pstdio", self.url.path, self.client_uuid()], env)
        except ValueError as exc:
            if self.url.kind == "local":
                return None  # no git-annex-shell here: plain git serves a local path
            raise Fatal(str(exc)) from None
        try:
            return trio.run(
                lambda: gittunnel.run_service(
                    argv,
                    env,
                    service,
                    idle_timeout=self.idle_timeout(),
                    announce=lambda: reply(b"\n"),
                    verbose=self.verbosity >= 2,
                    watch=watch,
                )
            )
        except gittunnel.TunnelError as exc:
            raise Fatal(str(exc)) from None
        except OSError as exc:
            raise Fatal(f"cannot run {argv[0]}: {exc.strerror}") from None

    def fallback(self, service: str, env: dict[str, str], watch: PushWatch | None) -> int:
        """The service run directly (over ssh, or locally), with git on our fds 0 and 1."""
        try:
            argv = urls.git_service_argv(self.url, service, env)
        except ValueError as exc:
            raise Fatal(str(exc)) from None
        if self.verbosity >= 2:
            sys.stderr.write("annexproxy: the server does not tunnel git; running it directly\n")
            sys.stderr.flush()
        reply(b"\n")
        try:
            # No timeout of ours: this is git's own transport, which git waits on for as long
            # as the transfer takes (ssh's keep-alives bound a dead connection).
            if watch is None:
                returncode = subprocess.run(argv, env=env, check=False).returncode
            else:
                from git_remote_annexproxy.pushcontent import run_watched  # noqa: PLC0415

                returncode = run_watched(argv, env, watch)
        except OSError as exc:
            raise Fatal(f"cannot run {argv[0]}: {exc.strerror}") from None
        return returncode if returncode >= 0 else 128 - returncode

    # -- environment and configuration --------------------------------------------------

    def session_env(self, service: str) -> dict[str, str]:
        """The environment for ssh or a local server: no trace of our own repository, the
        ssh settings git would use, and GIT_PROTOCOL as git would send it."""
        env = without_local_repo(self.env)
        for variable, key in SSH_SETTINGS:
            value = self.config.get(key)
            if not env.get(variable) and value:
                env[variable] = value
        protocol = git_protocol(service, self.config.get("protocol.version"))
        if protocol and not env.get("GIT_PROTOCOL"):
            env["GIT_PROTOCOL"] = protocol
        return env

    def idle_timeout(self) -> float:
        # Imported here: the P2P modules cost tens of milliseconds, and only a tunnel pays.
        from git_remote_annexproxy import p2p  # noqa: PLC0415

        try:
            value = float(self.config.get(IDLE_TIMEOUT_CONFIG) or p2p.DEFAULT_IDLE_TIMEOUT)
        except ValueError:
            return p2p.DEFAULT_IDLE_TIMEOUT
        return value if math.isfinite(value) and value > 0 else p2p.DEFAULT_IDLE_TIMEOUT

    def client_uuid(self) -> str:
        """Who we are to the server: this repository's annex.uuid, else our own stable one."""
        for key in ("annex.uuid", UUID_CONFIG):
            known = self.config.get(key)
            if known:
                return known
        value = str(uuidlib.uuid4())
        if self.in_repo:
            set_config(self.env, UUID_CONFIG, value)
            self.config.set(UUID_CONFIG, value)
        return value

    def remember_annexurl(self) -> None:
        """Point git-annex at the same repository (see the module docstring).

        An annexurl already there is left alone: the user may have chosen another one.
        """
        key = f"remote.{self.remote}.annexurl"
        if not self.in_repo or f"remote.{self.remote}.url" not in self.config:
            return
        if key not in self.config:
            set_config(self.env, key, urls.annexurl(self.url))


def git_protocol(service: str, configured: str | None) -> str | None:
    """GIT_PROTOCOL as git's own ssh transport sets it (connect.c): protocol.version,
    default 2; v2 exists for upload-pack only, so a push asks for v0 (nothing) instead."""
    version = (configured or "2").strip()
    if version == "1":
        return "version=1"
    if version == "2" and service == "git-upload-pack":
        return "version=2"
    return None


def read_config(env: Mapping[str, str]) -> GitConfig:
    """All of git's configuration as git sees it here (repository, global, `-c`)."""
    try:
        result = subprocess.run(
            ["git", "config", "-z", "--list"],
            env=dict(env),
            capture_output=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Fatal(f"cannot read git config: {exc}") from None
    return GitConfig(parse_list_z(result.stdout))


def set_config(env: Mapping[str, str], key: str, value: str) -> None:
    try:
        subprocess.run(
            ["git", "config", "--", key, value],
            env=dict(env),
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise Fatal(f"cannot set git config {key}: {exc}") from None


def read_command() -> str:
    """One command line from git, read unbuffered: after `connect` our stdin belongs to
    the service, so not one byte past the newline may be taken."""
    line = bytearray()
    while len(line) <= MAX_COMMAND:
        byte = os.read(0, 1)
        if not byte or byte == b"\n":
            return os.fsdecode(bytes(line))
        line += byte
    raise Fatal("helper command line too long")


def reply(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) == 2:
            remote, url = args
        elif len(args) == 1:
            remote = args[0]
            url = read_config(os.environ).get(f"remote.{remote}.url") or ""
        else:
            raise Fatal("usage: git-remote-annexproxy REMOTE [URL]")
        return Helper(remote, url, os.environ).serve()
    except Fatal as exc:
        sys.stderr.write(f"fatal: {exc}\n")
        sys.stderr.flush()
        return 1
    except BrokenPipeError:
        return 1  # git went away
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())
