"""The man pages: groff finds nothing to warn about, and they cover what the code has."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shell import cli, nodelink, passthrough, restrict

MAN = Path(__file__).resolve().parent.parent / "man"
PAGES = sorted(MAN.glob("*.1"))
SHELL_PAGE = MAN / "git-annex-shell.1"


def test_pages_exist() -> None:
    # Without this, a missing man/ directory would make the parametrized test vanish.
    assert SHELL_PAGE in PAGES


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_groff_has_no_warnings(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (apt-get install groff)")
    # groff exits 0 even when it warns, so the check is that it prints nothing at all.
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, check=False
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith(".SH "):
            current = sections.setdefault(line[4:].strip().strip('"'), [])
        else:
            current.append(line)
    return sections


def _plain(roff: str) -> str:
    """Roff source to plain words: drop font macros, escapes and quotes."""
    roff = re.sub(r"^\.(B|I|BI|BR|IB|RB|IR|RI)\s+", "", roff)
    roff = roff.replace("\\-", "-").replace("\\(aq", "'").replace("\\c", "")
    return re.sub(r"\\f[BIRP]", "", roff).replace('"', "")


def _tagged(lines: list[str]) -> list[str]:
    """The first word of each `.TP` tag in a section."""
    tags = []
    for prev, line in itertools.pairwise(lines):
        if prev.strip() == ".TP":
            words = _plain(line).split()
            if words:
                tags.append(words[0].split("=")[0])
    return tags


@pytest.fixture(scope="module")
def shell_page() -> dict[str, list[str]]:
    return _sections(SHELL_PAGE.read_text(encoding="utf-8"))


def test_every_builtin_is_documented(shell_page: dict[str, list[str]]) -> None:
    documented = set(_tagged(shell_page["COMMANDS"]))
    # The usage text's commands too: it announces annexproxy's noderpc before BUILTINS has it.
    in_usage = {
        line.split()[0]
        for line in cli.USAGE.split("Plumbing commands:")[1].splitlines()
        if line.strip()
    }
    expected = set(cli.BUILTINS) | in_usage
    assert expected - documented == set(), "builtins missing from COMMANDS"
    assert documented - expected == set(), "COMMANDS documents commands the shell lacks"


def test_noderpc_is_marked_as_extension(shell_page: dict[str, list[str]]) -> None:
    lines = shell_page["COMMANDS"]
    start = next(i for i, line in enumerate(lines) if _plain(line).startswith("noderpc"))
    entry = " ".join(_plain(line) for line in lines[start : start + 30])
    assert "annexproxy's own extension" in entry and restrict.ALLOW_NODERPC in entry


def test_environment_variables_and_messages(shell_page: dict[str, list[str]]) -> None:
    env = shell_page["ENVIRONMENT"]
    tags = set(_tagged(env))
    for name in (restrict.READONLY, restrict.APPENDONLY, restrict.LIMITED, restrict.DIRECTORY,
                 passthrough.ALLOW_ARCHIVE_ENV, nodelink.DIRECTORY_NODES_ENV,
                 restrict.ALLOW_NODERPC):  # fmt: skip
        assert name in tags
    text = re.sub(r"\s+", " ", " ".join(_plain(line) for line in env))
    for message in (
        f"git-annex-shell: Action blocked by {restrict.READONLY}",
        f"git-annex-shell: Action blocked by {restrict.APPENDONLY}",
        f"git-annex-shell: Action blocked by {restrict.LIMITED}",
        f"ERROR {restrict.READONLY_DENIED}",
        f"ERROR {restrict.APPENDONLY_DENIED}",
        "git-annex-shell: Only allowed to access dir not directory",
        "git-annex-shell: Only allowed to access dir and could not determine directory "
        "from command line",
        "git-annex-shell: git-upload-archive is disabled here "
        f"(set {passthrough.ALLOW_ARCHIVE_ENV}=1)",
        f"git-annex-shell: {restrict.NODERPC_REFUSED}",
    ):
        assert message in text


def test_examples_use_env_in_forced_commands(shell_page: dict[str, list[str]]) -> None:
    forced = [line for line in shell_page["EXAMPLES"] if line.startswith("command=")]
    assert forced
    for line in forced:
        # `environment="..."` would need PermitUserEnvironment; env works with any login shell.
        assert line.startswith('command="env GIT_ANNEX_SHELL_')
        assert 'git\\-annex\\-shell \\-c \\e"$SSH_ORIGINAL_COMMAND\\e""' in line
