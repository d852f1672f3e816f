"""Peak RSS of the node worker (`git-annex-shell noderpc`) under a client that never reads.

A holder of an ssh key that may run noderpc (ANNEXPROXY_ALLOW_NODERPC, git-annex-shell(1))
can offer a large credit window, ask for many bodies or answers, and read none of them. The
worker must bound what it queues for such a client (shell/noderpc.py). Each scenario
spawns a fresh worker on a repository made by the real git-annex, plays that client
(tests/rpcdriver.py), and reports the worker's peak resident set (VmHWM, the kernel's own
high-water mark):

| scenario   | what the client sends, reading nothing                          |
|------------|-----------------------------------------------------------------|
| baseline   | HELLO and one `info` (its answer read): the worker at rest      |
| gets-4MiB  | 100 `get`s of a 4 MiB object                                     |
| gets-64MB  | 30 `get`s of a 64 MB object                                      |
| small      | 36 MB of `timestamp` requests                                    |

The client offers a 1 GiB window first; a worker that refuses that window (it ends the
link at HELLO) is measured again with the largest window it accepts (rpc.MAX_CREDIT).

    .venv/bin/python bench/noderpc_abuse.py [--only NAME,...] [--target-mib 64]

Exits 1 if a peak reaches the target.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path.insert(0, str(TESTS))

from rpcdriver import RpcSession, hello, request  # noqa: E402

from git_remote_annexproxy import rpc  # noqa: E402

GIB = 1 << 30
GITCONFIG = "[user]\n\tname = bench\n\temail = bench@annexproxy.invalid\n"


def real_annex_dir(work: Path) -> Path:
    spec = importlib.util.find_spec("git_annex")
    if spec is None or spec.origin is None:
        sys.exit("bench: the git-annex wheel is not installed (pip install -e '.[test]')")
    out = work / "annexbin"
    out.mkdir()
    (out / "git-annex").symlink_to(Path(spec.origin).parent / "git-annex")
    return out


def make_repo(work: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    """A bare repository holding a 4 MiB and a 64 MB object; (path, env, keys by name)."""
    home = work / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(GITCONFIG, encoding="utf-8")
    env = {
        "HOME": str(home),
        "PATH": f"{real_annex_dir(work)}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    repo = home / "node.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], env=env, check=True)
    subprocess.run(["git", "annex", "init", "-q", "node"], cwd=repo, env=env, check=True)
    keys = {}
    for name, size in (("4MiB", 4 << 20), ("64MB", 64_000_000)):
        data = hashlib.shake_256(name.encode()).digest(size)
        key = f"SHA256E-s{size}--{hashlib.sha256(data).hexdigest()}.bin"
        seed = work / "seed"
        seed.write_bytes(data)
        subprocess.run(["git", "annex", "setkey", key, str(seed)], cwd=repo, env=env, check=True)
        keys[name] = key
    return repo, env, keys


def gets(key: str, n: int) -> bytes:
    params = {"key": key, "offset": 0, "af": None}
    return b"".join(request(i, "get", params) for i in range(2, n + 2))


def small(total: int) -> bytes:
    out, rid = bytearray(), 2
    while len(out) < total:
        out += request(rid, "timestamp", {})
        rid += 1
    return bytes(out)


def measure(repo: Path, env: dict[str, str], window: int, payload: bytes | None) -> str:
    argv = [sys.executable, "-m", "shell", "noderpc", str(repo)]
    with RpcSession(argv, env=env, cwd=repo, timeout=30) as s:
        start = time.monotonic()
        taken = s.push(hello(window) + request(1, "info", {}))
        if payload is None:
            with contextlib.suppress(EOFError):  # a refused window: reported below
                s.frame(), s.frame()  # HELLO and the answer
        else:
            taken += s.push(payload, stall=10)
        peak = s.settle()
        seconds = time.monotonic() - start
        state = "running" if s.alive() else f"exited {s.proc.returncode}"
        s.kill()
        err = s.stderr().strip().splitlines()
    note = f"; stderr: {err[-1]}" if err else ""
    shown = f"{peak / 1024:7.1f} MiB" if peak else "    n/a    "  # gone before a sample
    return (f"peak {shown}  took {taken / 1e6:6.1f} MB of input in "
            f"{seconds:4.1f}s, {state}{note}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--target-mib", type=float, default=64.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="noderpc-abuse-") as tmp:
        repo, env, keys = make_repo(Path(tmp))
        scenarios: dict[str, Callable[[], bytes | None]] = {
            "baseline": lambda: None,
            "gets-4MiB": lambda: gets(keys["4MiB"], 100),
            "gets-64MB": lambda: gets(keys["64MB"], 30),
            "small": lambda: small(36_000_000),
        }
        wanted = [w for w in args.only.split(",") if w] or list(scenarios)
        worst = 0.0
        for name in wanted:
            payload = scenarios[name]()
            windows = [GIB] if rpc.MAX_CREDIT >= GIB else [GIB, rpc.MAX_CREDIT]
            for window in windows:
                line = measure(repo, env, window, payload)
                print(f"{name:10} window {window >> 20:5} MiB: {line}", flush=True)
                if "n/a" not in line:
                    worst = max(worst, float(line.split()[1]))
        print(f"worst peak {worst:.1f} MiB (target < {args.target_mib:.0f} MiB)")
        return 0 if worst < args.target_mib else 1


if __name__ == "__main__":
    sys.exit(main())
