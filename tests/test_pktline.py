"""git's pkt-line framing (git_remote_annexproxy/pktline.py): byte-at-a-time feeding, round
trips, and the edges of what git's own reader accepts, asked of `git receive-pack`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_remote_annexproxy import pktline
from git_remote_annexproxy.pktline import DELIM, FLUSH, RESPONSE_END, PktLineReader, next_pkt


def pkt(payload: bytes) -> bytes:
    return b"%04x" % (len(payload) + 4) + payload


def test_specials_and_empty_payload_differ() -> None:
    stream = b"0000" + b"0001" + b"0002" + b"0004" + pkt(b"ab")
    assert list(PktLineReader().feed(stream)) == [FLUSH, DELIM, RESPONSE_END, b"", b"ab"]
    assert not isinstance(FLUSH, bytes)  # so an empty `0004` is no flush (git reads a line)


def test_incomplete_then_complete() -> None:
    assert next_pkt(b"0006a", 0) == (None, 0)
    assert next_pkt(b"00", 0) == (None, 0)
    assert next_pkt(b"0006ab0000", 0) == (b"ab", 6)


@pytest.mark.parametrize("head", [b"0003", b"00g0", b"-001", b" 00a", b"fff4", b"ffff"])
def test_not_pkt_lines(head: bytes) -> None:
    with pytest.raises(pktline.PktLineError):
        next_pkt(head + b"x" * 70000, 0)
    reader = PktLineReader()
    assert list(reader.feed(pkt(b"ok") + head + b"x" * 10)) == [b"ok"]
    assert reader.broken and list(reader.feed(pkt(b"more"))) == []


@settings(deadline=None, max_examples=200)
@given(st.lists(st.one_of(st.binary(max_size=300), st.sampled_from([FLUSH, DELIM]))))
def test_round_trip_byte_at_a_time(packets: list[bytes | pktline.Special]) -> None:
    wire = b"".join(
        b"0000" if p is FLUSH else b"0001" if p is DELIM else pkt(p)  # type: ignore[arg-type]
        for p in packets
    )
    reader = PktLineReader()
    got = [p for i in range(len(wire)) for p in reader.feed(wire[i : i + 1])]
    assert got == packets and reader.buffered == 0 and not reader.broken


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=100))
def test_any_bytes_parse_or_break_cleanly(data: bytes) -> None:
    reader = PktLineReader()
    list(reader.feed(data))
    assert reader.buffered <= len(data)


def _receive_pack(tmp_path: Path, body: bytes) -> str:
    repo = tmp_path / "r.git"
    if not repo.exists():
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    proc = subprocess.run(
        ["git", "receive-pack", str(repo)], input=body, capture_output=True, timeout=60,
        check=False,
    )
    return proc.stderr.decode(errors="replace")


@pytest.mark.parametrize(
    "head, accepted",
    [
        (b"%04X" % 0x7B, True),  # upper-case hex digits: git reads them
        (b"fff3", True),  # a 65519-byte payload: the longest git reads
        (b"fff4", False),  # 65520: git refuses
        (b"0003", False),
        (b"00x0", False),
    ],
)
def test_limits_as_git_reads_them(tmp_path: Path, head: bytes, accepted: bool) -> None:
    try:
        size = int(head, 16)
    except ValueError:
        size = 0
    body = head + b"x" * max(size - 4, 0) + b"0000"
    said = _receive_pack(tmp_path, body)
    git_accepts = "bad line length" not in said
    assert git_accepts is accepted, said
    try:
        packet, _ = next_pkt(body, 0)
    except pktline.PktLineError:
        packet = None
    assert (packet is not None) is accepted
