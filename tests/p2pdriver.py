"""A tiny P2P client for tests: runs `git-annex-shell p2pstdio DIR CLIENTUUID` and talks to it.

Synchronous on purpose: a test is a script of "send this, expect that", and every wait is
bounded by a timeout so a hung server fails the test instead of hanging the suite. The
server's stderr goes to a temporary file (a pipe could fill up and block the server while
the test waits on stdout).

    with ShellSession(p2pstdio_argv(shell, repo, CLIENT), env=env) as s:
        assert s.readline().startswith("AUTH-SUCCESS ")
        s.send("VERSION 4")
        assert s.readline() == "VERSION 4"
        s.send("CHECKPRESENT " + key)
        assert s.readline() == "SUCCESS"
        result = s.finish()                # closes stdin, waits
    assert result.code == 0
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

DEFAULT_TIMEOUT = 20.0
CLIENT_UUID = "d21e0000-0000-4000-8000-00000000d21e"

Form = Literal["multi", "single"]


def sha256e_key(content: bytes, ext: str = ".txt") -> str:
    """The SHA256E key git-annex gives `content` in a file ending in `ext`."""
    return f"SHA256E-s{len(content)}--{hashlib.sha256(content).hexdigest()}{ext}"


def blake2b256e_key(content: bytes, ext: str = ".bin") -> str:
    digest = hashlib.blake2b(content, digest_size=32).hexdigest()
    return f"BLAKE2B256E-s{len(content)}--{digest}{ext}"


def quote(word: str) -> str:
    """git-annex's own quoting of one word for the single-string form (annex-shell.md §1)."""
    return "'" + word.replace("'", "'\"'\"'") + "'"


def shell_argv(shell: Path | str, words: Sequence[str], form: Form = "multi") -> list[str]:
    """argv for git-annex-shell with `words` (COMMAND DIR ...), in either argv form.

    "single" is what sshd runs for a forced command or login shell:
    `git-annex-shell -c "git-annex-shell 'COMMAND' 'DIR' ..."`; options such as `--uuid`
    are left unquoted, as git-annex sends them.
    """
    if form == "multi":
        return [str(shell), *words]
    quoted = [w if w.startswith("--") else quote(w) for w in words]
    return [str(shell), "-c", " ".join(["git-annex-shell", *quoted])]


def p2pstdio_argv(
    shell: Path | str,
    directory: Path | str,
    client_uuid: str = CLIENT_UUID,
    *,
    form: Form = "multi",
    uuid: str | None = None,
) -> list[str]:
    words = ["p2pstdio", str(directory), client_uuid]
    if uuid is not None:
        words += ["--uuid", uuid]
    return shell_argv(shell, words, form)


@dataclass
class Result:
    code: int
    stdout: bytes  # what the server wrote after the last byte the test read
    stderr: str
    rusage: resource.struct_rusage | None


class ShellSession:
    """One git-annex-shell process with its stdin/stdout as the test's P2P connection."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | str | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        preexec_fn: Callable[[], None] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.timeout = timeout
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.PIPE if stdin is None else stdin,
            stdout=subprocess.PIPE if stdout is None else stdout,
            stderr=self._stderr,
            # Tests use it for resource limits only; nothing else runs in the child.
            preexec_fn=preexec_fn,  # noqa: PLW1509
        )
        self._buf = bytearray()
        self._eof = False
        self.rusage: resource.struct_rusage | None = None

    # -- writing ------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, line: str | bytes) -> None:
        raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogateescape")
        self.send_raw(raw + b"\n")

    def send_data(self, payload: bytes) -> None:
        self.send_raw(b"DATA %d\n" % len(payload) + payload)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()

    # -- reading ------------------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read more of stdout into the buffer; False at EOF."""
        assert self.proc.stdout is not None
        if self._eof:
            return False
        fd = self.proc.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"no output from the server within {self.timeout}s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    def readline(self, timeout: float | None = None) -> str:
        """The next line without its newline; EOFError if the server closed first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (nl := self._buf.find(b"\n")) < 0:
            if not self._fill(deadline):
                raise EOFError(f"server closed stdout; pending {bytes(self._buf)[:80]!r}")
        line = bytes(self._buf[:nl])
        del self._buf[: nl + 1]
        return line.decode("utf-8", "surrogateescape")

    def read_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._buf) < n:
            if not self._fill(deadline):
                raise EOFError(f"server closed stdout after {len(self._buf)} of {n} bytes")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def read_data(self) -> bytes:
        """A `DATA n` header and its n bytes."""
        header = self.readline()
        assert header.startswith("DATA "), header
        return self.read_exact(int(header[5:]))

    def at_eof(self, timeout: float | None = None) -> bool:
        """True if the server closes stdout without writing anything more."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._buf:
            if not self._fill(deadline):
                return True
        return False

    def request(self, line: str | bytes) -> str:
        self.send(line)
        return self.readline()

    def handshake(self, version: int | None = 4) -> str:
        """Read AUTH-SUCCESS (returns its uuid) and negotiate `version` (None: stay at v0)."""
        auth = self.readline()
        assert auth.startswith("AUTH-SUCCESS "), auth
        if version is not None:
            assert self.request(f"VERSION {version}") == f"VERSION {min(version, 4)}"
        return auth[len("AUTH-SUCCESS ") :]

    # -- ending -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> int:
        """Reap the process with wait4, keeping its resource usage (peak RSS)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.rusage = usage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return self.proc.returncode
            if time.monotonic() > deadline:
                raise TimeoutError(f"server still running after {self.timeout}s")
            time.sleep(0.01)

    def finish(self, timeout: float | None = None) -> Result:
        """Close stdin, wait for the exit, and collect what is left."""
        self.close_stdin()
        code = self.wait(timeout)
        rest = bytes(self._buf)
        self._buf.clear()
        if self.proc.stdout is not None and not self._eof:
            rest += self.proc.stdout.read()
        return Result(code, rest, self.stderr(), self.rusage)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return self.wait()

    def __enter__(self) -> ShellSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.returncode is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()
        self._stderr.close()


def run_shell(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | str | None = None,
    input: bytes = b"",
    timeout: float = DEFAULT_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a one-shot git-annex-shell command (configlist, passthrough...), text output."""
    proc = subprocess.run(
        list(argv),
        env=dict(env),
        cwd=cwd,
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "surrogateescape"),
        proc.stderr.decode("utf-8", "surrogateescape"),
    )
