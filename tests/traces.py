"""Reading git-annex's recorded transcripts (../shared/spec/traces/*.txt) in tests.

A test whose expectation is git-annex's behaviour takes it from the transcript file rather
than from a copy pasted into the test, so the row says where it comes from and cannot drift
from it. The transcripts live beside the clone (CI copies shared/ there), or where
ANNEXPROXY_SHARED points. Format (each file's header): `## Step N: ...` sections; within a
step, `[Sn] C> line` is what went into git-annex-shell session n, `[Sn] S> line` what it
wrote on stdout; the appendix lists branch files as `--- path` followed by indented lines.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ANNEXPROXY_SHARED", ROOT.parent / "shared"))
TRACES = SHARED / "spec" / "traces"

_STEP = re.compile(r"^## Step (\w+):")
# A line a session sent: `[Sn] C> line`, `C> line` (edgecases.txt), or a driver's `  | S> line`.
_SENT = re.compile(r"^(?:\[S\d+\] |  \| )?[CS]> (.*)$")


@functools.cache
def _text(name: str) -> str:
    path = TRACES / name
    if not path.is_file():
        pytest.fail(
            f"transcript {path} is missing: the expectations of this test are read from it "
            "(put shared/ beside the clone, or set ANNEXPROXY_SHARED)"
        )
    return path.read_text(encoding="utf-8")


@functools.cache
def step(name: str, number: str) -> tuple[str, ...]:
    """The lines of `## Step <number>:` in transcript `name`."""
    out: list[str] = []
    inside = False
    for line in _text(name).splitlines():
        if line.startswith("## "):
            match = _STEP.match(line)
            inside = match is not None and match.group(1) == number
            continue
        if inside:
            out.append(line)
    if not out:
        pytest.fail(f"{name} has no step {number}")
    return tuple(out)


def said(name: str, number: str, session: str, direction: str, verb: str) -> str:
    """The first line session `session` ("S5") sent in `direction` ("S>" from the shell,
    "C>" to it) in that step whose first word is `verb`, with its newline."""
    prefix = f"[{session}] {direction} "
    for line in step(name, number):
        if line.startswith(prefix):
            message = line.removeprefix(prefix)
            if message.split(" ", 1)[0] == verb:
                return message + "\n"
    pytest.fail(f"{name} step {number}: no {direction} {verb} in session {session}")


def branch_file(name: str, repository: str, path: str) -> bytes:
    """A file of the git-annex branch as the appendix of `name` lists it for `repository`
    (the `### git-annex branch of <repository>` section)."""
    out: list[str] = []
    section = inside = False
    for line in _text(name).splitlines():
        if line.startswith("#"):
            section = line == f"### git-annex branch of {repository}"
            inside = False
        elif section and line.startswith("--- "):
            inside = line == f"--- {path}"
        elif inside and line.startswith("    "):
            out.append(line[4:] + "\n")
    if not out:
        pytest.fail(f"{name}: no branch file {path} of {repository}")
    return "".join(out).encode()


def sent_anywhere(line: str) -> bool:
    """Whether some session of some transcript sent `line` (either direction)."""
    names = sorted(path.name for path in TRACES.glob("*.txt"))
    if not names:
        pytest.fail(f"no transcripts in {TRACES} (put shared/ beside the clone)")
    for name in names:
        for text in _text(name).splitlines():
            match = _SENT.match(text)
            if match is not None and match.group(1) == line:
                return True
    return False
