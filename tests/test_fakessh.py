"""The fake ssh (tests/fakessh.py) and the ssh_env fixture built on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fakessh
import pytest
from conftest import FAKESSH, SshEnvFactory


@pytest.mark.parametrize(
    ("argv", "options", "host", "command"),
    [
        (["localhost", "git-annex-shell 'configlist' '/r'"], [], "localhost",
         ["git-annex-shell 'configlist' '/r'"]),
        (["-T", "localhost", "a", "b"], [("T", None)], "localhost", ["a", "b"]),
        # Options after HOST are options; after the first command word, everything is command.
        (["localhost", "-n", "-T", "cmd", "-x", "--"], [("n", None), ("T", None)], "localhost",
         ["cmd", "-x", "--"]),
        # Clustered flags and attached values, as getopt allows.
        (["-p22", "-oBatchMode=yes", "-nT", "u@localhost", "true"],
         [("p", "22"), ("o", "BatchMode=yes"), ("n", None), ("T", None)], "u@localhost", ["true"]),
        (["-nTp", "2222", "localhost", "x"], [("n", None), ("T", None), ("p", "2222")],
         "localhost", ["x"]),
        # What git-annex sends with connection caching on (annex-shell.md §7).
        (["-S", ".git/annex/ssh/localhost", "-o", "ControlMaster=auto",
          "-o", "ControlPersist=yes", "localhost", "-i", "/dev/null", "-p", "2222", "-n", "-T",
          "git-annex-shell 'configlist' '/r'"],
         [("S", ".git/annex/ssh/localhost"), ("o", "ControlMaster=auto"),
          ("o", "ControlPersist=yes"), ("i", "/dev/null"), ("p", "2222"), ("n", None),
          ("T", None)],
         "localhost", ["git-annex-shell 'configlist' '/r'"]),
        (["-O", "stop", "-S", "sock", "localhost"], [("O", "stop"), ("S", "sock")], "localhost",
         []),
        (["-G", "-o", "SendEnv=GIT_PROTOCOL", "localhost"],
         [("G", None), ("o", "SendEnv=GIT_PROTOCOL")], "localhost", []),
        (["--", "localhost", "-x"], [], "localhost", ["-x"]),
        (["localhost", "--", "-n", "y"], [], "localhost", ["-n", "y"]),
        (["-l", "git", "-4", "-x", "-a", "-C", "-q", "-v", "-6", "-N", "::1"],
         [("l", "git"), ("4", None), ("x", None), ("a", None), ("C", None), ("q", None),
          ("v", None), ("6", None), ("N", None)], "::1", []),
        (["-E", "log", "-F", "cfg", "-J", "jump", "-L", "1:h:2", "-R", "3:h:4", "-D", "5",
          "-b", "127.0.0.1", "-c", "aes128-ctr", "-m", "hmac-sha2-256", "-W", "h:1", "-e", "none",
          "localhost", "c"],
         [("E", "log"), ("F", "cfg"), ("J", "jump"), ("L", "1:h:2"), ("R", "3:h:4"), ("D", "5"),
          ("b", "127.0.0.1"), ("c", "aes128-ctr"), ("m", "hmac-sha2-256"), ("W", "h:1"),
          ("e", "none")], "localhost", ["c"]),
    ],
)  # fmt: skip
def test_parse_args(
    argv: list[str], options: list[tuple[str, str | None]], host: str, command: list[str]
) -> None:
    parsed = fakessh.parse_args(argv)
    assert (parsed.options, parsed.host, parsed.command) == (options, host, command)


def test_remote_command_joins_words_with_single_spaces() -> None:
    # Like real ssh: the words are joined, not quoted, so the remote side splits them again.
    parsed = fakessh.parse_args(["localhost", "git-annex-shell", "configlist", "/a b", ""])
    assert parsed.remote_command == "git-annex-shell configlist /a b "


@pytest.mark.parametrize("argv", [["-Z", "localhost"], ["localhost", "-p"], ["-o"]])
def test_parse_args_refuses(argv: list[str]) -> None:
    with pytest.raises(fakessh.UsageError):
        fakessh.parse_args(argv)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("localhost", True), ("127.0.0.1", True), ("::1", True), ("[::1]", True),
        ("git@localhost", True), ("a@b@127.0.0.1", True),
        ("example.com", False), ("localhost.example.com", False), ("10.0.0.1", False),
        ("127.0.0.1@example.com", False), ("", False), (None, False),
    ],
)  # fmt: skip
def test_is_loopback(host: str | None, ok: bool) -> None:
    assert fakessh.is_loopback(host) is ok


def run_fake(
    argv: list[str], env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAKESSH), *argv], env=env, input=input, capture_output=True, text=True, timeout=60,
        check=False,
    )


@pytest.fixture
def plain_env(tmp_path: Path) -> dict[str, str]:
    """Just enough environment for the fake itself, with a server HOME of its own."""
    home = tmp_path / "home-server"
    home.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "FAKESSH_MODE": "shell",
        "FAKESSH_SERVER_HOME": str(home),
        "FAKESSH_SERVER_PATH": "/usr/bin:/bin",
    }


def test_non_loopback_refused_and_nothing_runs(plain_env: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for host in ("example.com", "git@192.168.1.1", "10.0.0.1"):
        proc = run_fake([host, f"touch {marker}"], plain_env)
        assert proc.returncode == 255
        assert "refusing non-loopback host" in proc.stderr
    assert not marker.exists()
    # The same command on a loopback host does run, so the refusal above is not blanket.
    proc = run_fake(["git@127.0.0.1", f"touch {marker}"], plain_env)
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()


def test_usage_errors_exit_255(plain_env: dict[str, str]) -> None:
    for argv in (["-Z", "localhost", "true"], [], ["-n"], ["localhost"]):
        proc = run_fake(argv, plain_env)
        assert proc.returncode == 255, argv
        assert proc.stderr.startswith("fake ssh: ")


def test_control_and_config_probe(plain_env: dict[str, str]) -> None:
    proc = run_fake(["-O", "stop", "-S", "/nonexistent/sock", "-o", "ControlMaster=auto",
                     "localhost"], plain_env)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, "")
    proc = run_fake(["-O", "check", "example.com"], plain_env)
    assert proc.returncode == 255
    proc = run_fake(["-G", "-p", "2222", "git@localhost"], plain_env)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["user git", "hostname localhost", "port 2222"]


def test_shell_mode_environment_is_scrubbed(plain_env: dict[str, str]) -> None:
    env = dict(
        plain_env,
        GIT_DIR="/leak",
        GIT_ANNEX_SHELL_READONLY="leak",
        SECRET="leak",
        GIT_PROTOCOL="version=2",
        LANG="C.UTF-8",
        FAKESSH_SERVER_ENV="GIT_ANNEX_SHELL_APPENDONLY=1 GIT_ANNEX_SHELL_DIRECTORY=/srv/r.git",
    )
    proc = run_fake(["localhost", "pwd;", "env"], env)
    assert proc.returncode == 0, proc.stderr
    cwd, *lines = proc.stdout.splitlines()
    server = dict(line.split("=", 1) for line in lines if "=" in line)
    assert cwd == plain_env["FAKESSH_SERVER_HOME"]
    assert server["HOME"] == plain_env["FAKESSH_SERVER_HOME"]
    assert server["PATH"] == "/usr/bin:/bin"
    assert server["GIT_PROTOCOL"] == "version=2" and server["LANG"] == "C.UTF-8"
    assert server["GIT_ANNEX_SHELL_APPENDONLY"] == "1"
    assert server["GIT_ANNEX_SHELL_DIRECTORY"] == "/srv/r.git"
    assert "SSH_CONNECTION" in server
    for leaked in ("GIT_DIR", "GIT_ANNEX_SHELL_READONLY", "SECRET", "SSH_ORIGINAL_COMMAND",
                   "FAKESSH_SERVER_ENV"):  # fmt: skip
        assert leaked not in server


def test_stdio_and_exit_status_are_the_session(plain_env: dict[str, str]) -> None:
    proc = run_fake(["localhost", "cat; exit 7"], plain_env, input="over the wire\n")
    assert (proc.returncode, proc.stdout) == (7, "over the wire\n")


@pytest.mark.parametrize(
    ("mode", "original"), [("forced", True), ("login", False)]
)
def test_forced_and_login_modes_exec_git_annex_shell(
    plain_env: dict[str, str], tmp_path: Path, mode: str, original: bool
) -> None:
    # A stand-in git-annex-shell on the server PATH that reports how it was run.
    srvbin = tmp_path / "srvbin"
    srvbin.mkdir()
    stub = srvbin / "git-annex-shell"
    stub.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        "print(repr(sys.argv[1:]))\n"
        "print(os.environ.get('SSH_ORIGINAL_COMMAND'))\n"
        "print(os.environ['SHELL'] == os.path.realpath(__file__))\n",
        encoding="utf-8",
    )
    stub.chmod(0o755)
    env = dict(plain_env, FAKESSH_MODE=mode, FAKESSH_SERVER_PATH=f"{srvbin}:/usr/bin:/bin")
    proc = run_fake(["-T", "localhost", "git-annex-shell", "'configlist'", "'/a b'"], env)
    assert proc.returncode == 0, proc.stderr
    command = "git-annex-shell 'configlist' '/a b'"
    argv, ssh_original, shell_is_stub = proc.stdout.splitlines()
    assert argv == repr(["-c", command])
    assert ssh_original == (command if original else "None")
    assert shell_is_stub == str(mode == "login")


def test_forced_mode_without_git_annex_shell(plain_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(plain_env, FAKESSH_MODE="forced", FAKESSH_SERVER_PATH=str(tmp_path / "empty"))
    proc = run_fake(["localhost", "git-annex-shell 'configlist' '/r'"], env)
    assert proc.returncode == 127  # not 255: the "connection" worked, the command did not
    assert "git-annex-shell: not found" in proc.stderr


@pytest.mark.parametrize("mode", ["forced", "login", "shell"])
def test_configlist_through_fake_ssh(ssh_env: SshEnvFactory, our_shell: Path, mode: str) -> None:
    env = ssh_env(mode=mode)
    repo = env.make_server_repo("repo.git")
    uuid = env.run(["git", "config", "annex.uuid"], cwd=repo, admin=True).stdout.strip()
    assert len(uuid) == 36
    proc = env.run(["ssh", "-n", "-T", "localhost", f"git-annex-shell 'configlist' '{repo}'"])
    assert proc.stdout == f"annex.uuid={uuid}\ncore.gcrypt-id=\n"
    # The server's PATH finds our shell first, not the wheel's copy in annex_bin.
    found = shutil.which("git-annex-shell", path=env["FAKESSH_SERVER_PATH"])
    assert found is not None and Path(found).resolve() == our_shell.resolve()
    # A usage error (a builtin without DIR) is git-annex-shell's exit 1, never ssh's 255.
    proc = env.run(["ssh", "localhost", "git-annex-shell 'configlist'"], check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("git-annex-shell: bad parameters")


def test_clone_through_fake_ssh(ssh_env: SshEnvFactory, tmp_path: Path) -> None:
    env = ssh_env()
    repo = env.make_server_repo("repo.git")
    clone = tmp_path / "clone"
    env.run(["git", "clone", "--quiet", f"localhost:{repo}", str(clone)])
    assert (clone / ".git").is_dir()
    log = env.log.read_text(encoding="utf-8")
    assert "git-upload-pack" in log


@pytest.mark.parametrize("mode", ["forced", "shell"])
def test_annex_copy_drop_get_through_fake_ssh(
    ssh_env: SshEnvFactory, tmp_path: Path, mode: str
) -> None:
    """The round trip other end-to-end tests build on: real client, our shell, fake ssh."""
    env = ssh_env(mode=mode)
    repo = env.make_server_repo("repo.git")
    client = tmp_path / "client"
    env.run(["git", "clone", "--quiet", f"localhost:{repo}", str(client)])
    env.run(["git", "annex", "init", "client"], cwd=client)
    content = b"annexed through the fake ssh\n" * 1000
    (client / "f.bin").write_bytes(content)
    env.run(["git", "annex", "add", "f.bin"], cwd=client)
    env.run(["git", "commit", "--quiet", "-m", "f"], cwd=client)
    env.run(["git", "annex", "copy", "--to", "origin", "f.bin"], cwd=client)
    key = env.run(["git", "annex", "lookupkey", "f.bin"], cwd=client).stdout.strip()
    location = env.run(["git", "annex", "contentlocation", key], cwd=repo, admin=True)
    assert (repo / location.stdout.strip()).read_bytes() == content
    env.run(["git", "annex", "drop", "f.bin"], cwd=client)
    assert env.run(["git", "annex", "find", "--in", "here"], cwd=client).stdout == ""
    env.run(["git", "annex", "get", "f.bin"], cwd=client)
    assert (client / "f.bin").read_bytes() == content
    assert "p2pstdio" in env.log.read_text(encoding="utf-8")
