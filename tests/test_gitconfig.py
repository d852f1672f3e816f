"""Our config reader against git's own `git config --list` on the same files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from git_remote_annexproxy.gitconfig import (
    ConfigError,
    GitConfig,
    parse_config,
    parse_list_z,
    read_repo_config,
    wildmatch,
)

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


def git_list(path: Path) -> list[tuple[str, str | None]]:
    out = subprocess.run(
        ["git", "config", "--file", str(path), "--list", "-z"],
        check=True,
        capture_output=True,
    ).stdout
    return list(parse_list_z(out))


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


# -- value-less keys: one reading for the server's parser and both client readers -----------


def _git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, check=False, text=True, env=env
    ).stdout


def test_valueless_key_as_git_reads_it(tmp_path: Path) -> None:
    """`[a] flag` is "" as a string and true as a boolean; `[a] empty =` is "" and false.
    Before gitconfig.parse_list_z the server read the first as "true" and the remote helper
    its boolean as false (test fails on the old readers)."""
    path = tmp_path / "config"
    path.write_text("[a]\n\tflag\n\tempty =\n\tnum = 2\n\tzero = 0\n")
    conf = GitConfig.read([path])
    listed = GitConfig(parse_list_z(subprocess.run(
        ["git", "config", "--file", str(path), "--list", "-z"], capture_output=True, check=True
    ).stdout))
    for key in ("a.flag", "a.empty", "a.num", "a.zero"):
        as_string = _git("config", "--file", str(path), "--get", key, cwd=tmp_path)
        as_bool = _git("config", "--file", str(path), "--bool", "--get", key, cwd=tmp_path)
        for reader in (conf, listed):
            assert reader.get(key) == as_string.rstrip("\n")
            assert reader.get_bool(key) is (as_bool.strip() == "true")


def test_push_content_switch_reads_booleans_as_git(tmp_path: Path) -> None:
    from git_remote_annexproxy import pushcontent

    for text, on in [("\tannexproxy-push-content\n", True),
                     ("\tannexproxy-push-content =\n", False),
                     ("\tannexproxy-push-content = yes\n", True),
                     ("", False)]:
        path = tmp_path / "config"
        path.write_text('[remote "o"]\n' + text)
        assert pushcontent.enabled(GitConfig.read([path]), "o") is on


# -- includes ---------------------------------------------------------------------------------


def _repo(tmp_path: Path, name: str, *, bare: bool = False) -> Path:
    path = tmp_path / name
    subprocess.run(
        ["git", "init", "-q", *(["--bare"] if bare else []), "-b", "main", str(path)],
        check=True,
    )
    return path if bare else path / ".git"


def _ours_and_gits(gitdir: Path, home: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}
    out = subprocess.run(
        ["git", "--git-dir", str(gitdir), "config", "--list", "-z"],
        capture_output=True, check=True, env=env,
    ).stdout
    theirs = [(k, v or "") for k, v in parse_list_z(out)]
    import os

    saved = {k: os.environ.get(k) for k in ("HOME", "GIT_CONFIG_SYSTEM", "XDG_CONFIG_HOME")}
    os.environ["HOME"] = str(home)
    os.environ["GIT_CONFIG_SYSTEM"] = "/nonexistent"
    os.environ.pop("XDG_CONFIG_HOME", None)
    try:
        ours = list(read_repo_config(gitdir).items())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # git lists in file order; ours groups by key: compare the last value of every key.
    return sorted(dict(ours).items()), sorted(dict(theirs).items())


def test_includes_as_git_follows_them(tmp_path: Path) -> None:
    """include.path (relative, `~/`, nested, missing) and includeIf gitdir:, gitdir/i: and
    onbranch: give the same settings as `git config --list` in that repository. Before,
    includes were not followed at all (annexproxy.trafficlog set in an included file was
    silently ignored)."""
    home = tmp_path / "home"
    (home / "conf.d").mkdir(parents=True)
    srv = tmp_path / "srv"
    srv.mkdir()
    gitdir = _repo(srv, "Data.git", bare=True)
    other = _repo(srv, "other.git", bare=True)
    (home / "conf.d" / "base").write_text("[annexproxy]\n\ttrafficlog = /var/log/a\n"
                                          "[include]\n\tpath = nested\n")
    (home / "conf.d" / "nested").write_text("[annexproxy]\n\tnodetimeout = 30\n")
    (home / "bygitdir").write_text("[x]\n\tbygitdir = yes\n")
    (home / "byfold").write_text("[x]\n\tbyfold = yes\n")
    (home / "bybranch").write_text("[x]\n\tbybranch = yes\n")
    (home / ".gitconfig").write_text(
        "[include]\n\tpath = ~/conf.d/base\n\tpath = missing-file\n"
        f'[includeIf "gitdir:{srv}/"]\n\tpath = bygitdir\n'
        '[includeIf "gitdir/i:**/DATA.GIT"]\n\tpath = byfold\n'
        '[includeIf "onbranch:ma*"]\n\tpath = bybranch\n'
        '[includeIf "hasconfig:remote.*.url:https://**"]\n\tpath = bybranch\n'
    )
    ours, theirs = _ours_and_gits(gitdir, home)
    assert ours == theirs
    keys = dict(ours)
    assert keys["annexproxy.trafficlog"] == "/var/log/a" and keys["annexproxy.nodetimeout"] == "30"
    assert keys["x.bygitdir"] == keys["x.byfold"] == keys["x.bybranch"] == "yes"
    ours, theirs = _ours_and_gits(other, home)
    assert ours == theirs and "x.byfold" not in dict(ours)


def test_include_loop_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("[include]\n\tpath = config\n")
    with pytest.raises(ConfigError, match="include depth"):
        GitConfig.read([path])
    said = subprocess.run(
        ["git", "config", "--includes", "--file", str(path), "--list"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert said.returncode != 0 and "include depth" in said.stderr


@pytest.mark.parametrize(
    "pattern, text, matches",
    [
        ("**/srv/**", "/a/srv/b/c", True),
        ("/srv/*", "/srv/a/b", False),
        ("/srv/*/x", "/srv/a/x", True),
        ("**/x.git", "/x.git", True),
        ("/s?v/[a-c]*", "/srv/b1", True),
        ("/s?v/[!a-c]*", "/srv/b1", False),
    ],
)
def test_wildmatch(pattern: str, text: str, matches: bool) -> None:
    assert wildmatch(pattern, text) is matches
