"""`git push` with content: what a push through the helper updated, and uploading its keys.

With `remote.NAME.annexproxy-push-content=true`, after git-receive-pack accepted a push,
the helper uploads the annexed content of the pushed commits to the remote (the proxy's
own repository), or to `remote.NAME.annexproxy-push-content-to` (any name `git annexproxy
info` lists: a cluster, a node, a special remote). Off by default: git-annex's own `git
push` never sends content, and a push should not move gigabytes unasked.

The helper only relays git's bytes (`connect`), so it learns what was pushed by watching
them (`PushWatch`, sans-IO, git protocol v0/v1 as used for push):

* git -> server: pkt-lines `OLD NEW REF` (the first with `\\0capabilities`), a flush, then
  the pack, which is not looked at;
* server -> git: the ref advertisement up to a flush, then the report (`report-status`):
  `unpack ok`, `ok REF` / `ng REF why`, in side-band channel 1 when git asked for it.

Only refs the report says `ok` count (without report-status: all of them, if receive-pack
exited 0). The keys are those of annexed files (symlinks and pointer files) in each new
tip's tree that are not in the old tip's (`git diff-tree`; the whole tree for a new ref);
deleted refs have none. Keys whose content is not in this clone are skipped, as by `copy`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from git_remote_annexproxy import annexcopy
from git_remote_annexproxy.clientrepo import Fatal, find_clone
from git_remote_annexproxy.gitconfig import GitConfig, parse_bool
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.pktline import FLUSH, PktLineReader
from git_remote_annexproxy.report import Progress, Report

PUSH_CONTENT = "annexproxy-push-content"
PUSH_CONTENT_TO = "annexproxy-push-content-to"
READ_SIZE = 65536
ZERO = "0" * 40


@dataclass(frozen=True)
class RefUpdate:
    old: str
    new: str
    ref: str


@dataclass
class PushWatch:
    """Watches both directions of one git-receive-pack session."""

    commands: list[RefUpdate] = field(default_factory=list)
    caps: frozenset[str] = frozenset()
    reported_ok: set[str] = field(default_factory=set)
    report_seen: bool = False
    unsupported: str | None = None
    _out: PktLineReader = field(default_factory=PktLineReader)  # git -> server
    _out_done: bool = False
    _in: PktLineReader = field(default_factory=PktLineReader)  # server -> git
    _advertised: bool = False
    _report: PktLineReader = field(default_factory=PktLineReader)  # inside side-band channel 1

    def from_git(self, data: bytes | bytearray) -> None:
        if self._out_done:
            return  # the pack
        for pkt in self._out.feed(data):
            if pkt is FLUSH:
                self._out_done = True
                return
            if not isinstance(pkt, bytes):
                continue
            line, _, caps = pkt.rstrip(b"\n").partition(b"\0")
            if caps:
                self.caps = frozenset(caps.decode("utf-8", "replace").split())
            words = line.decode("utf-8", "surrogateescape").split(" ")
            if words[0] == "shallow":
                continue
            if len(words) != 3:
                self.unsupported = f"cannot follow this push ({words[0][:20]})"  # push-cert
                self._out_done = True
                return
            self.commands.append(RefUpdate(*words))

    def to_git(self, data: bytes | bytearray) -> None:
        for pkt in self._in.feed(data):
            if not self._advertised:
                self._advertised = pkt is FLUSH
            elif not isinstance(pkt, bytes):
                continue
            elif "side-band-64k" in self.caps or "side-band" in self.caps:
                if pkt[:1] == b"\1":
                    for inner in self._report.feed(pkt[1:]):
                        if isinstance(inner, bytes):
                            self._report_line(inner)
            else:
                self._report_line(pkt)

    def _report_line(self, pkt: bytes) -> None:
        self.report_seen = True
        words = pkt.rstrip(b"\n").decode("utf-8", "surrogateescape").split(" ")
        if words[0] == "ok" and len(words) >= 2:
            self.reported_ok.add(words[1])

    def updated(self, exit_code: int) -> list[RefUpdate]:
        """The ref updates that took effect, deletions left out."""
        if self.unsupported is not None:
            return []
        if "report-status" in self.caps or "report-status-v2" in self.caps:
            done = [c for c in self.commands if c.ref in self.reported_ok]
        else:
            done = list(self.commands) if exit_code == 0 else []
        return [c for c in done if c.new.strip("0")]


def enabled(config: GitConfig, remote: str) -> bool:
    """git's boolean: a value-less key is true, an empty value false; a value git would
    refuse as a boolean leaves content alone."""
    key = f"remote.{remote}.{PUSH_CONTENT}"
    return key in config and parse_bool(config.getraw(key)) is True


def pushed_keys(gitdir: Path, updates: Sequence[RefUpdate]) -> dict[Key, list[str]]:
    """{key: paths} of the annexed files new in the pushed tips (see the docstring)."""
    wanted: dict[Key, list[str]] = {}
    for u in updates:
        entries: list[tuple[str, str, str]] = []
        old_known = u.old.strip("0") and _exists(gitdir, u.old)
        if old_known:
            args = [
                "diff-tree",
                "-r",
                "-z",
                "--no-renames",
                f"{u.old}^{{tree}}",
                f"{u.new}^{{tree}}",
            ]
            items = annexcopy.git_lines(gitdir, args)
            for meta, path in zip(items[::2], items[1::2], strict=False):
                fields = meta.decode().lstrip(":").split(" ")
                if len(fields) == 5 and fields[4] != "D":
                    entries.append((fields[1], fields[3], path.decode("utf-8", "surrogateescape")))
        else:
            args = ["ls-tree", "-r", "-z", "--full-tree", f"{u.new}^{{tree}}"]
            for item in annexcopy.git_lines(gitdir, args):
                meta, _, path = item.partition(b"\t")
                mode, _, sha = meta.decode().split(" ")
                entries.append((mode, sha, path.decode("utf-8", "surrogateescape")))
        for name, key in annexcopy.keys_of_blobs(gitdir, entries):
            paths = wanted.setdefault(key, [])
            if name not in paths:
                paths.append(name)
    return wanted


def _exists(gitdir: Path, sha: str) -> bool:
    try:
        annexcopy.git_lines(gitdir, ["cat-file", "-e", f"{sha}^{{tree}}"])
    except Fatal:
        return False
    return True


def send_content(
    remote: str, config: GitConfig, watch: PushWatch, code: int, *, verbose: bool
) -> int:
    """After a push: upload the content of what it updated. 0, or 1 if anything failed;
    everything is said on stderr (stdout is git's)."""
    updates = watch.updated(code)
    if watch.unsupported is not None:
        sys.stderr.write(f"annexproxy: no content sent: {watch.unsupported}\n")
        return 0
    if not updates:
        return 0
    target = config.get(f"remote.{remote}.{PUSH_CONTENT_TO}") or remote
    progress = Progress(enabled=sys.stderr.isatty())
    progress.verb = "copy"
    report = Report(False, not verbose, progress, verb="copy", direction="to")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            clone = find_clone()
            wanted = pushed_keys(clone.gitdir, updates)
            annexcopy.copy_keys(clone, target, wanted, report)
    except (Fatal, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write(f"annexproxy: no content sent: {exc}\n")
        return 1
    if report.files or report.failed:
        progress.clear()
        sys.stderr.write(
            f"annexproxy: sent the content of {report.files} files ({report.bytes} bytes) "
            f"to {target}" + (f", {report.failed} failed\n" if report.failed else "\n")
        )
    return 1 if report.failed else 0


def run_watched(argv: Sequence[str], env: Mapping[str, str], watch: PushWatch) -> int:
    """Run a git service with git on our fds 0 and 1, as the helper's fallback does, but
    with its bytes passing through us so `watch` sees them. Its exit status."""
    proc = subprocess.Popen(
        list(argv), env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    to_service = proc.stdin

    def inward() -> None:
        try:
            while data := os.read(0, READ_SIZE):
                watch.from_git(data)
                to_service.write(data)
                to_service.flush()
        except OSError:
            pass  # the service is gone; git sees how it ended
        finally:
            with contextlib.suppress(OSError):
                to_service.close()

    # A daemon: git closes our stdin only when it is done with us, maybe after we return.
    threading.Thread(target=inward, daemon=True).start()
    git_open = True
    while data := os.read(proc.stdout.fileno(), READ_SIZE):
        watch.to_git(data)
        view = memoryview(data)
        while git_open and view:
            try:
                view = view[os.write(1, view) :]
            except OSError:
                git_open = False  # git went away: drain the service so it can end
    proc.stdout.close()
    # No timeout: this is git's own transport, waited on for as long as the push takes.
    return proc.wait()
