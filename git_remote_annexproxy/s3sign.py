"""AWS Signature Version 4 for S3: header authentication and presigned URLs.

Pure module: no I/O, no clock (callers pass the time). Follows AWS's "Signature
Calculations for the Authorization Header" and "Authenticating Requests: Using Query
Parameters" for S3; checked against AWS's published examples (``tests/test_s3sign.py``).

S3's variant of SigV4: the canonical URI is the object path URI-encoded *once* (other
services encode it twice), ``/`` kept; every request carries ``x-amz-content-sha256``
(the payload's SHA-256, or ``UNSIGNED-PAYLOAD``); a presigned URL always has the payload
``UNSIGNED-PAYLOAD``. Header values are trimmed and inner runs of spaces collapsed.

A presigned URL may sign more headers than ``host``: the server then refuses the request
unless it carries exactly those values. ``content-length`` and ``x-amz-checksum-sha256``
scope a presigned PUT to one size and one content.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# S3 refuses presigned URLs valid longer than a week.
MAX_EXPIRES = 7 * 24 * 3600

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_SPACES = re.compile(r" +")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = ""
    session_token: str | None = None  # temporary credentials (x-amz-security-token)

    def __repr__(self) -> str:  # never print a secret by accident
        return f"Credentials({self.access_key!r}, ...)"


def uri_encode(text: str | bytes, *, encode_slash: bool = True) -> str:
    """AWS's UriEncode: every byte but A-Z a-z 0-9 - _ . ~ (and ``/`` when not
    ``encode_slash``) as ``%XX`` with upper-case hex; text is UTF-8 (surrogateescape,
    so any byte of a key name survives)."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return "".join(
        chr(b) if b in _UNRESERVED or (b == 0x2F and not encode_slash) else f"%{b:02X}"
        for b in data
    )


def amz_date(now: datetime.datetime) -> str:
    """``20130524T000000Z``; ``now`` must be timezone-aware (it is converted to UTC)."""
    if now.tzinfo is None:
        raise ValueError("the signing time must be timezone-aware")
    return now.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """Encoded names and values, sorted by encoded name then value."""
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _header_value(value: str) -> str:
    return _SPACES.sub(" ", value.strip())


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """(canonical headers block, signed headers list) for ``headers``, all of them
    signed. Names are lower-cased; two names differing only in case are an error."""
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower().strip()
        if low in lowered:
            raise ValueError(f"header {low} given twice")
        if "\n" in value or "\r" in value:
            raise ValueError(f"header {low} holds a line break")
        lowered[low] = _header_value(value)
    names = sorted(lowered)
    block = "".join(f"{n}:{lowered[n]}\n" for n in names)
    return block, ";".join(names)


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_hash: str,
) -> str:
    """``path`` is the decoded object path (``/bucket/key``); it is encoded here."""
    block, signed = canonical_headers(headers)
    return "\n".join([
        method,
        uri_encode(path, encode_slash=False),
        canonical_query(query),
        block,
        signed,
        payload_hash,
    ])


def scope(date: str, region: str, service: str = "s3") -> str:
    return f"{date[:8]}/{region}/{service}/aws4_request"


def string_to_sign(date: str, credential_scope: str, request: str) -> str:
    digest = hashlib.sha256(request.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ALGORITHM}\n{date}\n{credential_scope}\n{digest}"


def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def signature(key: bytes, to_sign: str) -> str:
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Request:
    """One S3 request to sign: the decoded path, its query and the headers to sign
    (``host`` included; ``x-amz-date`` and ``x-amz-content-sha256`` are added)."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: tuple[tuple[str, str], ...] = ()


def sign_headers(
    creds: Credentials,
    request: Request,
    *,
    region: str,
    now: datetime.datetime,
    payload_hash: str = UNSIGNED_PAYLOAD,
    service: str = "s3",
) -> dict[str, str]:
    """Every header the request must send: the given ones plus ``x-amz-date``,
    ``x-amz-content-sha256``, ``x-amz-security-token`` (temporary credentials) and
    ``Authorization``. ``payload_hash`` is the hex SHA-256 of the body or
    UNSIGNED_PAYLOAD."""
    date = amz_date(now)
    headers = dict(request.headers)
    headers["x-amz-date"] = date
    headers["x-amz-content-sha256"] = payload_hash
    if creds.session_token:
        headers["x-amz-security-token"] = creds.session_token
    canonical = canonical_request(request.method, request.path, request.query, headers,
                                  payload_hash)  # fmt: skip
    cscope = scope(date, region, service)
    sig = signature(signing_key(creds.secret_key, date, region, service),
                    string_to_sign(date, cscope, canonical))  # fmt: skip
    _, signed = canonical_headers(headers)
    headers["Authorization"] = (
        f"{ALGORITHM} Credential={creds.access_key}/{cscope},"
        f"SignedHeaders={signed},Signature={sig}"
    )
    return headers


def presign(
    creds: Credentials,
    request: Request,
    *,
    region: str,
    now: datetime.datetime,
    expires: int,
    service: str = "s3",
) -> str:
    """The query string (without ``?``) of a presigned URL for ``request``: its own
    query plus the X-Amz-* parameters. Every header in ``request.headers`` is signed and
    must be sent as given."""
    if not 1 <= expires <= MAX_EXPIRES:
        raise ValueError(f"expires must be between 1 and {MAX_EXPIRES} seconds")
    date = amz_date(now)
    cscope = scope(date, region, service)
    _, signed = canonical_headers(request.headers)
    params = [
        *request.query,
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{creds.access_key}/{cscope}"),
        ("X-Amz-Date", date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", signed),
    ]
    if creds.session_token:
        params.append(("X-Amz-Security-Token", creds.session_token))
    canonical = canonical_request(request.method, request.path, params, request.headers,
                                  UNSIGNED_PAYLOAD)  # fmt: skip
    sig = signature(signing_key(creds.secret_key, date, region, service),
                    string_to_sign(date, cscope, canonical))  # fmt: skip
    return canonical_query(params) + "&X-Amz-Signature=" + sig
