"""Tests for git_remote_annexproxy.annexlog (pure).

The fixed vectors in the tables below (PRESENCE_ORACLE, EQUAL_CLOCK, NEWEST_WINS,
CLOCK_PARSE, CLOCK_REJECTS, CLOCK_FORMAT, LOG_PATHS, JOURNAL_QUIRKS, DESCRIBE_*) say what
git-annex 10.20261026 does. They were recorded from it (the "old" content written into
``annex/journal/`` of a throw-away repository, then ``GIT_ANNEX_VECTOR_CLOCK=<now> git -c
annex.alwayscommit=false annex setpresentkey KEY UUID 0|1`` or ``annex describe`` run and
the journal file read back), and ``tests/test_branch.py`` (section "the recorded vectors,
rerun") runs git-annex on every one of them in CI, so none is only our word. Vectors
without such a table (round trips, ``a/b__c/d``) are our own invariants.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from traces import branch_file

from git_remote_annexproxy import annexlog
from git_remote_annexproxy.annexlog import LogLine, VectorClock
from git_remote_annexproxy.keys import Key

A = "aaaaaaaa-0000-4000-8000-000000000001"
B = "bbbbbbbb-0000-4000-8000-000000000002"
Z = "00000000-0000-4000-8000-000000000009"


def lines(*rows: str) -> bytes:
    return "".join(r + "\n" for r in rows).encode()


# (old content, uuid, present, candidate clock, what git-annex wrote)
PRESENCE_ORACLE: list[tuple[bytes, str, bool, str, bytes]] = [
    # First line of a new log; a fractional pinned clock is written as is.
    (b"", A, True, "1700000000.5", lines(f"1700000000.5s 1 {A}")),
    # A second UUID; output sorted by UUID.
    (
        lines(f"1700000000.5s 1 {A}"),
        B,
        True,
        "1700000000.5",
        lines(f"1700000000.5s 1 {A}", f"1700000000.5s 1 {B}"),
    ),
    # Same status already in effect: no change at all, even with a newer clock.
    (
        lines(f"1700000000.5s 1 {A}", f"1700000000.5s 1 {B}"),
        B,
        True,
        "1700000001",
        lines(f"1700000000.5s 1 {A}", f"1700000000.5s 1 {B}"),
    ),
    # A clock behind the UUID's own last line: that line's clock + 1 second.
    (
        lines(f"1700000000.5s 1 {A}", f"1700000000.5s 1 {B}"),
        A,
        False,
        "1600000000",
        lines(f"1700000001.5s 0 {A}", f"1700000000.5s 1 {B}"),
    ),
    # Only the UUID's own lines count: B's future clock does not push A's forward.
    (
        lines(f"2000000000s 1 {B}", f"1500000000.100s 1 {A}"),
        A,
        False,
        "1600000000",
        lines(f"1600000000s 0 {A}", f"2000000000s 1 {B}"),
    ),
    # Garbage skipped, \r\n accepted, clocks normalised ("+", trailing zeros, no "s"),
    # fractions cut to 12 digits, newest line per UUID kept.
    (
        b"garbage line\n"
        + f"+1500000000.100s 1 {B}\r\n\r\n".encode()
        + lines(
            f"1500000000.000000000000009s 1 {A}",
            f"1500000000.1234567890123s 1 {Z}",
            f"5 1 {Z}",
        ),
        A,
        False,
        "1400000000",
        lines(
            f"1500000000.123456789012s 1 {Z}",
            f"1500000001s 0 {A}",
            f"1500000000.1s 1 {B}",
        ),
    ),
]


@pytest.mark.parametrize(("old", "uuid", "present", "now", "expected"), PRESENCE_ORACLE)
def test_add_presence_matches_git_annex(
    old: bytes, uuid: str, present: bool, now: str, expected: bytes
) -> None:
    clock = VectorClock.parse(now.encode())
    assert clock is not None
    assert annexlog.add_presence(old, uuid, present, clock) == expected


def test_add_presence_accepts_integer_seconds_and_none() -> None:
    assert annexlog.add_presence(None, A, True, 1795562601) == lines(f"1795562601s 1 {A}")


# An old clock equal to the candidate also forces +1 (describe showed it too):
# (old, uuid, present, candidate seconds, what git-annex wrote)
EQUAL_CLOCK = (lines(f"1700000000s 1 {A}"), A, False, 1700000000, lines(f"1700000001s 0 {A}"))


def test_add_presence_equal_clock_advances() -> None:
    old, uuid, present, now, expected = EQUAL_CLOCK
    assert annexlog.add_presence(old, uuid, present, now) == expected


# (log, is A present): what `git annex readpresentkey KEY A` answers.
NEWEST_WINS: list[tuple[bytes, bool]] = [
    # Equal clocks: the line that comes first wins.
    (lines(f"1500000000s 1 {A}", f"1500000000s 0 {A}"), True),
    (lines(f"1500000000s 0 {A}", f"1500000000s 1 {A}"), False),
    (lines(f"1s 1 {A}", f"2s X {A}"), False),  # dead is not present
    (lines(f"3s 1 {A}", f"2s 0 {A}"), True),
]


@pytest.mark.parametrize(("data", "present"), NEWEST_WINS)
def test_present_uuids_newest_wins(data: bytes, present: bool) -> None:
    assert (A in annexlog.present_uuids(data)) is present


# (clock text in a log, the clock git-annex reads from it)
CLOCK_PARSE: list[tuple[bytes, int]] = [
    (b"1795562601s", 1795562601 * 10**12),
    (b"1700000000.123456s", 1700000000 * 10**12 + 123456 * 10**6),
    (b"5", 5 * 10**12),
    (b"+5s", 5 * 10**12),
    (b"-5s", -5 * 10**12),
    (b"-0.5s", 5 * 10**11),  # git-annex's sign binds to the integer part only
    (b"-2.5s", -(25 * 10**11)),
    (b"1.1234567890129s", 10**12 + 123456789012),
]
# Clock texts that make git-annex skip the line.
CLOCK_REJECTS = [b"", b"s", b"5.", b"5.s", b"1e5s", b"5ss", b" 5s", b"0x5s"]
# (clock, how git-annex writes it)
CLOCK_FORMAT: list[tuple[int, bytes]] = [
    (1795562601 * 10**12, b"1795562601s"),
    (1700000000 * 10**12 + 5 * 10**11, b"1700000000.5s"),
    (1, b"0.000000000001s"),
    (-(5 * 10**11), b"-0.5s"),
    (0, b"0s"),
]


@pytest.mark.parametrize(("text", "picos"), CLOCK_PARSE)
def test_vector_clock_parse(text: bytes, picos: int) -> None:
    assert VectorClock.parse(text) == VectorClock(picos)


@pytest.mark.parametrize("text", CLOCK_REJECTS)
def test_vector_clock_rejects(text: bytes) -> None:
    assert VectorClock.parse(text) is None


@pytest.mark.parametrize(("picos", "text"), CLOCK_FORMAT)
def test_vector_clock_format(picos: int, text: bytes) -> None:
    assert VectorClock(picos).format() == text


@given(st.integers(min_value=-(10**25), max_value=10**25))
def test_vector_clock_round_trip(picos: int) -> None:
    clock = VectorClock(picos)
    if -(10**12) < picos < 0:
        # Haskell prints -0.5 as "-0.5s" but reads it back as +0.5 (see parse).
        assert VectorClock.parse(clock.format()) == VectorClock(-picos)
    else:
        assert VectorClock.parse(clock.format()) == clock


# --- presence logs: property tests -------------------------------------------------------

infos = st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b)
uuids = st.sampled_from([A, B, Z, "ac000000-0000-8000-8000-000000000000", "x"])
clocks = st.integers(min_value=0, max_value=2**40 * 10**12).map(VectorClock)
log_lines = st.builds(LogLine, clocks, st.sampled_from(["0", "1", "X"]), infos)


@given(st.lists(log_lines, max_size=12))
def test_presence_log_round_trip(ls: list[LogLine]) -> None:
    assert annexlog.parse_presence_log(annexlog.format_presence_log(ls)) == ls


@given(st.lists(log_lines, max_size=12))
def test_compact_keeps_newest_line_per_info(ls: list[LogLine]) -> None:
    out = annexlog.compact(ls)
    assert [x.info for x in out] == sorted({x.info for x in ls})
    for line in out:
        assert line in ls
        assert line.clock == max(x.clock for x in ls if x.info == line.info)
        # ties: the first such line in the file
        assert line == next(x for x in ls if x.info == line.info and x.clock == line.clock)
    assert annexlog.compact(out) == out


@given(st.lists(log_lines, max_size=12), uuids, st.booleans(), clocks)
def test_add_presence_records_status(
    ls: list[LogLine], uuid: str, present: bool, now: VectorClock
) -> None:
    old = annexlog.format_presence_log(ls)
    new = annexlog.add_presence(old, uuid, present, now)
    assert (uuid in annexlog.present_uuids(new)) is present
    before = {x.info: x for x in annexlog.compact(ls)}
    after = {x.info: x for x in annexlog.compact(annexlog.parse_presence_log(new))}
    info = uuid.encode()
    # Other UUIDs are untouched; the changed UUID's clock beats all its old lines.
    assert {k: v for k, v in after.items() if k != info} == {
        k: v for k, v in before.items() if k != info
    }
    if new != old:
        assert after[info].clock >= now
        assert all(after[info].clock > x.clock for x in ls if x.info == info)
        assert new == annexlog.format_presence_log(after[k] for k in sorted(after))


# (key, its location log in the branch, the journal file setpresentkey of it creates)
LOG_PATHS: list[tuple[str, str, str]] = [
    (
        "SHA256E-s3--abc_def.txt",
        "2ff/78e/SHA256E-s3--abc_def.txt.log",
        "2ff_78e_SHA256E-s3--abc__def.txt.log",
    ),
    # The trace appendix (plain.txt) shows this key's log at d91/b11/.
    (
        "SHA256E-s6--5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03.txt",
        "d91/b11/SHA256E-s6--5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03.txt.log",
        "d91_b11_SHA256E-s6--5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03.txt.log",
    ),
]


@pytest.mark.parametrize(("key", "path", "journal"), LOG_PATHS)
def test_location_log_path(key: str, path: str, journal: str) -> None:
    assert annexlog.location_log_path(Key.parse(key)) == path
    assert annexlog.journal_name(path) == journal
    assert annexlog.branch_path(journal) == path


def test_cluster_uuid() -> None:
    assert annexlog.is_cluster_uuid("ac41e7d0-ed00-86fd-acbf-9fd58f6e46eb")
    assert not annexlog.is_cluster_uuid("ac41e7d0-ed00-46fd-acbf-9fd58f6e46eb")
    assert not annexlog.is_cluster_uuid("bc41e7d0-ed00-86fd-acbf-9fd58f6e46eb")
    assert not annexlog.is_cluster_uuid("ac")


# --- uuid.log -----------------------------------------------------------------------------

U = "a7ced0f8-bd6f-403d-9b52-47a328a0340e"
C = "cccccccc-0000-4000-8000-000000000003"
D = "dddddddd-0000-4000-8000-000000000004"
MESSY_UUID_LOG = (
    lines(
        f"{U} first  desc timestamp=2000000000s",
        f"{U} old timestamp=1999999999s",
    )
    + f"{C} no timestamp here\r\n".encode()
    + lines(
        f"{C} x timestamp=bad",
        f"{B} later wins timestamp=1500000000s",
        f"{B} tie1 timestamp=5s",
        f"{B} tie2 timestamp=5s",
        B,
        f"{D} tie1 timestamp=5s",
        f"{D} tie2 timestamp=5s",
        f"{D} untimed",
        "eeee  spaced   out  timestamp=7.000s",
        "ffff",
    )
)


# `GIT_ANNEX_VECTOR_CLOCK=1700000000 git annex describe U "new  desc"` on MESSY_UUID_LOG:
DESCRIBE_MESSY = (U, "new  desc", 1700000000)
DESCRIBE_MESSY_WROTE = lines(
    f"{U} new  desc timestamp=2000000001s",
    f"{B} later wins timestamp=1500000000s",
    f"{C} x timestamp=bad",
    f"{D} tie2 timestamp=5s",
    "eeee  spaced   out  timestamp=7s",
    "ffff ",
)
# ... and then describing B at a clock equal to its own gives +1.
DESCRIBE_AGAIN = (B, "bdesc", 1500000000)
DESCRIBE_AGAIN_LINE = f"{B} bdesc timestamp=1500000001s\n".encode()


def test_describe_uuid_matches_git_annex() -> None:
    assert annexlog.describe_uuid(MESSY_UUID_LOG, *DESCRIBE_MESSY) == DESCRIBE_MESSY_WROTE
    again = annexlog.describe_uuid(DESCRIBE_MESSY_WROTE, *DESCRIBE_AGAIN)
    assert DESCRIBE_AGAIN_LINE in again


def test_parse_uuid_log() -> None:
    got = annexlog.parse_uuid_log(MESSY_UUID_LOG)
    assert got == {
        U: "first  desc",
        B: "later wins",
        C: "x timestamp=bad",
        D: "tie2",
        "eeee": " spaced   out ",
        "ffff": "",
    }


def test_parse_uuid_log_trace_lines() -> None:
    # uuid.log as git-annex wrote it (the appendices of the proxy and cluster transcripts).
    assert annexlog.parse_uuid_log(branch_file("proxy.txt", "proxy.git", "uuid.log")) == {
        "40de0000-0000-4000-8000-000000000001": "node1",
        "40de0000-0000-4000-8000-000000000002": "node2",
        "9a0c0000-0000-4000-8000-000000000001": "proxy",
    }
    cluster = annexlog.parse_uuid_log(branch_file("cluster.txt", "gw1.git", "uuid.log"))
    assert cluster["ac8fad45-873b-8322-9d01-7c563dab1f32"] == "cluster mycluster"
    assert cluster["9a7e0000-0000-4000-8000-000000000002"] == "gw2"


descriptions = st.text(max_size=30).filter(lambda s: "\n" not in s and "\r" not in s)
uuid_words = st.text(min_size=1, max_size=12).filter(lambda s: not any(c in s for c in " \r\n"))


@given(
    st.lists(st.tuples(uuid_words, descriptions, clocks), max_size=6),
    uuid_words,
    descriptions,
    clocks,
)
def test_describe_uuid_then_parse(
    entries: list[tuple[str, str, VectorClock]], uuid: str, desc: str, now: VectorClock
) -> None:
    old = b""
    for u, d, c in entries:
        old = annexlog.describe_uuid(old, u, d, c)
    new = annexlog.describe_uuid(old, uuid, desc, now)
    parsed = annexlog.parse_uuid_log(new)
    assert parsed[uuid] == desc
    assert {k: v for k, v in parsed.items() if k != uuid} == {
        k: v for k, v in annexlog.parse_uuid_log(old).items() if k != uuid
    }
    # Printing is canonical: parse + print is the identity on our own output.
    entries_now = annexlog.parse_uuid_log_entries(new)
    assert annexlog.format_uuid_log(entries_now) == new


# --- journal names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("2ff/78e/SHA256E-s3--abc_def.txt.log", "2ff_78e_SHA256E-s3--abc__def.txt.log"),
        ("uuid.log", "uuid.log"),
        ("a/b__c/d", "a_b____c_d"),
    ],
)
def test_journal_name(path: str, name: str) -> None:
    assert annexlog.journal_name(path) == name
    assert annexlog.branch_path(name) == path


# (journal file name, the branch path git-annex commits it to). Annex/Journal.hs
# fileJournal: a lone trailing "_" disappears; "___" reads as "_/".
JOURNAL_QUIRKS = [("abc_", "abc"), ("a___b", "a_/b")]


@pytest.mark.parametrize(("name", "path"), JOURNAL_QUIRKS)
def test_branch_path_quirks(name: str, path: str) -> None:
    assert annexlog.branch_path(name) == path


def test_branch_path_leading_underscore() -> None:
    # Read from Annex/Journal.hs, not observable: git keeps no tree entry named "/x".
    assert annexlog.branch_path("_x") == "/x"


# The mangling is ambiguous exactly where "/" is followed by "_" ("a/_b" and "a_/b" both
# give "a___b"), and for a trailing "/". Branch paths never look like that: each component
# of a log path starts with a hash dir or a backend name.
branch_paths = st.text(max_size=40).filter(lambda p: "/_" not in p and not p.endswith("/"))


@given(branch_paths)
def test_journal_name_round_trip(path: str) -> None:
    name = annexlog.journal_name(path)
    assert "/" not in name
    assert annexlog.branch_path(name) == path
