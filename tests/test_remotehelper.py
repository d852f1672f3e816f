"""git-remote-annexproxy end to end: real git (and git-annex) on the client, our server or
git-annex's own git-annex-shell behind the fake ssh (tests/fakessh.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SshEnv, SshEnvFactory

HELPER = Path(sys.executable).parent / "git-remote-annexproxy"


@pytest.fixture(autouse=True)
def _helper_installed() -> None:
    if not HELPER.is_file():
        pytest.fail(f"{HELPER} is missing: install the project (pip install -e '.[test]')")


def ssh_commands(env: SshEnv) -> list[str]:
    """The remote command of every fake ssh call so far, in order."""
    if not env.log.exists():
        return []
    return [json.loads(line)["command"] for line in env.log.read_text().splitlines()]


def ssh_argvs(env: SshEnv) -> list[list[str]]:
    return [json.loads(line)["argv"] for line in env.log.read_text().splitlines()]


def seeded_repo(env: SshEnv, name: str = "repo.git") -> Path:
    """A bare annex repository on the server with one commit on main (`a.txt`)."""
    repo = env.make_server_repo(name)
    seed = env.root / f"seed-{name}"
    env.run(["git", "clone", "-q", str(repo), str(seed)], admin=True)
    (seed / "a.txt").write_text("hello\n")
    env.run(["git", "add", "a.txt"], cwd=seed, admin=True)
    env.run(["git", "commit", "-q", "-m", "seed"], cwd=seed, admin=True)
    env.run(["git", "push", "-q", "origin", "main"], cwd=seed, admin=True)
    return repo


def server_ref(env: SshEnv, repo: Path, ref: str) -> str | None:
    proc = env.run(["git", "rev-parse", "--verify", "-q", ref], cwd=repo, admin=True, check=False)
    return proc.stdout.strip() or None


def commit(env: SshEnv, clone: Path, name: str) -> str:
    (clone / name).write_text(name + "\n")
    env.run(["git", "add", name], cwd=clone)
    env.run(["git", "commit", "-q", "-m", name], cwd=clone)
    return env.run(["git", "rev-parse", "HEAD"], cwd=clone).stdout.strip()


# --- through our server: CONNECT ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["forced", "login", "shell"])
def test_clone_push_fetch_through_connect(ssh_env: SshEnvFactory, mode: str) -> None:
    env = ssh_env(mode=mode)
    repo = seeded_repo(env)
    clone = env.client_home / "c"
    env.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{repo}", str(clone)])
    assert (clone / "a.txt").read_text() == "hello\n"
    # One ssh session, the P2P one: git went through CONNECT, not a second `git-upload-pack`.
    assert len(ssh_commands(env)) == 1
    assert ssh_commands(env)[0].startswith(f"git-annex-shell 'p2pstdio' '{repo}' '")

    head = commit(env, clone, "b.txt")
    env.run(["git", "push", "-q", "origin", "main"], cwd=clone)
    assert server_ref(env, repo, "refs/heads/main") == head

    other = env.client_home / "other"
    env.run(["git", "clone", "-q", f"annexproxy::localhost:{repo}", str(other)])
    newer = commit(env, other, "c.txt")
    env.run(["git", "push", "-q", "origin", "main"], cwd=other)
    env.run(["git", "fetch", "-q", "origin"], cwd=clone)
    assert env.run(["git", "rev-parse", "origin/main"], cwd=clone).stdout.strip() == newer
    assert not any(c.startswith("git-upload-pack") for c in ssh_commands(env))


def test_clone_sets_annexurl_and_a_stable_client_uuid(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    clone = env.client_home / "c"
    env.run(["git", "clone", "-q", f"annexproxy::ssh://localhost:2222{repo}", str(clone)])

    def config(key: str) -> str:
        return env.run(["git", "config", key], cwd=clone).stdout.strip()

    assert config("remote.origin.annexurl") == f"ssh://localhost:2222{repo}"
    client = config("annexproxy.uuid")
    assert ssh_argvs(env)[0][2:4] == ["-p", "2222"]
    env.run(["git", "fetch", "-q"], cwd=clone)
    # The same UUID on every session, so the server's transfer logs name one client.
    assert all(c.endswith(f"'{client}'") for c in ssh_commands(env))
    # A user's own annexurl is left alone.
    env.run(["git", "config", "remote.origin.annexurl", "ssh://elsewhere/x"], cwd=clone)
    env.run(["git", "fetch", "-q"], cwd=clone)
    assert config("remote.origin.annexurl") == "ssh://elsewhere/x"


def test_protocol_v2_through_the_tunnel(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    clone = env.client_home / "c"
    env.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{repo}", str(clone)])
    trace = dict(env, GIT_TRACE_PACKET="1")
    v2 = subprocess.run(
        ["git", "-c", "protocol.version=2", "ls-remote", "origin"],
        cwd=clone, env=trace, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "< version 2" in v2.stderr and "> command=ls-refs" in v2.stderr
    assert "refs/heads/main" in v2.stdout
    v0 = subprocess.run(
        ["git", "-c", "protocol.version=0", "ls-remote", "origin"],
        cwd=clone, env=trace, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "version 2" not in v0.stderr and "refs/heads/main" in v0.stdout
    # A v2 fetch of new history (upload-pack serves until the tunnel's end-of-input marker).
    other = env.client_home / "other"
    env.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{repo}", str(other)])
    newer = commit(env, other, "n.txt")
    env.run(["git", "push", "-q", "origin", "main"], cwd=other)
    env.run(["git", "-c", "protocol.version=2", "fetch", "-q", "origin"], cwd=clone)
    assert env.run(["git", "rev-parse", "origin/main"], cwd=clone).stdout.strip() == newer


def test_readonly_refuses_push_and_allows_fetch(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    before = server_ref(env, repo, "refs/heads/main")
    ro = env.with_server(GIT_ANNEX_SHELL_READONLY="1")
    clone = env.client_home / "c"
    ro.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{repo}", str(clone)])
    commit(env, clone, "b.txt")
    push = ro.run(["git", "push", "origin", "main"], cwd=clone, check=False)
    assert push.returncode != 0
    assert "fatal: this repository is read-only; write access denied" in push.stderr
    assert server_ref(env, repo, "refs/heads/main") == before
    # Refused, not "unsupported": no fallback to a direct git-receive-pack.
    assert not any(c.startswith("git-receive-pack") for c in ssh_commands(env))


def test_limited_refuses_git(ssh_env: SshEnvFactory) -> None:
    env = ssh_env(server_env={"GIT_ANNEX_SHELL_LIMITED": "1"})
    repo = seeded_repo(env)
    clone = env.run(
        ["git", "clone", f"annexproxy::ssh://localhost{repo}", str(env.client_home / "c")],
        check=False,
    )
    assert clone.returncode != 0
    assert "fatal: Action blocked by GIT_ANNEX_SHELL_LIMITED" in clone.stderr
    assert len(ssh_commands(env)) == 1


def test_directory_restriction_applies(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    other = seeded_repo(env, "other.git")
    limited = env.with_server(GIT_ANNEX_SHELL_DIRECTORY=str(other))
    clone = limited.run(
        ["git", "clone", f"annexproxy::ssh://localhost{repo}", str(env.client_home / "c")],
        check=False,
    )
    assert clone.returncode != 0
    assert f"Only allowed to access {other}" in clone.stderr
    limited.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{other}", "ok"])


def test_push_of_an_option_like_ref_is_refused(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    clone = env.client_home / "c"
    env.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{repo}", str(clone)])
    commit(env, clone, "b.txt")
    push = env.run(["git", "push", "origin", "HEAD:refs/heads/-x"], cwd=clone, check=False)
    assert push.returncode != 0
    assert "refusing a ref name that looks like an option: refs/heads/-x" in push.stderr
    assert server_ref(env, repo, "refs/heads/-x") is None
    env.run(["git", "fsck", "--no-progress"], cwd=repo, admin=True)


def test_git_ssh_command_is_honoured(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    fake = env.bin_dir / "ssh"
    custom = dict(env, GIT_SSH_COMMAND=f"{fake} -o ServerAliveInterval=7")
    proc = subprocess.run(
        ["git", "clone", "-q", f"annexproxy::ssh://localhost{repo}", "c"],
        cwd=env.client_home, env=custom, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ssh_argvs(env)[0][:2] == ["-o", "ServerAliveInterval=7"]


def test_bad_urls_fail_before_any_ssh(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    for url in ("annexproxy::ssh://-oProxyCommand=touch%20pwned/r", "annexproxy::host:-x"):
        proc = env.run(["git", "clone", url, "c"], check=False)
        assert proc.returncode != 0
        assert "fatal: strange" in proc.stderr
    assert ssh_commands(env) == []
    assert not (env.client_home / "pwned").exists()


def test_missing_repository_reports_gits_message(ssh_env: SshEnvFactory) -> None:
    env = ssh_env()
    proc = env.run(["git", "clone", "annexproxy::localhost:nowhere.git", "c"], check=False)
    assert proc.returncode != 0
    assert "'~/nowhere.git' does not appear to be a git repository" in proc.stderr


def test_local_urls(ssh_env: SshEnvFactory, tmp_path: Path) -> None:
    env = ssh_env()
    repo = seeded_repo(env)
    plain = tmp_path / "plain.git"
    env.run(["git", "init", "-q", "--bare", str(plain)], admin=True)
    tunnelled = env.run(["git", "clone", "-v", f"annexproxy::{repo}", "a"])
    assert "does not tunnel git" not in tunnelled.stderr
    assert (env.client_home / "a" / "a.txt").is_file()
    # No annex there: our git-annex-shell says so, and plain git serves the path.
    direct = env.run(["git", "clone", "-v", f"annexproxy::file://{plain}", "b"])
    assert "does not tunnel git" in direct.stderr
    assert ssh_commands(env) == []


# --- against git-annex's own git-annex-shell: the fallback ----------------------------------


def real_shell_env(ssh_env: SshEnvFactory, root: Path) -> SshEnv:
    """The fake ssh with git-annex's git-annex-shell (the wheel's binary) on the server."""
    import git_annex  # test dependency (the git-annex wheel)

    binary = Path(git_annex.__file__).parent / "git-annex"
    env = ssh_env(root)
    link = env.srvbin_dir / "git-annex-shell"
    link.unlink()
    link.symlink_to(binary)
    return env


def test_real_git_annex_shell_falls_back_to_git_over_ssh(
    ssh_env: SshEnvFactory, tmp_path: Path
) -> None:
    env = real_shell_env(ssh_env, tmp_path / "real")
    repo = seeded_repo(env)
    clone = env.client_home / "c"
    proc = env.run(["git", "clone", f"annexproxy::ssh://localhost{repo}", str(clone)])
    assert (clone / "a.txt").read_text() == "hello\n"
    # git-annex's complaint about CONNECT is not shown to the user.
    assert "relaying to git not supported" not in proc.stderr
    commands = ssh_commands(env)
    assert commands[0].startswith("git-annex-shell 'p2pstdio' ")
    assert commands[1] == f"git-upload-pack '{repo}'"

    head = commit(env, clone, "b.txt")
    env.run(["git", "push", "-q", "origin", "main"], cwd=clone)
    assert server_ref(env, repo, "refs/heads/main") == head
    assert ssh_commands(env)[-1] == f"git-receive-pack '{repo}'"
    env.run(["git", "-c", "protocol.version=2", "fetch", "-q", "origin"], cwd=clone)


# --- a clone made by the helper, used by the real git-annex client ---------------------------


def test_git_annex_uses_the_clone_through_our_proxy(ssh_env: SshEnvFactory) -> None:
    """`git annex init` + `get --from origin-node1` with only what the helper configured."""
    env = ssh_env()
    proxy = env.make_server_repo("proxy.git", "proxy")
    node1 = env.make_server_repo("node1.git", "node1")
    env.run(["git", "remote", "add", "node1", str(node1)], cwd=proxy, admin=True)
    env.run(["git", "annex", "sync", "-q", "--no-content", "node1"], cwd=proxy, admin=True)
    env.run(["git", "config", "remote.node1.annex-proxy", "true"], cwd=proxy, admin=True)
    assert (
        "Started proxying for node1"
        in env.run(["git", "annex", "updateproxy"], cwd=proxy, admin=True).stdout
    )
    # An admin's working copy puts f.txt on node1 only, and tells the proxy.
    seed = env.root / "seed"
    env.run(["git", "init", "-q", str(seed)], admin=True)
    env.run(["git", "annex", "init", "-q", "seed"], cwd=seed, admin=True)
    (seed / "f.txt").write_text("stored on node1\n")
    env.run(["git", "annex", "add", "f.txt"], cwd=seed, admin=True)
    env.run(["git", "commit", "-q", "-m", "seed"], cwd=seed, admin=True)
    for name, path in (("origin", proxy), ("node1", node1)):
        env.run(["git", "remote", "add", name, str(path)], cwd=seed, admin=True)
    env.run(["git", "annex", "copy", "-q", "--to", "node1", "f.txt"], cwd=seed, admin=True)
    env.run(["git", "annex", "sync", "-q", "--no-content", "origin", "node1"], cwd=seed, admin=True)

    clone = env.client_home / "c"
    env.run(["git", "clone", "-q", f"annexproxy::ssh://localhost{proxy}", str(clone)])
    env.run(["git", "annex", "init", "-q", "client"], cwd=clone)
    info = env.run(["git", "annex", "info", "--fast", "--json", "origin-node1"], cwd=clone)
    assert json.loads(info.stdout.splitlines()[-1])["proxied"] == "true"
    env.run(["git", "annex", "get", "-q", "--from", "origin-node1", "f.txt"], cwd=clone)
    assert (clone / "f.txt").read_text() == "stored on node1\n"
    # git-annex's sync pushes through the helper too: the proxy learns of the client.
    env.run(["git", "annex", "sync", "-q", "--no-content", "origin"], cwd=clone)
    uuid_log = env.run(["git", "show", "git-annex:uuid.log"], cwd=proxy, admin=True).stdout
    assert " client timestamp=" in uuid_log
