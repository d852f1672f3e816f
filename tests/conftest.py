"""Shared fixtures: the real git-annex client, our git-annex-shell, and a fake ssh between them.

End-to-end tests run the real `git`/`git annex` client against repositories "on a server"
that is this machine: `tests/fakessh.py` plays ssh + sshd and execs our git-annex-shell as
an authorized_keys forced command would. Example:

    def test_copy(ssh_env: SshEnvFactory, tmp_path: Path) -> None:
        env = ssh_env()                                  # forced-command mode, no restrictions
        repo = env.make_server_repo("repo.git")          # bare, `git annex init` by the admin
        client = tmp_path / "client"
        env.run(["git", "clone", f"localhost:{repo}", str(client)])
        env.run(["git", "annex", "init", "client"], cwd=client)
        ...
        env.run(["git", "annex", "copy", "--to", "origin", "."], cwd=client)
        ro = env.with_server(GIT_ANNEX_SHELL_READONLY="1")   # same trees, restricted key
        assert ro.run([...], cwd=client, check=False).returncode != 0
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pytest
from hypothesis import HealthCheck, settings

TESTS = Path(__file__).resolve().parent
FAKESSH = TESTS / "fakessh.py"

# Both sides' ~/.gitconfig. annex.sshcaching=false keeps git-annex from adding -S/ControlMaster
# options, running `ssh ... true` probes and sending `-O stop`: with no real ssh there is
# nothing to cache, and the fake's log stays readable.
GITCONFIG = """\
[user]
\tname = annexproxy test
\temail = test@annexproxy.invalid
[init]
\tdefaultBranch = main
[annex]
\tsshcaching = false
"""

# The client's environment must not leak into the tests: a GIT_DIR or GIT_ANNEX_* from the
# developer's shell would change what git does, and XDG_CONFIG_HOME is a second global config.
SCRUBBED_PREFIXES = ("GIT_", "SSH_", "FAKESSH_")
SCRUBBED_NAMES = frozenset({"XDG_CONFIG_HOME", "EMAIL"})

SERVER_SYSTEM_PATH = "/usr/bin:/bin"

# Hypothesis, for every property test: no per-example wall-clock deadline and no "data
# generation too slow" check. Both measure the machine's load as much as our code (the
# default 200 ms deadline failed on a 2-core machine with both cores busy); the suite must
# pass there. A test that claims a speed bound measures CPU time itself (test_p2p.py's
# process_time checks); a hang is bounded by pytest-timeout.
settings.register_profile("annexproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("annexproxy")


def _venv_bin() -> Path:
    # Not resolved: in a venv, sys.executable is a symlink whose directory is the venv's bin.
    return Path(sys.executable).parent


def _is_ours(script: Path) -> bool:
    """True when `script` is our console script, not git-annex's wrapper of the same name.

    The git-annex wheel also installs a `git-annex-shell` console script; whichever package
    pip installs last owns the file, so the name alone proves nothing.
    """
    try:
        head = script.read_bytes()[:4096]
    except OSError:
        return False
    return b"shell.cli" in head


def find_git_annex() -> Path | None:
    """The real `git-annex` (the client and admin tool): next to sys.executable (the venv
    need not be on PATH), else on PATH; None if neither has it."""
    candidate = _venv_bin() / "git-annex"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("git-annex")
    return Path(found) if found is not None else None


@pytest.fixture(scope="session")
def annex_bin() -> Path:
    """The directory holding the real `git-annex` (the client and admin tool)."""
    found = find_git_annex()
    if found is None:
        pytest.skip(
            "real git-annex not found next to sys.executable or on PATH "
            "(pip install -e '.[test]' brings it as the git-annex wheel)"
        )
    return found.parent


@pytest.fixture(scope="session")
def our_shell() -> Path:
    """Our `git-annex-shell` console script (shell.cli:entry), next to sys.executable."""
    script = _venv_bin() / "git-annex-shell"
    if not script.is_file():
        pytest.fail(f"{script} is missing: install the project (pip install -e '.[test]')")
    if not _is_ours(script):
        # Testing git-annex's own binary by mistake would make every end-to-end test pass.
        pytest.fail(
            f"{script} is not annexproxy's git-annex-shell (the git-annex wheel's wrapper "
            "overwrote it?); reinstall the project: pip install --force-reinstall --no-deps -e ."
        )
    return script


def git_annex_multicall() -> Path:
    """The wheel's multicall binary: git-annex, or git-annex-shell when argv[0] says so."""
    git_annex = pytest.importorskip("git_annex")
    binary = Path(git_annex.__file__).resolve().parent / "git-annex"
    if not binary.is_file():
        pytest.fail(f"the git-annex wheel has no binary at {binary}")
    return binary


@pytest.fixture(scope="session")
def real_annex_shell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """git-annex's own `git-annex-shell`: a symlink of that name to the multicall binary
    (the venv's script of that name is ours)."""
    link = tmp_path_factory.mktemp("realbin") / "git-annex-shell"
    link.symlink_to(git_annex_multicall())
    return link


# A refusal git-annex-shell prints without needing a repository or a network.
_PROBE_ENV = {"GIT_ANNEX_SHELL_LIMITED": "1", "PATH": SERVER_SYSTEM_PATH}
_PROBE_MESSAGE = "git-annex-shell: Action blocked by GIT_ANNEX_SHELL_LIMITED"


@functools.cache
def _error_ending() -> str:
    proc = subprocess.run(
        ["git-annex-shell", "-c", "true"],
        executable=git_annex_multicall(),
        env=_PROBE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1 and proc.stderr.startswith(_PROBE_MESSAGE), proc
    return proc.stderr.removeprefix(_PROBE_MESSAGE)


def shell_error(message: str) -> str:
    """The stderr of a git-annex-shell that fails with `message`, for messages only ours
    prints. The layout around the message (the prefix, and what follows it: git-annex ends
    an error with a blank line) is read from git-annex's own git-annex-shell refusing a
    command, once per run, not written down here."""
    return f"git-annex-shell: {message}{_error_ending()}"


class SshEnv(dict[str, str]):
    """The client's environment (pass it as `env=`), plus the paths of the fake set-up.

    Layout under `root`:
        bin/ssh                   -> tests/fakessh.py   (first on the client's PATH)
        srvbin/git-annex-shell    -> our git-annex-shell (first on the server's PATH)
        home-client/.gitconfig, home-server/.gitconfig
        srv/                      where make_server_repo puts repositories
        ssh.jsonl                 one line per fake ssh call (FAKESSH_LOG)
    """

    def __init__(self, values: Mapping[str, str], root: Path, annex_bin: Path) -> None:
        super().__init__(values)
        self.root = root
        self.annex_bin = annex_bin
        self.bin_dir = root / "bin"
        self.srvbin_dir = root / "srvbin"
        self.client_home = root / "home-client"
        self.server_home = root / "home-server"
        self.srv = root / "srv"
        self.log = root / "ssh.jsonl"

    def with_server(self, mode: str | None = None, **server_env: str) -> SshEnv:
        """A copy for another ssh key: another FAKESSH_MODE and/or server variables.

        `server_env` replaces FAKESSH_SERVER_ENV as a whole, so `with_server()` alone lifts
        every restriction; values must not contain spaces (the variable is space-separated).
        """
        values = dict(self)
        if mode is not None:
            values["FAKESSH_MODE"] = mode
        if server_env:
            for name, value in server_env.items():
                if " " in value:
                    raise ValueError(f"{name}: FAKESSH_SERVER_ENV values cannot hold spaces")
            values["FAKESSH_SERVER_ENV"] = " ".join(f"{k}={v}" for k, v in server_env.items())
        else:
            values.pop("FAKESSH_SERVER_ENV", None)
        return SshEnv(values, self.root, self.annex_bin)

    def admin_env(self) -> dict[str, str]:
        """The server administrator's environment: real git/git-annex, HOME = server home."""
        values = {k: v for k, v in self.items() if not k.startswith("FAKESSH_")}
        values["HOME"] = str(self.server_home)
        values["PATH"] = f"{self.annex_bin}{os.pathsep}{SERVER_SYSTEM_PATH}"
        return values

    def run(
        self,
        args: Sequence[str],
        cwd: Path | None = None,
        *,
        check: bool = True,
        input: str | None = None,
        admin: bool = False,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (or, with admin=True, a server-side admin command).

        With check=True a failure raises AssertionError carrying the command's output, which
        is what a test failure should show.
        """
        env = self.admin_env() if admin else dict(self)
        proc = subprocess.run(
            list(args),
            cwd=cwd or (self.server_home if admin else self.client_home),
            env=env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
            )
        return proc

    def make_server_repo(self, name: str = "repo.git", description: str = "server") -> Path:
        """A bare repository under srv/, initialised by the admin with the real git-annex."""
        path = self.srv / name
        self.run(["git", "init", "--quiet", "--bare", str(path)], admin=True)
        self.run(["git", "annex", "init", "--quiet", description], cwd=path, admin=True)
        return path


class SshEnvFactory(Protocol):
    """The type of the `ssh_env` fixture."""

    def __call__(
        self,
        root: Path | None = None,
        *,
        mode: str = "forced",
        server_env: Mapping[str, str] | None = None,
    ) -> SshEnv: ...


def make_ssh_env(
    root: Path,
    annex_bin: Path,
    our_shell: Path,
    *,
    mode: str = "forced",
    server_env: Mapping[str, str] | None = None,
) -> SshEnv:
    """Lay out the fake client/server under `root` and return the client's environment."""
    bin_dir, srvbin_dir = root / "bin", root / "srvbin"
    client_home, server_home = root / "home-client", root / "home-server"
    for d in (bin_dir, srvbin_dir, client_home, server_home, root / "srv"):
        d.mkdir(parents=True, exist_ok=True)
    _symlink(bin_dir / "ssh", FAKESSH)
    # Only git-annex-shell here: the server must find ours before the wheel's copy in
    # annex_bin, and nothing else of the venv.
    _symlink(srvbin_dir / "git-annex-shell", our_shell)
    for home in (client_home, server_home):
        (home / ".gitconfig").write_text(GITCONFIG, encoding="utf-8")

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(SCRUBBED_PREFIXES) and k not in SCRUBBED_NAMES
    }
    system_path = env.get("PATH", SERVER_SYSTEM_PATH)
    env.update(
        HOME=str(client_home),
        PATH=os.pathsep.join((str(bin_dir), str(annex_bin), system_path)),
        LANG="C.UTF-8",
        LC_ALL="C.UTF-8",
        TZ="UTC",
        # /etc/gitconfig is the machine's, not the test's.
        GIT_CONFIG_NOSYSTEM="1",
        FAKESSH_MODE=mode,
        # The fake ssh directory comes first on the server too, so that a server-side hop
        # (a proxy reaching a gateway at localhost:...) stays inside the fake.
        FAKESSH_SERVER_PATH=os.pathsep.join(
            (str(bin_dir), str(srvbin_dir), str(annex_bin), SERVER_SYSTEM_PATH)
        ),
        FAKESSH_SERVER_HOME=str(server_home),
        FAKESSH_LOG=str(root / "ssh.jsonl"),
    )
    result = SshEnv(env, root, annex_bin)
    return result.with_server(**dict(server_env or {}))


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


@pytest.fixture
def ssh_env(tmp_path: Path, annex_bin: Path, our_shell: Path) -> SshEnvFactory:
    """Factory: `ssh_env(root=None, *, mode="forced", server_env=None) -> SshEnv`.

    Without `root` the set-up goes to `tmp_path/"ssh"`; call it again with the same root for
    another view of the same trees (or use SshEnv.with_server).
    """

    def factory(
        root: Path | None = None,
        *,
        mode: str = "forced",
        server_env: Mapping[str, str] | None = None,
    ) -> SshEnv:
        return make_ssh_env(
            root or tmp_path / "ssh", annex_bin, our_shell, mode=mode, server_env=server_env
        )

    return factory


# --- slow tests: `@pytest.mark.slow` runs only with --runslow (setup.cfg declares the marker)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# -- gpg ----------------------------------------------------------------------------------------


def gpg_home_with_key(home: Path) -> str:
    """A throwaway GNUPGHOME holding one passphrase-less key pair; returns the key id."""
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
         "annexproxy test <test@annexproxy.invalid>", "default", "default", "never"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    listing = subprocess.run(
        ["gpg", "--with-colons", "--list-keys"], env=env, check=True, capture_output=True,
        text=True, timeout=60,
    ).stdout
    return next(line.split(":")[4] for line in listing.splitlines() if line.startswith("pub:"))


def stop_gpg_agent(home: Path) -> None:
    subprocess.run(
        ["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)},
        check=False, capture_output=True, timeout=60,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gnupg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A GNUPGHOME with one passphrase-less key pair, per test module; (home, key id)."""
    home = tmp_path_factory.mktemp("gpg") / "home"
    keyid = gpg_home_with_key(home)
    yield home, keyid
    stop_gpg_agent(home)
