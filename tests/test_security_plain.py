"""security.md's hostile input and fault catalogue, rows 1-30, 35 and 38, for a plain repository.

Each test drives our `git-annex-shell` as a subprocess, the way sshd would: the multi-argument
form (`git-annex-shell p2pstdio DIR UUID`, an account whose login shell is /bin/sh) and the
single-string form (`git-annex-shell -c "git-annex-shell 'p2pstdio' 'DIR' 'UUID'"`, a forced
command), with the GIT_ANNEX_SHELL_* restrictions in the environment. Each asserts both the
answer (exact strings where the specs give them) and that nothing was lost or written where
it should not be: the whole test directory (server HOME, the repository, the "outside"
directories an attack aims at) is snapshotted before and after.

The server repository is made once by the real git-annex (an admin's `git annex init` plus
`git annex setkey` for the content), copied per test, and real git-annex is the oracle for
object paths (`contentlocation`) and location logs (`whereis`).

Rows 31-34, 36 and 37 are about the proxy, clusters and the git relay and live elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SshEnv, SshEnvFactory, shell_error
from p2pdriver import (
    CLIENT_UUID,
    Form,
    ShellSession,
    blake2b256e_key,
    p2pstdio_argv,
    quote,
    run_shell,
    sha256e_key,
    shell_argv,
)
from test_e2e_proxy import real_git_annex_binary

from git_remote_annexproxy.keys import Key
from shell import cli
from shell.passthrough import sq_dequote, sq_quote
from shell.restrict import APPENDONLY_DENIED, READONLY_DENIED

FORMS: tuple[Form, ...] = ("multi", "single")

HELLO = b"hello world\n"
K_HELLO = sha256e_key(HELLO)  # present on the server
RESUME = b"resume me please\n"
K_RESUME = sha256e_key(RESUME)  # absent
OTHER = b"other\n"
K_OTHER = sha256e_key(OTHER)  # absent
BIG = hashlib.shake_256(b"annexproxy big").digest(1 << 20)  # 1 MiB: more than a pipe holds
K_BIG = sha256e_key(BIG, ".bin")  # present on the server

ERROR_UNKNOWN = "ERROR unknown command"
ERROR_READONLY = f"ERROR {READONLY_DENIED}"
ERROR_APPENDONLY = f"ERROR {APPENDONLY_DENIED}"

# Programs an injected command would run; each copy records that it ran, which it never may.
TRAPPED_PROGRAMS = ("rm", "bash", "sh", "touch", "id", "curl", "evil")

GITCONFIG = "[user]\n\tname = admin\n\temail = admin@example.invalid\n"


# -- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    home: Path
    repo: Path
    uuid: str


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory, annex_bin: Path) -> Template:
    """A bare repository initialised by the real git-annex, holding HELLO and BIG."""
    root = tmp_path_factory.mktemp("template")
    home = root / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(GITCONFIG, encoding="utf-8")
    repo = home / "repo.git"
    env = _admin_env(home, annex_bin)

    def admin(*args: str) -> str:
        return subprocess.run(
            list(args), cwd=repo, env=env, check=True, capture_output=True, text=True
        ).stdout

    subprocess.run(["git", "init", "-q", "--bare", str(repo)], env=env, check=True)
    admin("git", "annex", "init", "-q", "server")
    for content, key in ((HELLO, K_HELLO), (BIG, K_BIG)):
        src = root / "seed"
        src.write_bytes(content)
        admin("git", "annex", "setkey", key, str(src))
    uuid = admin("git", "config", "annex.uuid").strip()
    return Template(home, repo, uuid)


@pytest.fixture(scope="session")
def real_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose git-annex and git-annex-shell are git-annex's own binary (the
    oracle; it picks its personality from argv[0], and its proxy finds the
    git-annex-shell for its local nodes on PATH)."""
    binary = real_git_annex_binary()
    bindir = tmp_path_factory.mktemp("realbin")
    for name in ("git-annex", "git-annex-shell"):
        (bindir / name).symlink_to(binary)
    return bindir


def _admin_env(home: Path, annex_bin: Path) -> dict[str, str]:
    return {
        "HOME": str(home),
        "PATH": f"{annex_bin}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
    }


@dataclass
class Server:
    """One test's copy of the server: its HOME, the repository, and ways to reach them."""

    root: Path  # everything the test can observe lives under here
    home: Path
    repo: Path
    uuid: str
    shell: Path
    annex_bin: Path
    trap: Path  # first on the server's PATH: fake rm, sh, touch... that record being run
    outside: Path  # a directory outside the repository that attacks aim at

    @property
    def trapped(self) -> Path:
        return self.root / "TRAPPED"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """sshd's environment for the session, plus restriction variables."""
        env = {
            "HOME": str(self.home),
            "PATH": f"{self.trap}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "SHELL": "/bin/sh",
            "GIT_CONFIG_NOSYSTEM": "1",
        }
        if "PYTHONPATH" in os.environ:
            # The server runs the code the test process imports (mutation runs use this).
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        env.update(extra or {})
        return env

    def session(
        self,
        *,
        form: Form = "multi",
        directory: Path | str | None = None,
        client: str = CLIENT_UUID,
        uuid: str | None = None,
        env: Mapping[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> ShellSession:
        argv = p2pstdio_argv(self.shell, directory or self.repo, client, form=form, uuid=uuid)
        return ShellSession(argv, env=self.env(env), cwd=self.home, preexec_fn=preexec_fn)

    def run(
        self, argv_tail: Sequence[str], env: Mapping[str, str] | None = None, input: bytes = b""
    ) -> subprocess.CompletedProcess[str]:
        """git-annex-shell ARGV_TAIL... (a one-shot command: configlist, passthrough...)."""
        return run_shell(
            [str(self.shell), *argv_tail], env=self.env(env), cwd=self.home, input=input
        )

    def builtin(
        self, words: Sequence[str], form: Form, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_shell(shell_argv(self.shell, words, form), env=self.env(env), cwd=self.home)

    def admin(self, *args: str, check: bool = True) -> str:
        """Real git / git-annex in the repository, as the administrator."""
        proc = subprocess.run(
            list(args),
            cwd=self.repo,
            env=_admin_env(self.home, self.annex_bin),
            capture_output=True,
            text=True,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed: {proc.stdout}{proc.stderr}")
        return proc.stdout

    def object_path(self, key: str) -> Path | None:
        """Where real git-annex finds the object (None: not present)."""
        out = self.admin("git", "annex", "contentlocation", key, check=False).strip()
        return (self.repo / out).resolve() if out else None

    def expected_object_path(self, key: str) -> Path:
        """Where real git-annex would put the object of `key` in this bare repository."""
        out = self.admin("git", "annex", "examinekey", "--format=${objectpath}", key)
        return self.repo / out.strip()

    def partial(self, key: str) -> Path:
        return self.repo / "annex" / "tmp" / Key.parse(key).keyfile()

    def logged_here(self, key: str) -> bool:
        """Does the repository's location log (branch + journal) say it has `key`?"""
        out = self.admin("git", "annex", "whereis", "--json", "--key", key, check=False)
        if not out.strip():
            return False
        return any(w["uuid"] == self.uuid for w in json.loads(out)["whereis"])

    def has_object(self, key: str, content: bytes) -> bool:
        path = self.object_path(key)
        return path is not None and path.read_bytes() == content

    def set_config(self, name: str, value: str) -> None:
        self.admin("git", "config", name, value)


@pytest.fixture
def server(tmp_path: Path, template: Template, our_shell: Path, annex_bin: Path) -> Server:
    root = tmp_path
    home = root / "home"
    shutil.copytree(template.home, home, symlinks=True)
    trap = root / "trap"
    trap.mkdir()
    for name in TRAPPED_PROGRAMS:
        prog = trap / name
        prog.write_text(f'#!/bin/sh\necho "{name} $*" >> {root / "TRAPPED"}\n', encoding="utf-8")
        prog.chmod(0o755)
    outside = root / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious\n", encoding="utf-8")
    return Server(root, home, home / "repo.git", template.uuid, our_shell, annex_bin, trap, outside)


# -- snapshots: "nothing lost, nothing written elsewhere" --------------------------------

Entry = tuple[str, int, str]  # kind, mode, content digest or link target
Snapshot = dict[str, Entry]


def snapshot(root: Path) -> Snapshot:
    """Every path under `root` with its type, mode and content (directory mtimes ignored)."""
    state: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("l", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("d", mode, "")
            else:
                state[rel] = ("f", mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def changes(before: Snapshot, after: Snapshot) -> dict[str, tuple[Entry | None, Entry | None]]:
    return {
        p: (before.get(p), after.get(p))
        for p in before.keys() | after.keys()
        if before.get(p) != after.get(p)
    }


def assert_unchanged(
    before: Snapshot, after: Snapshot, *, allow: Callable[[str], bool] = lambda _: False
) -> None:
    """No path changed, except those `allow` accepts."""
    unexpected = {p: c for p, c in changes(before, after).items() if not allow(p)}
    assert unexpected == {}, f"unexpected changes: {unexpected}"


def store_bookkeeping(path: str) -> bool:
    """Directories the store creates on first use (empty afterwards), and annex/othertmp,
    which a branch update empties and removes as git-annex does: not content."""
    return path.startswith(
        ("home/repo.git/annex/transfer", "home/repo.git/annex/tmp", "home/repo.git/annex/othertmp")
    ) and not Path(path).name.startswith(("SHA", "WORM", "URL", "BLAKE"))


def only_dirs(before: Snapshot, after: Snapshot) -> Callable[[str], bool]:
    """Accept new directories of the store's bookkeeping, nothing else."""
    return lambda p: store_bookkeeping(p) and (after.get(p) or before.get(p) or ("",))[0] == "d"


def git_annex_shell_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("git-annex-shell:")]


def assert_refused(proc: subprocess.CompletedProcess[str], message: str | None = None) -> None:
    """Refused as the spec says: exit 1 (never 0 or 255), nothing on stdout, and exactly one
    `git-annex-shell: ...` line on stderr, the last one, ending as git-annex's errors do
    (git-shell's own `fatal:` may precede it, as with git-annex's own git-annex-shell)."""
    assert proc.returncode == 1, proc
    assert proc.stdout == "", proc
    ours = git_annex_shell_lines(proc.stderr)
    assert len(ours) == 1, proc.stderr
    assert proc.stderr.endswith(shell_error(ours[0].removeprefix("git-annex-shell: "))), proc.stderr
    assert "Traceback" not in proc.stderr
    if message is not None:
        assert ours[0] == f"git-annex-shell: {message}", proc.stderr


def not_a_repo_message(path: Path | str) -> str:
    return (
        f"failed to read git config of git repository in {socket.gethostname()} on {path}; "
        "perhaps this repository is not set up correctly or has moved"
    )


def put(s: ShellSession, key: str, content: bytes, *, validity: str = "VALID") -> str:
    """A whole PUT from offset 0; returns the final answer."""
    assert s.request(f"PUT file {key}") == "PUT-FROM 0"
    s.send_data(content)
    s.send(validity)
    return s.readline()


def fake_git_shell(server: Server) -> tuple[Path, Path]:
    """A git-shell that records its argv (and whether stdin is blocking); (dir, record)."""
    bindir = server.root / "fakegitshell"
    bindir.mkdir(exist_ok=True)
    record = server.root / "git-shell.argv"
    script = bindir / "git-shell"
    probe = (
        "import os, sys, json\n"
        f"rec = {{'argv': sys.argv, 'stdin_blocking': os.get_blocking(0)}}\n"
        f"open({str(record)!r}, 'a').write(json.dumps(rec) + '\\n')\n"
    )
    script.write_text(f"#!{sys.executable}\n{probe}", encoding="utf-8")
    script.chmod(0o755)
    return bindir, record


def read_records(record: Path) -> list[dict[str, object]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]


# == row 1: unknown command ===============================================================


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["-c", "rm -rf {outside}"],
        ["-c", "bash"],
        ["-c", "bash -c 'rm -rf {outside}'"],
        ["-c", "sh -c id"],
        ["rm", "-rf", "{outside}"],
        ["bash", "-c", "rm -rf {outside}"],
    ],
)
def test_row_01_unknown_command_is_refused_and_never_run(
    server: Server, argv_tail: list[str]
) -> None:
    """`rm -rf /` or `bash` as the command: git-shell refuses it (`fatal: unrecognized
    command` / `Run with no arguments or with -c cmd`), we say `git-annex-shell: git-shell
    failed`, exit 1, and nothing is run: every program on the server's PATH that the command
    names is a trap that would record being run."""
    argv = [a.format(outside=server.outside) for a in argv_tail]
    before = snapshot(server.root)
    env = {"SSH_ORIGINAL_COMMAND": argv[1]} if argv[0] == "-c" else {}
    proc = server.run(argv, env=env)
    assert_refused(proc, "git-shell failed")
    assert proc.stderr.startswith("fatal: ")
    assert not server.trapped.exists()
    assert_unchanged(before, snapshot(server.root))


# == row 2: shell metacharacters ===========================================================

METACHARACTERS = [
    "git-annex-shell 'configlist' '{repo}'; touch {mark}",
    "git-annex-shell 'configlist' '{repo}' && touch {mark}",
    "git-annex-shell 'configlist' '{repo}' | touch {mark}",
    "git-annex-shell 'configlist' '{repo}$(touch {mark})'",
    "git-annex-shell 'configlist' '{repo}`touch {mark}`'",
    "git-annex-shell 'configlist' '{repo}'\ntouch {mark}",
    "git-annex-shell 'p2pstdio' '{repo}' 'u' > {mark}",
    "git-upload-pack '{repo}'; touch {mark}",
    "git-upload-pack '{repo}$(touch {mark})'",
    "git-upload-pack '{repo}'\ntouch {mark}",
]


@pytest.mark.parametrize("command", METACHARACTERS)
def test_row_02_metacharacters_are_literal_and_no_shell_runs(server: Server, command: str) -> None:
    """`;`, `&&`, `|`, `$()`, backticks, `>` and a newline inside the single string are
    literal characters of words (git-annex's shellUnEscape); no shell ever sees them. The
    command fails (the words make no valid command) and no trap runs."""
    mark = server.outside / "MARK"
    text = command.format(repo=server.repo, mark=mark)
    before = snapshot(server.root)
    proc = server.run(["-c", text], env={"SSH_ORIGINAL_COMMAND": text})
    assert_refused(proc)
    assert not mark.exists()
    assert not server.trapped.exists()
    assert_unchanged(before, snapshot(server.root))


def test_row_02_substitution_is_part_of_the_directory_name(server: Server) -> None:
    """The proof that `$(...)` is literal: a repository whose name contains it is served."""
    weird = server.home / "we$(touch MARK)`id`;ird.git"
    shutil.copytree(server.repo, weird, symlinks=True)
    for form in FORMS:
        proc = server.builtin(["configlist", str(weird)], form)
        assert (proc.returncode, proc.stderr) == (0, ""), proc
        assert proc.stdout == f"annex.uuid={server.uuid}\ncore.gcrypt-id=\n"
    assert not (server.home / "MARK").exists()
    assert not server.trapped.exists()
    missing = server.builtin(["configlist", f"{server.repo}$(id)"], "single")
    assert_refused(missing, not_a_repo_message(f"{server.repo}$(id)"))


# == row 3: oversized command lines ========================================================


@pytest.mark.parametrize(
    "make_argv",
    [
        # One string past the 64 KiB cap (one argv string is limited to 128 KiB by Linux).
        pytest.param(lambda r: ["-c", f"git-annex-shell 'configlist' '{r}' " + "x" * 100_000],
                     id="100KiB-string"),
        # 1 MiB spread over 16 arguments.
        pytest.param(lambda r: ["configlist", r, *["y" * 65536] * 16], id="1MiB-argv"),
        pytest.param(lambda r: ["configlist", r, *["z"] * 10_000], id="10k-arguments"),
        # 10k words inside one 20 KB string: under the byte cap, over the word cap.
        pytest.param(lambda r: ["-c", f"git-annex-shell 'configlist' '{r}'" + " z" * 10_000],
                     id="10k-words-in-string"),
        pytest.param(lambda r: ["-c", "git-annex-shell " + " " * 60_000], id="60k-empty-words"),
    ],
)  # fmt: skip
def test_row_03_oversized_command_line_is_refused_before_parsing(
    server: Server, make_argv: Callable[[str], list[str]]
) -> None:
    before = snapshot(server.root)
    proc = server.run(make_argv(str(server.repo)))
    assert_refused(proc, "command line too long")
    assert_unchanged(before, snapshot(server.root))


def test_row_03_nul_byte_is_refused(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """execve cannot carry a NUL (C strings), so sshd never delivers one; `cli.main` called
    directly must still refuse it with a one-line error instead of a ValueError traceback."""
    with pytest.raises(ValueError, match="embedded null byte"):
        subprocess.run([str(server.shell), "configlist", "a\0b"], check=False)
    monkeypatch.setenv("HOME", str(server.home))
    for argv in (
        ["-c", f"git-annex-shell 'configlist' '{server.repo}\0x'"],
        ["configlist", f"{server.repo}\0x"],
        ["-c", f"git-upload-pack '{server.repo}\0'"],
    ):
        assert cli.main(argv) == 1
        out, err = capsys.readouterr()
        assert (out, err) == ("", shell_error("NUL byte in command line"))


# == row 4: options smuggled in as arguments ===============================================


@pytest.mark.parametrize(
    "command",
    [
        "git-upload-pack --upload-pack=touch {mark}",
        "git-upload-pack '--upload-pack=touch {mark}'",
        "git-upload-pack '--help'",
        "git-upload-pack '-c'",
        "git-receive-pack '--receive-pack=touch {mark}' '{repo}'",
    ],
)
def test_row_04_git_option_as_directory_is_a_bad_argument(server: Server, command: str) -> None:
    """git-shell refuses a directory that starts with `-` (`fatal: bad argument`); the one
    string after `-c` is all it is given, so no peer word becomes an argv entry of git."""
    mark = server.outside / "MARK"
    text = command.format(mark=mark, repo=server.repo)
    before = snapshot(server.root)
    proc = server.run(["-c", text], env={"SSH_ORIGINAL_COMMAND": text})
    assert_refused(proc, "git-shell failed")
    assert proc.stderr.startswith(("fatal: bad argument\n", "fatal: unrecognized command"))
    assert not mark.exists() and not server.trapped.exists()
    assert_unchanged(before, snapshot(server.root))


def test_row_04_peer_words_reach_git_shell_as_one_string(server: Server) -> None:
    """Design check with a recording git-shell: argv is exactly `git-shell -c <string>`."""
    bindir, record = fake_git_shell(server)
    text = f"git-upload-pack --upload-pack=touch '{server.repo}'"
    proc = server.run(["-c", text], env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc
    [rec] = read_records(record)
    assert rec["argv"][1:] == ["-c", text]  # type: ignore[index]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "words",
    [
        ["configlist", "--help"],
        ["configlist", "-c"],
        ["p2pstdio", "--upload-pack=x", "u"],
    ],
)
def test_row_04_option_as_builtin_directory_is_just_a_path(
    server: Server, form: Form, words: list[str]
) -> None:
    """A builtin's DIR that looks like an option is a path relative to HOME, nothing more."""
    before = snapshot(server.root)
    proc = server.builtin(words, form)
    assert_refused(proc, not_a_repo_message(server.home / words[1]))
    assert_unchanged(before, snapshot(server.root))


@pytest.mark.parametrize("form", FORMS)
def test_row_04_unknown_option_after_directory_is_refused(server: Server, form: Form) -> None:
    mark = server.outside / "MARK"
    proc = server.builtin(["configlist", str(server.repo), f"--upload-pack=touch>{mark}"], form)
    assert_refused(proc, f"invalid option --upload-pack=touch>{mark}")
    assert not mark.exists() and not server.trapped.exists()


# == row 5: services that are off ==========================================================


@pytest.mark.parametrize("command", ["git-upload-archive '{repo}'", "git upload-archive '{repo}'"])
def test_row_05_upload_archive_is_off_unless_enabled(server: Server, command: str) -> None:
    bindir, record = fake_git_shell(server)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    text = command.format(repo=server.repo)
    proc = server.run(["-c", text], env=env)
    assert_refused(
        proc, "git-upload-archive is disabled here (set ANNEXPROXY_ALLOW_UPLOAD_ARCHIVE=1)"
    )
    assert read_records(record) == []
    enabled = server.run(["-c", text], env={**env, "ANNEXPROXY_ALLOW_UPLOAD_ARCHIVE": "1"})
    assert enabled.returncode == 0, enabled
    assert [r["argv"][1:] for r in read_records(record)] == [["-c", text]]  # type: ignore[index]


@pytest.mark.parametrize("command", ["git-cvsserver", "cvs server", "git-cvsserver server"])
def test_row_05_cvsserver_is_refused(server: Server, command: str) -> None:
    proc = server.run(["-c", command], env={"SSH_ORIGINAL_COMMAND": command})
    assert_refused(proc, "git-shell failed")
    assert proc.stderr.startswith("fatal: unrecognized command")


@pytest.mark.parametrize("argv", [[], ["-c"], ["-c", "-c"]])
def test_row_05_interactive_login_is_refused(server: Server, argv: list[str]) -> None:
    """No command at all (an interactive login): usage, exit 1, no shell."""
    proc = server.run(argv)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("git-annex-shell: bad parameters\n\nUsage: git-annex-shell")
    assert not server.trapped.exists()


# == row 6: directory canonicalisation under GIT_ANNEX_SHELL_DIRECTORY =====================


@pytest.mark.parametrize(
    ("directory", "shown"),
    [
        ("../../etc", "{parent2}/etc"),
        ("/~nobody/", "/~nobody"),
        ("/~root/repo.git", "/~root/repo.git"),
        ("other.git", "~/other.git"),
        ("/~/other.git", "~/other.git"),
        ("repo.git/..", "~/"),
        ("//etc", "/etc"),
        ("{home}/../home/repo.git/../x", "~/x"),
    ],
)
def test_row_06_directory_outside_the_allowed_one_is_refused(
    server: Server, directory: str, shown: str
) -> None:
    d = directory.format(home=server.home)
    want = shown.format(parent2=server.home.parent.parent)
    before = snapshot(server.root)
    for form in FORMS:
        for words in (["configlist", d], ["p2pstdio", d, CLIENT_UUID]):
            proc = server.builtin(words, form, env={"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo)})
            assert_refused(proc, f"Only allowed to access ~/repo.git not {want}")
    passthrough = server.run(
        ["-c", f"git-upload-pack '{d}'"], env={"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo)}
    )
    assert_refused(passthrough, f"Only allowed to access ~/repo.git not {want}")
    assert_unchanged(before, snapshot(server.root))


@pytest.mark.parametrize(
    "directory",
    ["{repo}", "{repo}/", "repo.git", "/~/repo.git", "~/repo.git", "/{repo}",
     "{home}/sub/../repo.git", "{home}//repo.git"],
)  # fmt: skip
@pytest.mark.parametrize("allowed", ["{repo}", "~/repo.git", "/~/repo.git"])
def test_row_06_spellings_of_the_allowed_directory_are_served(
    server: Server, directory: str, allowed: str
) -> None:
    (server.home / "sub").mkdir()
    d = directory.format(repo=server.repo, home=server.home)
    env = {"GIT_ANNEX_SHELL_DIRECTORY": allowed.format(repo=server.repo)}
    proc = server.builtin(["configlist", d], "single", env=env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    assert proc.stdout == f"annex.uuid={server.uuid}\ncore.gcrypt-id=\n"


def test_row_06_unknown_user_and_relative_paths_without_restriction(server: Server) -> None:
    """Without DIRECTORY, `..` and `/~user/` resolve to paths that are not repositories."""
    for d in ("../../etc", "/~nobody/x.git"):
        proc = server.builtin(["p2pstdio", d, CLIENT_UUID], "multi")
        assert_refused(proc)
        assert "failed to read git config" in proc.stderr, (d, proc.stderr)
    proc = server.builtin(["configlist", "/~no-such-user-here/r.git"], "single")
    assert_refused(proc, "unknown user in directory /~no-such-user-here/r.git")


# The directory git is handed under DIRECTORY: the checked one, absolute, in our quoting.
HANDED_SPELLINGS = [
    "{repo}", "{repo}/", "{repo}/.", "repo.git", "~/repo.git", "/~/repo.git",
    "{home}/./repo.git", "{home}/sub/../repo.git", "{home}//repo.git",
]  # fmt: skip


@pytest.mark.parametrize("spelling", HANDED_SPELLINGS)
@pytest.mark.parametrize(
    ("command", "service"),
    [("git-upload-pack '{d}'", "git-upload-pack"), ("git upload-pack '{d}'", "git-upload-pack"),
     ("git-receive-pack '{d}'", "git-receive-pack")],
)  # fmt: skip
def test_row_06_git_is_handed_the_checked_absolute_path(
    server: Server, spelling: str, command: str, service: str
) -> None:
    """Under DIRECTORY, git-shell gets `SERVICE '<the checked path>'`, never the client's
    string: `~` and relative paths are not git's to expand (it would use its cwd and its
    own `~` rules), and `.`, `..`, `//` and a trailing slash are already resolved."""
    (server.home / "sub").mkdir()
    bindir, record = fake_git_shell(server)
    d = spelling.format(repo=server.repo, home=server.home)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "GIT_ANNEX_SHELL_DIRECTORY": str(server.repo)}
    proc = server.run(["-c", command.format(d=d)], env=env)
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    [rec] = read_records(record)
    assert rec["argv"][1:] == ["-c", f"{service} '{server.repo}'"]  # type: ignore[index]


def test_row_06_without_directory_git_gets_the_string_unchanged(server: Server) -> None:
    bindir, record = fake_git_shell(server)
    text = "git upload-pack '~/repo.git/'"
    proc = server.run(["-c", text], env={"PATH": f"{bindir}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc
    assert [r["argv"][1:] for r in read_records(record)] == [["-c", text]]  # type: ignore[index]


def _other_repository(server: Server) -> Path:
    """A second repository on the account, with a ref no client of repo.git may see."""
    other = server.home / "other.git"
    shutil.copytree(server.repo, other, symlinks=True)
    head = server.admin("git", "rev-parse", "git-annex").strip()
    subprocess.run(
        ["git", "update-ref", "refs/heads/secret", head], cwd=other, check=True,
        env=_admin_env(server.home, server.annex_bin),
    )  # fmt: skip
    return other


@pytest.mark.parametrize("service", ["git-upload-pack", "git-receive-pack"])
@pytest.mark.parametrize("form", FORMS)
def test_row_06_git_shell_gets_the_directory_that_was_checked(
    server: Server, service: str, form: Form
) -> None:
    """git-annex checks the last word of the last argument but hands git-shell the part
    before `--`: `git-annex-shell 'git-upload-pack '"'"'OTHER'"'"'' -- 'ALLOWED'` served
    OTHER (git-annex 10.20261026 does so too). The directory checked must be the one git
    reads; with real git, the other repository's refs are never advertised."""
    other = _other_repository(server)
    env = {"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo)}
    words = [f"{service} '{other}'", "--", str(server.repo)]
    argv = words if form == "multi" else ["-c", " ".join(["git-annex-shell", *map(quote, words)])]
    before = snapshot(server.root)
    proc = server.run(argv, env=env, input=b"0000")
    assert_refused(proc, "Only allowed to access ~/repo.git not ~/other.git")
    assert "refs/heads/secret" not in proc.stdout
    assert_unchanged(before, snapshot(server.root))


@pytest.mark.parametrize(
    "command",
    ["git-upload-pack {repo}", 'git-upload-pack "{repo}"', "git-upload-pack", "git-upload-pack "],
)
def test_row_06_git_argument_that_names_no_directory(server: Server, command: str) -> None:
    """Under DIRECTORY, a git service whose argument git-shell would not read as one quoted
    directory is refused here, with git-annex's message for that case."""
    bindir, record = fake_git_shell(server)
    text = command.format(repo=server.repo)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "GIT_ANNEX_SHELL_DIRECTORY": str(server.repo)}
    # The last word (git-annex's check) is the repository in the first two: let it pass.
    proc = server.run(["-c", text, "--", str(server.repo)], env=env)
    assert_refused(proc)
    assert (
        f"Only allowed to access {server.repo} and could not determine directory from command line"
        in proc.stderr
    ), proc.stderr
    assert read_records(record) == []


@pytest.mark.parametrize(
    ("allowed", "directory"),
    [("", "{repo}"), ("{home}", "{repo}"), ("{home}/", "{repo}"),
     ("{repo}", "{home}"), ("{repo}", "."), ("{repo}", "repo.git/.."), ("{repo}", "~"),
     ("{repo}", "/~")],
)  # fmt: skip
def test_row_06_messages_match_git_annex(
    server: Server, real_bin: Path, allowed: str, directory: str
) -> None:
    """The real git-annex-shell is the oracle for the refusal and its canonical forms: an
    empty DIRECTORY is set (only HOME is allowed), and HOME itself reads `~/`."""
    a = allowed.format(repo=server.repo, home=server.home)
    d = directory.format(repo=server.repo, home=server.home)
    env = {"GIT_ANNEX_SHELL_DIRECTORY": a}
    ours = server.builtin(["configlist", d], "single", env=env)
    real = run_shell(
        shell_argv(real_bin / "git-annex-shell", ["configlist", d], "single"),
        env=server.env({**env, "PATH": f"{real_bin}:/usr/bin:/bin"}),
        cwd=server.home,
    )
    # git-annex 10.20261026 ends each such message with a blank line; we end it with the line.
    assert (ours.returncode, ours.stdout, ours.stderr.rstrip("\n")) == (
        real.returncode, real.stdout, real.stderr.rstrip("\n")
    )  # fmt: skip
    assert ours.stderr.startswith("git-annex-shell: Only allowed to access "), ours.stderr


def test_row_06_sq_quote_is_what_git_shell_reads(server: Server) -> None:
    """Our quoting of the checked path is git's: real git-shell serves a repository whose
    name holds a quote, a bang, a space and a backslash."""
    weird = server.home / "it's a\\ bang!.git"
    shutil.copytree(server.repo, weird, symlinks=True)
    assert sq_dequote(sq_quote(str(weird))) == str(weird)
    proc = subprocess.run(
        ["git-shell", "-c", f"git-upload-pack {sq_quote(str(weird))}"], input=b"0000",
        capture_output=True, env=server.env(), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc
    assert b"refs/heads/git-annex" in proc.stdout


# == row 7: symlinks ========================================================================


def test_row_07_allowed_directory_through_a_symlink_is_refused(server: Server) -> None:
    link = server.home / "link.git"
    link.symlink_to(server.repo)
    env = {"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo)}
    for form in FORMS:
        proc = server.builtin(["p2pstdio", str(link), CLIENT_UUID], form, env=env)
        assert_refused(proc, "Only allowed to access ~/repo.git not ~/link.git")


def _move_out_and_link(path: Path, target: Path) -> None:
    shutil.move(path, target)
    path.symlink_to(target)


@pytest.mark.parametrize("form", FORMS)
def test_row_07_symlinked_objects_directory_is_not_followed(server: Server, form: Form) -> None:
    """annex/objects is a symlink to a directory outside: its content is invisible (not
    served, not locked, not removed) and nothing is written through it."""
    elsewhere = server.outside / "objects"
    _move_out_and_link(server.repo / "annex" / "objects", elsewhere)
    before = snapshot(server.root)
    with server.session(form=form) as s:
        s.handshake()
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "FAILURE"
        assert s.request(f"LOCKCONTENT {K_HELLO}") == "FAILURE"
        s.send(f"GET 0 f {K_HELLO}")
        assert s.read_data() == b""
        assert s.readline() == "INVALID"
        s.send("FAILURE")
        assert s.request(f"REMOVE {K_HELLO}") == "SUCCESS"  # "not present" here
        assert put(s, K_OTHER, OTHER) == "FAILURE"
        assert s.request(f"CHECKPRESENT {K_OTHER}") == "FAILURE"
        result = s.finish()
    assert result.code == 0, result.stderr
    after = snapshot(server.root)
    # Only our side of the store changed: the verified partial is kept for a later resume.
    assert_unchanged(
        before,
        after,
        allow=lambda p: store_bookkeeping(p) or p == f"home/repo.git/annex/tmp/{K_OTHER}",
    )
    assert server.partial(K_OTHER).read_bytes() == OTHER
    assert not server.logged_here(K_OTHER)


def test_row_07_symlinked_object_file_is_not_served(server: Server) -> None:
    obj = server.object_path(K_HELLO)
    assert obj is not None
    obj.parent.chmod(0o755)
    obj.unlink()
    secret = server.outside / "victim"
    obj.symlink_to(secret)
    with server.session() as s:
        s.handshake()
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "FAILURE"
        s.send(f"GET 0 f {K_HELLO}")
        assert s.read_data() == b""
        assert s.readline() == "INVALID"
        s.send("FAILURE")
        assert s.finish().code == 0
    assert secret.read_text(encoding="utf-8") == "precious\n"


@pytest.mark.parametrize("what", ["tmpdir", "partial"])
def test_row_07_symlinked_tmp_is_not_written_through(server: Server, what: str) -> None:
    """A symlink at annex/tmp, or at the partial's name, is refused with an ERROR to the PUT
    (the session goes on); the file it points to is untouched."""
    if what == "tmpdir":
        shutil.rmtree(server.repo / "annex" / "tmp", ignore_errors=True)
        (server.repo / "annex" / "tmp").symlink_to(server.outside)
    else:
        server.partial(K_OTHER).parent.mkdir(exist_ok=True)
        server.partial(K_OTHER).symlink_to(server.outside / "victim")
    before = snapshot(server.root)
    with server.session() as s:
        s.handshake()
        reply = s.request(f"PUT f {K_OTHER}")
        assert reply.startswith("ERROR cannot receive content: "), reply
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        result = s.finish()
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))
    assert (server.outside / "victim").read_text(encoding="utf-8") == "precious\n"


# -- row 7, continued: a symlink a client pushes into a non-bare DIRECTORY ----------------


@dataclass
class PushedSymlink:
    env: SshEnv  # unrestricted; `restricted` is the key limited to `wt`
    restricted: SshEnv
    wt: Path  # the allowed repository: non-bare, receive.denyCurrentBranch=updateInstead
    other: Path  # another repository of the same account
    client: Path
    secret: str  # other's HEAD, which no client of wt may see


@pytest.fixture
def pushed_symlink(ssh_env: SshEnvFactory, tmp_path: Path) -> PushedSymlink:
    """Through the fake ssh with real git: the key restricted to `wt` pushes a commit with
    `evil -> OTHER/.git`, which updateInstead checks out in wt's work tree."""
    env = ssh_env(tmp_path / "ssh")
    wt, other = env.srv / "wt", env.srv / "other"
    for repo in (wt, other):
        env.run(["git", "init", "-q", str(repo)], admin=True)
        env.run(["git", "commit", "-q", "--allow-empty", "-m", repo.name], cwd=repo, admin=True)
        env.run(["git", "annex", "init", "-q", repo.name], cwd=repo, admin=True)
    env.run(["git", "config", "receive.denyCurrentBranch", "updateInstead"], cwd=wt, admin=True)
    restricted = env.with_server(GIT_ANNEX_SHELL_DIRECTORY=str(wt))
    client = tmp_path / "client"
    restricted.run(["git", "clone", "-q", f"localhost:{wt}", str(client)])
    (client / "evil").symlink_to(other / ".git")
    env.run(["git", "add", "evil"], cwd=client)
    env.run(["git", "commit", "-q", "-m", "evil"], cwd=client)
    restricted.run(["git", "push", "-q", "origin", "main"], cwd=client)
    assert (wt / "evil").is_symlink() and (wt / "evil" / "..").resolve() == other
    secret = env.run(["git", "rev-parse", "HEAD"], cwd=other, admin=True).stdout.strip()
    return PushedSymlink(env, restricted, wt, other, client, secret)


def test_row_07_pushed_symlink_does_not_lead_git_out_of_the_directory(
    pushed_symlink: PushedSymlink,
) -> None:
    """`WT/evil/..` is WT by name (git-annex's check passes it) but OTHER to the kernel,
    which is what git opened: the other repository was served and written. Now it is
    refused, upload-pack and receive-pack alike, and OTHER is neither read nor changed."""
    p = pushed_symlink
    escaped = f"localhost:{p.wt}/evil/.."
    before = snapshot(p.other)
    listing = p.restricted.run(["git", "ls-remote", escaped], check=False)
    assert listing.returncode != 0 and p.secret not in listing.stdout, listing
    assert f"git-annex-shell: Only allowed to access {p.wt} not {p.wt}/evil/.." in listing.stderr
    fetch = p.restricted.run(["git", "fetch", "-q", escaped, "main"], cwd=p.client, check=False)
    assert fetch.returncode != 0, fetch
    known = p.env.run(["git", "cat-file", "-e", p.secret], cwd=p.client, check=False)
    assert known.returncode != 0, "the other repository's commit reached the client"
    push = p.restricted.run(
        ["git", "push", escaped, "main:refs/heads/pwned"], cwd=p.client, check=False
    )
    assert push.returncode != 0, push
    assert "Only allowed to access" in push.stderr
    assert_unchanged(before, snapshot(p.other))
    # The allowed repository itself is still served, by name.
    assert p.secret not in p.restricted.run(["git", "ls-remote", f"localhost:{p.wt}"]).stdout


def test_row_07_pushed_symlink_and_the_builtins(pushed_symlink: PushedSymlink) -> None:
    """The builtins open `WT/evil/..` by name, so they never reached OTHER; under DIRECTORY
    they now refuse that spelling too (one rule for git and the builtins)."""
    p = pushed_symlink
    other_uuid = p.env.run(["git", "config", "annex.uuid"], cwd=p.other, admin=True).stdout
    escaped = f"{p.wt}/evil/.."
    before = snapshot(p.other)
    for words in (["configlist", escaped], ["inannex", escaped, K_HELLO],
                  ["p2pstdio", escaped, CLIENT_UUID]):  # fmt: skip
        command = " ".join(["git-annex-shell", *map(quote, words)])
        proc = p.restricted.run(["ssh", "localhost", command], check=False, input="")
        assert proc.returncode == 1 and other_uuid.strip() not in proc.stdout, proc
        assert proc.stdout == "", proc
        assert proc.stderr.startswith(
            f"git-annex-shell: Only allowed to access {p.wt} not {escaped}"
        ), proc.stderr
    assert_unchanged(before, snapshot(p.other))


def test_row_07_symlink_the_admin_made_keeps_working(pushed_symlink: PushedSymlink) -> None:
    """DIRECTORY may itself be a symlink (the admin's): it is served by that name, for git
    and the builtins; the pushed symlink still cannot lead out of it."""
    p = pushed_symlink
    link = p.env.srv / "wtlink"
    link.symlink_to(p.wt)
    via_link = p.env.with_server(GIT_ANNEX_SHELL_DIRECTORY=str(link))
    wt_head = p.env.run(["git", "rev-parse", "HEAD"], cwd=p.wt, admin=True).stdout.strip()
    assert wt_head in via_link.run(["git", "ls-remote", f"localhost:{link}"]).stdout
    p.env.run(["git", "commit", "-q", "--allow-empty", "-m", "via link"], cwd=p.client)
    via_link.run(["git", "push", "-q", f"localhost:{link}", "main"], cwd=p.client)
    wt_uuid = p.env.run(["git", "config", "annex.uuid"], cwd=p.wt, admin=True).stdout.strip()
    configlist = via_link.run(["ssh", "localhost", f"git-annex-shell 'configlist' '{link}'"])
    assert configlist.stdout == f"annex.uuid={wt_uuid}\ncore.gcrypt-id=\n"
    listing = via_link.run(["git", "ls-remote", f"localhost:{link}/evil/.."], check=False)
    assert listing.returncode != 0 and p.secret not in listing.stdout, listing


# == row 8: not a repository; no upward search ===========================================


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("where", ["plain-dir", "missing", "inside-bare", "inside-worktree"])
def test_row_08_not_a_repository_and_no_upward_search(
    server: Server, form: Form, where: str
) -> None:
    worktree = server.home / "work"
    if where == "plain-dir":
        d = server.home / "plain"
        d.mkdir()
    elif where == "missing":
        d = server.home / "missing.git"
    elif where == "inside-bare":
        d = server.repo / "annex"  # a directory inside the bare repository
    else:
        # A non-bare annex repository; DIR names a directory inside its work tree.
        subprocess.run(["git", "init", "-q", str(worktree)], check=True)
        subprocess.run(
            ["git", "-C", str(worktree), "config", "annex.uuid", server.uuid], check=True
        )
        d = worktree / "sub"
        d.mkdir()
    before = snapshot(server.root)
    for words in (["p2pstdio", str(d), CLIENT_UUID], ["configlist", str(d)]):
        proc = server.builtin(words, form)
        assert_refused(proc, not_a_repo_message(d))
    assert_unchanged(before, snapshot(server.root))


# == row 9: ownership and permissions ======================================================


def _plant_hook(server: Server) -> Path:
    ran = server.outside / "HOOK-RAN"
    hook = server.repo / "hooks" / "post-update-annex"
    hook.write_text(f"#!/bin/sh\necho ran > {ran}\n", encoding="utf-8")
    hook.chmod(0o755)
    return ran


def test_row_09_hooks_do_run_for_a_trusted_repository(server: Server) -> None:
    """Positive control for the two tests below: a PUT commits the branch, which runs the
    post-update-annex hook, so "the hook did not run" there means something."""
    ran = _plant_hook(server)
    with server.session() as s:
        s.handshake()
        assert put(s, K_OTHER, OTHER) == "SUCCESS"
        assert s.finish().code == 0
    assert ran.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the repository away")
def test_row_09_repository_owned_by_another_user_is_refused(server: Server) -> None:
    ran = _plant_hook(server)
    for dirpath, dirnames, filenames in os.walk(server.repo):
        for name in [*dirnames, *filenames, "."]:
            os.lchown(Path(dirpath, name), 65534, 65534)
    before = snapshot(server.root)
    message = (
        f"detected dubious ownership in repository at {server.repo} (owned by uid 65534); "
        "refusing to use it (see git-config safe.directory)"
    )
    for form in FORMS:
        with server.session(form=form) as s:
            assert s.at_eof()  # not even AUTH-SUCCESS
            result = s.finish()
        assert result.code == 1
        assert result.stderr == shell_error(message)  # git's refusal, in git-annex's layout
        assert_refused(server.builtin(["configlist", str(server.repo)], form), message)
    assert not ran.exists()
    assert_unchanged(before, snapshot(server.root))
    # The administrator's way in, as with git: safe.directory in the global config.
    with open(server.home / ".gitconfig", "a", encoding="utf-8") as fh:
        fh.write(f"[safe]\n\tdirectory = {server.repo}\n")
    proc = server.builtin(["configlist", str(server.repo)], "single")
    assert proc.returncode == 0 and proc.stdout.startswith(f"annex.uuid={server.uuid}\n")


def test_row_09_world_writable_repository_is_refused(server: Server) -> None:
    ran = _plant_hook(server)
    server.repo.chmod(0o777)
    before = snapshot(server.root)
    message = (
        f"refusing to use world-writable repository at {server.repo} "
        "(see git-config safe.directory)"
    )
    for form in FORMS:
        with server.session(form=form) as s:
            assert s.at_eof()  # not even AUTH-SUCCESS
            result = s.finish()
        assert (result.code, result.stderr) == (1, shell_error(message))  # ours only
    assert not ran.exists()
    assert_unchanged(before, snapshot(server.root))
    server.repo.chmod(0o1777)  # sticky: others cannot replace what is there
    proc = server.builtin(["configlist", str(server.repo)], "multi")
    assert proc.returncode == 0, proc


# == row 10: --uuid =========================================================================


@pytest.mark.parametrize("form", FORMS)
def test_row_10_uuid_mismatch_is_refused_before_anything(
    server: Server, form: Form, real_annex_shell: Path
) -> None:
    wrong = "00000000-dead-4000-8000-000000000000"
    before = snapshot(server.root)
    with server.session(form=form, uuid=wrong) as s:
        assert s.at_eof()
        result = s.finish()
    assert result.code == 1
    proc = server.builtin(["configlist", str(server.repo), "--uuid", wrong], form)
    assert_refused(proc, f"expected repository UUID {wrong} but found UUID {server.uuid}")
    assert_unchanged(before, snapshot(server.root))
    assert server.has_object(K_HELLO, HELLO)
    # git-annex's own git-annex-shell on the same command line says the same, byte for byte
    # (run last: it writes annex/mergedrefs, which ours leaves alone).
    argv = p2pstdio_argv(real_annex_shell, server.repo, form=form, uuid=wrong)
    real = run_shell(argv, env=server.env(), cwd=server.home)
    assert (real.returncode, real.stdout) == (1, "")
    assert result.stderr == real.stderr
    assert f"expected repository UUID {wrong} but found UUID {server.uuid}" in real.stderr
    # The right UUID is served.
    with server.session(form=form, uuid=server.uuid) as s:
        assert s.handshake() == server.uuid


def test_row_10_uuid_against_an_uninitialised_repository(server: Server) -> None:
    bare = server.home / "fresh.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    before = snapshot(server.root)
    proc = server.builtin(["p2pstdio", str(bare), CLIENT_UUID, "--uuid", server.uuid], "single")
    assert_refused(
        proc, f"expected repository UUID {server.uuid} but found uninitialized repository"
    )
    assert_unchanged(before, snapshot(server.root))


# -- row 10, continued: --uuid and the nodes of a proxy under DIRECTORY ------------------


@dataclass(frozen=True)
class ProxyNodes:
    uuids: dict[str, str]  # node name -> UUID; node1 holds HELLO
    cluster: str  # the UUID of a cluster of both nodes, repo.git its gateway
    special: str  # a directory special remote the proxy serves itself


@pytest.fixture
def proxy_nodes(server: Server) -> ProxyNodes:
    """repo.git proxies for two local nodes (node1 by absolute path, node2 by a path relative
    to the repository, `../node2.git`), is the gateway of a cluster of both, and proxies for
    a directory special remote; laid out by the admin with the real git-annex."""
    env = _admin_env(server.home, server.annex_bin)
    uuids = {}
    for name, url in (("node1", str(server.home / "node1.git")), ("node2", "../node2.git")):
        path = server.home / f"{name}.git"
        subprocess.run(["git", "init", "-q", "--bare", str(path)], env=env, check=True)
        subprocess.run(["git", "annex", "init", "-q", name], cwd=path, env=env, check=True)
        uuids[name] = subprocess.run(
            ["git", "config", "annex.uuid"], cwd=path, env=env, check=True,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        server.admin("git", "remote", "add", name, url)
    seed = server.root / "seed"
    seed.write_bytes(HELLO)
    subprocess.run(
        ["git", "annex", "setkey", K_HELLO, str(seed)], cwd=server.home / "node1.git", env=env,
        check=True, capture_output=True,
    )  # fmt: skip
    server.admin("git", "annex", "sync", "-q", "--no-content", "node1", "node2")
    (server.root / "dirsr").mkdir()
    server.admin("git", "annex", "initremote", "-q", "sr", "type=directory",
                 f"directory={server.root / 'dirsr'}", "encryption=none")  # fmt: skip
    server.admin("git", "annex", "initcluster", "-q", "mycluster")
    for name in ("node1", "node2", "sr"):
        if name != "sr":
            server.set_config(f"remote.{name}.annex-cluster-node", "mycluster")
        server.set_config(f"remote.{name}.annex-proxy", "true")
    server.admin("git", "annex", "updatecluster")
    server.admin("git", "annex", "updateproxy")
    return ProxyNodes(
        uuids=uuids,
        cluster=server.admin("git", "config", "annex.cluster.mycluster").strip(),
        special=server.admin("git", "config", "remote.sr.annex-uuid").strip(),
    )


def _p2p_once(
    server: Server, shell: Path, uuid: str, requests: str, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    argv = p2pstdio_argv(shell, server.repo, CLIENT_UUID, uuid=uuid, form="single")
    return run_shell(argv, env=server.env(env), cwd=server.home, input=requests.encode())


@pytest.mark.parametrize("link", ["noderpc", "p2p"])
@pytest.mark.parametrize("node", ["node1", "node2"])
def test_row_10_uuid_of_a_local_node_outside_directory_byte_for_byte(
    server: Server, proxy_nodes: ProxyNodes, real_bin: Path, node: str, link: str
) -> None:
    """With DIRECTORY = the proxy, `--uuid NODE` used to reach the node: restriction
    variables are dropped on node hops. git-annex's proxy starts the local node's
    git-annex-shell with DIRECTORY inherited, which refuses it; the real binary is the
    oracle, byte for byte on stdout and stderr, and the exit status (node2's URL is
    relative: it names ~/node2.git, as git-annex reads it, not a path under our cwd)."""
    if link == "p2p":
        server.set_config(f"remote.{node}.annexproxy-link", "p2p")
    env = {"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo), "PATH": f"{real_bin}:/usr/bin:/bin"}
    uuid = proxy_nodes.uuids[node]
    before = snapshot(server.root)
    ours = _p2p_once(server, server.shell, uuid, f"VERSION 2\nCHECKPRESENT {K_HELLO}\n", env)
    real = _p2p_once(
        server, real_bin / "git-annex-shell", uuid, f"VERSION 2\nCHECKPRESENT {K_HELLO}\n", env
    )
    expected = (
        1,
        f"AUTH-SUCCESS {uuid}\n",
        f"git-annex-shell: Only allowed to access ~/repo.git not ~/{node}.git\n\n"
        "git-annex: Unable to connect to remote.\np2pstdio: 1 failed\n",
    )
    assert (real.returncode, real.stdout, real.stderr) == expected
    assert (ours.returncode, ours.stdout, ours.stderr) == expected
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))


def test_row_10_nodes_reached_without_directory_and_with_the_opt_in(
    server: Server, proxy_nodes: ProxyNodes
) -> None:
    """Without DIRECTORY both nodes answer (node2 by its relative URL); with
    ANNEXPROXY_DIRECTORY_NODES=1 beside DIRECTORY (annexproxy only) the key may reach the
    nodes its proxy is configured for."""
    for env in ({}, {"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo),
                     "ANNEXPROXY_DIRECTORY_NODES": "1"}):  # fmt: skip
        for node, answer in (("node1", "SUCCESS"), ("node2", "FAILURE")):
            uuid = proxy_nodes.uuids[node]
            proc = _p2p_once(
                server, server.shell, uuid, f"VERSION 2\nCHECKPRESENT {K_HELLO}\n", env
            )
            assert (proc.returncode, proc.stderr) == (0, ""), (env, node, proc)
            assert proc.stdout.endswith(f"\n{answer}\n"), (env, node, proc.stdout)


def test_row_10_cluster_and_special_remote_under_directory(
    server: Server, proxy_nodes: ProxyNodes, real_bin: Path
) -> None:
    """Through the cluster, nodes outside DIRECTORY are not reached either: git-annex ends
    the session when it needs one, our gateway counts the node as unavailable (its rule for
    any node that cannot be reached) and says why. A special remote is served in the
    proxy's own process by both, so DIRECTORY (the proxy) allows it."""
    env = {"GIT_ANNEX_SHELL_DIRECTORY": str(server.repo), "PATH": f"{real_bin}:/usr/bin:/bin"}
    requests = f"VERSION 2\nCHECKPRESENT {K_HELLO}\n"
    for shell in (server.shell, real_bin / "git-annex-shell"):
        proc = _p2p_once(server, shell, proxy_nodes.cluster, requests, env)
        assert "SUCCESS" not in proc.stdout.splitlines(), (shell, proc)
        assert "Only allowed to access ~/repo.git not ~/node1.git" in proc.stderr, proc.stderr
        special = _p2p_once(server, shell, proxy_nodes.special, requests, env)
        assert (special.returncode, special.stdout.splitlines()[-1]) == (0, "FAILURE"), special
        assert "Only allowed" not in special.stderr, special
    ours = _p2p_once(server, server.shell, proxy_nodes.cluster, requests, env)
    assert (ours.returncode, ours.stdout.splitlines()[-1]) == (0, "FAILURE"), ours


# == row 11: fields ==========================================================================


def _fresh_bare(server: Server) -> Path:
    bare = server.home / "fresh.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    return bare


@pytest.mark.parametrize("form", FORMS)
def test_row_11_unknown_fields_are_ignored_autoinit_honoured(server: Server, form: Form) -> None:
    bare = _fresh_bare(server)
    words = ["configlist", str(bare), "--", "evil=1", "autoinit=1", "remoteuuid=../x", "--"]
    proc = server.builtin(words, form)
    assert proc.returncode == 0, proc
    uuid = proc.stdout.splitlines()[0].removeprefix("annex.uuid=")
    assert len(uuid) == 36 and proc.stdout == f"annex.uuid={uuid}\ncore.gcrypt-id=\n"
    config = (bare / "config").read_text(encoding="utf-8")
    assert f"uuid = {uuid}" in config
    assert "evil" not in config and "../x" not in config


@pytest.mark.parametrize(
    "fields", [["autoinit=yes"], ["autoinit=0"], ["evil=1"], ["autoinit"], ["AUTOINIT=1"]]
)
def test_row_11_no_autoinit_without_the_exact_field(server: Server, fields: list[str]) -> None:
    bare = _fresh_bare(server)
    before = snapshot(server.root)
    proc = server.builtin(["configlist", str(bare), "--", *fields, "--"], "single")
    assert (proc.returncode, proc.stdout) == (0, "annex.uuid=\ncore.gcrypt-id=\n"), proc
    assert_unchanged(before, snapshot(server.root))


def test_row_11_autoinit_is_a_write_readonly_blocks(server: Server) -> None:
    bare = _fresh_bare(server)
    before = snapshot(server.root)
    proc = server.builtin(
        ["configlist", str(bare), "--", "autoinit=1", "--"],
        "single",
        env={"GIT_ANNEX_SHELL_READONLY": "1"},
    )
    assert_refused(proc, "Action blocked by GIT_ANNEX_SHELL_READONLY")
    assert_unchanged(before, snapshot(server.root))


def test_row_11_autoinit_only_for_configlist(server: Server) -> None:
    bare = _fresh_bare(server)
    before = snapshot(server.root)
    proc = server.builtin(["p2pstdio", str(bare), CLIENT_UUID, "--", "autoinit=1", "--"], "multi")
    assert_refused(proc, "not a git-annex repository (no annex.uuid)")
    assert_unchanged(before, snapshot(server.root))


# == rows 12 and 13: READONLY and APPENDONLY ===============================================


@pytest.mark.parametrize("form", FORMS)
def test_row_12_readonly_refuses_every_write_and_stays_usable(server: Server, form: Form) -> None:
    before = snapshot(server.root)
    with server.session(form=form, env={"GIT_ANNEX_SHELL_READONLY": "1"}) as s:
        s.handshake()
        assert s.request(f"PUT f {K_OTHER}") == ERROR_READONLY
        assert s.request(f"REMOVE {K_HELLO}") == ERROR_READONLY
        assert s.request(f"REMOVE-BEFORE 999999999999 {K_HELLO}") == ERROR_READONLY
        assert s.request("CONNECT git-receive-pack") == ERROR_READONLY
        # Still usable, and reading is allowed.
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        s.send(f"GET 6 f {K_HELLO}")
        assert s.read_data() == HELLO[6:]
        assert s.readline() == "VALID"
        s.send("SUCCESS")
        assert s.request(f"CHECKPRESENT {K_OTHER}") == "FAILURE"
        result = s.finish()
    assert result.code == 0, result.stderr
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))
    assert server.has_object(K_HELLO, HELLO) and server.logged_here(K_HELLO)


@pytest.mark.parametrize(
    ("words", "variable"),
    [
        (["dropkey", "{repo}", "--force", K_HELLO], "READONLY"),
        (["recvkey", "{repo}", K_OTHER], "READONLY"),
        (["gcryptsetup", "{repo}", "x"], "READONLY"),
        (["dropkey", "{repo}", "--force", K_HELLO], "APPENDONLY"),
        (["gcryptsetup", "{repo}", "x"], "APPENDONLY"),
    ],
)
def test_row_12_13_write_builtins_are_blocked(
    server: Server, words: list[str], variable: str
) -> None:
    before = snapshot(server.root)
    argv = [w.format(repo=server.repo) for w in words]
    for form in FORMS:
        proc = server.builtin(argv, form, env={f"GIT_ANNEX_SHELL_{variable}": "true"})
        assert_refused(proc, f"Action blocked by GIT_ANNEX_SHELL_{variable}")
    assert_unchanged(before, snapshot(server.root))


def test_row_12_readonly_does_not_reach_git_shell(server: Server) -> None:
    """Per annex-shell.md §4/§5 (observed with git-annex), READONLY and APPENDONLY do not
    apply to git's own commands: `git-receive-pack` is handed to git-shell. LIMITED is the
    admin's lock-down for git (row 14)."""
    bindir, record = fake_git_shell(server)
    text = f"git-receive-pack '{server.repo}'"
    for var in ("GIT_ANNEX_SHELL_READONLY", "GIT_ANNEX_SHELL_APPENDONLY"):
        proc = server.run(["-c", text], env={"PATH": f"{bindir}:/usr/bin:/bin", var: "1"})
        assert proc.returncode == 0, proc
    assert len(read_records(record)) == 2


@pytest.mark.parametrize("form", FORMS)
def test_row_13_appendonly_refuses_removal_allows_put(server: Server, form: Form) -> None:
    before = snapshot(server.root)
    with server.session(form=form, env={"GIT_ANNEX_SHELL_APPENDONLY": "1"}) as s:
        s.handshake()
        assert s.request(f"REMOVE {K_HELLO}") == ERROR_APPENDONLY
        assert s.request(f"REMOVE-BEFORE 999999999999 {K_HELLO}") == ERROR_APPENDONLY
        assert s.request("CONNECT git-receive-pack") == ERROR_READONLY
        assert put(s, K_OTHER, OTHER) == "SUCCESS"
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        result = s.finish()
    after = snapshot(server.root)  # before real git-annex tidies up below
    assert result.code == 0, result.stderr
    assert server.has_object(K_HELLO, HELLO) and server.logged_here(K_HELLO)
    assert server.has_object(K_OTHER, OTHER) and server.logged_here(K_OTHER)
    # Nothing was removed: every path that existed before still does.
    lost = [
        p
        for p in before
        if p not in after
        and not p.startswith("home/repo.git/annex/journal")
        and not store_bookkeeping(p)
    ]
    assert lost == []


def test_row_13_appendonly_ref_rewrites_are_gits_job(
    ssh_env: SshEnvFactory, tmp_path: Path
) -> None:
    """Row 13's "receive-pack that deletes or force-updates refs": APPENDONLY does not reach
    git-shell (annex-shell.md §4, observed with git-annex), so ref rules are git's own
    (`receive.denyDeletes`, `receive.denyNonFastForwards`), which an append-only server's
    admin sets. Through the fake ssh with the real client, this checks that our pass-through
    keeps git's verdict: the rewriting pushes fail, the ref is unchanged, appending works."""
    env = ssh_env(tmp_path / "ssh")
    repo = env.make_server_repo("repo.git")
    for name in ("receive.denyDeletes", "receive.denyNonFastForwards"):
        env.run(["git", "config", name, "true"], cwd=repo, admin=True)
    client = tmp_path / "client"
    env.run(["git", "clone", "-q", f"localhost:{repo}", str(client)])
    env.run(["git", "commit", "-q", "--allow-empty", "-m", "one"], cwd=client)
    ao = env.with_server(GIT_ANNEX_SHELL_APPENDONLY="1")
    ao.run(["git", "push", "-q", "origin", "main"], cwd=client)

    def server_main() -> str:
        return env.run(["git", "rev-parse", "main"], cwd=repo, admin=True).stdout.strip()

    head = server_main()
    env.run(["git", "commit", "-q", "--amend", "--allow-empty", "-m", "rewritten"], cwd=client)
    for refspec in ("+main:main", ":main"):
        proc = ao.run(["git", "push", "origin", refspec], cwd=client, check=False)
        assert proc.returncode != 0, proc
        assert server_main() == head
    env.run(["git", "reset", "-q", "--hard", head], cwd=client)
    env.run(["git", "commit", "-q", "--allow-empty", "-m", "two"], cwd=client)
    ao.run(["git", "push", "-q", "origin", "main"], cwd=client)
    assert server_main() != head


# == row 14: LIMITED ========================================================================


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["-c", "git-upload-pack '{repo}'"],
        ["-c", "git-receive-pack '{repo}'"],
        ["git-upload-pack", "{repo}"],
        ["-c", "frobnicate"],
    ],
)
def test_row_14_limited_blocks_every_passthrough(
    server: Server, argv_tail: list[str], real_annex_shell: Path
) -> None:
    bindir, record = fake_git_shell(server)
    argv = [a.format(repo=server.repo) for a in argv_tail]
    before = snapshot(server.root)
    env = {"GIT_ANNEX_SHELL_LIMITED": "1", "PATH": f"{bindir}:/usr/bin:/bin"}
    proc = server.run(argv, env=env)
    assert_refused(proc, "Action blocked by GIT_ANNEX_SHELL_LIMITED")
    # As git-annex's own git-annex-shell refuses the same command line, byte for byte.
    real = run_shell([str(real_annex_shell), *argv], env=server.env(env), cwd=server.home)
    assert (proc.returncode, proc.stderr) == (real.returncode, real.stderr)
    assert read_records(record) == []
    assert_unchanged(before, snapshot(server.root))


def test_row_14_limited_still_serves_the_annex(server: Server) -> None:
    env = {"GIT_ANNEX_SHELL_LIMITED": "1"}
    proc = server.builtin(["configlist", str(server.repo)], "single", env=env)
    assert proc.returncode == 0 and proc.stdout.startswith(f"annex.uuid={server.uuid}")
    with server.session(form="single", env=env) as s:
        s.handshake()
        assert put(s, K_OTHER, OTHER) == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(K_OTHER, OTHER)


# == row 15: protocol grammar ===============================================================


@pytest.mark.parametrize("form", FORMS)
def test_row_15_malformed_requests_get_error_and_the_loop_goes_on(
    server: Server, form: Form
) -> None:
    before = snapshot(server.root)
    with server.session(form=form) as s:
        s.handshake(version=None)
        # Requests before any VERSION are served at version 0 (no VALID after DATA).
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        s.send(f"GET 0 f {K_HELLO}")
        assert s.read_data() == HELLO
        s.send("SUCCESS")
        for line in (
            "version 1",
            "checkpresent " + K_HELLO,
            "FROBNICATE",
            "CHECKPRESENT",
            "CHECKPRESENT ",
            "CHECKPRESENT not-a-key",
            "CHECKPRESENT SHA256E-s3-x5--abc",
            "GETTIMESTAMP now",
            "VERSION 4 5",
            "VERSION -1",
            "UNLOCKCONTENT " + K_HELLO,
            "SUCCESS  ",
            "GET 0 /etc/passwd " + K_HELLO,
            "",
        ):
            assert s.request(line) == ERROR_UNKNOWN, line
        assert (
            s.request("AUTH c1e70000-0000-4000-8000-000000000001 t") == "ERROR unexpected command"
        )
        assert s.request("SUCCESS") == "ERROR unexpected command"
        # CRLF is accepted, and the session is still in step.
        s.send_raw(f"CHECKPRESENT {K_HELLO}\r\n".encode())
        assert s.readline() == "SUCCESS"
        assert s.request("VERSION 4") == "VERSION 4"
        result = s.finish()
    assert (result.code, result.stdout) == (0, b""), result.stderr
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))


# == row 16: overlong line ==================================================================


def _peak_rss_kib(s: ShellSession) -> int:
    assert s.rusage is not None
    return int(s.rusage.ru_maxrss)


def test_row_16_overlong_line_is_fatal_and_memory_stays_bounded(server: Server) -> None:
    with server.session() as s:
        s.handshake()
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        baseline = s.finish()
    assert baseline.code == 0
    base_kib = _peak_rss_kib(s)

    sent = 0
    chunk = b"a" * (1 << 20)
    with server.session() as s:
        s.handshake()
        s.send_raw(b"CHECKPRESENT ")
        try:
            while sent < 100 << 20:
                s.send_raw(chunk)
                sent += len(chunk)
        except BrokenPipeError:
            pass
        assert s.at_eof()  # no reply at all: the line is not answered
        result = s.finish()
    assert sent < 8 << 20, "the server kept reading a line far past the cap"
    assert result.code == 1
    assert result.stderr == "git-annex-shell: protocol error\n"
    assert _peak_rss_kib(s) < base_kib + 16 * 1024, (base_kib, _peak_rss_kib(s))


# == row 17: bad DATA headers ===============================================================


@pytest.mark.parametrize(
    "header", ["DATA -1", "DATA 1e9999", "DATA 0x10", "DATA ٣", "DATA +17", "DATA 1 7",
               "DATA 99999999999999999999999", "DATA ", "DATA"],
)  # fmt: skip
@pytest.mark.parametrize("where", ["after-put-from", "top-level"])
def test_row_17_unreadable_data_header_closes_the_session(
    server: Server, header: str, where: str
) -> None:
    """An unreadable DATA header loses the framing: no reply, exit 1 with `protocol error`,
    never a read of a negative or absurd length (the test would hang or the server crash)."""
    before = snapshot(server.root)
    with server.session() as s:
        s.handshake()
        if where == "after-put-from":
            assert s.request(f"PUT f {K_RESUME}") == "PUT-FROM 0"
        try:
            s.send(header)
            s.send_raw(RESUME)
        except BrokenPipeError:
            pass  # it may already have gone, which is the point
        assert s.at_eof()
        result = s.finish()
    assert result.code == 1
    assert result.stderr == "git-annex-shell: protocol error\n"
    assert server.object_path(K_RESUME) is None
    partial = server.partial(K_RESUME)
    assert not partial.exists() or partial.stat().st_size == 0
    assert_unchanged(
        before,
        snapshot(server.root),
        allow=lambda p: store_bookkeeping(p) or p == f"home/repo.git/annex/tmp/{K_RESUME}",
    )


# == row 18: DATA of the wrong size ===========================================================


@pytest.mark.parametrize("length", [len(RESUME) + 3, len(RESUME) - 5, 0, 1 << 20])
def test_row_18_data_of_the_wrong_size_fails_before_any_write(server: Server, length: int) -> None:
    """DATA whose length disagrees with the key's size: FAILURE before a byte is written,
    and the session stays in step. (There is no free-space budget such as annex.diskreserve
    in the plain server: a DATA larger than the disk fails on the write, row 29.)"""
    payload = (RESUME * (length // len(RESUME) + 1))[:length]
    with server.session() as s:
        s.handshake()
        assert s.request(f"PUT f {K_RESUME}") == "PUT-FROM 0"
        s.send_data(payload)
        s.send("VALID")
        assert s.readline() == "FAILURE"
        partial = server.partial(K_RESUME)
        assert not partial.exists() or partial.stat().st_size == 0  # no tmp growth
        # In step: the right content is accepted next.
        assert put(s, K_RESUME, RESUME) == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(K_RESUME, RESUME)


# == row 19: offsets ==========================================================================


def test_row_19_negative_and_past_the_end_offsets(server: Server) -> None:
    with server.session() as s:
        s.handshake()
        # git-annex answers GET -5 with a DATA header and then dies mid-stream; we refuse it.
        assert s.request(f"GET -5 f {K_HELLO}") == ERROR_UNKNOWN
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"  # no stray DATA bytes
        for offset, want in ((100, b""), (12, b""), (6, b"world\n"), (0, HELLO)):
            s.send(f"GET {offset} f {K_HELLO}")
            assert s.read_data() == want
            assert s.readline() == "VALID"
            s.send("SUCCESS")
        assert s.request("PUT-FROM 3") == "ERROR unexpected command"
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        assert s.finish().code == 0


def test_row_19_partial_longer_than_the_key_restarts_at_zero(server: Server) -> None:
    partial = server.partial(K_RESUME)
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(b"x" * (len(RESUME) + 10))
    with server.session() as s:
        s.handshake()
        assert put(s, K_RESUME, RESUME) == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(K_RESUME, RESUME)
    assert not partial.exists()


# == row 20: hostile key names ================================================================


@pytest.mark.parametrize(
    "name",
    ["../../../../../../evil", "a%b&c:d", "sl/ash", "&a%s&c", "..", ".", "-rf", "sp ace", "ü"],
)
def test_row_20_key_names_are_escaped_like_keyfile(server: Server, name: str) -> None:
    """Stored at the path real git-annex computes for the key (`examinekey`), under
    annex/objects, and real git-annex finds it there (`contentlocation`); nothing else."""
    key = f"WORM-s1-m1--{name}"
    before = snapshot(server.root)
    with server.session() as s:
        s.handshake()
        assert put(s, key, b"!") == "SUCCESS"
        assert s.request(f"CHECKPRESENT {key}") == "SUCCESS"
        assert s.finish().code == 0
    after = snapshot(server.root)
    found = server.object_path(key)
    assert found is not None
    # examinekey cuts a key at a space (a quirk of its argument parsing); contentlocation
    # and the P2P protocol do not, so for that name the located path is the oracle.
    expected = found if " " in key else server.expected_object_path(key)
    assert found == expected.resolve()
    assert expected.read_bytes() == b"!"
    objects = (server.repo / "annex" / "objects").resolve()
    assert objects in expected.resolve().parents
    # Every change is inside the repository; inside annex/, only the new object's own
    # directories, the journal and the branch's index; the rest is the git-annex branch
    # commit (git objects, refs/heads/git-annex).
    keydirs = {
        str(q.relative_to(server.root))
        for q in [expected, *expected.parents]
        if server.root in q.parents
    }
    for path in changes(before, after):
        assert path.startswith("home/repo.git/"), path
        if path.startswith("home/repo.git/annex/"):
            assert (
                path in keydirs
                or path.startswith(("home/repo.git/annex/journal", "home/repo.git/annex/index"))
                or store_bookkeeping(path)
            ), path
    assert server.logged_here(key)


@pytest.mark.parametrize(
    ("key", "first"),
    [
        ("WORM-s1-m1--" + "a" * 4096, "ERROR cannot receive content: File name too long"),
        ("WORM-s1-m1--a\0b", ERROR_UNKNOWN),
        (f"{K_HELLO}\r", ERROR_UNKNOWN),
        ("SHA256E-s1--" + "b" * 9000, ERROR_UNKNOWN),
    ],
)
def test_row_20_unstorable_keys_are_refused_and_the_session_goes_on(
    server: Server, key: str, first: str
) -> None:
    """A key too long for a file name, with a NUL, ending in CR, or past 8 KiB: refused, no
    traceback, nothing written, and the session still answers."""
    before = snapshot(server.root)
    with server.session() as s:
        s.handshake()
        # CRLF endings: the CR is stripped, so a key ending in CR keeps its own.
        s.send_raw(f"PUT f {key}\r\n".encode("utf-8", "surrogateescape"))
        assert s.readline() == first
        s.send_raw(f"CHECKPRESENT {key}\r\n".encode("utf-8", "surrogateescape"))
        assert s.readline() in {"FAILURE", ERROR_UNKNOWN}
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        result = s.finish()
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))


# == rows 21, 22 and 25: verification ===========================================================


@pytest.mark.parametrize(
    ("key", "good"),
    [(K_OTHER, OTHER), (blake2b256e_key(OTHER), OTHER)],
    ids=["SHA256E", "BLAKE2B256E"],
)
@pytest.mark.parametrize("validity", ["VALID", "INVALID"])
def test_row_21_25_wrong_content_fails_verification(
    server: Server, key: str, good: bytes, validity: str
) -> None:
    """Bytes that do not hash to the key: FAILURE, `Verification of content failed` on
    stderr, partial deleted, object absent, nothing logged. With INVALID (row 25) the check
    is the same. Right bytes afterwards are stored."""
    before = snapshot(server.root)
    with server.session() as s:
        s.handshake()
        assert put(s, key, b"X" * len(good), validity=validity) == "FAILURE"
        assert not server.partial(key).exists()
        assert s.request(f"CHECKPRESENT {key}") == "FAILURE"
        mid = s.finish()
    assert mid.code == 0
    assert "Verification of content failed" in mid.stderr
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))
    assert not server.logged_here(key)
    with server.session() as s:
        s.handshake()
        assert put(s, key, good, validity=validity) == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(key, good) and server.logged_here(key)


def test_row_22_unverifiable_keys_check_the_size_only(server: Server) -> None:
    """WORM and URL keys carry no hash: the size is all that can be checked. Documented:
    any bytes of the right size are stored (git-annex does the same)."""
    worm = "WORM-s5-m1--x"
    with server.session() as s:
        s.handshake()
        assert put(s, worm, b"four") == "FAILURE"  # 4 bytes for a 5-byte key
        assert s.request(f"CHECKPRESENT {worm}") == "FAILURE"
        assert put(s, worm, b"hello") == "SUCCESS"
        url = "URL--http://example.com/x"
        assert put(s, url, b"anything at all") == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(worm, b"hello")
    assert server.has_object(url, b"anything at all")


def test_row_25_data_0_invalid_means_the_sender_had_nothing(server: Server) -> None:
    partial = server.partial(K_RESUME)
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(RESUME)  # complete, as after a cut at the very end
    with server.session() as s:
        s.handshake()
        assert s.request(f"PUT f {K_RESUME}") == f"PUT-FROM {len(RESUME)}"
        s.send_data(b"")
        s.send("INVALID")
        assert s.readline() == "FAILURE"
        assert s.finish().code == 0
    assert server.object_path(K_RESUME) is None


# == row 23: client cut mid-PUT =================================================================


@pytest.mark.parametrize("form", FORMS)
def test_row_23_cut_mid_put_keeps_the_partial_and_resumes(server: Server, form: Form) -> None:
    with server.session(form=form) as s:
        s.handshake()
        assert s.request(f"PUT f {K_RESUME}") == "PUT-FROM 0"
        s.send_raw(b"DATA %d\n" % len(RESUME) + RESUME[:6])
        cut = s.finish()
    assert cut.code == 0 and "Traceback" not in cut.stderr, cut.stderr
    assert server.partial(K_RESUME).read_bytes() == RESUME[:6]
    assert server.object_path(K_RESUME) is None
    assert not server.logged_here(K_RESUME)
    with server.session(form=form) as s:
        s.handshake()
        assert s.request(f"PUT f {K_RESUME}") == "PUT-FROM 6"
        s.send_data(RESUME[6:])
        s.send("VALID")
        assert s.readline() == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(K_RESUME, RESUME) and server.logged_here(K_RESUME)
    assert not server.partial(K_RESUME).exists()


# == row 24: client cut mid-GET =================================================================


def _key_dir_listing(server: Server, key: str) -> list[str]:
    path = server.object_path(key)
    assert path is not None
    return sorted(os.listdir(path.parent))


def test_row_24_cut_mid_get_leaves_no_lock_or_transfer_behind(server: Server) -> None:
    before = snapshot(server.root)
    s = server.session()
    with s:
        s.handshake()
        s.send(f"GET 0 big {K_BIG}")
        assert s.readline() == f"DATA {len(BIG)}"
        assert s.read_exact(1000) == BIG[:1000]
        assert s.proc.stdout is not None
        s.proc.stdout.close()
        s.close_stdin()
        code = s.wait()
        stderr = s.stderr()
    assert code in (0, 1) and "Traceback" not in stderr, stderr
    assert _key_dir_listing(server, K_BIG) == [Key.parse(K_BIG).keyfile()]
    transfer = server.repo / "annex" / "transfer"
    leftovers = [p for p in transfer.rglob("*") if p.is_file()] if transfer.exists() else []
    assert leftovers == []
    assert_unchanged(before, snapshot(server.root), allow=only_dirs(before, snapshot(server.root)))
    # Nothing holds the content: another session can remove it at once.
    with server.session() as s2:
        s2.handshake()
        assert s2.request(f"REMOVE {K_BIG}") == "SUCCESS"
        assert s2.finish().code == 0


# == row 26: concurrent PUTs ====================================================================

IN_PROGRESS = "ERROR transfer already in progress, or unable to take transfer lock"


def test_row_26_second_put_during_a_transfer(server: Server) -> None:
    """While one session receives a key, a second PUT of it gets git-annex's own answer
    (`transfer already in progress`, what the real git-annex-shell says while its download
    lock is held) rather than ALREADY-HAVE/SUCCESS: the client retries later. After the
    first completes, the second sees ALREADY-HAVE. One object, correct."""
    with server.session() as a, server.session(client="c2") as b:
        a.handshake()
        b.handshake()
        key = sha256e_key(BIG[:300_000], ".bin")
        content = BIG[:300_000]
        assert a.request(f"PUT f {key}") == "PUT-FROM 0"
        a.send_raw(b"DATA %d\n" % len(content) + content[:100_000])
        assert b.request(f"PUT f {key}") == IN_PROGRESS
        assert b.request(f"CHECKPRESENT {key}") == "FAILURE"
        a.send_raw(content[100_000:])
        a.send("VALID")
        assert a.readline() == "SUCCESS"
        assert b.request(f"PUT f {key}") == "ALREADY-HAVE"
        assert a.finish().code == 0 and b.finish().code == 0
    assert server.has_object(key, content)


def test_row_26_racing_puts_store_one_correct_object(server: Server) -> None:
    content = BIG[:400_000]
    key = sha256e_key(content, ".bin")
    answers: list[str] = []
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with server.session(client=f"c{n}") as s:
                s.handshake()
                reply = s.request(f"PUT f {key}")
                if reply.startswith("PUT-FROM "):
                    s.send_data(content[int(reply[9:]) :])
                    s.send("VALID")
                    reply = s.readline()
                answers.append(reply)
                assert s.finish().code == 0
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(answers) <= {"SUCCESS", "ALREADY-HAVE", IN_PROGRESS}, answers
    assert "SUCCESS" in answers
    assert server.has_object(key, content) and server.logged_here(key)
    assert not server.partial(key).exists()


# == row 27: LOCKCONTENT against REMOVE ===========================================================


def _lck_is_free(server: Server, key: str) -> bool:
    """No process holds any lock on the content's .lck (or there is none)."""
    obj = server.object_path(key)
    assert obj is not None
    lck = obj.with_name(obj.name + ".lck")
    try:
        fd = os.open(lck, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # conflicts with OFD locks too
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def test_row_27_remove_fails_while_locked_and_works_after_unlock(server: Server) -> None:
    with server.session() as a, server.session(client="c2") as b:
        a.handshake()
        b.handshake()
        assert a.request(f"LOCKCONTENT {K_HELLO}") == "SUCCESS"
        assert not _lck_is_free(server, K_HELLO)
        assert b.request(f"REMOVE {K_HELLO}") == "FAILURE"
        assert b.request(f"REMOVE-BEFORE 999999999999 {K_HELLO}") == "FAILURE"
        assert server.has_object(K_HELLO, HELLO)
        a.send("UNLOCKCONTENT")
        assert a.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"  # UNLOCKCONTENT: no reply
        assert b.request(f"REMOVE {K_HELLO}") == "SUCCESS"
        a_res, b_res = a.finish(), b.finish()
    assert (a_res.code, b_res.code) == (0, 0)
    assert "content is locked" in b_res.stderr
    assert server.object_path(K_HELLO) is None and not server.logged_here(K_HELLO)


def test_row_27_lock_released_on_disconnect_retention_kept(server: Server) -> None:
    """On EOF the lock itself is released (the process ends), but p2p-protocol.md §7 wants
    the content kept for 10 minutes after a LOCKCONTENT SUCCESS whose connection died (a
    drop proof relies on it): the `.rtm` retention refuses REMOVE until then."""
    with server.session() as a:
        a.handshake()
        assert a.request(f"LOCKCONTENT {K_HELLO}") == "SUCCESS"
        assert a.finish().code == 0
    assert _lck_is_free(server, K_HELLO)
    obj = server.object_path(K_HELLO)
    assert obj is not None
    rtm = obj.with_name(obj.name + ".rtm")
    until = float(rtm.read_text(encoding="ascii").rstrip("s"))
    assert time.time() + 590 < until < time.time() + 610
    with server.session() as b:
        b.handshake()
        assert b.request(f"REMOVE {K_HELLO}") == "FAILURE"
        assert server.has_object(K_HELLO, HELLO)
        # Ten minutes later (the retention time rewritten into the past) it can go.
        obj.parent.chmod(0o755)
        rtm.write_text(f"{int(time.time()) - 1}s", encoding="ascii")
        assert b.request(f"REMOVE {K_HELLO}") == "SUCCESS"
        assert b.finish().code == 0
    assert server.object_path(K_HELLO) is None


def test_row_27_anything_but_unlockcontent_releases_the_lock(server: Server) -> None:
    with server.session() as a:
        a.handshake()
        assert a.request(f"LOCKCONTENT {K_HELLO}") == "SUCCESS"
        assert a.request(f"REMOVE {K_HELLO}") == "ERROR expected UNLOCKCONTENT"  # not run
        assert a.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"  # the ERROR was not a REMOVE
        assert _lck_is_free(server, K_HELLO)
        assert a.request(f"REMOVE {K_HELLO}") == "SUCCESS"
        assert a.finish().code == 0


# == row 28: numcopies ==========================================================================


def test_row_28_plain_server_does_not_check_numcopies(server: Server) -> None:
    """The plain server does not check numcopies, by design (p2p-protocol.md §7: "the client
    proved safety beforehand", with LOCKCONTENT on the other copies); "FAILURE when the proxy
    cannot confirm other copies" belongs to the proxy/cluster layer. So with numcopies 3 set
    on the server, REMOVE succeeds and the location log follows; what the plain server does
    guarantee is that content it must keep (a live lock or retention) is not removed."""
    server.admin("git", "annex", "numcopies", "3")
    server.admin("git", "annex", "mincopies", "2")
    with server.session() as s:
        s.handshake()
        assert s.request(f"REMOVE {K_HELLO}") == "SUCCESS"
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "FAILURE"
        assert s.request(f"LOCKCONTENT {K_BIG}") == "SUCCESS"
        s.send("UNLOCKCONTENT")
        assert s.finish().code == 0
    assert server.object_path(K_HELLO) is None and not server.logged_here(K_HELLO)
    assert server.has_object(K_BIG, BIG)


# == row 29: disk full and write errors ===========================================================


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only; skipped elsewhere); the RLIMIT_FSIZE test covers others."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_row_29_disk_full_answers_failure_keeps_a_resumable_prefix(
    server: Server, small_fs: Path
) -> None:
    repo = small_fs / "repo.git"
    shutil.copytree(server.repo, repo, symlinks=True)
    content = hashlib.shake_256(b"too big").digest(3 << 20)
    key = sha256e_key(content, ".bin")
    with server.session(directory=repo) as s:
        s.handshake()
        assert s.request(f"PUT f {key}") == "PUT-FROM 0"
        try:
            s.send_data(content)
            s.send("VALID")
        except BrokenPipeError:
            pass  # the server stopped reading: it had to, the framing is lost
        assert s.readline() == "FAILURE"
        result = s.finish()
    assert result.code == 1
    assert result.stderr.endswith(
        "git-annex-shell: cannot store content: No space left on device\n"
    )
    assert "Traceback" not in result.stderr
    partial = repo / "annex" / "tmp" / key
    kept = partial.read_bytes()
    assert 0 < len(kept) < len(content) and content.startswith(kept)
    assert not list((repo / "annex" / "objects").rglob(key))
    # More space, and the transfer resumes where it stopped.
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    with server.session(directory=repo) as s:
        s.handshake()
        assert s.request(f"PUT f {key}") == f"PUT-FROM {len(kept)}"
        s.send_data(content[len(kept) :])
        s.send("VALID")
        assert s.readline() == "SUCCESS"
        assert s.finish().code == 0
    [obj] = (repo / "annex" / "objects").rglob(f"{key}/{key}")
    assert obj.read_bytes() == content
    assert not partial.exists()


def _limit_file_size(limit: int) -> Callable[[], None]:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_row_29_write_error_answers_failure_and_drops_the_suspect_partial(
    server: Server,
) -> None:
    """EFBIG (RLIMIT_FSIZE in the child) stands for EIO-like errors: the partial's contents
    are suspect, so it is deleted (store.py's rule); FAILURE, then close, exit 1."""
    content = BIG[: 256 * 1024]
    key = sha256e_key(content, ".bin")
    with server.session(preexec_fn=_limit_file_size(64 * 1024)) as s:
        s.handshake()
        assert s.request(f"PUT f {key}") == "PUT-FROM 0"
        try:
            s.send_data(content)
            s.send("VALID")
        except BrokenPipeError:
            pass
        assert s.readline() == "FAILURE"
        result = s.finish()
    assert result.code == 1
    assert result.stderr.endswith("git-annex-shell: cannot store content: File too large\n")
    assert not server.partial(key).exists()
    assert server.object_path(key) is None and not server.logged_here(key)
    assert server.has_object(K_HELLO, HELLO)


# == row 30: SIGKILL ============================================================================


def _wait_for_size(path: Path, size: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size >= size):
        assert time.monotonic() < deadline, f"{path} never reached {size} bytes"
        time.sleep(0.005)


@pytest.mark.parametrize("kill_at", ["mid-body", "before-valid"])
def test_row_30_sigkill_then_resume(server: Server, kill_at: str) -> None:
    content = BIG[:300_000]
    key = sha256e_key(content, ".bin")
    sent = 120_000 if kill_at == "mid-body" else len(content)
    with server.session() as s:
        s.handshake()
        assert s.request(f"PUT f {key}") == "PUT-FROM 0"
        s.send_raw(b"DATA %d\n" % len(content) + content[:sent])
        _wait_for_size(server.partial(key), sent)
        assert s.kill() == -signal.SIGKILL
    kept = server.partial(key).read_bytes()
    assert kept == content[:sent]
    assert server.object_path(key) is None and not server.logged_here(key)
    # The dead server's lock files are left behind but not held: no "in progress".
    with server.session() as s:
        s.handshake()
        assert s.request(f"PUT f {key}") == f"PUT-FROM {sent}"
        s.send_data(content[sent:])
        s.send("VALID")
        assert s.readline() == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(key, content) and server.logged_here(key)


def test_row_30_sigkill_around_the_commit_never_truncates(server: Server) -> None:
    """Kill at a spread of moments after VALID (verify, fsync, rename, log): every time the
    object is absent or complete, and a new PUT finishes the job."""
    content = BIG[:200_000]
    key = sha256e_key(content, ".bin")
    for delay in (0.0, 0.001, 0.003, 0.01, 0.03):
        with server.session() as s:
            s.handshake()
            reply = s.request(f"PUT f {key}")
            if reply == "ALREADY-HAVE":
                break
            offset = int(reply.removeprefix("PUT-FROM "))
            s.send_data(content[offset:])
            s.send("VALID")
            time.sleep(delay)
            s.kill()
        obj = server.object_path(key)
        assert obj is None or obj.read_bytes() == content, delay
    with server.session() as s:
        s.handshake()
        reply = s.request(f"PUT f {key}")
        if reply != "ALREADY-HAVE":
            s.send_data(content[int(reply.removeprefix("PUT-FROM ")) :])
            s.send("VALID")
            assert s.readline() == "SUCCESS"
        assert s.finish().code == 0
    assert server.has_object(key, content)


# == row 35: slow loris ===========================================================================


@pytest.mark.parametrize("behaviour", ["never-sends", "never-reads", "holds-lock"])
def test_row_35_idle_client_is_cut_off(server: Server, behaviour: str) -> None:
    """annexproxy.idletimeout (seconds) bounds every wait on the client; other sessions go on.
    Not covered: a client that trickles one byte per timeout keeps its own session alive (a
    transfer-rate floor is not implemented); it costs one process, as any ssh session does."""
    server.set_config("annexproxy.idletimeout", "1")
    start = time.monotonic()
    with server.session() as loris:
        loris.handshake()
        if behaviour == "never-reads":
            loris.send(f"GET 0 big {K_BIG}")  # 1 MiB: more than the pipe holds
        elif behaviour == "holds-lock":
            assert loris.request(f"LOCKCONTENT {K_HELLO}") == "SUCCESS"
        # Meanwhile another client is served normally.
        with server.session(client="c2") as other:
            other.handshake()
            assert other.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
            assert other.finish().code == 0
        code = loris.wait(timeout=60)
        elapsed = time.monotonic() - start
        stderr = loris.stderr()
    assert code == 1
    # The configured second, not the default (7200 s); generous above for a loaded machine.
    assert 0.9 < elapsed < 60, elapsed
    expected = {
        "never-sends": "git-annex-shell: no data from peer for 1s\n",
        "never-reads": "git-annex-shell: peer did not read for 1s\n",
        "holds-lock": "git-annex-shell: client held a content lock past the idle timeout\n",
    }[behaviour]
    assert stderr == expected


def test_row_35_without_the_setting_the_session_waits(server: Server) -> None:
    """Control for the test above: the default timeout is long (two hours)."""
    with server.session() as s:
        s.handshake()
        with pytest.raises(TimeoutError):
            s.readline(timeout=1.5)
        assert s.proc.poll() is None
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        assert s.finish().code == 0


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "inf"])
def test_row_35_bad_timeout_value_is_reported_and_ignored(server: Server, value: str) -> None:
    server.set_config("annexproxy.idletimeout", value)
    with server.session() as s:
        s.handshake()
        assert s.request(f"CHECKPRESENT {K_HELLO}") == "SUCCESS"
        result = s.finish()
    assert result.code == 0
    assert result.stderr == f"git-annex-shell: ignoring bad annexproxy.idletimeout={value!r}\n"


# == row 38: O_NONBLOCK must not leak to whoever shares stdio ===================================


def _overlong(w: int) -> None:
    os.write(w, b"CHECKPRESENT " + b"a" * 40_000 + b"\n")


def _client_error(w: int) -> None:
    os.write(w, b"ERROR bye\n")


def _connect(w: int) -> None:
    os.write(w, b"CONNECT git-upload-pack\n")


ENDINGS: dict[str, Callable[[int], None]] = {
    "eof": lambda w: None,
    "client-error": _client_error,
    "protocol-error": _overlong,
    "connect": _connect,
}


@contextlib.contextmanager
def _stdio(kind: str) -> Iterator[tuple[int, int, int, int]]:
    """(child's stdin, child's stdout, our write end, our read end) as the session's parent
    would hold them: two pipes (a forked shell, this test), or one socketpair for both
    (sshd on Linux). Our ends of the child's fds share its open file descriptions."""
    if kind == "pipe":
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        fds = [in_r, in_w, out_r, out_w]
        child_in, child_out, ours_w, ours_r = in_r, out_w, in_w, out_r
    else:
        ours, theirs = socket.socketpair()
        fds = [ours.detach(), theirs.detach()]
        child_in = child_out = fds[1]
        ours_w = ours_r = fds[0]
    try:
        yield child_in, child_out, ours_w, ours_r
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _start_session(server: Server, child_in: int, child_out: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        p2pstdio_argv(server.shell, server.repo),
        stdin=child_in,
        stdout=child_out,
        stderr=subprocess.DEVNULL,
        env=server.env(),
        cwd=server.home,
    )


def _read_greeting(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        piece = os.read(fd, 1)
        assert piece, line
        line += piece
    return line


@pytest.mark.parametrize("kind", ["pipe", "socketpair"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_row_38_stdio_is_blocking_again_after_the_session(
    server: Server, ending: str, kind: str
) -> None:
    """trio's FdStream makes the *open file description* it is given non-blocking, which
    everyone sharing it (a parent shell, whoever else holds the pipe) would see. We keep our
    own ends of the very same pipes and watch the flag. A pipe is reopened by the session
    (a description of its own): the shared one is never touched. A socket cannot be
    reopened: the flag is off during the session (proving the check can see it), and on
    again after, however the session ends."""
    with _stdio(kind) as (child_in, child_out, ours_w, ours_r):
        proc = _start_session(server, child_in, child_out)
        assert _read_greeting(ours_r).startswith(b"AUTH-SUCCESS ")
        shared = kind == "socketpair"
        assert os.get_blocking(child_in) is not shared
        assert os.get_blocking(child_out) is not shared
        ENDINGS[ending](ours_w)
        if kind == "pipe":
            os.close(ours_w)
        else:
            with socket.socket(fileno=os.dup(ours_w)) as sock:
                sock.shutdown(socket.SHUT_WR)
        proc.wait(timeout=60)
        assert os.get_blocking(child_in), "stdin left non-blocking"
        assert os.get_blocking(child_out), "stdout left non-blocking"


def test_row_38_git_shell_child_gets_blocking_stdin(server: Server) -> None:
    """The pass-through's child inherits stdin before any trio code ran: blocking."""
    bindir, record = fake_git_shell(server)
    in_r, in_w = os.pipe()
    try:
        proc = subprocess.run(
            [str(server.shell), "-c", f"git-upload-pack '{server.repo}'"],
            stdin=in_r,
            capture_output=True,
            env=server.env({"PATH": f"{bindir}:/usr/bin:/bin"}),
            check=False,
        )
    finally:
        os.close(in_r)
        os.close(in_w)
    assert proc.returncode == 0, proc
    [rec] = read_records(record)
    assert rec["stdin_blocking"] is True


def test_row_38_sigkill_leaves_piped_stdio_blocking(server: Server) -> None:
    """Nothing of ours runs after SIGKILL: the shared descriptions of piped stdin and
    stdout must never have been made non-blocking. (A socket, which cannot be reopened,
    keeps the restore-at-exit; the process holding its other end has its own description.)"""
    with _stdio("pipe") as (child_in, child_out, _ours_w, ours_r):
        proc = _start_session(server, child_in, child_out)
        assert _read_greeting(ours_r).startswith(b"AUTH-SUCCESS ")
        proc.kill()
        proc.wait(timeout=60)
        assert os.get_blocking(child_in), "stdin left non-blocking"
        assert os.get_blocking(child_out), "stdout left non-blocking"
