"""Uploads to S3 behind our proxy: through it (direct) against straight to S3 (indirect).

One site laid out with the real git-annex: a bare proxy repository served by our
``git-annex-shell`` through the fake ssh (``tests/fakessh.py``, forced-command mode), with
S3 special remotes on moto's standalone server (``tests/s3server.py``): ``s3``
(encryption=none) and ``s3enc`` (encryption=shared, ``chunk=`` as given), both
``annex-proxy=true``. The admin's ``initremote`` writes the credentials to the proxy's
``annex/creds/<uuid>``; the proxy's sessions get no AWS_* variable. The proxy's traffic log
(``annexproxy.trafficlog``) gives its byte counts per session.

Per remote, one new file of ``--size`` MiB each way, timed as a whole command:

    direct    the real git-annex client: git annex copy --to origin-NAME FILE
              (the content crosses the proxy, which encrypts and writes it to S3)
    indirect  our client, no git-annex on its PATH: git annexproxy copy --to origin-NAME FILE
              (chunked and encrypted on the client, PUT straight to S3 at URLs the proxy
              presigned; the proxy reads each object back, verifies the key and logs
              the location)

Each upload is checked (the bucket holds the new objects, their total size at least the
content's). Output: seconds, MB/s, and the proxy's client_in, client_out,
storage_written and storage_read for the session of the upload.

Usage: .venv/bin/python bench/indirect.py [--size MiB] [--chunk SIZE] [--no-encrypted]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
FAKESSH = TESTS / "fakessh.py"
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
KEY_ID, SECRET = "AKIDANNEXPROXYBENCH", "annexproxy/bench+secret"
FIELDS = ("client_in", "client_out", "storage_written", "storage_read")


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


def s3server() -> ModuleType:
    """tests/s3server.py (moto's standalone server as a subprocess)."""
    spec = importlib.util.spec_from_file_location("s3server", TESTS / "s3server.py")
    if spec is None or spec.loader is None:
        sys.exit("bench: cannot load tests/s3server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Site:
    """The proxy, its S3 remotes, an admin, a git-annex client and one of ours."""

    def __init__(self, root: Path, annex_dir: Path, gnupghome: Path) -> None:
        self.root = root
        for d in ("bin", "only-bin", "srvbin", "home-client", "home-server", "srv"):
            (root / d).mkdir(parents=True)
        (root / "bin" / "ssh").symlink_to(FAKESSH)
        (root / "srvbin" / "git-annex-shell").symlink_to(ours())
        for name in ("git-annexproxy", "git-remote-annexproxy"):
            (root / "only-bin" / name).symlink_to(VENV_BIN / name)
        for home in ("home-client", "home-server"):
            (root / home / ".gitconfig").write_text(GITCONFIG, encoding="utf-8")
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("GIT_", "FAKESSH_", "AWS_"))}  # fmt: skip
        self.annex_env = {
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
            "FAKESSH_PASSENV": "GNUPGHOME",  # no AWS_*: the proxy reads its creds files
        }
        self.ours_env = {
            **self.annex_env,
            "PATH": os.pathsep.join((str(root / "bin"), str(root / "only-bin"), SYSTEM_PATH)),
        }
        self.admin_env = {
            **{k: v for k, v in self.annex_env.items() if not k.startswith("FAKESSH_")},
            "HOME": str(root / "home-server"),
            "PATH": os.pathsep.join((str(annex_dir), SYSTEM_PATH)),
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET,
        }
        self.proxy = root / "srv" / "proxy.git"
        self.traffic = root / "traffic.log"
        self.uuids: dict[str, str] = {}

    def run(self, *argv: str, cwd: Path, env: dict[str, str]) -> str:
        proc = subprocess.run(
            list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr[-800:]}")
        return proc.stdout

    def admin(self, *argv: str, cwd: Path | None = None) -> str:
        return self.run(*argv, cwd=cwd or self.proxy, env=self.admin_env)

    def set_up(self, port: int, remotes: dict[str, list[str]]) -> None:
        self.admin("git", "init", "-q", "--bare", str(self.proxy), cwd=self.root)
        self.admin("git", "annex", "init", "-q", "proxy")
        self.admin("git", "config", "annex.security.allowed-ip-addresses", "127.0.0.1")
        self.admin("git", "config", "annexproxy.trafficlog", str(self.traffic))
        for name, settings in remotes.items():
            self.admin("git", "annex", "initremote", "-q", name, "type=S3", "host=127.0.0.1",
                       f"port={port}", "protocol=http", "requeststyle=path", "signature=v4",
                       "region=us-east-1", f"bucket=bench-{name}", *settings)  # fmt: skip
            self.admin("git", "config", f"remote.{name}.annex-proxy", "true")
            self.uuids[name] = self.admin("git", "config", f"remote.{name}.annex-uuid").strip()
        self.admin("git", "annex", "updateproxy", "-q")
        seed = self.root / "seed"
        self.admin("git", "clone", "-q", str(self.proxy), str(seed), cwd=self.root)
        (seed / "README").write_text("bench\n")
        self.admin("git", "add", "README", cwd=seed)
        self.admin("git", "commit", "-q", "-m", "start", cwd=seed)
        self.admin("git", "push", "-q", "origin", "main", cwd=seed)
        self.annex_clone = self.root / "annex-client"
        self.run("git", "clone", "-q", f"localhost:{self.proxy}", str(self.annex_clone),
                 cwd=self.root, env=self.annex_env)  # fmt: skip
        self.run("git", "annex", "init", "-q", "annex-client", cwd=self.annex_clone,
                 env=self.annex_env)  # fmt: skip
        self.our_clone = self.root / "our-client"
        self.run("git", "clone", "-q", f"annexproxy::ssh://localhost{self.proxy}",
                 str(self.our_clone), cwd=self.root, env=self.ours_env)  # fmt: skip

    def traffic_lines(self) -> list[dict[str, str]]:
        if not self.traffic.exists():
            return []
        return [dict(w.split("=", 1) for w in line.split()[1:])
                for line in self.traffic.read_text().splitlines()]  # fmt: skip

    def upload(self, method: str, remote: str, size_mib: int) -> tuple[float, dict[str, int]]:
        """One new file of size_mib MiB to origin-REMOTE: (seconds, the proxy's counts)."""
        clone, env = (
            (self.annex_clone, self.annex_env) if method == "direct"
            else (self.our_clone, self.ours_env)
        )  # fmt: skip
        name = f"{method}-{remote}.bin"
        with (clone / name).open("wb") as out:
            for _ in range(size_mib):
                out.write(os.urandom(1 << 20))
        if method == "direct":
            self.run("git", "annex", "add", "-q", name, cwd=clone, env=env)
            argv = ["git", "annex", "copy", "-q", "--to", f"origin-{remote}", name]
        else:
            self.run("git", "annexproxy", "add", name, cwd=clone, env=env)
            argv = ["git", "annexproxy", "copy", "-q", "--to", f"origin-{remote}", name]
        before = len(self.traffic_lines())
        start = time.perf_counter()
        self.run(*argv, cwd=clone, env=env)
        seconds = time.perf_counter() - start
        lines = [ln for ln in self.traffic_lines()[before:] if ln["uuid"] == self.uuids[remote]]
        if len(lines) != 1:
            raise BenchError(f"{method} {remote}: {len(lines)} proxy sessions logged, expected 1")
        (clone / name).unlink()  # its object stays in the store; the space is the content's
        return seconds, {f: int(lines[0][f]) for f in FIELDS}


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=100, help="file size in MiB (100)")
    parser.add_argument("--chunk", default="8MiB", help="chunk= of the encrypted remote (8MiB)")
    parser.add_argument("--no-encrypted", action="store_true", help="only the unencrypted remote")
    opts = parser.parse_args(argv)
    size = opts.size << 20
    remotes = {"s3": ["encryption=none"]}
    if not opts.no_encrypted:
        remotes["s3enc"] = ["encryption=shared", f"chunk={opts.chunk}"]
    expected = {"s3": 1, "s3enc": max(1, -(-size // parse_size(opts.chunk)))}
    moto = s3server()
    with tempfile.TemporaryDirectory(prefix="annexproxy-bench-indirect-") as tmp:
        work = Path(tmp)
        gnupghome = work / "gnupg"
        gnupghome.mkdir(mode=0o700)
        rows: list[tuple[str, str, float, dict[str, int]]] = []
        try:
            with moto.moto_server(work / "moto.log") as server:
                site = Site(work / "site", real_binary().parent, gnupghome)
                site.set_up(server.port, remotes)
                print(
                    f"# {opts.size} MiB per upload; s3: encryption=none; "
                    f"s3enc: encryption=shared chunk={opts.chunk}; moto on {server.endpoint}"
                )
                print(f"# proxy: {ours()}")  # fmt: skip
                for remote in remotes:
                    for method in ("direct", "indirect"):
                        before = server.list_objects(f"bench-{remote}")
                        seconds, counts = site.upload(method, remote, opts.size)
                        after = server.list_objects(f"bench-{remote}")
                        new = {k: v for k, v in after.items() if k not in before}
                        if len(new) != expected[remote] or sum(new.values()) < size:
                            raise BenchError(f"{method} {remote}: the bucket got {len(new)}"
                                             f" objects, {sum(new.values())} bytes")  # fmt: skip
                        rows.append((remote, method, seconds, counts))
        except BenchError as exc:
            print(f"FAILED: {exc}")
            return 1
        finally:
            agent_env = {**os.environ, "GNUPGHOME": str(gnupghome)}
            subprocess.run(["gpgconf", "--kill", "all"], env=agent_env, check=False,
                           capture_output=True, timeout=60)  # fmt: skip
    print(f"{'remote':7} {'upload':9} {'seconds':>8} {'MB/s':>7} "
          + " ".join(f"{f:>16}" for f in FIELDS))  # fmt: skip
    for remote, method, seconds, counts in rows:
        print(f"{remote:7} {method:9} {seconds:8.2f} {size / seconds / 1e6:7.1f} "
              + " ".join(f"{counts[f]:16d}" for f in FIELDS))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
