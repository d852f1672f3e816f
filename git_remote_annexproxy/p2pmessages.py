"""git-annex's P2P protocol messages, versions 0-4 (spec §1-4; `P2P/Protocol.hs`): one
frozen dataclass per message, how each is parsed from the text after its verb (`PARSERS`)
and written (`fields`). The framing (lines, the bytes after `DATA n`) and the whole
vocabulary are `p2p`'s; our own extension messages are in `p2pext`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, assert_never

from .keys import Key
from .p2pfields import (
    LocalProtocolError,
    decode_af,
    encode_af,
    is_token,
    key_str,
    nat,
    num,
    p0,
    p_key,
    p_list,
    p_nat,
    parse_key,
    separate,
    token,
)

SERVICES: Final = frozenset({"git-upload-pack", "git-receive-pack"})

#: The highest protocol version git-annex 10.20261026 speaks, and so do we, on every side.
MAX_VERSION: Final = 4
_AUTH_TOKEN_RE: Final = re.compile("[A-Za-z0-9]*")


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth:
    uuid: str
    token: str  # upstream AuthToken: ASCII letters and digits only, may be empty


@dataclass(frozen=True, slots=True)
class AuthSuccess:
    uuid: str


@dataclass(frozen=True, slots=True)
class AuthFailure:
    pass


@dataclass(frozen=True, slots=True)
class Version:
    n: int


@dataclass(frozen=True, slots=True)
class Bypass:
    uuids: tuple[str, ...]  # sent in this order; upstream sends a sorted set


@dataclass(frozen=True, slots=True)
class CheckPresent:
    key: Key


@dataclass(frozen=True, slots=True)
class LockContent:
    key: Key


@dataclass(frozen=True, slots=True)
class UnlockContent:
    pass


@dataclass(frozen=True, slots=True)
class Remove:
    key: Key


@dataclass(frozen=True, slots=True)
class RemoveBefore:
    ts: int
    key: Key


@dataclass(frozen=True, slots=True)
class GetTimestamp:
    pass


@dataclass(frozen=True, slots=True)
class Timestamp:
    ts: int


@dataclass(frozen=True, slots=True)
class Put:
    af: str | None
    key: Key


@dataclass(frozen=True, slots=True)
class PutFrom:
    offset: int


@dataclass(frozen=True, slots=True)
class Data:
    """Only the header line; the caller writes (or the reader delivers) the payload."""

    length: int


@dataclass(frozen=True, slots=True)
class DataPresent:
    pass


@dataclass(frozen=True, slots=True)
class Valid:
    pass


@dataclass(frozen=True, slots=True)
class Invalid:
    pass


@dataclass(frozen=True, slots=True)
class Get:
    offset: int
    af: str | None
    key: Key


@dataclass(frozen=True, slots=True)
class Success:
    pass


@dataclass(frozen=True, slots=True)
class Failure:
    pass


@dataclass(frozen=True, slots=True)
class SuccessPlus:
    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FailurePlus:
    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AlreadyHave:
    pass


@dataclass(frozen=True, slots=True)
class AlreadyHavePlus:
    uuids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Connect:
    service: str


@dataclass(frozen=True, slots=True)
class ConnectDone:
    code: int


@dataclass(frozen=True, slots=True)
class NotifyChange:
    pass


@dataclass(frozen=True, slots=True)
class Changed:
    shas: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Error:
    text: str


AnnexMessage: TypeAlias = (
    Auth | AuthSuccess | AuthFailure | Version | Bypass | CheckPresent | LockContent
    | UnlockContent | Remove | RemoveBefore | GetTimestamp | Timestamp | Put | PutFrom | Data
    | DataPresent | Valid | Invalid | Get | Success | Failure | SuccessPlus | FailurePlus
    | AlreadyHave | AlreadyHavePlus | Connect | ConnectDone | NotifyChange | Changed | Error
)  # fmt: skip


# --- parsing ---------------------------------------------------------------------------------


def _parse_auth(rest: str) -> AnnexMessage | None:
    uuid, auth_token = separate(rest)
    if uuid and _AUTH_TOKEN_RE.fullmatch(auth_token):
        return Auth(uuid, auth_token)
    return None


def _parse_remove_before(rest: str) -> AnnexMessage | None:
    ts_s, key_s = separate(rest)
    ts, key = nat(ts_s), parse_key(key_s)
    return None if ts is None or key is None else RemoveBefore(ts, key)


def _parse_put(rest: str) -> AnnexMessage | None:
    af_s, key_s = separate(rest)
    key = parse_key(key_s)
    try:
        return None if key is None else Put(decode_af(af_s), key)
    except ValueError:
        return None


def _parse_get(rest: str) -> AnnexMessage | None:
    offset_s, rest = separate(rest)
    af_s, key_s = separate(rest)
    offset, key = nat(offset_s), parse_key(key_s)
    try:
        return None if offset is None or key is None else Get(offset, decode_af(af_s), key)
    except ValueError:
        return None


# DATA is missing on purpose: the reader handles it, because it switches the framing.
PARSERS: Final[dict[str, Callable[[str], AnnexMessage | None]]] = {
    "AUTH": _parse_auth,
    "AUTH-SUCCESS": lambda rest: AuthSuccess(rest) if is_token(rest) else None,
    "AUTH-FAILURE": p0(AuthFailure()),
    "VERSION": p_nat(Version),
    "BYPASS": p_list(Bypass),
    "CHECKPRESENT": p_key(CheckPresent),
    "LOCKCONTENT": p_key(LockContent),
    "UNLOCKCONTENT": p0(UnlockContent()),
    "REMOVE": p_key(Remove),
    "REMOVE-BEFORE": _parse_remove_before,
    "GETTIMESTAMP": p0(GetTimestamp()),
    "TIMESTAMP": p_nat(Timestamp),
    "PUT": _parse_put,
    "PUT-FROM": p_nat(PutFrom),
    "DATA-PRESENT": p0(DataPresent()),
    "VALID": p0(Valid()),
    "INVALID": p0(Invalid()),
    "GET": _parse_get,
    "SUCCESS": p0(Success()),
    "FAILURE": p0(Failure()),
    "SUCCESS-PLUS": p_list(SuccessPlus),
    "FAILURE-PLUS": p_list(FailurePlus),
    "ALREADY-HAVE": p0(AlreadyHave()),
    "ALREADY-HAVE-PLUS": p_list(AlreadyHavePlus),
    "CONNECT": lambda rest: Connect(rest) if rest in SERVICES else None,
    "CONNECTDONE": p_nat(ConnectDone),
    "NOTIFYCHANGE": p0(NotifyChange()),
    "CHANGED": p_list(Changed),
    "ERROR": Error,
}


# --- writing ---------------------------------------------------------------------------------


def fields(msg: AnnexMessage) -> list[str]:
    """The words of the message's line, verb first (`p2p.serialize` joins them)."""
    # Joined with single spaces like upstream's `unwords`, empty fields included, so an
    # absent AssociatedFile gives `GET 0  KEY` and `ERROR` with no text gives `ERROR `.
    match msg:
        case Auth(uuid, auth_token):
            if not _AUTH_TOKEN_RE.fullmatch(auth_token):
                raise LocalProtocolError("AUTH token must be ASCII letters and digits")
            return ["AUTH", token(uuid), auth_token]
        case AuthSuccess(uuid):
            return ["AUTH-SUCCESS", token(uuid)]
        case AuthFailure():
            return ["AUTH-FAILURE"]
        case Version(n):
            return ["VERSION", num(n)]
        case Bypass(uuids):
            return ["BYPASS", *map(token, uuids)]
        case CheckPresent(key):
            return ["CHECKPRESENT", key_str(key)]
        case LockContent(key):
            return ["LOCKCONTENT", key_str(key)]
        case UnlockContent():
            return ["UNLOCKCONTENT"]
        case Remove(key):
            return ["REMOVE", key_str(key)]
        case RemoveBefore(ts, key):
            return ["REMOVE-BEFORE", num(ts), key_str(key)]
        case GetTimestamp():
            return ["GETTIMESTAMP"]
        case Timestamp(ts):
            return ["TIMESTAMP", num(ts)]
        case Put(af, key):
            return ["PUT", encode_af(af), key_str(key)]
        case PutFrom(offset):
            return ["PUT-FROM", num(offset)]
        case Data(length):
            return ["DATA", num(length)]
        case DataPresent():
            return ["DATA-PRESENT"]
        case Valid():
            return ["VALID"]
        case Invalid():
            return ["INVALID"]
        case Get(offset, af, key):
            return ["GET", num(offset), encode_af(af), key_str(key)]
        case Success():
            return ["SUCCESS"]
        case Failure():
            return ["FAILURE"]
        # Upstream builds the three -PLUS lists and BYPASS as separate words (an empty list
        # is the bare verb) but CHANGED as one `unwords` field (empty: `CHANGED `).
        case SuccessPlus(uuids):
            return ["SUCCESS-PLUS", *map(token, uuids)]
        case FailurePlus(uuids):
            return ["FAILURE-PLUS", *map(token, uuids)]
        case AlreadyHave():
            return ["ALREADY-HAVE"]
        case AlreadyHavePlus(uuids):
            return ["ALREADY-HAVE-PLUS", *map(token, uuids)]
        case Connect(service):
            if service not in SERVICES:
                raise LocalProtocolError(f"unknown service {service!r}")
            return ["CONNECT", service]
        case ConnectDone(code):
            return ["CONNECTDONE", num(code)]
        case NotifyChange():
            return ["NOTIFYCHANGE"]
        case Changed(shas):
            return ["CHANGED", " ".join(map(token, shas))]
        case Error(text):
            # A trailing CR is allowed: it is lost on the way, as upstream loses it, which
            # is harmless for a message text and lets a relay pass on any ERROR it got.
            if "\n" in text:
                raise LocalProtocolError(f"newline in ERROR text: {text!r}")
            return ["ERROR", text]
    assert_never(msg)
