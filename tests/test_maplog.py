"""The one reader of git-annex's per-repository logs (maplog.py and its users), against the
real git-annex: each case writes a crafted log into a git-annex branch and asks git-annex
what it reads there, then asks our readers.

Before maplog.py these disagreed with git-annex: repologs kept the FIRST of two lines with
equal timestamps (trust.log `X` then `0` read as dead), dropped a maxsize of `200x`, kept a
two-character trust level; the gateway's numcopies.log reader took the last line whatever
its timestamp.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_remote_annexproxy import maplog, repologs
from git_remote_annexproxy.preferred import TrustLevel, parse_old_log, parse_trust_log

U = "c8db1909-151c-4d36-bb66-24fcf8d1c596"


class AnnexRepo:
    """A git-annex repository whose branch files a test overwrites, and git-annex to ask."""

    def __init__(self, root: Path, annex_bin: Path) -> None:
        self.path = root / "repo"
        home = root / "home"
        home.mkdir()
        (home / ".gitconfig").write_text(
            "[user]\n\tname = t\n\temail = t@annexproxy.invalid\n[init]\n\tdefaultBranch = main\n"
        )
        self.env = {"HOME": str(home), "PATH": f"{annex_bin}:/usr/bin:/bin"}
        self.git("init", "-q", str(self.path), cwd=root)
        self.git("config", "annex.uuid", U)
        self.git("annex", "init", "-q", "test")
        self.index = root / "index"

    def git(self, *args: str, cwd: Path | None = None, stdin: bytes = b"") -> str:
        proc = subprocess.run(
            ["git", *args], cwd=cwd or self.path, env=self.env, input=stdin,
            capture_output=True, check=True, timeout=120,
        )
        return proc.stdout.decode()

    def put(self, name: str, content: bytes) -> None:
        """Replace `name` on the git-annex branch by `content` (a new commit)."""
        blob = self.git("hash-object", "-w", "--stdin", stdin=content).strip()
        env = {**self.env, "GIT_INDEX_FILE": str(self.index)}

        def git_ix(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=self.path, env=env, capture_output=True, check=True,
                timeout=60, text=True,
            ).stdout.strip()

        git_ix("read-tree", "git-annex")
        git_ix("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
        tree = git_ix("write-tree")
        commit = git_ix("commit-tree", tree, "-p", "git-annex", "-m", "test")
        self.git("update-ref", "refs/heads/git-annex", commit)

    def trust(self) -> str:
        out = json.loads(self.git("annex", "info", "--fast", "--json", "here"))
        return str(out["trust"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path) -> AnnexRepo:
    return AnnexRepo(tmp_path_factory.mktemp("maplog"), annex_bin)


_TRUST_NAMES = {"1": "trusted", "0": "untrusted", "X": "dead", "?": "semitrusted"}


@pytest.mark.parametrize(
    "log",
    [
        f"{U} X timestamp=5s\n{U} 0 timestamp=5s\n",  # a tie: the later line wins
        f"{U} 0 timestamp=5s\n{U} X timestamp=5s\n",
        f"{U} 0 timestamp=5s\n{U} 00 timestamp=6s\n",  # a value that does not parse: skipped
        f"{U} 0 timestamp=5s\n{U}\n",  # no timestamp: older than any
        f"{U} timestamp=5s\n",  # no value: trusted (what old git-annex wrote)
        f"{U} q timestamp=5s\r\r\n",  # unknown level: semitrusted
        f"{U} 1 timestamp=5s\n{U} X timestamp=4.99999s\n",
        f" {U} X timestamp=5s\n",  # a leading space: no UUID, skipped
    ],
)
def test_trust_log_as_git_annex(repo: AnnexRepo, log: str) -> None:
    repo.put("trust.log", log.encode())
    ours = repologs.parse_trust_log(log.encode()).get(U, "?")
    assert _TRUST_NAMES[ours] == repo.trust()
    assert (U in repologs.dead_uuids(log.encode())) == (repo.trust() == "dead")
    level = parse_trust_log(log).get(U, TrustLevel.SEMITRUSTED)
    assert level.name.lower() == repo.trust()


@pytest.mark.parametrize(
    "log",
    [
        f"{U} include=a timestamp=5s\n{U} include=b timestamp=5s\n",
        f"{U} include=a timestamp=6s\n{U} include=b timestamp=5s\n",
        f"{U} include=a\n{U} include=b timestamp=0s\n",
        f"{U} include=a  and  include=b timestamp=bogus\n",
        f"{U} include=a timestamp=5s\n{U} include=c timestamp=5.0s\n",
    ],
)
def test_preferred_content_as_git_annex(repo: AnnexRepo, log: str) -> None:
    repo.put("preferred-content.log", log.encode())
    theirs = repo.git("annex", "wanted", "here").rstrip("\n")
    assert parse_old_log(log)[U] == theirs
    assert repologs.parse_old_layout(log.encode())[U] == theirs


@pytest.mark.parametrize(
    "log", ["5s 3\n5s 2\n", "10s 2\n5s 3\n", "5s 0\n", "5s  4 junk\n", "5s 2.5\n6s x\n"]
)
def test_numcopies_as_git_annex(repo: AnnexRepo, log: str) -> None:
    repo.put("numcopies.log", log.encode())
    said = repo.git("annex", "numcopies").strip()
    theirs = None if "not set" in said else int(said)
    assert maplog.configured_copies(log.encode()) == theirs


@pytest.mark.parametrize(
    "log",
    [f"5s {U} 100\n5s {U} 200x\n", f"5s {U} 300\n4s {U} 100\n", f"5s {U} 7\n6s {U}\n"],
)
def test_maxsize_as_git_annex(repo: AnnexRepo, log: str) -> None:
    repo.put("maxsize.log", log.encode())
    out = json.loads(repo.git("annex", "maxsize", "--json", "--bytes"))
    theirs = {
        r["uuid"]: int(r["size"]["maxsize"])
        for r in out["repositories"]
        if r["size"].get("maxsize") is not None
    }
    assert repologs.parse_maxsize_log(log.encode()) == theirs


def test_group_log_as_git_annex(repo: AnnexRepo) -> None:
    log = f"{U} g1 timestamp=5s\n{U}  g2  g3  timestamp=5s\n"
    repo.put("group.log", log.encode())
    theirs = set(repo.git("annex", "group", "here").split())
    assert maplog.parse_old(log.encode(), maplog.loose_word_set)[U] == theirs


# -- pure rules ------------------------------------------------------------------------------


def test_new_layout_needs_both_spaces() -> None:
    data = b"5s P1\n5s P2 \n5s  x\n"
    assert maplog.parse_new(data, maplog.text_value) == {"P2": "", "": "x"}


def test_proxy_log_bad_word_spoils_line() -> None:
    good = b"5s P1 U1:node1 U2:node2\n"
    assert repologs.parse_proxy_log(good) == {"P1": {"U1": "node1", "U2": "node2"}}
    # A later line with a malformed word is skipped whole, so the older line stays.
    assert repologs.parse_proxy_log(good + b"6s P1 U1:node1 bogus\n") == {
        "P1": {"U1": "node1", "U2": "node2"}
    }
    # Names git refuses as remote names are dropped after parsing.
    assert repologs.parse_proxy_log(b"5s P1 U1:a..b U2:ok\n") == {"P1": {"U2": "ok"}}


def test_cluster_log_double_space_spoils_line() -> None:
    cluster = "ac000000-0000-8000-0000-000000000001"
    data = f"5s {cluster} N1 N2\n6s {cluster} N1  N3\n".encode()
    assert repologs.parse_cluster_log(data) == {cluster: frozenset({"N1", "N2"})}


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=200))
def test_readers_take_any_bytes(data: bytes) -> None:
    maplog.parse_old(data, maplog.text_value)
    maplog.parse_new(data, maplog.word_set)
    maplog.configured_copies(data)
    repologs.parse_trust_log(data)
    repologs.parse_proxy_log(data)
    repologs.parse_maxsize_log(data)
