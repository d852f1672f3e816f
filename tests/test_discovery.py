"""Discovery from git-annex branches, source choice, and recording presence, on branches
written here line by line (formats as in proxy-and-cluster.md §1, values from its traces).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from git_remote_annexproxy import annexlog, urls
from git_remote_annexproxy.annexget import Fetcher, candidates, why_unavailable
from git_remote_annexproxy.discovery import (
    BranchLogs,
    DiscoveryError,
    annex_remotes,
    client_uuid,
    discover,
    remote_uuid,
    run_bounded,
)
from git_remote_annexproxy.gitconfig import GitConfig, read_repo_config
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.store import AnnexStore

PROXY = "9a0c0000-0000-0000-0000-000000000001"
OTHER_PROXY = "9a0c0000-0000-0000-0000-000000000002"
NODE1 = "40de0000-0000-0000-0000-000000000001"
NODE2 = "40de0000-0000-0000-0000-000000000002"
DEADNODE = "40de0000-0000-0000-0000-0000000000dd"
CLUSTER = "ac41e7d0-ed00-86fd-acbf-9fd58f6e46eb"
SPECIAL = "7fb10000-0000-0000-0000-00000000953c"
OUTSIDE = "0d7d0000-0000-0000-0000-000000000000"
KEY = Key.parse("SHA256E-s6--5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03.txt")
LOCLOG = annexlog.location_log_path(KEY)
URL = urls.parse_url("localhost:/srv/proxy.git")

BRANCH = {
    "uuid.log": (
        f"{PROXY} proxy timestamp=1795561867s\n"
        f"{NODE1} node1 timestamp=1795561867s\n"
        f"{NODE2} node2 timestamp=1795561867s\n"
        f"{CLUSTER} cluster mycluster timestamp=1795561970s\n"
        f"{SPECIAL} dirsr timestamp=1795562227s\n"
        f"{OUTSIDE} outside timestamp=1795562227s\n"
    ),
    "proxy.log": (
        f"1795561918s {PROXY} {NODE1}:node1 {NODE2}:node2 {CLUSTER}:mycluster "
        f"{SPECIAL}:dirsr {DEADNODE}:gone {OUTSIDE}:bad~name {PROXY}:self\n"
        f"1795561918s {OTHER_PROXY} {OUTSIDE}:outside\n"
    ),
    "cluster.log": f"1795561971s {CLUSTER} {NODE1} {NODE2} {DEADNODE}\n",
    "remote.log": f"{SPECIAL} encryption=none name=dirsr type=directory timestamp=1795562227s\n",
    "trust.log": f"{DEADNODE} X timestamp=1795562266s\n",
}


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=repo, input=input, capture_output=True, check=True,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
             "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"},
    )  # fmt: skip
    return proc.stdout.decode()


def write_branch(repo: Path, ref: str, files: dict[str, str]) -> None:
    """Commit `files` as the whole tree of `ref`, with git's plumbing."""
    index = repo / ".git" / "tmp-index"
    index.unlink(missing_ok=True)
    env_index = {"GIT_INDEX_FILE": str(index)}
    for path, text in files.items():
        sha = git(repo, "hash-object", "-w", "--stdin", input=text.encode()).strip()
        subprocess.run(
            ["git", "update-index", "--add", "--cacheinfo", f"100644,{sha},{path}"],
            cwd=repo, env={**os.environ, **env_index}, check=True,
        )  # fmt: skip
    tree = subprocess.run(
        ["git", "write-tree"], cwd=repo, env={**os.environ, **env_index},
        capture_output=True, check=True, text=True,
    ).stdout.strip()  # fmt: skip
    commit = git(repo, "commit-tree", tree, "-m", "update").strip()
    git(repo, "update-ref", ref, commit)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    repo = tmp_path / "clone"
    git(tmp_path, "init", "--quiet", str(repo))
    git(repo, "remote", "add", "origin", "localhost:/srv/proxy.git")
    git(repo, "remote", "add", "other", "localhost:/srv/other.git")  # no git-annex branch
    write_branch(repo, "refs/remotes/origin/git-annex", BRANCH)
    return repo


def test_discover_names_kinds_and_descriptions(clone: Path) -> None:
    view = discover(BranchLogs(clone / ".git"), "origin", URL, PROXY)
    got = [(r.name, r.uuid, r.kind, r.description, r.dead) for r in view.repositories]
    assert got == [
        ("origin", PROXY, "proxy", "proxy", False),
        ("origin-dirsr", SPECIAL, "special", "dirsr", False),
        ("origin-gone", DEADNODE, "node", "", True),
        ("origin-mycluster", CLUSTER, "cluster", "cluster mycluster", False),
        ("origin-node1", NODE1, "node", "node1", False),
        ("origin-node2", NODE2, "node", "node2", False),
    ]
    cluster = view.by_name("origin-mycluster")
    assert cluster is not None and cluster.nodes == (NODE1, NODE2)  # the dead node left
    special = view.by_uuid(SPECIAL)
    assert special is not None and special.special_type == "directory"
    assert special.proxied_name == "dirsr"


def test_a_remote_that_proxies_nothing_is_just_itself(clone: Path) -> None:
    view = discover(BranchLogs(clone / ".git"), "origin", URL, NODE1)
    assert [(r.name, r.kind) for r in view.repositories] == [("origin", "repository")]


def test_branches_and_journal_are_read_as_their_union(clone: Path) -> None:
    # origin says node1 has the key; the local branch, newer, says it dropped it; the
    # journal says node2 got it. Newest line per UUID wins, wherever it came from.
    write_branch(clone, "refs/remotes/origin/git-annex", {
        **BRANCH, LOCLOG: f"1795561921s 1 {NODE1}\n1795561921s 1 {OUTSIDE}\n",
    })  # fmt: skip
    write_branch(clone, "refs/heads/git-annex", {LOCLOG: f"1795561999s 0 {NODE1}\n"})
    journal = clone / ".git/annex/journal"
    journal.mkdir(parents=True)
    (journal / annexlog.journal_name(LOCLOG)).write_text(f"1795562000s 1 {NODE2}\n")
    logs = BranchLogs(clone / ".git")
    assert logs.refs == (b"refs/heads/git-annex", b"refs/remotes/origin/git-annex")
    assert logs.present(KEY) == {OUTSIDE, NODE2}


def test_candidates_best_first_and_why_not(clone: Path) -> None:
    write_branch(clone, "refs/remotes/origin/git-annex", {
        **BRANCH,
        LOCLOG: "".join(f"1795561921s 1 {u}\n" for u in (NODE2, PROXY, SPECIAL, DEADNODE)),
    })  # fmt: skip
    logs = BranchLogs(clone / ".git")
    view = discover(logs, "origin", URL, PROXY)
    names = [s.repo.name for s in candidates(KEY, [view], logs, logs.dead())]
    # The cluster has it through node2; the dead node is never a source.
    assert names == ["origin-mycluster", "origin-node2", "origin", "origin-dirsr"]

    write_branch(clone, "refs/remotes/origin/git-annex", {
        **BRANCH, LOCLOG: f"1795561921s 1 {OUTSIDE}\n1795561921s 1 {DEADNODE}\n",
    })  # fmt: skip
    logs = BranchLogs(clone / ".git")
    assert candidates(KEY, [view], logs, logs.dead()) == []
    assert why_unavailable(KEY, [view], logs, logs.dead()) == (
        f"only in outside ({OUTSIDE}), which origin does not reach"
    )
    write_branch(clone, "refs/remotes/origin/git-annex", BRANCH)
    logs = BranchLogs(clone / ".git")
    assert why_unavailable(KEY, [view], logs, logs.dead()).startswith(
        "no repository is recorded to have it"
    )


def test_record_present_keeps_every_other_line(clone: Path) -> None:
    write_branch(clone, "refs/remotes/origin/git-annex", {
        **BRANCH, LOCLOG: f"1795561921s 1 {NODE1}\n1795561921s 0 {NODE2}\n",
    })  # fmt: skip
    gitdir = clone / ".git"
    logs = BranchLogs(gitdir)
    me = "c1c10000-0000-0000-0000-000000000000"
    fetcher = Fetcher(gitdir, AnnexStore(gitdir, bare=False), None, logs, me)  # type: ignore[arg-type]
    fetcher.record_present(KEY)
    journal = gitdir / "annex/journal" / annexlog.journal_name(LOCLOG)
    lines = annexlog.compact(annexlog.parse_presence_log(journal.read_bytes()))
    assert {(ln.uuid, ln.status) for ln in lines} == {(NODE1, "1"), (NODE2, "0"), (me, "1")}
    before = journal.read_bytes()
    fetcher.record_present(KEY)  # already recorded: nothing written
    assert journal.read_bytes() == before


def test_annex_remotes_are_those_with_a_fetched_branch(clone: Path) -> None:
    config = read_repo_config(clone / ".git")
    assert annex_remotes(config, BranchLogs(clone / ".git").refs) == ["origin"]


def test_remote_uuid_is_asked_once_and_recorded(tmp_path: Path, clone: Path) -> None:
    server = tmp_path / "server.git"
    git(tmp_path, "init", "--quiet", "--bare", str(server))
    git(server, "config", "annex.uuid", PROXY)
    url = urls.parse_url(f"file://{server}")
    gitdir = clone / ".git"
    assert remote_uuid(gitdir, read_repo_config(gitdir), "origin", url) == PROXY
    config = read_repo_config(gitdir)
    assert config.get("remote.origin.annex-uuid") == PROXY
    # Known now: no server is asked (this URL would fail).
    gone = urls.parse_url(f"file://{tmp_path}/nonexistent.git")
    assert remote_uuid(gitdir, config, "origin", gone) == PROXY

    plain = tmp_path / "plain.git"
    git(tmp_path, "init", "--quiet", "--bare", str(plain))
    with pytest.raises(DiscoveryError) as info:
        remote_uuid(gitdir, config, "other", urls.parse_url(f"file://{plain}"))
    assert str(info.value) == "other: cannot learn its UUID: not a git-annex repository"
    # The server's own words when it fails.
    with pytest.raises(DiscoveryError) as info:
        remote_uuid(gitdir, config, "other", gone)
    assert str(info.value).startswith(
        "other: cannot learn its UUID: git-annex-shell: failed to read git config of git "
    )
    assert read_repo_config(gitdir).get("remote.other.annex-uuid") is None


def test_client_uuid_is_made_once(clone: Path) -> None:
    gitdir = clone / ".git"
    made = client_uuid(gitdir, GitConfig())
    assert len(made) == 36
    assert read_repo_config(gitdir).get("annex.uuid") == made
    assert client_uuid(gitdir, read_repo_config(gitdir)) == made


def test_client_uuid_keeps_the_remote_helpers_identity(clone: Path) -> None:
    gitdir = clone / ".git"
    git(clone, "config", "annexproxy.uuid", NODE2)
    assert client_uuid(gitdir, read_repo_config(gitdir)) == NODE2
    assert read_repo_config(gitdir).get("annex.uuid") == NODE2


def test_server_commands_are_bounded_in_output_and_time() -> None:
    flood = "import sys; sys.stdout.write('o' * 300000); sys.stderr.write('e' * 300000 + 'END')"
    code, out, err = run_bounded([sys.executable, "-c", flood], os.environ, timeout=30, limit=1000)
    assert (code, out, err) == (0, b"o" * 1000, b"e" * 997 + b"END")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], os.environ, timeout=0.5)
    assert time.monotonic() - started < 10
