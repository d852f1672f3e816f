"""Watching a tunnelled `git-receive-pack` (sans-IO): refuse option-like ref names, and
notice a push that git reported as failed.

git itself accepts a push to `refs/heads/-x`, yet such a name turns into an option as soon as
some script runs `git checkout "$branch"` or `git log $ref` on the server (the CVE-2017-1000117
family). The command list a client sends comes first, as pkt-lines ending with a flush, before
the pack; this guard holds it back until the flush, checks every ref name, and only then lets
it through to receive-pack. So a refused push never reaches git, and the repository is intact.

receive-pack exits 0 even when it rejected the pack or a ref (it says so in its report-status,
`unpack <error>` / `ng <ref> <why>`), so the guard also reads that report from the service's
output (through side-band if the client asked for it), for an honest `CONNECTDONE` code.

Only the protocol's framing is parsed (git_remote_annexproxy/pktline.py); the pack itself is
never looked at.
"""

from __future__ import annotations

import re

from git_remote_annexproxy.pktline import FLUSH, PktLineError, next_pkt

# A push of many refs is ~100 bytes per ref; this allows some 100,000 of them.
MAX_COMMANDS_BYTES = 16 << 20

# `old-oid SP new-oid SP refname` (SHA-1 or SHA-256 ids).
_COMMAND = re.compile(rb"([0-9a-f]{40}|[0-9a-f]{64}) ([0-9a-f]{40}|[0-9a-f]{64}) (.+)")


class PushRefused(Exception):
    """The client's commands are not passed on; the message says why, in one line."""


def option_like(refname: bytes) -> bool:
    return any(part.startswith(b"-") for part in refname.split(b"/"))


class ReceivePackGuard:
    """Feed it both directions of one receive-pack session.

    `from_client(data)` returns the bytes that may go to receive-pack now (nothing while
    the command list is incomplete) or raises PushRefused. `from_service(data)` only
    watches; `failed` is True once receive-pack reported an unpack error or a rejected ref.
    """

    def __init__(self) -> None:
        self._held = bytearray()
        self._scan = 0  # start of the first pkt-line of _held not yet checked
        self._commands_done = False
        self.caps: frozenset[bytes] = frozenset()
        self.failed = False
        # Service side: the ref advertisement, then the report (maybe inside side-band 1).
        self._out = bytearray()
        self._out_pos = 0
        self._advertised = False
        self._report = bytearray()
        self._report_pos = 0
        self._broken_output = False

    # -- client -> receive-pack -------------------------------------------------------------

    def from_client(self, data: bytes) -> bytes:
        if self._commands_done:
            return data
        self._held += data
        if len(self._held) > MAX_COMMANDS_BYTES:
            raise PushRefused("push command list too long")
        while True:
            try:
                payload, end = next_pkt(self._held, self._scan)
            except PktLineError as exc:
                raise PushRefused(f"malformed push command list: {exc}") from None
            if payload is None:
                return b""
            self._scan = end
            if payload is FLUSH:
                self._commands_done = True
                out = bytes(self._held)
                self._held.clear()
                return out
            if isinstance(payload, bytes):  # `0004` is an (empty) command line, as for git
                self._check_command(payload)

    def _check_command(self, payload: bytes) -> None:
        line, nul, caps = payload.rstrip(b"\n").partition(b"\0")
        if nul and not self.caps:
            self.caps = frozenset(caps.split())
        match = _COMMAND.fullmatch(line)
        # Other lines (`shallow`, a push certificate's header) name no ref; the certificate's
        # own command lines are matched here as well, which is what we want.
        if match and option_like(match.group(3)):
            name = match.group(3).decode("utf-8", "backslashreplace")
            raise PushRefused(f"refusing a ref name that looks like an option: {name}")

    # -- receive-pack -> client (watch only) -----------------------------------------------

    def from_service(self, data: bytes | bytearray) -> None:
        if self.failed or self._broken_output:
            return
        self._out += data
        try:
            self._scan_output()
        except PktLineError:
            # Not what receive-pack writes; stop watching rather than guess.
            self._broken_output = True

    def _scan_output(self) -> None:
        sideband = bool(self.caps & {b"side-band", b"side-band-64k"})
        while True:
            payload, self._out_pos = next_pkt(self._out, self._out_pos)
            if payload is None:
                del self._out[: self._out_pos]
                self._out_pos = 0
                return
            if not self._advertised:
                self._advertised = payload is FLUSH
            elif not isinstance(payload, bytes):
                continue
            elif not sideband:
                self._report_line(payload)
            elif payload[:1] == b"\1":
                self._report += payload[1:]
                self._scan_report()

    def _scan_report(self) -> None:
        while True:
            payload, self._report_pos = next_pkt(self._report, self._report_pos)
            if payload is None:
                del self._report[: self._report_pos]
                self._report_pos = 0
                return
            if isinstance(payload, bytes):
                self._report_line(payload)

    def _report_line(self, payload: bytes) -> None:
        line = payload.rstrip(b"\n")
        if (line.startswith(b"unpack ") and line != b"unpack ok") or line.startswith(b"ng "):
            self.failed = True
