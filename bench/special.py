"""Encrypted special remote behind a proxy: our git-annex-shell against git-annex's own.

One site per side, laid out identically with the real git-annex: a bare proxy repository
with a directory special remote (``encryption=shared``, ``chunk=`` as given,
``annex-proxy=true``, ``updateproxy``), and a client clone reaching it over ssh as
``origin-sr``. The only difference is which ``git-annex-shell`` the fake ssh
(``tests/fakessh.py``, forced-command mode) runs on the proxy: ours, or the real one, which
then does the chunking and encryption itself (with gpg, a process per chunk).

Figures, wall time of one command, the sides interleaved run by run:

    put        git annex copy --to origin-sr FILE   (the proxy verifies, chunks, encrypts, writes)
    get        git annex get --from origin-sr FILE  (after a local drop; decrypt, join, stream)
  ours only, each against the real side's put or get:
    get-gpg    git annex get through our proxy, of objects git-annex's gpg wrote (stored with
               the remote enabled directly in a clone on the server)
    cput       git annexproxy copy --to origin-sr FILE, our client with no git-annex on its
               PATH: chunked and encrypted on the client, finished objects to the proxy
    cget       git annexproxy get --from origin-sr FILE: objects fetched and decrypted on the
               client
    cget-gpg   the same, of the objects git-annex's gpg wrote

Each run checks its result (the store holds the chunk objects; the file comes back with
the right key); a wrong run voids the benchmark. The peak resident set (VmHWM) of our
proxy's processes is sampled throughout.

Usage: .venv/bin/python bench/special.py [--size MiB] [--chunk SIZE[,SIZE...]] [--runs N]
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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKESSH = HERE.parent / "tests" / "fakessh.py"
VENV_BIN = Path(sys.executable).parent
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
# Each figure of ours and the real side's figure it compares with.
FIGURES = {"put": "put", "get": "get", "get-gpg": "get", "cput": "put", "cget": "get",
           "cget-gpg": "get"}  # fmt: skip


class BenchError(Exception):
    pass


def ours() -> Path:
    script = VENV_BIN / "git-annex-shell"
    if b"shell.cli" not in script.read_bytes()[:4096]:
        sys.exit(f"bench: {script} is not annexproxy's git-annex-shell; reinstall the project")
    return script


def real_binary() -> Path:
    spec = importlib.util.find_spec("git_annex")
    if spec is None or spec.origin is None:
        sys.exit("bench: the git-annex wheel is not installed (pip install -e '.[test]')")
    return Path(spec.origin).parent / "git-annex"


class RssWatch:
    """The largest VmHWM of any process serving ``proxy`` (our git-annex-shell), every
    100 ms from a thread, in KiB."""

    def __init__(self, proxy: Path) -> None:
        self.proxy = str(proxy).encode()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    argv = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if b"p2pstdio" not in argv or self.proxy not in argv:
                        continue
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


class Site:
    """A proxy with one encrypted special remote and a client, for one git-annex-shell;
    for ours also our client (no git-annex on its PATH) and a clone on the server where
    real git-annex has the remote enabled directly."""

    def __init__(self, root: Path, shell: Path, annex_dir: Path, gnupghome: Path) -> None:
        self.root = root
        for d in ("bin", "only-bin", "srvbin", "home-client", "home-server", "srv", "store"):
            (root / d).mkdir(parents=True)
        (root / "bin" / "ssh").symlink_to(FAKESSH)
        for name in ("git-annexproxy", "git-remote-annexproxy"):
            (root / "only-bin" / name).symlink_to(VENV_BIN / name)
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
        self.ours_env = {
            **self.client_env,
            "PATH": os.pathsep.join((str(root / "bin"), str(root / "only-bin"), SYSTEM_PATH)),
        }
        self.admin_env = {
            **{k: v for k, v in self.client_env.items() if not k.startswith("FAKESSH_")},
            "HOME": str(root / "home-server"),
            "PATH": os.pathsep.join((str(annex_dir), SYSTEM_PATH)),
        }
        self.proxy = root / "srv" / "proxy.git"
        self.client = root / "client"
        self.our_client = root / "our-client"
        self.direct = root / "direct"
        self.store = root / "store"

    def run(self, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=env or self.client_env, capture_output=True, text=True,
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            why = (proc.stdout[-300:] + proc.stderr[-500:]).strip()
            raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}: {why}")
        return proc.stdout

    def admin(self, *argv: str, cwd: Path) -> str:
        return self.run(*argv, cwd=cwd, env=self.admin_env)

    def set_up(self, chunk: str, content: Path, with_ours: bool) -> str:
        self.admin("git", "init", "-q", "--bare", str(self.proxy), cwd=self.root)
        self.admin("git", "annex", "init", "-q", "proxy", cwd=self.proxy)
        self.admin("git", "annex", "initremote", "-q", "sr", "type=directory",
                   f"directory={self.store}", "encryption=shared", f"chunk={chunk}",
                   cwd=self.proxy)  # fmt: skip
        self.admin("git", "config", "remote.sr.annex-proxy", "true", cwd=self.proxy)
        self.admin("git", "annex", "updateproxy", "-q", cwd=self.proxy)
        self.run("git", "clone", "-q", f"localhost:{self.proxy}", str(self.client), cwd=self.root)
        self.run("git", "annex", "init", "-q", "client", cwd=self.client)
        self.run("git", "config", "remote.origin.annex-verified", "verified", cwd=self.client)
        os.link(content, self.client / "big.bin")
        self.run("git", "annex", "add", "-q", "big.bin", cwd=self.client)
        key = self.run("git", "annex", "lookupkey", "big.bin", cwd=self.client).strip()
        if not with_ours:
            return key
        self.admin("git", "clone", "-q", str(self.proxy), str(self.direct), cwd=self.root)
        self.admin("git", "annex", "init", "-q", "direct", cwd=self.direct)
        self.admin("git", "annex", "enableremote", "-q", "sr", f"directory={self.store}",
                   cwd=self.direct)  # fmt: skip
        self.admin("git", "config", "remote.sr.annex-verified", "verified", cwd=self.direct)
        os.link(content, self.direct / "big.bin")
        self.admin("git", "annex", "add", "-q", "big.bin", cwd=self.direct)
        self.run("git", "clone", "-q", f"annexproxy::ssh://localhost{self.proxy}",
                 str(self.our_client), cwd=self.root, env=self.ours_env)  # fmt: skip
        os.link(content, self.our_client / "big.bin")
        self.run("git", "annexproxy", "add", "big.bin", cwd=self.our_client, env=self.ours_env)
        theirs = self.admin("git", "annex", "lookupkey", "big.bin", cwd=self.direct).strip()
        mine = os.path.basename(os.readlink(self.our_client / "big.bin"))
        if not key == theirs == mine:
            raise BenchError(f"the clones disagree on the key: {key} {theirs} {mine}")
        return key

    def timed(self, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              ) -> float:  # fmt: skip
        start = time.perf_counter()
        self.run(*argv, cwd=cwd or self.client, env=env)
        return time.perf_counter() - start

    def objects(self) -> int:
        """Object files in the store (not counting its tmp/ directory)."""
        return sum(len(files) for top, _, files in os.walk(self.store)
                   if not top.startswith(str(self.store / "tmp")))  # fmt: skip

    def check_stored(self, chunks: int) -> None:
        if self.objects() != chunks:
            raise BenchError(f"store holds {self.objects()} objects, expected {chunks}")

    def check_content(self, path: Path, digest: str) -> None:
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise BenchError(f"{path} came back different")

    def put(self, chunks: int) -> float:
        seconds = self.timed("git", "annex", "copy", "-q", "--to", "origin-sr", "big.bin")
        self.check_stored(chunks)
        return seconds

    def get(self, digest: str) -> float:
        self.run("git", "annex", "drop", "-q", "--force", "big.bin", cwd=self.client)
        seconds = self.timed("git", "annex", "get", "-q", "--from", "origin-sr", "big.bin")
        self.check_content(self.client / "big.bin", digest)
        return seconds

    def clear(self) -> None:
        self.run("git", "annex", "drop", "-q", "--force", "--from", "origin-sr", "big.bin",
                 cwd=self.client)  # fmt: skip
        if self.objects():
            raise BenchError("objects left in the store after drop --from")

    # -- ours only ------------------------------------------------------------------------------

    def gpg_put(self, chunks: int) -> None:
        """Real git-annex with the remote enabled directly stores the file (its gpg writes
        the objects); the proxy and the client learn where it is."""
        self.admin("git", "fetch", "-q", "origin", cwd=self.direct)
        self.admin("git", "annex", "merge", "-q", cwd=self.direct)
        self.admin("git", "annex", "copy", "-q", "--to", "sr", "big.bin", cwd=self.direct)
        self.check_stored(chunks)
        self.admin("git", "push", "-q", "origin", "git-annex", cwd=self.direct)
        self.run("git", "fetch", "-q", "origin", cwd=self.client)
        self.run("git", "annex", "merge", "-q", cwd=self.client)

    def client_put(self, chunks: int) -> float:
        seconds = self.timed("git", "annexproxy", "copy", "-q", "--to", "origin-sr", "big.bin",
                             cwd=self.our_client, env=self.ours_env)  # fmt: skip
        self.check_stored(chunks)
        return seconds

    def client_get(self, key: str, digest: str) -> float:
        self.run("git", "fetch", "-q", "origin", cwd=self.our_client, env=self.ours_env)
        objects = self.our_client / ".git" / "annex" / "objects"
        for top, _, files in os.walk(objects):
            if key in files:
                os.chmod(top, 0o755)
                os.unlink(os.path.join(top, key))
        seconds = self.timed("git", "annexproxy", "get", "-q", "--from", "origin-sr", "big.bin",
                             cwd=self.our_client, env=self.ours_env)  # fmt: skip
        self.check_content(self.our_client / "big.bin", digest)
        return seconds


def parse_chunk(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


def bench_chunk(work: Path, chunk: str, size_mib: int, runs: int, content: Path,
                digest: str, gnupghome: Path) -> int:  # fmt: skip
    size = size_mib << 20
    chunks = max(1, -(-size // parse_chunk(chunk)))
    binary = real_binary()
    sites = {"ours": Site(work / f"ours-{chunk}", ours(), binary.parent, gnupghome),
             "real": Site(work / f"real-{chunk}", binary, binary.parent, gnupghome)}  # fmt: skip
    keys = {side: site.set_up(chunk, content, side == "ours") for side, site in sites.items()}
    print(f"# {size_mib} MiB, encryption=shared chunk={chunk} ({chunks} objects),"
          f" {runs} runs per side, interleaved")  # fmt: skip
    times: dict[str, list[float]] = {f: [] for f in (*FIGURES, "real-put", "real-get")}
    o, r = sites["ours"], sites["real"]
    watch = RssWatch(o.proxy)
    try:
        for _ in range(runs):
            times["real-put"].append(r.put(chunks))
            times["put"].append(o.put(chunks))
            times["real-get"].append(r.get(digest))
            times["get"].append(o.get(digest))
            r.clear()
            o.clear()
            times["cput"].append(o.client_put(chunks))
            times["cget"].append(o.client_get(keys["ours"], digest))
            o.clear()
            o.gpg_put(chunks)
            times["get-gpg"].append(o.get(digest))
            times["cget-gpg"].append(o.client_get(keys["ours"], digest))
            o.clear()
    except BenchError as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        peak = watch.stop()
    print(f"{'figure':9} {'ours s':>8} {'MB/s':>7} {'real s':>8} {'MB/s':>7} {'real/ours':>10}")
    for figure, real in FIGURES.items():
        mine = statistics.median(times[figure])
        theirs = statistics.median(times[f"real-{real}"])
        print(f"{figure:9} {mine:8.2f} {size / mine / 1e6:7.1f} {theirs:8.2f}"
              f" {size / theirs / 1e6:7.1f} {theirs / mine:10.2f}")  # fmt: skip
    print(f"# our proxy's peak RSS (VmHWM): {peak / 1024:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=256, help="file size in MiB (256)")
    parser.add_argument("--chunk", default="1MiB,64MiB",
                        help="chunk= of the remote; several, comma-separated (1MiB,64MiB)")
    parser.add_argument("--runs", type=int, default=2, help="runs per side (2)")
    opts = parser.parse_args(argv)
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
        print(f"# ours: {ours()}\n# real: {real_binary()}")
        status = 0
        try:
            for chunk in opts.chunk.split(","):
                status |= bench_chunk(work, chunk, opts.size, opts.runs, content,
                                      digest.hexdigest(), gnupghome)  # fmt: skip
        finally:
            agent_env = {**os.environ, "GNUPGHOME": str(gnupghome)}
            subprocess.run(["gpgconf", "--kill", "all"], env=agent_env, check=False,
                           capture_output=True, timeout=60)  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
