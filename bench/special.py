"""Encrypted special remote behind a proxy: our git-annex-shell against git-annex's own.

One site per side, laid out identically with the real git-annex: a bare proxy repository
with a directory special remote (``encryption=shared chunk=1MiB`` by default,
``annex-proxy=true``, ``updateproxy``), and a client clone reaching it over ssh as
``origin-sr``. The only difference is which ``git-annex-shell`` the fake ssh
(``tests/fakessh.py``, forced-command mode) runs on the proxy: ours, or the real one, which
then does the chunking and encryption itself.

Figures, wall time of the real git-annex client's command, the sides interleaved run by run:

    put   git annex copy --to origin-sr FILE   (the proxy verifies, chunks, encrypts, writes)
    get   git annex get --from origin-sr FILE  (after a local drop; decrypt, join, stream)

Each run checks its result (the store holds the chunk objects; the file comes back with
the right key); a wrong run voids the benchmark.

Usage: .venv/bin/python bench/special.py [--size MiB] [--chunk SIZE] [--runs N]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKESSH = HERE.parent / "tests" / "fakessh.py"
GITCONFIG = """\
[user]
\tname = annexproxy bench
\temail = bench@annexproxy.invalid
[init]
\tdefaultBranch = main
[annex]
\tsshcaching = false
"""
SYSTEM_PATH = "/usr/bin:/bin"
TIMEOUT = 3600.0


class BenchError(Exception):
    pass


def ours() -> Path:
    script = Path(sys.executable).parent / "git-annex-shell"
    if b"shell.cli" not in script.read_bytes()[:4096]:
        sys.exit(f"bench: {script} is not annexproxy's git-annex-shell; reinstall the project")
    return script


def real_binary() -> Path:
    spec = importlib.util.find_spec("git_annex")
    if spec is None or spec.origin is None:
        sys.exit("bench: the git-annex wheel is not installed (pip install -e '.[test]')")
    return Path(spec.origin).parent / "git-annex"


class Site:
    """A proxy with one encrypted special remote and a client, for one git-annex-shell."""

    def __init__(self, root: Path, shell: Path, annex_dir: Path, gnupghome: Path) -> None:
        self.root = root
        for d in ("bin", "srvbin", "home-client", "home-server", "srv", "store"):
            (root / d).mkdir(parents=True)
        (root / "bin" / "ssh").symlink_to(FAKESSH)
        # The real binary picks its personality from argv[0]: link it by that name.
        (root / "srvbin" / "git-annex-shell").symlink_to(shell)
        for home in ("home-client", "home-server"):
            (root / home / ".gitconfig").write_text(GITCONFIG, encoding="utf-8")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "FAKESSH_"))}
        self.client_env = {
            **base,
            "HOME": str(root / "home-client"),
            "PATH": os.pathsep.join((str(root / "bin"), str(annex_dir), SYSTEM_PATH)),
            "LANG": "C.UTF-8",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GNUPGHOME": str(gnupghome),
            "FAKESSH_MODE": "forced",
            "FAKESSH_SERVER_PATH": os.pathsep.join(
                (str(root / "srvbin"), str(annex_dir), SYSTEM_PATH)
            ),
            "FAKESSH_SERVER_HOME": str(root / "home-server"),
            "FAKESSH_PASSENV": "GNUPGHOME",
        }
        self.admin_env = {
            **{k: v for k, v in self.client_env.items() if not k.startswith("FAKESSH_")},
            "HOME": str(root / "home-server"),
            "PATH": os.pathsep.join((str(annex_dir), SYSTEM_PATH)),
        }
        self.proxy = root / "srv" / "proxy.git"
        self.client = root / "client"
        self.store = root / "store"

    def run(self, *argv: str, cwd: Path, admin: bool = False) -> str:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=self.admin_env if admin else self.client_env,
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr[-500:]}")
        return proc.stdout

    def set_up(self, chunk: str, content: Path) -> str:
        self.run("git", "init", "-q", "--bare", str(self.proxy), cwd=self.root, admin=True)
        self.run("git", "annex", "init", "-q", "proxy", cwd=self.proxy, admin=True)
        self.run("git", "annex", "initremote", "-q", "sr", "type=directory",
                 f"directory={self.store}", "encryption=shared", f"chunk={chunk}",
                 cwd=self.proxy, admin=True)  # fmt: skip
        self.run("git", "config", "remote.sr.annex-proxy", "true", cwd=self.proxy, admin=True)
        self.run("git", "annex", "updateproxy", "-q", cwd=self.proxy, admin=True)
        self.run("git", "clone", "-q", f"localhost:{self.proxy}", str(self.client), cwd=self.root)
        self.run("git", "annex", "init", "-q", "client", cwd=self.client)
        self.run("git", "config", "remote.origin.annex-verified", "verified", cwd=self.client)
        os.link(content, self.client / "big.bin")
        self.run("git", "annex", "add", "-q", "big.bin", cwd=self.client)
        return self.run("git", "annex", "lookupkey", "big.bin", cwd=self.client).strip()

    def timed(self, *argv: str) -> float:
        start = time.perf_counter()
        self.run(*argv, cwd=self.client)
        return time.perf_counter() - start

    def objects(self) -> int:
        """Object files in the store (not counting its tmp/ directory)."""
        return sum(len(files) for top, _, files in os.walk(self.store)
                   if not top.startswith(str(self.store / "tmp")))  # fmt: skip

    def put(self, chunks: int) -> float:
        seconds = self.timed("git", "annex", "copy", "-q", "--to", "origin-sr", "big.bin")
        if self.objects() != chunks:
            raise BenchError(f"store holds {self.objects()} objects, expected {chunks}")
        return seconds

    def get(self, key: str, digest: str) -> float:
        self.run("git", "annex", "drop", "-q", "--force", "big.bin", cwd=self.client)
        seconds = self.timed("git", "annex", "get", "-q", "--from", "origin-sr", "big.bin")
        got = hashlib.sha256((self.client / "big.bin").read_bytes()).hexdigest()
        if got != digest:
            raise BenchError("content came back different")
        return seconds

    def clear(self) -> None:
        self.run("git", "annex", "drop", "-q", "--force", "--from", "origin-sr", "big.bin",
                 cwd=self.client)  # fmt: skip
        if self.objects():
            raise BenchError("objects left in the store after drop --from")


def parse_chunk(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=256, help="file size in MiB (256)")
    parser.add_argument("--chunk", default="1MiB", help="chunk= of the remote (1MiB)")
    parser.add_argument("--runs", type=int, default=2, help="runs per side (2)")
    opts = parser.parse_args(argv)
    size = opts.size << 20
    chunks = max(1, -(-size // parse_chunk(opts.chunk)))
    binary = real_binary()
    shells = {"ours": ours(), "real": binary}
    with tempfile.TemporaryDirectory(prefix="annexproxy-bench-special-") as tmp:
        work = Path(tmp)
        gnupghome = work / "gnupg"
        gnupghome.mkdir(mode=0o700)
        content = work / "content"
        digest = hashlib.sha256()
        with content.open("wb") as out:
            for _ in range(opts.size):
                block = os.urandom(1 << 20)
                digest.update(block)
                out.write(block)
        sites = {side: Site(work / side, shell, binary.parent, gnupghome)
                 for side, shell in shells.items()}  # fmt: skip
        keys = {side: site.set_up(opts.chunk, content) for side, site in sites.items()}
        print(f"# {opts.size} MiB, encryption=shared chunk={opts.chunk} ({chunks} objects),"
              f" {opts.runs} runs per side, interleaved")  # fmt: skip
        print(f"# ours: {shells['ours']}\n# real: {shells['real']}")
        times: dict[str, dict[str, list[float]]] = {s: {"put": [], "get": []} for s in sites}
        try:
            for _ in range(opts.runs):
                for side, site in sites.items():
                    times[side]["put"].append(site.put(chunks))
                    times[side]["get"].append(site.get(keys[side], digest.hexdigest()))
                    site.clear()
        except BenchError as exc:
            print(f"FAILED: {exc}")
            return 1
        finally:
            agent_env = {**os.environ, "GNUPGHOME": str(gnupghome)}
            subprocess.run(["gpgconf", "--kill", "all"], env=agent_env, check=False,
                           capture_output=True, timeout=60)  # fmt: skip
        print(f"{'figure':8} {'ours s':>8} {'MB/s':>7} {'real s':>8} {'MB/s':>7} {'ours/real':>10}")
        for figure in ("put", "get"):
            o = statistics.median(times["ours"][figure])
            r = statistics.median(times["real"][figure])
            print(f"{figure:8} {o:8.2f} {size / o / 1e6:7.1f} {r:8.2f} {size / r / 1e6:7.1f}"
                  f" {o / r:10.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
