"""Our config reader against git's own `git config --list` on the same files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from git_remote_annexproxy.gitconfig import ConfigError, GitConfig, parse_config

SAMPLES = [
    "[core]\n\tbare = true\n",
    '[remote "node1"]\n\turl = /srv/node1.git\n\tannex-uuid = 1234\n\tannex-proxy = true\n',
    '[remote "with \\"quote\\" and space"]\n\turl = x\n',
    "[Annex]\n\tUUID = abc\n",
    "[section.Sub]\n\tkey = v\n",
    '[a]\n\tk = "  padded  "\n\tm = one two   three # comment\n\tn = x ; c\n',
    '[a]\n\tflag\n\tesc = a\\tb\\\\c\\"d\n',
    "[a]\n\tlong = first \\\n second\n",
    "# comment\n; another\n[a] k = inline\n",
    "[a]\n\tk = 1\n\tk = 2\n",
    '[remote "Mixed.Case"]\n\tURL = u\n',
]


def git_list(path: Path) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["git", "config", "--file", str(path), "--list", "-z"],
        check=True,
        capture_output=True,
    ).stdout.decode()
    pairs = []
    for item in out.split("\0"):
        if not item:
            continue
        key, newline, value = item.partition("\n")
        # git prints a bare `name` (no `=`) without a value; it means true.
        pairs.append((key, value if newline else "true"))
    return pairs


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_git(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config"
    path.write_text(text)
    assert list(parse_config(text)) == git_list(path)


def test_lookup_is_case_insensitive_except_subsection(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text('[Remote "Node1"]\n\tAnnex-UUID = u1\n[annex]\n\tuuid = a\n')
    conf = GitConfig.read([path])
    assert conf.get("remote.Node1.annex-uuid") == "u1"
    assert conf.get("REMOTE.Node1.ANNEX-UUID") == "u1"
    assert conf.get("remote.node1.annex-uuid") is None
    assert conf.get("annex.UUID") == "a"
    assert conf.subsections("remote") == ["Node1"]


def test_later_files_override(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("[annex]\n\tjobs = 1\n")
    b.write_text("[annex]\n\tjobs = 4\n")
    assert GitConfig.read([a, b]).get("annex.jobs") == "4"
    assert GitConfig.read([a, tmp_path / "missing"]).get("annex.jobs") == "1"


@pytest.mark.parametrize(
    "text", ['[a]\n\tk = "open\n', "[a\n", "[a]\n\tk = bad\\q\n", "[a]\n\t1k = v\n"]
)
def test_rejects_what_git_rejects(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config"
    path.write_text(text)
    with pytest.raises(ConfigError):
        list(parse_config(text))
    assert (
        subprocess.run(
            ["git", "config", "--file", str(path), "--list"], capture_output=True, check=False
        ).returncode
        != 0
    )


def test_bool() -> None:
    conf = GitConfig(parse_config("[a]\n\tt\n\tf = no\n\ty = On\n\tbad = maybe\n"))
    assert conf.get_bool("a.t") is True
    assert conf.get_bool("a.f") is False
    assert conf.get_bool("a.y") is True
    assert conf.get_bool("a.missing", True) is True
    with pytest.raises(ConfigError):
        conf.get_bool("a.bad")
