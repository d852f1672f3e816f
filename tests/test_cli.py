"""argv grammar, field whitelist and restriction checks (annex-shell.md §1, §5)."""

from __future__ import annotations

import pytest

from shell import cli, restrict
from shell.errors import ShellError


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "git-annex-shell 'configlist' '/srv/r.git'",
            ["git-annex-shell", "configlist", "/srv/r.git"],
        ),
        ("a  b", ["a", "", "b"]),
        ("a ", ["a"]),
        ("'a b' c", ["a b", "c"]),
        ('"x y"z', ["x yz"]),
        ("'it'\"'\"'s'", ["it's"]),  # git-annex's own quoting of an embedded quote
        ("a\\ b", ["a\\", "b"]),  # backslash is not special
        ("'unterminated", ["unterminated"]),
        ("$(rm -rf /); `x` && y", ["$(rm", "-rf", "/);", "`x`", "&&", "y"]),
        ("", []),
    ],
)
def test_shell_unescape(text: str, words: list[str]) -> None:
    assert cli.shell_unescape(text) == words


def test_partition_params() -> None:
    assert cli.partition_params(["a", "--", "x=1", "--", "e1", "--", "e2"]) == (
        ["a"],
        ["x=1"],
        ["e1", "--", "e2"],
    )
    assert cli.partition_params(["a", "b"]) == (["a", "b"], [], [])


def test_field_whitelist() -> None:
    fields = cli.allowed_fields(["evil=1", "autoinit=1", "remoteuuid=ab-12", "remoteuuid2=x"])
    assert fields == {"autoinit": "1", "remoteuuid": "ab-12"}
    assert cli.allowed_fields(["remoteuuid=../x", "autoinit=yes"]) == {}


def test_parse_builtin_options_anywhere() -> None:
    inv = cli.parse_builtin(
        "p2pstdio", "/r", ["--debug", "cu", "--uuid", "U", "--", "autoinit=1", "--"]
    )
    assert (inv.args, inv.uuid, inv.debug, inv.fields) == (["cu"], "U", True, {"autoinit": "1"})
    inv = cli.parse_builtin("dropkey", "/r", ["--force", "K1", "K2", "--uuid=V"])
    assert (inv.args, inv.uuid, inv.force) == (["K1", "K2"], "V", True)
    with pytest.raises(ShellError, match="invalid option --upload-pack=x"):
        cli.parse_builtin("configlist", "/r", ["--upload-pack=x"])


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_no_args_is_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main([], capsys)
    assert code == 1 and out == ""
    assert err.startswith("git-annex-shell: bad parameters\n")
    assert "Usage: git-annex-shell" in err


def test_builtin_without_dir(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["-c", "configlist"], capsys)
    assert code == 1 and err.startswith("git-annex-shell: bad parameters")


def test_overlong_command_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["-c", "git-annex-shell " + "x" * (cli.MAX_ARGV_BYTES + 1)], capsys)
    assert (code, out) == (1, "")
    assert err == "git-annex-shell: command line too long\n"
    code, _, err = run_main(["configlist"] + ["a"] * (cli.MAX_ARGS + 1), capsys)
    assert code == 1 and "too long" in err


@pytest.mark.parametrize(
    ("env", "needed", "message"),
    [
        (
            {"GIT_ANNEX_SHELL_READONLY": "1"},
            restrict.Mode.APPENDONLY,
            "Action blocked by GIT_ANNEX_SHELL_READONLY",
        ),
        (
            {"GIT_ANNEX_SHELL_READONLY": "1"},
            restrict.Mode.READWRITE,
            "Action blocked by GIT_ANNEX_SHELL_READONLY",
        ),
        (
            {"GIT_ANNEX_SHELL_READONLY": "1", "GIT_ANNEX_SHELL_APPENDONLY": "1"},
            restrict.Mode.READWRITE,
            "Action blocked by GIT_ANNEX_SHELL_READONLY",
        ),
        (
            {"GIT_ANNEX_SHELL_APPENDONLY": "1"},
            restrict.Mode.READWRITE,
            "Action blocked by GIT_ANNEX_SHELL_APPENDONLY",
        ),
    ],
)
def test_mode_blocks(env: dict[str, str], needed: int, message: str) -> None:
    with pytest.raises(ShellError) as info:
        restrict.check_mode(needed, env)
    assert info.value.message == message


@pytest.mark.parametrize(
    ("env", "needed"),
    [
        ({}, restrict.Mode.READWRITE),
        ({"GIT_ANNEX_SHELL_READONLY": ""}, restrict.Mode.READWRITE),  # empty means unset
        ({"GIT_ANNEX_SHELL_READONLY": "1"}, restrict.Mode.READONLY),
        ({"GIT_ANNEX_SHELL_APPENDONLY": "1"}, restrict.Mode.APPENDONLY),
    ],
)
def test_mode_allows(env: dict[str, str], needed: int) -> None:
    restrict.check_mode(needed, env)


def test_server_mode() -> None:
    assert restrict.server_mode({}) == restrict.Mode.READWRITE
    assert restrict.server_mode({"GIT_ANNEX_SHELL_APPENDONLY": "t"}) == restrict.Mode.APPENDONLY
    assert (
        restrict.server_mode({"GIT_ANNEX_SHELL_APPENDONLY": "t", "GIT_ANNEX_SHELL_READONLY": "t"})
        == restrict.Mode.READONLY
    )


@pytest.mark.parametrize(
    ("allowed", "given", "ok"),
    [
        ("/srv/r.git", "/srv/r.git", True),
        ("/home/u/r.git", "/~/r.git", True),
        ("~/r.git", "/home/u/r.git", True),
        ("r.git", "/~/r.git", True),
        ("/srv/r.git", "/srv/x/../r.git", True),
        ("/srv/r.git/", "/srv/r.git", True),
        ("/srv/r.git", "/srv/other.git", False),
        ("/srv/r.git", "/srv/r.git/../../etc", False),
        ("/srv/r.git", "/~other/r.git", False),
        ("/srv/r.git", "srv/r.git", False),
    ],
)
def test_directory(allowed: str, given: str, ok: bool) -> None:
    env = {"GIT_ANNEX_SHELL_DIRECTORY": allowed, "HOME": "/home/u"}
    if ok:
        restrict.check_directory(given, env)
    else:
        with pytest.raises(ShellError, match=r"^Only allowed to access .* not "):
            restrict.check_directory(given, env)


def test_directory_message_is_canonical() -> None:
    env = {"GIT_ANNEX_SHELL_DIRECTORY": "/srv/a.git", "HOME": "/home/u"}
    with pytest.raises(ShellError) as info:
        restrict.check_directory("/home/u/b.git", env)
    assert info.value.message == "Only allowed to access /srv/a.git not ~/b.git"
    with pytest.raises(ShellError) as info:
        restrict.check_directory(None, env)
    assert info.value.message == (
        "Only allowed to access /srv/a.git and could not determine directory from command line"
    )


def test_limited_blocks_passthrough(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_ANNEX_SHELL_LIMITED", "1")
    code, out, err = run_main(["-c", "git-upload-pack '/srv/r.git'"], capsys)
    assert (code, out, err) == (
        1,
        "",
        "git-annex-shell: Action blocked by GIT_ANNEX_SHELL_LIMITED\n",
    )
    code, _, err = run_main(["-c", "true"], capsys)
    assert code == 1 and "GIT_ANNEX_SHELL_LIMITED" in err


def test_directory_checked_for_passthrough(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_ANNEX_SHELL_DIRECTORY", "/srv/a.git")
    code, _, err = run_main(["-c", "git-upload-pack '/srv/b.git'"], capsys)
    assert (
        code == 1 and err == "git-annex-shell: Only allowed to access /srv/a.git not /srv/b.git\n"
    )


def test_upload_archive_off_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["-c", "git-upload-archive '/srv/r.git'"], capsys)
    assert code == 1 and "git-upload-archive is disabled" in err
