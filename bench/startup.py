"""Start-up cost of our git-annex-shell against git-annex's own, side by side.

Every ssh access to an annex starts a fresh git-annex-shell, so its start-up is paid once
per `git annex` command and remote (and once per job with -J). The real binary answers
`configlist` in a few milliseconds; a Python program pays for the interpreter and for every
module it imports, hence the 20 ms target for `configlist` and the rule that `configlist`
and argument errors import neither trio nor dulwich (HACKING.md, "Start-up").

Figures, each timed as a whole process from spawn to exit, both shells interleaved run by
run so that machine drift affects both alike:

    configlist   git-annex-shell -c "git-annex-shell 'configlist' '<bare repo>'" (as from sshd)
    uploadpack   git-annex-shell -c "git-upload-pack '<bare repo>'" with GIT_ANNEX_SHELL_DIRECTORY
                 set to it (the git pass-through as a restricted key runs it), a flush on stdin
    argerror     git-annex-shell with no arguments (usage error, exit 1)
    p2pstdio     git-annex-shell p2pstdio <repo> <uuid>: read AUTH-SUCCESS, send VERSION 4,
                 read VERSION 4, close stdin, wait for exit
    floor        our script's interpreter alone (python -c pass), for scale; ours only

Usage: .venv/bin/python bench/startup.py [--runs N] [--ours PATH] [--real PATH] [--strict]

Exit status 0 when every command behaved as expected and the fast paths imported no heavy
module; 1 otherwise (or, with --strict, when the configlist median misses the target).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TARGET_MS = 20.0
CLIENT_UUID = "00000000-0000-4000-8000-00000000c1e7"
# Modules the cheap paths must not load (HACKING.md): each costs tens of milliseconds.
HEAVY = ("trio", "dulwich", "msgpack", "cryptography")
P2P_TIMEOUT = 30.0

GITCONFIG = """\
[user]
\tname = annexproxy bench
\temail = bench@annexproxy.invalid
[init]
\tdefaultBranch = main
"""


class BenchError(Exception):
    """A command did not behave as the benchmark expects; its figure is void."""


@dataclass
class Figure:
    name: str
    samples: dict[str, list[float]] = field(default_factory=dict)  # side -> seconds
    errors: dict[str, str] = field(default_factory=dict)  # side -> why it failed


# -- set-up ---------------------------------------------------------------------------------


def venv_bin() -> Path:
    # Not resolved: sys.executable is a symlink whose directory is the venv's bin.
    return Path(sys.executable).parent


def find_ours() -> Path:
    script = venv_bin() / "git-annex-shell"
    try:
        head = script.read_bytes()[:4096]
    except OSError:
        sys.exit(f"bench: {script} is missing; install the project (pip install -e '.[test]')")
    if b"shell.cli" not in head:
        # The git-annex wheel installs a git-annex-shell wrapper too; the last install wins.
        sys.exit(f"bench: {script} is not annexproxy's git-annex-shell; reinstall the project")
    return script


def find_real(workdir: Path) -> Path:
    """git-annex's own git-annex-shell: the wheel's binary under that name.

    The git-annex binary picks its personality from argv[0], so a symlink named
    git-annex-shell is the real shell with no Python wrapper in between.
    """
    spec = importlib.util.find_spec("git_annex")  # locates without importing
    if spec is None or spec.origin is None:
        sys.exit("bench: the git-annex wheel is not installed (pip install -e '.[test]')")
    binary = Path(spec.origin).parent / "git-annex"
    if not binary.is_file():
        sys.exit(f"bench: {binary} not found in the git-annex wheel")
    link = workdir / "real-bin" / "git-annex-shell"
    link.parent.mkdir()
    link.symlink_to(binary)
    return link


def find_git_annex() -> str:
    candidate = venv_bin() / "git-annex"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("git-annex")
    if found is None:
        sys.exit("bench: git-annex not found (pip install -e '.[test]')")
    return found


def make_env(home: Path) -> dict[str, str]:
    """A small, fixed environment, like the one sshd gives a session."""
    home.mkdir()
    (home / ".gitconfig").write_text(GITCONFIG, encoding="utf-8")
    return {
        "HOME": str(home),
        "PATH": f"{Path(find_git_annex()).parent}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }


def make_repo(workdir: Path, env: dict[str, str]) -> tuple[Path, str]:
    """A bare repository initialised by the real git-annex, as an admin would make it."""
    repo = workdir / "repo.git"

    def run(*argv: str, cwd: Path = workdir) -> str:
        return subprocess.run(
            list(argv), cwd=cwd, env=env, check=True, capture_output=True, text=True
        ).stdout

    run("git", "init", "--quiet", "--bare", str(repo))
    run(find_git_annex(), "init", "--quiet", "bench", cwd=repo)
    return repo, run("git", "config", "annex.uuid", cwd=repo).strip()


# -- one run of each figure -------------------------------------------------------------------


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, check=False,
    )
    return time.perf_counter() - start, proc.returncode


def checked_output(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        check=False, timeout=P2P_TIMEOUT,
    )
    return proc.returncode, proc.stdout, proc.stderr


def read_line(fd: int, deadline: float, buffer: bytearray) -> bytes:
    """One `\\n`-terminated line from a pipe, without blocking past the deadline."""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("timed out waiting for the server")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"server closed stdout (got {bytes(buffer)!r})")
            buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def p2p_session(argv: list[str], env: dict[str, str], cwd: Path, uuid: str) -> float:
    """AUTH-SUCCESS, VERSION 4 both ways, EOF, exit 0; returns the wall time."""
    start = time.perf_counter()
    deadline = time.monotonic() + P2P_TIMEOUT
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        buffer = bytearray()
        fd = proc.stdout.fileno()
        line = read_line(fd, deadline, buffer)
        if line != f"AUTH-SUCCESS {uuid}".encode():
            raise BenchError(f"expected AUTH-SUCCESS {uuid}, got {line!r}")
        proc.stdin.write(b"VERSION 4\n")
        proc.stdin.flush()
        line = read_line(fd, deadline, buffer)
        if line != b"VERSION 4":
            raise BenchError(f"expected VERSION 4, got {line!r}")
        proc.stdin.close()
        code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        elapsed = time.perf_counter() - start
        if code != 0:
            raise BenchError(f"exit {code} after the client closed stdin")
        return elapsed
    except BenchError as exc:
        proc.kill()
        _, err = proc.communicate()
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise BenchError(f"{exc}; stderr: {' | '.join(tail) or '(empty)'}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(OSError, ValueError):
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# -- the import check -----------------------------------------------------------------------


@dataclass
class ImportLine:
    self_us: int
    cumulative_us: int
    depth: int
    name: str


def parse_importtime(stderr: str) -> list[ImportLine]:
    lines = []
    pattern = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
    for raw in stderr.splitlines():
        m = pattern.match(raw)
        if m:
            # One space after the bar, then two per nesting level.
            depth = (len(m.group(3)) - 1) // 2
            lines.append(ImportLine(int(m.group(1)), int(m.group(2)), depth, m.group(4)))
    return lines


def import_chain(lines: list[ImportLine], index: int) -> list[str]:
    """Who imported lines[index]: -X importtime lists a module before the one importing it."""
    chain = [lines[index].name]
    depth = lines[index].depth
    for line in lines[index + 1 :]:
        if line.depth < depth:
            chain.append(line.name)
            depth = line.depth
    chain.append("script")  # depth 0: the console script (or site) imported it
    return list(reversed(chain))


def script_python(script: Path) -> str:
    """The interpreter a console script's `#!` line names (it may be another venv's)."""
    with open(script, "rb") as fh:
        first = fh.readline(4096)
    words = first[2:].decode("utf-8", "surrogateescape").split() if first[:2] == b"#!" else []
    if len(words) > 1 and Path(words[0]).name == "env":
        return shutil.which(words[1]) or sys.executable
    if words and "python" in Path(words[0]).name:
        return words[0]
    return sys.executable


OUR_PACKAGES = ("shell", "git_remote_annexproxy")


def _ours(name: str) -> bool:
    return name.split(".")[0] in OUR_PACKAGES


def parent_of(lines: list[ImportLine], index: int) -> str | None:
    depth = lines[index].depth
    for line in lines[index + 1 :]:
        if line.depth < depth:
            return line.name
    return None  # imported by the script itself (or by the interpreter's start-up)


@dataclass
class ImportReport:
    heavy: list[str]  # "shell.cli -> shell.commands -> trio" for each heavy module loaded
    total_ms: float  # all imports, -X importtime's cumulative figures summed at top level
    costly: list[str]  # "shell.cli: dataclasses 8.0 ms": what our code (or script) pulls in,
    # and what site imports at every start


def check_imports(ours: Path, args: list[str], env: dict[str, str], cwd: Path) -> ImportReport:
    """Run our console script under -X importtime and see what it imports, and why."""
    proc = subprocess.run(
        [script_python(ours), "-X", "importtime", str(ours), *args], env=env, cwd=cwd,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )
    lines = parse_importtime(proc.stderr)
    if not lines:
        raise BenchError("no -X importtime output")
    # Whatever the bare interpreter imports too (os, encodings, ...) is no one's choice.
    bare = subprocess.run(
        [script_python(ours), "-X", "importtime", "-c", "pass"], env=env, cwd=cwd,
        capture_output=True, text=True, check=False,
    )
    bare_lines = parse_importtime(bare.stderr)
    baseline = {line.name for line in bare_lines} - {"site"}
    # .pth files run by site on every start (an editable install's finder costs ~10 ms).
    startup = [
        f"site: {line.name} {line.cumulative_us / 1000:.1f} ms"
        for i, line in enumerate(bare_lines)
        if parent_of(bare_lines, i) == "site" and line.cumulative_us >= 1000
        and line.name not in ("os",)
    ]
    heavy = [
        " -> ".join(import_chain(lines, i))
        for i, line in enumerate(lines)
        if line.name in HEAVY
    ]
    costly = []
    for i, line in enumerate(lines):
        parent = parent_of(lines, i)
        # What our modules import directly; what the script imports at top level other than
        # our package (the console-script wrapper's own imports, e.g. `re`); and what site
        # runs from .pth files (an editable install's import finder), which every start pays.
        by_us = parent is not None and _ours(parent)
        by_script = parent is None and line.name not in ("site", "encodings")
        by_site = parent == "site"
        chosen = not _ours(line.name) and line.name not in baseline
        if (by_us or by_script or by_site) and chosen and line.cumulative_us >= 1000:
            who = parent or "script"
            costly.append(f"{who}: {line.name} {line.cumulative_us / 1000:.1f} ms")
    total = sum(line.cumulative_us for line in lines if line.depth == 0) / 1000
    return ImportReport(heavy, total, startup + costly)


# -- report ---------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


def summary(samples: list[float]) -> str:
    return f"{ms(min(samples))} {ms(statistics.median(samples))} {ms(max(samples))}"


def report(figures: list[Figure], sides: list[str]) -> None:
    head = f"{'figure':<11} {'shell':<5} {'min ms':>7} {'median':>7} {'max ms':>7}"
    print(f"\n{head}   ratio ours/real")
    for fig in figures:
        for side in sides:
            if side in fig.errors:
                print(f"{fig.name:<11} {side:<5}  FAILED: {fig.errors[side]}")
                continue
            samples = fig.samples.get(side)
            if not samples:
                continue
            ratio = ""
            if side == "ours" and fig.samples.get("real") and "real" not in fig.errors:
                ratios = [a / b for a, b in zip(samples, fig.samples["real"], strict=False)]
                ratio = (
                    f"  x{statistics.median(samples) / statistics.median(fig.samples['real']):.1f}"
                    f" (pairwise median x{statistics.median(ratios):.1f})"
                )
            print(f"{fig.name:<11} {side:<5} {summary(samples)}{ratio}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30, help="counted runs per figure (30)")
    parser.add_argument("--warmup", type=int, default=3, help="uncounted runs first (3)")
    parser.add_argument("--ours", type=Path, help="our git-annex-shell (next to python)")
    parser.add_argument("--real", type=Path, help="git-annex's git-annex-shell (the wheel's)")
    parser.add_argument("--strict", action="store_true", help="fail when over the target")
    opts = parser.parse_args(argv)
    if opts.runs < 1:
        parser.error("--runs must be at least 1")

    with tempfile.TemporaryDirectory(prefix="annexproxy-bench-") as tmp:
        workdir = Path(tmp)
        ours = opts.ours or find_ours()
        real = opts.real or find_real(workdir)
        env = make_env(workdir / "home")
        repo, uuid = make_repo(workdir, env)
        shells = {"ours": str(ours), "real": str(real)}
        print(f"# python {sys.version.split()[0]} ({sys.executable})")
        print(f"# ours: {ours}")
        print(f"# real: {real} -> {os.path.realpath(real)}")
        print(f"# {opts.runs} runs per figure after {opts.warmup} warm-up, interleaved")
        return run_all(opts.runs, opts.warmup, opts.strict, shells, ours, env, workdir, repo, uuid)


def run_all(
    runs: int, warmup: int, strict: bool, shells: dict[str, str], ours: Path,
    env: dict[str, str], cwd: Path, repo: Path, uuid: str,
) -> int:  # fmt: skip
    configlist_cmd = f"git-annex-shell 'configlist' '{repo}'"
    expected_configlist = f"annex.uuid={uuid}\ncore.gcrypt-id=\n"

    def configlist(shell: str) -> float:
        seconds, code = timed([shell, "-c", configlist_cmd], env, cwd)
        if code != 0:
            raise BenchError(f"exit {code}")
        return seconds

    uploadpack_cmd = f"git-upload-pack '{repo}'"
    restricted = {**env, "GIT_ANNEX_SHELL_DIRECTORY": str(repo)}

    def uploadpack(shell: str) -> float:
        start = time.perf_counter()
        proc = subprocess.run(
            [shell, "-c", uploadpack_cmd], env=restricted, cwd=cwd, input=b"0000",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise BenchError(f"exit {proc.returncode}")
        return seconds

    def argerror(shell: str) -> float:
        seconds, code = timed([shell], env, cwd)
        if code != 1:
            raise BenchError(f"exit {code}, expected 1")
        return seconds

    def p2pstdio(shell: str) -> float:
        return p2p_session([shell, "p2pstdio", str(repo), CLIENT_UUID], env, cwd, uuid)

    interpreter = script_python(ours)

    def floor(shell: str) -> float:
        # The interpreter our script runs with, doing nothing: what no code change can save.
        seconds, _ = timed([interpreter, "-c", "pass"], env, cwd)
        return seconds

    # Correctness first, once per shell, with output captured: a fast wrong answer is void.
    def verify(side: str, shell: str) -> dict[str, str]:
        errors = {}
        code, out, err = checked_output([shell, "-c", configlist_cmd], env, cwd)
        if (code, out) != (0, expected_configlist):
            errors["configlist"] = f"exit {code}, stdout {out!r}, stderr {err.strip()[-200:]!r}"
        code, out, err = checked_output([shell], env, cwd)
        if code != 1 or not err.startswith("git-annex-shell: bad parameters"):
            errors["argerror"] = f"exit {code}, stderr {err[:80]!r}"
        proc = subprocess.run(
            [shell, "-c", uploadpack_cmd], env=restricted, cwd=cwd, input=b"0000",
            capture_output=True, check=False, timeout=P2P_TIMEOUT,
        )  # fmt: skip
        if proc.returncode != 0 or b"refs/heads/git-annex" not in proc.stdout:
            errors["uploadpack"] = f"exit {proc.returncode}, stderr {proc.stderr[-200:]!r}"
        return errors

    plan: list[tuple[str, Callable[[str], float], list[str]]] = [
        ("configlist", configlist, ["ours", "real"]),
        ("argerror", argerror, ["ours", "real"]),
        ("uploadpack", uploadpack, ["ours", "real"]),
        ("p2pstdio", p2pstdio, ["ours", "real"]),
        ("floor", floor, ["ours"]),
    ]
    figures = {name: Figure(name) for name, _, _ in plan}
    for side, shell in shells.items():
        for name, why in verify(side, shell).items():
            figures[name].errors[side] = why

    for name, fn, sides in plan:
        fig = figures[name]
        for i in range(warmup + runs):
            for side in sides:
                if side in fig.errors:
                    continue
                try:
                    seconds = fn(shells[side])
                except (BenchError, subprocess.SubprocessError, OSError) as exc:
                    fig.errors[side] = str(exc)
                    continue
                if i >= warmup:
                    fig.samples.setdefault(side, []).append(seconds)
        print(f"# {name} done", file=sys.stderr)

    report(list(figures.values()), ["ours", "real"])
    failed = any(fig.errors for fig in figures.values())

    print()
    cl = figures["configlist"].samples.get("ours")
    if cl:
        median_ms = statistics.median(cl) * 1000
        verdict = "under" if median_ms < TARGET_MS else "OVER"
        print(
            f"configlist (ours): median {median_ms:.1f} ms, "
            f"{verdict} the {TARGET_MS:.0f} ms target"
        )
        if strict and median_ms >= TARGET_MS:
            failed = True

    for label, args, label_env in (
        ("configlist", ["-c", configlist_cmd], env),
        ("argerror", [], env),
        ("uploadpack", ["-c", uploadpack_cmd], restricted),
    ):
        try:
            imports = check_imports(ours, args, label_env, cwd)
        except BenchError as exc:
            print(f"imports ({label}): could not check: {exc}")
            failed = True
            continue
        if imports.heavy:
            failed = True
            print(f"imports ({label}): HEAVY modules loaded:")
            for chain in imports.heavy:
                print(f"    {chain}")
        else:
            print(f"imports ({label}): none of {', '.join(HEAVY)} loaded")
        print(f"    all imports {imports.total_ms:.1f} ms (under -X importtime)")
        for item in imports.costly:
            print(f"    {item}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
