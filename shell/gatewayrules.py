"""The cluster gateway's placement and reply rules, as pure functions (p2p-protocol.md §10).

Kept apart from the I/O so that each rule is a table-driven unit test, and so that the
gateway session reads as "ask the nodes, then apply the rule".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from git_remote_annexproxy import p2p

N = TypeVar("N")


def put_targets(
    nodes: Sequence[N],
    uuid_of: Callable[[N], str],
    logged: frozenset[str],
    wants: Callable[[N], bool],
) -> list[N]:
    """Nodes that get a PUT: not logged as having the key and wanting it; else those not
    logged as having it; else all nodes (git-annex's fallbacks, in this order)."""
    missing = [n for n in nodes if uuid_of(n) not in logged]
    wanted = [n for n in missing if wants(n)]
    return wanted or missing or list(nodes)


@dataclass(frozen=True)
class NodeReply:
    """What one node answered to a PUT or REMOVE, reduced to what the rules need."""

    uuid: str
    ok: bool  # SUCCESS / SUCCESS-PLUS / ALREADY-HAVE(-PLUS)
    plus: tuple[str, ...] = ()
    plus_only: bool = False  # FAILURE-PLUS: the listed UUIDs count, the node itself not


def _uuids(replies: Sequence[NodeReply]) -> list[str]:
    out: list[str] = []
    for r in replies:
        if r.ok:
            out.append(r.uuid)
            out.extend(r.plus)
        elif r.plus_only:
            out.extend(r.plus)
    return list(dict.fromkeys(out))


def already_have_reply(replies: Sequence[NodeReply], version: int, cluster: str) -> p2p.Message:
    """Every target already had the key: ALREADY-HAVE-PLUS with their UUIDs (v2+)."""
    if version < 2:
        return p2p.AlreadyHave()
    return p2p.AlreadyHavePlus(tuple(u for u in _uuids(replies) if u != cluster))


def put_reply(replies: Sequence[NodeReply], version: int) -> p2p.Message:
    """SUCCESS-PLUS listing every node that stored it and every UUID a sub-gateway named
    (the cluster UUID included, as git-annex sends it); FAILURE when none did; plain
    SUCCESS below v2."""
    stored = _uuids([r for r in replies if r.ok])
    if not any(r.ok for r in replies):
        return p2p.Failure()
    if version < 2:
        return p2p.Success()
    return p2p.SuccessPlus(tuple(stored))


def remove_reply(
    replies: Sequence[NodeReply], version: int, addressed: str, first_error: str | None
) -> p2p.Message:
    """REMOVE went to every node: SUCCESS-PLUS when all succeeded, else FAILURE-PLUS, each
    listing the UUIDs the content is now gone from. Plain SUCCESS/FAILURE (or the first
    node's ERROR) below v2, or when the list is empty or is only the addressed UUID."""
    if not replies:
        return p2p.Failure()
    all_ok = all(r.ok for r in replies)
    gone = _uuids(replies)
    if version < 2 or not gone or gone == [addressed]:
        if not all_ok and first_error is not None and not gone:
            return p2p.Error(first_error)
        return p2p.Success() if all_ok else p2p.Failure()
    return p2p.SuccessPlus(tuple(gone)) if all_ok else p2p.FailurePlus(tuple(gone))


def translate_deadline(deadline: int, gateway_now: int, node_now: int) -> int:
    """A REMOVE-BEFORE deadline in the gateway's clock, moved into one node's clock.

    Clocks are per host (monotonic, since boot), so an expired deadline can land below
    zero on a node that booted recently; 0 is just as expired and can be sent.
    """
    return max(0, node_now + (deadline - gateway_now))
