"""What the node RPC says: its typed errors and its method table (protocol version 1).

The codec in `rpc.py` checks every request, result and notification against the tables
here, on both ends, so the proxy and the node worker share one definition. Params and
results are msgpack maps with exactly the fields listed (no optional fields: a nullable
field is sent as nil), because an unknown field silently ignored by an older node could
change what a call means (think of `remove` without its `before`).

| method        | params                                   | result            | stream   |
|---------------|------------------------------------------|-------------------|----------|
| `info`        | {}                                       | {uuid, kind}      |          |
| `checkpresent`| {keys: [key, 1..MAX_BATCH]}              | {present: [bool]} |          |
| `lock`        | {key}                                    | {lock: id}        |          |
| `unlock`      | {lock: id}                               | {}                |          |
| `put_begin`   | {key, af: str or nil}                    | {offset: n or nil}| upload   |
| `put_finish`  | {upload: id of the put_begin, valid}     | {}                |          |
| `get`         | {key, offset: n, af: str or nil}         | {length: n}       | download |
| `remove`      | {key, before: ts or nil}                 | {}                |          |
| `timestamp`   | {}                                       | {ts: n}           |          |

Semantics, as the node worker implements them (after the P2P protocol, spec §6-7):

* `checkpresent`: `present[i]` answers `keys[i]` (same length; the caller checks that).
* `lock`: a shared content lock until `unlock` or disconnect, with git-annex's lock retention
  (removal stays refused for 600 s after a lock, even if the connection dies). Errors:
  `not-found`, `locked`.
* `put_begin`: `offset` nil means the node already has the content (no stream); otherwise
  the client streams the bytes from `offset` on (resume of a partial upload) on stream id =
  the put_begin request id, ends it, then calls `put_finish` with P2P's VALID/INVALID as
  `valid`. A short stream keeps the partial for a later resume. Errors of `put_finish`:
  `verify-failed`, `io`; of `put_begin`: `readonly`, `transfer-in-progress`, `io`.
* `get`: `length` bytes follow on a download stream (id = the request id); 0 past the end.
  A stream that ends short means the read failed. Error: `not-found`.
* `remove`: succeeds if the content is gone afterwards; with `before` (a `timestamp` value)
  only while the node's monotonic clock is below it. Errors: `locked`, `appendonly`,
  `readonly`.
* `timestamp`: the node's monotonic clock in seconds (P2P GETTIMESTAMP).
* Per connection a node holds at most MAX_LOCKS locks and MAX_STREAMS open streams (uploads
  begun and not finished, downloads not ended); past that `lock`, `put_begin` and `get` fail
  with `protocol`. A proxy uses a handful at a time; the bounds are for other clients.

Notification: `log` {message}: a diagnostic from the node for the proxy's log (the node's
stderr may be an ssh channel nobody reads).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Literal

from .keys import BadKey, Key

MAX_BATCH: Final = 256  # keys per checkpresent; 256 keys of MAX_KEY_LENGTH fit one frame
MAX_ID: Final = 2**63 - 1  # request ids and lock ids
MAX_NAT: Final = 2**63 - 1  # offsets, lengths, timestamps: what an off_t / time_t holds
MAX_MESSAGE: Final = 1024  # error and log text is cut to this many characters when sent
MAX_STREAMS: Final = 32  # open body streams per connection (each holds files and locks)
MAX_LOCKS: Final = 64  # content locks held per connection


# --- typed errors ----------------------------------------------------------------------------


class RpcError(Exception):
    """An error the peer reported for one call; the connection itself is fine.

    Received types outside the v1 set arrive as this base class with `error_type` kept, so
    a newer node's errors still reach the caller."""

    TYPE: ClassVar[str] = ""

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = self.TYPE if error_type is None else error_type

    # Value equality, so events that carry an error compare equal across runs.
    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, RpcError)
            and (other.error_type, other.message) == (self.error_type, self.message)
        )

    def __hash__(self) -> int:
        return hash((type(self), self.error_type, self.message))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, error_type={self.error_type!r})"


class NotFoundError(RpcError):
    TYPE = "not-found"


class LockedError(RpcError):
    TYPE = "locked"


class ReadOnlyError(RpcError):
    TYPE = "readonly"


class AppendOnlyError(RpcError):
    TYPE = "appendonly"


class VerifyFailedError(RpcError):
    TYPE = "verify-failed"


class TransferInProgressError(RpcError):
    TYPE = "transfer-in-progress"


class StorageIOError(RpcError):
    TYPE = "io"


class CallProtocolError(RpcError):
    """The call broke the protocol (the codec also makes one for a malformed result)."""

    TYPE = "protocol"


class BadRequestError(RpcError):
    """Unknown method or params that do not fit the method table."""

    TYPE = "bad-request"


ERROR_TYPES: Final[Mapping[str, type[RpcError]]] = {
    cls.TYPE: cls
    for cls in (
        NotFoundError, LockedError, ReadOnlyError, AppendOnlyError, VerifyFailedError,
        TransferInProgressError, StorageIOError, CallProtocolError, BadRequestError,
    )
}  # fmt: skip


def error_from_wire(error_type: str, message: str) -> RpcError:
    cls = ERROR_TYPES.get(error_type)
    return RpcError(message, error_type=error_type) if cls is None else cls(message)


# --- field checks ----------------------------------------------------------------------------
# Exact type tests, not isinstance: msgpack gives exact types, and bool is an int subclass
# that must not pass as an offset. Strings are bounded by the framing (rpc.MAX_STR).

Check = Callable[[object], bool]


def _nat(v: object) -> bool:
    return type(v) is int and 0 <= v <= MAX_NAT


def _id(v: object) -> bool:
    return type(v) is int and 1 <= v <= MAX_ID


def _bool(v: object) -> bool:
    return type(v) is bool


def _text(v: object) -> bool:
    return type(v) is str


def _key(v: object) -> bool:
    if type(v) is not str:
        return False
    try:
        Key.parse(v)
    except BadKey:
        return False
    return True


def _af(v: object) -> bool:
    # As in P2P: an absolute AssociatedFile is refused; newline and NUL would corrupt the
    # line-based transfer info files that record it. "No file" is nil, never "".
    return v is None or (type(v) is str and v != "" and v[0] != "/" and not {"\n", "\0"} & set(v))


def _keys(v: object) -> bool:
    return isinstance(v, list | tuple) and 1 <= len(v) <= MAX_BATCH and all(map(_key, v))


def _bools(v: object) -> bool:
    return isinstance(v, list | tuple) and len(v) <= MAX_BATCH and all(map(_bool, v))


def _nullable(check: Check) -> Check:
    return lambda v: v is None or check(v)


# --- the tables ------------------------------------------------------------------------------

Schema = Mapping[str, Check]


@dataclass(frozen=True, slots=True)
class Method:
    params: Schema
    result: Schema
    # Direction of the body stream a successful call opens, seen from the client, and
    # whether a given successful result opens it (put_begin does not when the node has it).
    stream: Literal["upload", "download"] | None = None
    opens: Callable[[Mapping[str, Any]], bool] = lambda result: True


METHODS: Final[Mapping[str, Method]] = {
    "info": Method({}, {"uuid": _text, "kind": _text}),
    "checkpresent": Method({"keys": _keys}, {"present": _bools}),
    "lock": Method({"key": _key}, {"lock": _id}),
    "unlock": Method({"lock": _id}, {}),
    "put_begin": Method(
        {"key": _key, "af": _af},
        {"offset": _nullable(_nat)},
        stream="upload",
        opens=lambda result: result["offset"] is not None,
    ),
    "put_finish": Method({"upload": _id, "valid": _bool}, {}),
    "get": Method({"key": _key, "offset": _nat, "af": _af}, {"length": _nat}, stream="download"),
    "remove": Method({"key": _key, "before": _nullable(_nat)}, {}),
    "timestamp": Method({}, {"ts": _nat}),
}

NOTIFICATIONS: Final[Mapping[str, Schema]] = {"log": {"message": _text}}


def _check(schema: Schema, value: object, what: str) -> str | None:
    """Why `value` does not fit `schema`, or None if it does."""
    if type(value) is not dict:
        return f"{what}: not a map"
    if value.keys() != schema.keys():
        return f"{what}: the fields must be exactly {sorted(schema)}"
    for name, ok in schema.items():
        if not ok(value[name]):
            return f"{what}: bad {name!r}"
    return None


def validate_params(method: str, params: object) -> None:
    """Raise BadRequestError unless `params` fit `method` (the server answers with it)."""
    spec = METHODS.get(method)
    problem = (
        f"unknown method {method[:64]!r}"
        if spec is None
        else _check(spec.params, params, f"{method} params")
    )
    if problem is not None:
        raise BadRequestError(problem)


def validate_result(method: str, result: object) -> None:
    """Raise CallProtocolError unless `result` is a valid success result of `method`."""
    problem = _check(METHODS[method].result, result, f"{method} result")
    if problem is not None:
        raise CallProtocolError(problem)


def validate_notification(method: str, params: object) -> str | None:
    """Why this notification is invalid, or None."""
    schema = NOTIFICATIONS.get(method)
    if schema is None:
        return f"unknown notification {method[:64]!r}"
    return _check(schema, params, f"{method} notification")
