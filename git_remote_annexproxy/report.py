"""What a content-moving `git annexproxy` command shows: per-file results and progress.

stdout carries results (`get FILE (from NAME) ok`, `copy FILE (to NAME) ok`, or with --json
one JSON object per file); stderr carries the progress line (only on a terminal), one line
per failure, and the summary `VERB: N files, M bytes, K failed`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import IO

from git_remote_annexproxy.keys import Key


@dataclass
class Progress:
    """One status line on stderr, redrawn at most ten times a second; off unless stderr is
    a terminal. Lines for stdout or stderr go through `write` so they never get mixed."""

    enabled: bool
    verb: str = "get"
    total_files: int = 0
    total_bytes: int = 0
    done_files: int = 0
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0
    _width: int = 0

    def add(self, n: int) -> None:
        self.done_bytes += n
        self._draw()

    def file_done(self) -> None:
        self.done_files += 1
        self._draw(force=True)

    def write(self, stream: IO[str], line: str) -> None:
        self.clear()
        stream.write(line + "\n")
        stream.flush()
        self._draw(force=True)

    def clear(self) -> None:
        if self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._drawn < 0.1):
            return
        self._drawn = now
        rate = self.done_bytes / max(now - self.started, 1e-3)
        total = f"/{size_text(self.total_bytes)}" if self.total_bytes else ""
        line = (
            f"{self.verb}: {self.done_files}/{self.total_files} files, "
            f"{size_text(self.done_bytes)}{total}, {size_text(rate)}/s"
        )
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = max(self._width, len(line))


@dataclass
class Report:
    """Per-file results on stdout, failures on stderr, the counts for the summary.

    `verb` names the command ("get", "copy"); `direction` is "from" for downloads and "to"
    for uploads, both in the text line and as the JSON field naming the other repository."""

    json: bool
    quiet: bool
    progress: Progress
    verb: str = "get"
    direction: str = "from"
    files: int = 0
    bytes: int = 0
    failed: int = 0

    def ok(self, path: str, key: Key, other: str | None, nbytes: int, uuid: str | None) -> None:
        self.files += 1
        if self.json:
            self._json(path, key, success=True, other=other, uuid=uuid, nbytes=nbytes)
        elif not self.quiet:
            via = f" ({self.direction} {other})" if other else ""
            self.progress.write(sys.stdout, f"{self.verb} {path}{via} ok")

    def fail(self, path: str, key: Key | None, why: str) -> None:
        self.failed += 1
        if self.json:
            self._json(path, key, success=False, error=why)
        self.progress.write(sys.stderr, f"{self.verb} {path}: {why}")

    def _json(
        self,
        path: str,
        key: Key | None,
        *,
        success: bool,
        other: str | None = None,
        uuid: str | None = None,
        nbytes: int = 0,
        error: str | None = None,
    ) -> None:
        record = {
            "command": self.verb,
            "file": path,
            "key": None if key is None else str(key),
            "success": success,
            self.direction: other,
            "uuid": uuid,
            "bytes": nbytes,
            "error": error,
        }
        print(json.dumps(record), flush=True)

    def summary(self) -> None:
        self.progress.clear()
        sys.stderr.write(
            f"{self.verb}: {self.files} files, {self.bytes} bytes, {self.failed} failed\n"
        )


def size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
