"""Links from a proxy or gateway to the repositories behind it.

`NodeLink` is the one interface the proxy and the cluster gateway use; `P2PLink` speaks
the P2P protocol to any git-annex-shell (ours or git-annex's own), spawned locally for a
path remote or over ssh. The msgpack-RPC link to our own node worker implements the same
interface (`rpclink.py`).

Every call that waits on a node is bounded by the caller's `fail_after`; a link that
breaks raises `NodeError` and is dead from then on, which fails only that node's part.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from git_remote_annexproxy import p2p, p2prequests
from git_remote_annexproxy.gitconfig import GitConfig
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2prequests import P2PRequester
from shell import restrict
from shell.errors import ShellError
from shell.proxyselect import Remote, is_local_url, local_path

MAX_VERSION = p2prequests.MAX_VERSION  # the highest P2P version a node link speaks

# Variables that restrict a session apply to the client in front of us, never to our own
# hops (the proxy enforces them itself before relaying).
_SCRUBBED = (
    "GIT_ANNEX_SHELL_READONLY",
    "GIT_ANNEX_SHELL_APPENDONLY",
    "GIT_ANNEX_SHELL_LIMITED",
    "GIT_ANNEX_SHELL_DIRECTORY",
    "SSH_ORIGINAL_COMMAND",
)

# annexproxy only: set beside GIT_ANNEX_SHELL_DIRECTORY (in the same forced command), it lets
# that key reach the local nodes the proxy or gateway in that directory is configured for.
DIRECTORY_NODES_ENV = "ANNEXPROXY_DIRECTORY_NODES"


class NodeError(Exception):
    """A node failed (unreachable, died, timed out, or broke the protocol)."""


class NodeOutsideDirectory(NodeError):
    """A local node that GIT_ANNEX_SHELL_DIRECTORY does not allow; it was never started."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.text = text


class NodeRefused(NodeError):
    """The node answered ERROR: this request failed, the connection is still usable."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}")
        self.text = text


@dataclass(frozen=True)
class Outcome:
    """A node's answer to a store or removal: success, and any extra UUIDs it named."""

    ok: bool
    plus: tuple[str, ...] = ()


@dataclass(frozen=True)
class AlreadyHave:
    plus: tuple[str, ...] = ()


class Upload(ABC):
    """One PUT in progress on one node, after the node said where to start."""

    offset: int

    @abstractmethod
    async def send_data(self, length: int) -> None: ...

    @abstractmethod
    async def send_piece(self, data: bytes) -> None: ...

    @abstractmethod
    async def finish(self, valid: bool | None) -> Outcome:
        """After all pieces: send the validity (None for a v0 client) and read the answer."""

    @abstractmethod
    async def data_present(self) -> Outcome: ...


class Download(ABC):
    """One GET in progress: the node's DATA, then its validity, then the client's verdict."""

    length: int

    @abstractmethod
    def pieces(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def validity(self) -> bool | None:
        """VALID -> True, INVALID -> False, None below protocol version 1."""

    @abstractmethod
    async def verdict(self, ok: bool) -> None: ...


class NodeLink(ABC):
    """A connection to one repository behind us."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote
        self.uuid = remote.uuid
        self.version = 0

    @abstractmethod
    async def open(self, version: int | None, bypass: frozenset[str] = frozenset()) -> None:
        """Connect and negotiate; `version` None means a v0 client (send no VERSION)."""

    @abstractmethod
    async def checkpresent(self, key: Key) -> bool: ...

    @abstractmethod
    async def lockcontent(self, key: Key) -> bool: ...

    @abstractmethod
    async def unlockcontent(self) -> None: ...

    @abstractmethod
    async def remove(self, key: Key, before: int | None) -> Outcome: ...

    @abstractmethod
    async def timestamp(self) -> int: ...

    @abstractmethod
    async def put(self, af: str | None, key: Key) -> Upload | AlreadyHave: ...

    @abstractmethod
    async def get(self, offset: int, af: str | None, key: Key) -> Download: ...

    @abstractmethod
    async def aclose(self) -> None: ...


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in _SCRUBBED:
        env.pop(name, None)
    return env


def parse_ssh_url(url: str) -> tuple[str, str | None, str]:
    """(host, port, path) of an ssh remote URL, path as git-annex sends it (`/~/` for a
    path relative to the home directory)."""
    port: str | None = None
    if url.startswith("ssh://"):
        hostport, _, path = url[len("ssh://") :].partition("/")
        path = "/" + path
        if hostport.startswith("["):
            host, _, rest = hostport[1:].partition("]")
            port = rest.lstrip(":") or None
        else:
            host, _, port_s = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
            port = port_s or None
    else:
        host, _, path = url.partition(":")
        if not path.startswith("/"):
            path = "/~/" + path
    return host, port, path


def ssh_argv(remote: Remote, words: list[str]) -> list[str]:
    """ssh to `remote` running git-annex-shell with `words`, as git-annex builds it
    (annex-shell.md §7): one remote command string of single-quoted words. A host that
    starts with `-` is refused: ssh would take it as an option (CVE-2017-12976)."""
    host, port, _ = parse_ssh_url(remote.url)
    user_host = host.rpartition("@")[2]
    if not user_host or host.startswith("-") or (port is not None and not port.isdigit()):
        raise NodeError(f"refusing to use remote {remote.name} with url {remote.url!r}")
    shell_cmd = remote.get("shell") or "git-annex-shell"
    command = " ".join([shell_cmd, *(shlex.quote(w) for w in words)])
    argv = ["ssh", host, *(remote.get("ssh-options") or "").split()]
    if port:
        argv += ["-p", port]
    return [*argv, "-T", command]


def check_node_directory(remote: Remote) -> None:
    """GIT_ANNEX_SHELL_DIRECTORY applies to a node in a local directory as to any directory.

    git-annex starts a local node's git-annex-shell with the variable inherited, and that
    refuses every directory but the allowed one. We drop restrictions on node hops
    (`child_env`: the proxy enforces them), so the same rule is applied here, before the node
    starts, unless DIRECTORY_NODES_ENV says the key may reach the nodes. A node over ssh is
    its host's matter (sshd passes no such variable) and a special remote is served in the
    proxy's own process, as in git-annex.
    """
    if remote.special is not None or not is_local_url(remote.url):
        return
    if os.environ.get(DIRECTORY_NODES_ENV):
        return
    try:
        restrict.check_directory(local_path(remote.url))
    except ShellError as exc:
        raise NodeOutsideDirectory(remote.name, exc.message) from None


async def spawn_node(remote: Remote, argv: list[str]) -> trio.Process:
    """Start a node's server process (`p2pstdio` or `noderpc`, local or over ssh) with pipes
    on stdin and stdout; stderr stays ours, so the node's own messages reach the client."""
    check_node_directory(remote)
    try:
        return await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env()
        )
    except OSError as exc:
        raise NodeError(f"{remote.name}: cannot start {argv[0]}: {exc}") from None


def p2pstdio_argv(remote: Remote, proxy_uuid: str) -> list[str]:
    if remote.is_local:
        path = local_path(remote.url)
        # Our own shell, by the interpreter running us: never whichever git-annex-shell
        # PATH happens to find first.
        return [sys.executable, "-m", "shell", "p2pstdio", path, proxy_uuid]
    _, _, path = parse_ssh_url(remote.url)
    return ssh_argv(remote, ["p2pstdio", path, proxy_uuid, "--uuid", remote.uuid])


class P2PLink(NodeLink, P2PRequester):
    """The P2P protocol to a git-annex-shell p2pstdio of the node; the request plumbing,
    greeting and dead-marking rules are `P2PRequester`'s."""

    def __init__(self, remote: Remote, proxy_uuid: str, *, timeout: float) -> None:
        NodeLink.__init__(self, remote)
        P2PRequester.__init__(self, remote.name, idle_timeout=timeout)
        self.proxy_uuid = proxy_uuid
        self.timeout = timeout
        self.process: trio.Process | None = None

    def _error(self, what: str) -> NodeError:
        return NodeError(f"{self.name}: {what}")

    def _refusal(self, text: str) -> NodeRefused:
        return NodeRefused(self.name, text)

    # -- the interface -----------------------------------------------------------------

    async def open(self, version: int | None, bypass: frozenset[str] = frozenset()) -> None:
        try:
            self.process = await spawn_node(
                self.remote, p2pstdio_argv(self.remote, self.proxy_uuid)
            )
        except NodeError:
            self.dead = True
            raise
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.attach(self.process.stdout, self.process.stdin, version, bypass)

    async def attach(
        self,
        receive: trio.abc.ReceiveStream,
        send: trio.abc.SendStream,
        version: int | None,
        bypass: frozenset[str] = frozenset(),
    ) -> None:
        """Speak to the node over streams that are already connected (the pipes of the
        process `open` started, or a test's in-memory streams): check its AUTH-SUCCESS,
        then negotiate as `open` describes."""
        await self._greet(receive, send, self.uuid, version)
        if bypass and self.version >= 2:
            await self._send(p2p.Bypass(tuple(sorted(bypass))))

    async def checkpresent(self, key: Key) -> bool:
        return await self._succeeds(p2p.CheckPresent(key))

    async def lockcontent(self, key: Key) -> bool:
        return await self._succeeds(p2p.LockContent(key))

    async def unlockcontent(self) -> None:
        await self._send(p2p.UnlockContent())

    async def remove(self, key: Key, before: int | None) -> Outcome:
        if before is not None and self.version >= 3:
            await self._send(p2p.RemoveBefore(before, key))
        else:
            await self._send(p2p.Remove(key))
        return Outcome(*await self._verdict())

    async def timestamp(self) -> int:
        await self._send(p2p.GetTimestamp())
        reply = await self._reply(p2p.Timestamp)
        assert isinstance(reply, p2p.Timestamp)
        return reply.ts

    async def put(self, af: str | None, key: Key) -> Upload | AlreadyHave:
        offset, plus = await self._put(af, key)
        if offset is None:
            return AlreadyHave(plus)
        return _P2PUpload(self, offset)

    async def get(self, offset: int, af: str | None, key: Key) -> Download:
        return _P2PDownload(self, await self._get(offset, af, key))

    async def aclose(self) -> None:
        # Callers wait for aclose before answering the client: a failed node is not waited
        # for (see P2PRequester._close).
        await self._close(self.process)


class _P2PUpload(Upload):
    def __init__(self, link: P2PLink, offset: int) -> None:
        self.link = link
        self.offset = offset

    async def send_data(self, length: int) -> None:
        await self.link._send(p2p.Data(length))

    async def send_piece(self, data: bytes) -> None:
        await self.link._send_raw(data)

    async def finish(self, valid: bool | None) -> Outcome:
        if self.link.version >= 1:
            await self.link._send(p2p.Valid() if valid in (True, None) else p2p.Invalid())
        return Outcome(*await self.link._verdict())

    async def data_present(self) -> Outcome:
        await self.link._send(p2p.DataPresent())
        return Outcome(*await self.link._verdict())


class _P2PDownload(Download):
    def __init__(self, link: P2PLink, length: int) -> None:
        self.link = link
        self.length = length

    async def pieces(self) -> AsyncIterator[bytes]:
        while (piece := await self.link._piece()) is not None:
            yield piece

    async def validity(self) -> bool | None:
        return await self.link._validity()

    async def verdict(self, ok: bool) -> None:
        await self.link._send(p2p.Success() if ok else p2p.Failure())


# Admin settings of a node remote in the proxy's git config (remote.NAME.annexproxy-...).
LINK_SETTING = "annexproxy-link"  # "p2p": use P2P even for a local path (for comparison)
NODERPC_SETTING = "annexproxy-noderpc"  # true: this ssh remote runs our git-annex-shell
# A file to append one JSON line to per link made (which kind, which command): lets tests and
# admins see how each node is reached without tracing processes.
DEBUG_LOG_VARIABLE = "ANNEXPROXY_DEBUG_LINKS"


def link_kind(remote: Remote, config: GitConfig | None = None) -> str:
    """Which link reaches `remote`: "rpc" where our own node worker is known to be at the
    other end, else "p2p".

    A local path is always ours (we spawn it with our interpreter); an ssh remote only when
    the admin marked it, since a real git-annex-shell has no noderpc. A repository reached
    through another proxy is relayed by that proxy's P2P session, never ours to choose.
    """
    if remote.via is not None:
        return "p2p"
    prefix = f"remote.{remote.name}."
    if config is not None and (config.get(prefix + LINK_SETTING) or "").lower() == "p2p":
        return "p2p"
    if remote.is_local:
        return "rpc"
    if config is not None and config.get_bool(prefix + NODERPC_SETTING):
        return "rpc"
    return "p2p"


def make_link(
    remote: Remote,
    proxy_uuid: str,
    timeout: float,
    config: GitConfig | None = None,
    gitdir: Path | None = None,
) -> NodeLink:
    """The link the proxy uses for `remote`; `config` is the proxy's git config, `gitdir`
    its git directory (a special remote is served in-process, from the proxy's own repo)."""
    link: NodeLink
    if remote.special is not None:
        from shell.speciallink import SpecialLink  # noqa: PLC0415 - it imports this module

        link = SpecialLink(remote, gitdir=gitdir, config=config, timeout=timeout)
        _debug_log(remote, link, lambda: [])
        return link
    if link_kind(remote, config) == "rpc":
        from shell.rpclink import RpcLink  # noqa: PLC0415 - rpclink imports this module

        link = RpcLink(remote, proxy_uuid, timeout=timeout)
        argv = link.argv
    else:
        link = P2PLink(remote, proxy_uuid, timeout=timeout)
        argv = lambda: p2pstdio_argv(remote, proxy_uuid)  # noqa: E731
    _debug_log(remote, link, argv)
    return link


def _debug_log(remote: Remote, link: NodeLink, argv: Callable[[], list[str]]) -> None:
    path = os.environ.get(DEBUG_LOG_VARIABLE)
    if not path:
        return
    try:
        command: list[str] | None = argv()
    except NodeError:
        command = None  # an unusable URL: open() reports it
    record = {"remote": remote.name, "link": type(link).__name__, "argv": command}
    try:
        with open(path, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
    except OSError:
        pass  # a debug aid must never break a session
