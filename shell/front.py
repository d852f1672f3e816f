"""What every proxying session does on the client's side of the connection.

The proxy (one node) and the cluster gateway (many) both face a git-annex client over
p2pstdio, enforce the restriction variables before relaying, log node locations in the
proxy's own git-annex branch, and end the same way; that is here, once.
"""

from __future__ import annotations

import os
import time

from git_remote_annexproxy import p2p
from git_remote_annexproxy.annexlog import is_cluster_uuid
from git_remote_annexproxy.branch import AnnexBranch
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.p2pchannel import P2PChannel
from shell import restrict
from shell.p2pserver import ClientFacing, SessionEnd, warn
from shell.repo import Repo

# How long one node may take to answer one request (or to move data at all) before only
# that node's part fails. Admins can change it with git config annexproxy.nodetimeout.
DEFAULT_NODE_TIMEOUT = 120.0


def node_timeout(repo: Repo) -> float:
    value = repo.config.get("annexproxy.nodetimeout")
    try:
        return float(value) if value else DEFAULT_NODE_TIMEOUT
    except ValueError:
        return DEFAULT_NODE_TIMEOUT


def annex_jobs(repo: Repo) -> int:
    value = (repo.config.get("annex.jobs") or "1").strip()
    if value == "cpus":
        return os.cpu_count() or 1
    return int(value) if value.isdigit() and int(value) > 0 else 1


class FrontSession(ClientFacing):
    """The client-facing half of a proxying session."""

    def __init__(self, repo: Repo, channel: P2PChannel, client_uuid: str, served: str) -> None:
        assert repo.uuid is not None
        self.repo = repo
        self.own_uuid: str = repo.uuid
        self.served = served  # the UUID the client addressed (node or cluster)
        self.channel = channel
        self.client_uuid = client_uuid
        self.branch = AnnexBranch(repo.gitdir, repo.annexdir)
        self.mode = restrict.server_mode()
        self.version: int | None = None  # None until negotiated; a v0 client never does
        self.timeout = node_timeout(repo)

    @property
    def v(self) -> int:
        return self.version or 0

    async def protocol_error(self) -> None:
        """A message a proxy cannot relay: git-annex answers this and gives up."""
        await self.send(p2p.Error("protocol error"))
        raise SessionEnd(1, "protocol error")

    async def not_a_request(self, event: p2p.Event) -> None:
        """Messages outside the request set, shared by the proxy and the gateway."""
        match event:
            case p2p.Error():
                raise SessionEnd(0)
            case p2p.Unparsable():
                await self.send(p2p.Error("unknown command"))
            case p2p.Extensions():
                await self.send(p2p.Extensions(()))  # none for this kind of session
            case (
                p2p.CheckObject() | p2p.PutObject() | p2p.GetObject() | p2p.Record()
                | p2p.PutIndirect() | p2p.IndirectDone()
            ):  # fmt: skip
                # Not negotiated here: as unknown as to git-annex (a RECORD's DATA then
                # arrives as an unexpected DATA, and is answered as any other).
                await self.send(p2p.Error("unknown command"))
            case p2p.Bypass():
                pass
            case _:
                await self.protocol_error()

    def log_present(self, key: Key, uuids: list[str] | tuple[str, ...], present: bool) -> bool:
        """Record node locations in the proxy's branch; never a cluster UUID (spec §10).
        False if the log cannot be written (see `log_location`): the request fails."""
        return all(
            self.log_location(key, uuid, present)
            for uuid in dict.fromkeys(uuids)
            if uuid and not is_cluster_uuid(uuid) and uuid != self.own_uuid
        )

    async def read_client_data(self) -> p2p.Event:
        """The client's answer to PUT-FROM: DATA, DATA-PRESENT, or something wrong."""
        return await self.event()

    def log_traffic(self, storage_written: int = 0, storage_read: int = 0) -> None:
        """One line per session in the file git config ``annexproxy.trafficlog`` (or
        ANNEXPROXY_TRAFFIC_LOG) names: what crossed the client's connection and the
        storage's, so an admin (and the tests) can see where the bytes went."""
        path = os.environ.get("ANNEXPROXY_TRAFFIC_LOG") or self.repo.config.get(
            "annexproxy.trafficlog"
        )
        if not path:
            return
        line = (
            f"{int(time.time())} uuid={self.served} client={self.client_uuid}"
            f" client_in={self.channel.bytes_in} client_out={self.channel.bytes_out}"
            f" storage_written={storage_written} storage_read={storage_read}\n"
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "surrogateescape"))  # one append: atomic
            finally:
                os.close(fd)
        except OSError as exc:
            warn(f"git-annex-shell: cannot write the traffic log: {exc}")

    async def client_validity(self) -> bool | None:
        """VALID/INVALID after the client's DATA (None for a v0 client)."""
        if self.v < 1:
            return None
        event = await self.event()
        if isinstance(event, p2p.Valid):
            return True
        if isinstance(event, p2p.Invalid):
            return False
        await self.send(p2p.Error("expected VALID or INVALID"))
        raise SessionEnd(1, "client sent no VALID or INVALID after DATA")
