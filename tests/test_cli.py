"""argv grammar, field whitelist and restriction checks (annex-shell.md §1, §5), and our
error output beside git-annex's own git-annex-shell run on the same command lines."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from conftest import shell_error

from shell import cli, passthrough, restrict
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
    assert err == shell_error("command line too long")  # our message, git-annex's layout
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


def real_run(real_shell: Path, argv: list[str]) -> tuple[int, str, str]:
    """git-annex's own git-annex-shell on `argv`, in this process's environment."""
    proc = subprocess.run(
        [str(real_shell), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_limited_blocks_passthrough(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    real_annex_shell: Path,
) -> None:
    monkeypatch.setenv("GIT_ANNEX_SHELL_LIMITED", "1")
    argv = ["-c", "git-upload-pack '/srv/r.git'"]
    code, out, err = run_main(argv, capsys)
    assert (code, out, err) == real_run(real_annex_shell, argv)
    assert "Action blocked by GIT_ANNEX_SHELL_LIMITED" in err
    code, _, err = run_main(["-c", "true"], capsys)
    assert code == 1 and "GIT_ANNEX_SHELL_LIMITED" in err


def test_directory_checked_for_passthrough(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    real_annex_shell: Path,
) -> None:
    monkeypatch.setenv("GIT_ANNEX_SHELL_DIRECTORY", "/srv/a.git")
    argv = ["-c", "git-upload-pack '/srv/b.git'"]
    code, out, err = run_main(argv, capsys)
    assert (code, out, err) == real_run(real_annex_shell, argv)
    assert "Only allowed to access /srv/a.git not /srv/b.git" in err


def test_upload_archive_off_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["-c", "git-upload-archive '/srv/r.git'"], capsys)
    assert code == 1 and "git-upload-archive is disabled" in err


# --- errors as git-annex-shell prints them -----------------------------------------------------
#
# Both shells run the same command line in the same environment; where the message is one
# git-annex has too, our stderr must be its stderr byte for byte (the text and its ending:
# git-annex ends an error with a blank line). Expectations come from that run, not from us.
# Not compared: option errors (`--bogus`, `--uuid` without a value), which git-annex's
# option parser reports in its own format (no `git-annex-shell:` prefix, then its usage;
# the ending varies with the usage text); ours are `git-annex-shell:` lines like the rest,
# and end like them (conftest.shell_error).

REPO_UUID = "5e7e0000-0000-4000-8000-000000000001"
WRONG_UUID = "00000000-dead-4000-8000-000000000000"
CLIENT_UUID = "c1e70000-0000-4000-8000-000000000001"
SOME_KEY = "SHA256E-s6--7e4fa2eb8c7ac089739d5defc4489fad68a100d92082ca35c6b40a4524821f87.txt"
SYSTEM_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path) -> Path:
    """A server HOME holding repo.git, initialised by the real git-annex (fixed UUID)."""
    home = tmp_path_factory.mktemp("home")
    (home / ".gitconfig").write_text(
        "[user]\n\tname = admin\n\temail = admin@example.invalid\n", encoding="utf-8"
    )
    env = {**shell_env(home), "PATH": f"{annex_bin}:{SYSTEM_PATH}"}
    repo = home / "repo.git"
    for argv in (
        ["git", "init", "-q", "--bare", str(repo)],
        ["git", "-C", str(repo), "config", "annex.uuid", REPO_UUID],
        ["git", "-C", str(repo), "annex", "init", "-q", "server"],
    ):
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
    return home


def shell_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {
        "HOME": str(home),
        "PATH": SYSTEM_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        **(extra or {}),
    }


def run_both(
    our_shell: Path, real_shell: Path, argv: Sequence[str], env: Mapping[str, str], cwd: Path
) -> tuple[subprocess.CompletedProcess[bytes], subprocess.CompletedProcess[bytes]]:
    def run(shell: Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(shell), *argv],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=False,
        )

    return run(our_shell), run(real_shell)


Case = tuple[Callable[[Path], list[str]], dict[str, str]]
SHARED_ERRORS: dict[str, Case] = {
    "limited-passthrough": (
        lambda h: ["-c", f"git-upload-pack '{h}/repo.git'"],
        {"GIT_ANNEX_SHELL_LIMITED": "1"},
    ),
    "limited-true": (lambda h: ["-c", "true"], {"GIT_ANNEX_SHELL_LIMITED": "1"}),
    "directory-passthrough": (
        lambda h: ["-c", "git-upload-pack '/srv/b.git'"],
        {"GIT_ANNEX_SHELL_DIRECTORY": "/srv/a.git"},
    ),
    "directory-builtin-tilde": (
        lambda h: ["-c", f"git-annex-shell 'configlist' '{h}/b.git'"],
        {"GIT_ANNEX_SHELL_DIRECTORY": "/srv/a.git"},
    ),
    "readonly-dropkey": (
        lambda h: ["dropkey", f"{h}/repo.git", "--force", SOME_KEY],
        {"GIT_ANNEX_SHELL_READONLY": "1"},
    ),
    "appendonly-dropkey": (
        lambda h: ["dropkey", f"{h}/repo.git", "--force", SOME_KEY],
        {"GIT_ANNEX_SHELL_APPENDONLY": "1"},
    ),
    "dropkey-without-force": (lambda h: ["dropkey", f"{h}/repo.git", SOME_KEY], {}),
    "p2pstdio-missing-uuid": (lambda h: ["p2pstdio", f"{h}/repo.git"], {}),
    "uuid-mismatch-configlist": (
        lambda h: ["configlist", f"{h}/repo.git", "--uuid", WRONG_UUID],
        {},
    ),
    "uuid-mismatch-p2pstdio": (
        lambda h: ["p2pstdio", f"{h}/repo.git", CLIENT_UUID, "--uuid", WRONG_UUID],
        {},
    ),
    "not-a-repository": (lambda h: ["configlist", f"{h}/nonexistent.git"], {}),
    # git-shell's own complaint, then git-annex-shell's.
    "git-shell-failed": (lambda h: ["frobnicate", f"{h}/repo.git"], {}),
}


@pytest.mark.parametrize("case", sorted(SHARED_ERRORS))
def test_error_output_is_git_annex_shells(
    case: str, home: Path, our_shell: Path, real_annex_shell: Path
) -> None:
    make_argv, extra = SHARED_ERRORS[case]
    ours, real = run_both(
        our_shell, real_annex_shell, make_argv(home), shell_env(home, extra), home
    )
    # The case is one where git-annex-shell refuses with a message of its own.
    assert real.returncode == 1, real
    assert real.stderr.startswith(b"git-annex-shell: ") or b"\ngit-annex-shell: " in real.stderr
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        real.returncode,
        real.stdout,
        real.stderr,
    )


@pytest.mark.parametrize("argv", [[], ["-c", "configlist"]], ids=["no-args", "no-directory"])
def test_bad_parameters_is_laid_out_as_git_annex_shells(
    argv: list[str], home: Path, our_shell: Path, real_annex_shell: Path
) -> None:
    """Our usage text lists our commands, so only its frame is compared: the first line,
    the blank line after it, and how the whole ends."""
    ours, real = run_both(our_shell, real_annex_shell, argv, shell_env(home), home)
    assert ours.returncode == real.returncode == 1
    assert ours.stdout == real.stdout == b""

    def frame(err: bytes) -> tuple[list[bytes], int]:
        return err.split(b"\n")[:3], len(err) - len(err.rstrip(b"\n"))

    assert frame(ours.stderr) == frame(real.stderr), (ours.stderr, real.stderr)
def test_empty_directory_is_set_as_in_git_annex() -> None:
    """Unlike the other three variables, an empty DIRECTORY restricts (to HOME)."""
    env = {"GIT_ANNEX_SHELL_DIRECTORY": "", "HOME": "/home/u"}
    with pytest.raises(ShellError) as info:
        restrict.check_directory("/srv/r.git", env)
    assert info.value.message.startswith("Only allowed to access ~/ not /srv/r.git")
    assert restrict.check_directory("/~/", env) == "/home/u"
    assert restrict.check_directory("/srv/r.git", {"HOME": "/home/u"}) is None


@pytest.mark.parametrize(
    ("allowed", "given"),
    [("/srv/r.git", "/srv/r.git"), ("/srv/r.git", "/srv/x/../r.git/"), ("~/r.git", "r.git"),
     ("r.git", "/~/r.git"), ("/srv/r.git/", "//srv/./r.git"), ("~/r.git", "~/r.git")],
)  # fmt: skip
def test_directory_returns_the_path_to_open(allowed: str, given: str) -> None:
    env = {"GIT_ANNEX_SHELL_DIRECTORY": allowed, "HOME": "/home/u"}
    want = "/home/u/r.git" if "~" in allowed or "/" not in allowed else "/srv/r.git"
    assert restrict.check_directory(given, env) == want


def test_directory_names_equal_but_resolved_apart_is_refused() -> None:
    """`~bob/x` and `HOME/~bob/x` are one name to git-annex's comparison, two places to
    open; and `~` alone is HOME to open but `HOME/~` to compare."""
    env = {"GIT_ANNEX_SHELL_DIRECTORY": "/home/u/~root/x", "HOME": "/home/u"}
    with pytest.raises(ShellError, match=r"^Only allowed to access ~/~root/x not ~root/x$"):
        restrict.check_directory("~root/x", env)
    env = {"GIT_ANNEX_SHELL_DIRECTORY": "/home/u/~", "HOME": "/home/u"}
    with pytest.raises(ShellError, match=r"^Only allowed to access ~/~ not ~$"):
        restrict.check_directory("~", env)


def test_directory_dotdot_after_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wt").mkdir()
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "wt" / "evil").symlink_to(tmp_path / "other" / "sub")
    (tmp_path / "wt" / "plain").mkdir()
    env = {"GIT_ANNEX_SHELL_DIRECTORY": str(tmp_path / "wt"), "HOME": str(tmp_path)}
    with pytest.raises(ShellError) as info:
        restrict.check_directory(f"{tmp_path}/wt/evil/..", env)
    assert info.value.message.startswith(f"Only allowed to access ~/wt not {tmp_path}/wt/evil/..")
    for spelling in ("wt/evil/..", "/~/wt/evil/..", "~/wt/evil/../"):
        with pytest.raises(ShellError):
            restrict.check_directory(spelling, env)
    # Where `..` lands where its name says, it is fine: after a real directory, after a
    # symlink that comes back, or after the admin's own symlinked DIRECTORY.
    assert restrict.check_directory("wt/evil/../../wt", env) == f"{tmp_path}/wt"
    assert restrict.check_directory("wt/plain/..", env) == f"{tmp_path}/wt"
    (tmp_path / "link").symlink_to(tmp_path / "wt")
    env["GIT_ANNEX_SHELL_DIRECTORY"] = str(tmp_path / "link")
    assert restrict.check_directory("link/plain/..", env) == f"{tmp_path}/link"


@pytest.mark.parametrize(
    ("command", "parsed"),
    [
        ("git-upload-pack '/srv/r.git'", ("git-upload-pack", "/srv/r.git")),
        ("git upload-pack '/srv/r.git'", ("git-upload-pack", "/srv/r.git")),
        ("git\tupload-pack '/srv/r.git'", ("git-upload-pack", "/srv/r.git")),
        ("git-receive-pack '/a'\\''b'\\!'c'", ("git-receive-pack", "/a'b!c")),
        ("git-upload-archive '/r'", ("git-upload-archive", "/r")),
        ("git-upload-pack", ("git-upload-pack", None)),
        ("git-upload-pack /srv/r.git", ("git-upload-pack", None)),
        ("git-upload-pack '/srv/r.git' '/x'", ("git-upload-pack", None)),
        ("git-upload-pack '/srv/r.git", ("git-upload-pack", None)),
        ("git-upload-pack '-x'", ("git-upload-pack", None)),
        ("git-upload-pack '/a'\\x'b'", ("git-upload-pack", None)),
        ("git-upload-pack  '/r'", ("git-upload-pack", None)),
        ("git-upload-packx '/r'", None),
        ("git\vupload-pack '/r'", None),  # not a space to git
        ("cvs server", None),
        ("ls '/r'", None),
    ],
)
def test_git_request_reads_as_git_shell(
    command: str, parsed: tuple[str, str | None] | None
) -> None:
    assert passthrough.git_request(command) == parsed


@pytest.mark.parametrize("word", ["/srv/r.git", "", "it's", "!", "a'!'b", "'", "\\'", "x y"])
def test_sq_quote_round_trip(word: str) -> None:
    quoted = passthrough.sq_quote(word)
    assert passthrough.sq_dequote(quoted) == word
