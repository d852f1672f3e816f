"""AWS Signature Version 4 (git_remote_annexproxy/s3sign.py) against AWS's published
examples (S3 API reference, "Examples of Signature Calculations", with the example
credentials AKIAIOSFODNN7EXAMPLE), and against botocore's signer (a test dependency, via
moto) on generated requests."""

from __future__ import annotations

import datetime
import hashlib
import urllib.parse
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_remote_annexproxy import s3sign
from git_remote_annexproxy.s3sign import Credentials, Request

EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
MAY24 = datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC)
HOST = "examplebucket.s3.amazonaws.com"


def signature_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].rsplit("Signature=", 1)[1]


def test_get_object_example() -> None:
    """GET Object with a Range header."""
    req = Request("GET", "/test.txt", {"Host": HOST, "Range": "bytes=0-9"})
    canonical = s3sign.canonical_request(
        "GET", "/test.txt", (), {**req.headers, "x-amz-content-sha256": s3sign.EMPTY_SHA256,
                                 "x-amz-date": "20130524T000000Z"}, s3sign.EMPTY_SHA256,
    )  # fmt: skip
    assert hashlib.sha256(canonical.encode()).hexdigest() == (
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
    )
    headers = s3sign.sign_headers(EXAMPLE, req, region="us-east-1", now=MAY24,
                                  payload_hash=s3sign.EMPTY_SHA256)  # fmt: skip
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_put_object_example() -> None:
    """PUT Object: a `$` in the key name, a signed payload, a Date header."""
    body = b"Welcome to Amazon S3."
    digest = hashlib.sha256(body).hexdigest()
    assert digest == "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
    req = Request("PUT", "/test$file.text", {
        "Host": HOST, "Date": "Fri, 24 May 2013 00:00:00 GMT",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
    })  # fmt: skip
    headers = s3sign.sign_headers(EXAMPLE, req, region="us-east-1", now=MAY24,
                                  payload_hash=digest)  # fmt: skip
    assert signature_of(headers) == (
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
    )


def test_get_bucket_lifecycle_example() -> None:
    """A sub-resource with no value (`?lifecycle`)."""
    req = Request("GET", "/", {"Host": HOST}, (("lifecycle", ""),))
    headers = s3sign.sign_headers(EXAMPLE, req, region="us-east-1", now=MAY24,
                                  payload_hash=s3sign.EMPTY_SHA256)  # fmt: skip
    assert signature_of(headers) == (
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    )


def test_list_objects_example() -> None:
    """Query parameters sorted by name."""
    req = Request("GET", "/", {"Host": HOST}, (("prefix", "J"), ("max-keys", "2")))
    headers = s3sign.sign_headers(EXAMPLE, req, region="us-east-1", now=MAY24,
                                  payload_hash=s3sign.EMPTY_SHA256)  # fmt: skip
    assert signature_of(headers) == (
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_presigned_get_example() -> None:
    query = s3sign.presign(EXAMPLE, Request("GET", "/test.txt", {"Host": HOST}),
                           region="us-east-1", now=MAY24, expires=86400)  # fmt: skip
    assert f"https://{HOST}/test.txt?{query}" == (
        "https://examplebucket.s3.amazonaws.com/test.txt"
        "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_signing_key_example() -> None:
    """The general SigV4 documentation's derived key (IAM, 20120215)."""
    key = s3sign.signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215",
                             "us-east-1", "iam")  # fmt: skip
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_uri_encode_every_byte() -> None:
    """Byte at a time: unreserved bytes stay, every other one is %XX (upper case), and
    `/` only when asked; decoding gives the bytes back."""
    for b in range(256):
        one = bytes([b])
        expected = urllib.parse.quote_from_bytes(one, safe="-_.~")
        assert s3sign.uri_encode(one) == expected.replace("%2f", "%2F")
        kept = s3sign.uri_encode(one, encode_slash=False)
        assert kept == ("/" if b == 0x2F else expected)
        assert urllib.parse.unquote_to_bytes(kept) == one


@given(st.binary(max_size=64))
def test_uri_encode_round_trip(data: bytes) -> None:
    encoded = s3sign.uri_encode(data, encode_slash=False)
    assert urllib.parse.unquote_to_bytes(encoded) == data
    assert all(c.isascii() and (c.isalnum() or c in "-_.~/%") for c in encoded)


def test_bad_inputs_are_refused() -> None:
    naive = datetime.datetime(2013, 5, 24)
    with pytest.raises(ValueError):
        s3sign.amz_date(naive)
    req = Request("GET", "/x", {"Host": HOST})
    for expires in (0, s3sign.MAX_EXPIRES + 1):
        with pytest.raises(ValueError):
            s3sign.presign(EXAMPLE, req, region="us-east-1", now=MAY24, expires=expires)
    with pytest.raises(ValueError):
        s3sign.canonical_headers({"Host": "a", "host": "b"})
    with pytest.raises(ValueError):
        s3sign.canonical_headers({"x-amz-meta-a": "a\r\nInjected: 1"})


def test_credentials_repr_hides_the_secret() -> None:
    assert EXAMPLE.secret_key not in repr(EXAMPLE)


# --- against botocore's signer (an independent implementation) ------------------------------

_key_chars = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30
)
_header_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)


def _botocore_request(method: str, url: str, headers: dict[str, str]) -> Any:
    awsrequest = pytest.importorskip("botocore.awsrequest")
    return awsrequest.AWSRequest(method=method, url=url, headers=headers)


@settings(max_examples=60, deadline=None)
@given(key=_key_chars, meta=_header_value, payload=st.binary(max_size=100))
def test_header_signature_matches_botocore(key: str, meta: str, payload: bytes) -> None:
    auth = pytest.importorskip("botocore.auth")
    credentials = pytest.importorskip("botocore.credentials")
    now = datetime.datetime(2026, 11, 25, 12, 0, 0, tzinfo=datetime.UTC)
    path = "/bucket/" + key
    digest = hashlib.sha256(payload).hexdigest()
    ours = s3sign.sign_headers(
        EXAMPLE, Request("PUT", path, {"Host": "127.0.0.1:9000", "x-amz-meta-a": meta}),
        region="us-east-1", now=now, payload_hash=digest,
    )  # fmt: skip
    url = "http://127.0.0.1:9000" + s3sign.uri_encode(path, encode_slash=False)
    theirs: Any = _botocore_request("PUT", url, {
        "x-amz-meta-a": meta, "X-Amz-Date": "20261125T120000Z", "X-Amz-Content-SHA256": digest,
    })  # fmt: skip
    theirs.context = {"timestamp": "20261125T120000Z"}
    signer = auth.S3SigV4Auth(
        credentials.Credentials(EXAMPLE.access_key, EXAMPLE.secret_key), "s3", "us-east-1"
    )
    canonical = signer.canonical_request(theirs)
    sig = signer.signature(signer.string_to_sign(theirs, canonical), theirs)
    assert signature_of(ours) == sig
