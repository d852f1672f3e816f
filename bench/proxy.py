"""Proxy benchmarks: ours against the real git-annex-shell, in the same run.

1. `../shared/conformance/run --bench` (big and small copy and get through a proxy, no-op
   presence checks) for both shells; prints each figure and the ratio ours/real.
2. Peak RSS of the proxy process while a big file (256 MiB by default) is copied to and
   got from a node through it: our git-annex-shell runs under a small wrapper that
   `wait4`s it and records `ru_maxrss` (the kernel's own peak), so nothing is sampled.

    .venv/bin/python bench/proxy.py [--repeat N] [--big-mib N] [--skip-harness] [--skip-rss]

Exits 1 if the proxy's peak RSS reaches the 100 MiB target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("ANNEXPROXY_SHARED", ROOT.parent / "shared"))
RSS_TARGET_MIB = 100.0

WRAPPER = """#!{python}
# Runs annexproxy's git-annex-shell and records its peak RSS (ru_maxrss, KiB) and argv.
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv({shell!r}, [{shell!r}, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
with open({log!r}, "a") as fh:
    fh.write(json.dumps({{"argv": sys.argv[1:], "maxrss_kib": usage.ru_maxrss}}) + "\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def real_annex_bin(work: Path) -> Path:
    """A directory where git-annex and git-annex-shell are the real multi-call binary."""
    import git_annex

    binary = Path(git_annex.__file__).parent / "git-annex"
    out = work / "annexbin"
    out.mkdir(exist_ok=True)
    for name in ("git-annex", "git-annex-shell"):
        link = out / name
        if not link.exists():
            link.symlink_to(binary)
    return out


def our_shell() -> Path:
    script = Path(sys.executable).parent / "git-annex-shell"
    if b"shell.cli" not in script.read_bytes()[:4096]:
        raise SystemExit(f"{script} is not annexproxy's git-annex-shell")
    return script


def run_harness(shell: Path, annexbin: Path, repeat: int, big_mib: int) -> dict[str, float]:
    env = dict(os.environ)
    env.update(
        ANNEX_SHELL=str(shell),
        GIT_ANNEX_BIN=str(annexbin),
        ANNEXCONF_BENCH_REPEAT=str(repeat),
        ANNEXCONF_BENCH_BIG_MIB=str(big_mib),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    proc = subprocess.run(
        [sys.executable, str(SHARED / "conformance" / "run"), "--bench"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    figures = {}
    for m in re.finditer(r"^bench (\S+) seconds=([0-9.]+)", proc.stdout, re.M):
        figures[m.group(1)] = float(m.group(2))
    if proc.returncode != 0 or not figures:
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"harness --bench failed for {shell}")
    return figures


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def measure_rss(annexbin: Path, big_mib: int) -> list[tuple[str, float]]:
    """Peak RSS (MiB) of each proxy process during a big copy --to and get --from."""
    work = Path(tempfile.mkdtemp(prefix="annexproxy-rss-"))
    try:
        for d in ("bin", "srvbin", "home", "srv"):
            (work / d).mkdir()
        (work / "home" / ".gitconfig").write_text(
            "[user]\n\tname = bench\n\temail = bench@annexproxy.invalid\n"
            "[init]\n\tdefaultBranch = main\n[annex]\n\tsshcaching = false\n"
        )
        (work / "bin" / "ssh").symlink_to(ROOT / "tests" / "fakessh.py")
        log = work / "rss.jsonl"
        wrapper = work / "srvbin" / "git-annex-shell"
        wrapper.write_text(
            WRAPPER.format(python=sys.executable, shell=str(our_shell()), log=str(log))
        )
        wrapper.chmod(0o755)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "SSH_"))}
        admin = dict(base, HOME=str(work / "home"), PATH=f"{annexbin}:/usr/bin:/bin")
        client = dict(
            admin,
            PATH=f"{work / 'bin'}:{annexbin}:/usr/bin:/bin",
            FAKESSH_SERVER_HOME=str(work / "home"),
            FAKESSH_SERVER_PATH=f"{work / 'bin'}:{work / 'srvbin'}:{annexbin}:/usr/bin:/bin",
        )
        proxy, node = work / "srv" / "proxy.git", work / "srv" / "node1.git"
        for repo, desc in ((proxy, "proxy"), (node, "node1")):
            run(["git", "init", "-q", "--bare", str(repo)], work, admin)
            run(["git", "annex", "init", "-q", desc], repo, admin)
        run(["git", "remote", "add", "node1", str(node)], proxy, admin)
        run(["git", "annex", "sync", "-q", "--no-content", "node1"], proxy, admin)
        run(["git", "config", "remote.node1.annex-proxy", "true"], proxy, admin)
        run(["git", "annex", "updateproxy"], proxy, admin)
        clone = work / "client"
        run(["git", "clone", "-q", f"localhost:{proxy}", str(clone)], work, client)
        run(["git", "annex", "init", "-q", "client"], clone, client)
        big = clone / "big.bin"
        block = hashlib.sha256(b"annexproxy").digest() * 32768  # 1 MiB, not compressible
        with open(big, "wb") as fh:
            for i in range(big_mib):
                fh.write(hashlib.sha256(b"%d" % i).digest() + block[32:])
        run(["git", "annex", "add", "-q", "big.bin"], clone, client)
        run(["git", "commit", "-q", "-m", "big"], clone, client)
        results = []
        steps: list[tuple[str, list[list[str]]]] = [
            (
                "copy --to origin-node1",
                [["git", "annex", "copy", "--to", "origin-node1", "big.bin"]],
            ),
            (
                "get --from origin-node1",
                [
                    ["git", "annex", "drop", "big.bin"],
                    ["git", "annex", "get", "--from", "origin-node1", "big.bin"],
                ],
            ),
        ]
        for label, cmds in steps:
            log.write_text("")
            for cmd in cmds:
                run(cmd, clone, client)
            # The proxy sessions are the ones addressed with --uuid (node1's UUID).
            records = [json.loads(line) for line in log.read_text().splitlines()]
            peaks = [r["maxrss_kib"] / 1024 for r in records if "--uuid" in " ".join(r["argv"])]
            results.append((label, max(peaks) if peaks else float("nan")))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--skip-harness", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="annexproxy-bench-"))
    ok = True
    try:
        annexbin = real_annex_bin(work)
        if not args.skip_harness:
            ours = run_harness(our_shell(), annexbin, args.repeat, args.big_mib)
            real = run_harness(annexbin / "git-annex-shell", annexbin, args.repeat, args.big_mib)
            print(f"{'figure':28} {'ours s':>9} {'real s':>9} {'ours/real':>10}")
            for name, t in ours.items():
                r = real.get(name, float("nan"))
                print(f"{name:28} {t:9.3f} {r:9.3f} {t / r if r else float('nan'):10.2f}")
        if not args.skip_rss:
            for label, mib in measure_rss(annexbin, args.big_mib):
                verdict = "ok" if mib < RSS_TARGET_MIB else "OVER TARGET"
                print(
                    f"proxy peak RSS during {label} ({args.big_mib} MiB): {mib:.1f} MiB "
                    f"(target < {RSS_TARGET_MIB:.0f} MiB: {verdict})"
                )
                ok &= mib < RSS_TARGET_MIB
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
