"""annexproxy:: URL forms and the argv built from them (git_remote_annexproxy/urls.py)."""

from __future__ import annotations

import shlex
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_remote_annexproxy.urls import (
    ProxyURL,
    annexurl,
    git_service_argv,
    parse_url,
    quote_word,
    shell_argv,
)
from shell.cli import shell_unescape

U = "1f0c0000-0000-4000-8000-00000000c11e"
NO_ENV: dict[str, str] = {"PATH": "/usr/bin:/bin"}

FORMS = [
    # (url, kind, user, host, port, path, annexurl)
    ("annexproxy::ssh://host/srv/r.git", "ssh", None, "host", None, "/srv/r.git", "ssh://host/srv/r.git"),
    ("ssh://host/srv/r.git", "ssh", None, "host", None, "/srv/r.git", "ssh://host/srv/r.git"),
    ("annexproxy::ssh://bob@host:2222/srv/r.git", "ssh", "bob", "host", 2222, "/srv/r.git", "ssh://bob@host:2222/srv/r.git"),
    ("annexproxy::ssh://host:/srv/r.git", "ssh", None, "host", None, "/srv/r.git", "ssh://host/srv/r.git"),
    ("annexproxy::ssh://host/~/r.git", "ssh", None, "host", None, "/~/r.git", "ssh://host/~/r.git"),
    ("annexproxy::ssh://host/~bob/r.git", "ssh", None, "host", None, "/~bob/r.git", "ssh://host/~bob/r.git"),
    ("annexproxy::git+ssh://host/r", "ssh", None, "host", None, "/r", "ssh://host/r"),
    ("annexproxy::ssh://[::1]/r.git", "ssh", None, "::1", None, "/r.git", "ssh://[::1]/r.git"),
    ("annexproxy::ssh://bob@[::1]:22/r.git", "ssh", "bob", "::1", 22, "/r.git", "ssh://bob@[::1]:22/r.git"),
    ("annexproxy::ssh://[fe80::1%eth0]/r", "ssh", None, "fe80::1%eth0", None, "/r", "ssh://[fe80::1%eth0]/r"),
    # scp-like: a relative path is relative to the home directory, as git-annex sends it.
    ("annexproxy::host:r.git", "ssh", None, "host", None, "/~/r.git", "ssh://host/~/r.git"),
    ("annexproxy::host:/srv/r.git", "ssh", None, "host", None, "/srv/r.git", "ssh://host/srv/r.git"),
    ("annexproxy::bob@host:~/r.git", "ssh", "bob", "host", None, "/~/r.git", "ssh://bob@host/~/r.git"),
    ("annexproxy::host:~alice/r.git", "ssh", None, "host", None, "/~alice/r.git", "ssh://host/~alice/r.git"),
    ("annexproxy::[::1]:r.git", "ssh", None, "::1", None, "/~/r.git", "ssh://[::1]/~/r.git"),
    ("annexproxy::bob@[::1]:/srv/r", "ssh", "bob", "::1", None, "/srv/r", "ssh://bob@[::1]/srv/r"),
    ("annexproxy::host:dir/with:colon", "ssh", None, "host", None, "/~/dir/with:colon", "ssh://host/~/dir/with:colon"),
    ("annexproxy::host:it's a", "ssh", None, "host", None, "/~/it's a", "ssh://host/~/it's a"),
    # no ssh
    ("annexproxy::/srv/r.git", "local", None, None, None, "/srv/r.git", "/srv/r.git"),
    ("annexproxy::file:///srv/r.git", "local", None, None, None, "/srv/r.git", "/srv/r.git"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "kind", "user", "host", "port", "path", "aurl"), FORMS)
def test_forms(
    url: str, kind: str, user: str | None, host: str | None, port: int | None, path: str, aurl: str
) -> None:
    u = parse_url(url)
    assert u == ProxyURL(kind, user, host, port, path)  # type: ignore[arg-type]
    assert annexurl(u) == aurl
    # The annexurl names the same repository (a fixed point, apart from scp-like spelling).
    assert parse_url(aurl) == u


REFUSED = [
    ("annexproxy::ssh://-oProxyCommand=touch%20x/r", "strange hostname"),
    ("annexproxy::-oProxyCommand=x:r", "strange hostname"),
    ("annexproxy::ssh://-l@host/r", "strange user name"),
    ("annexproxy::-l@host:r", "strange user name"),
    ("annexproxy::host:-r", "strange repository path"),
    ("annexproxy::ssh://host/-r", "strange repository path"),
    ("annexproxy::ssh://host", "no repository path"),
    ("annexproxy::ssh://host/", "no repository path"),
    ("annexproxy::host:", "no repository path"),
    ("annexproxy::ssh://host:0/r", "bad port"),
    ("annexproxy::ssh://host:65536/r", "bad port"),
    ("annexproxy::ssh://host:22a/r", "bad port"),
    ("annexproxy::ssh://host:-22/r", "bad port"),
    ("annexproxy::ssh://[::1/r", "unclosed"),
    ("annexproxy::ssh://[::1]x/r", "junk after"),
    ("annexproxy::[host:22]:r", "brackets are for IPv6"),
    ("annexproxy::ssh://[host:22]/r", "brackets are for IPv6"),
    ("annexproxy::ssh://ho st/r", "bad character"),
    ("annexproxy::ssh://@host/r", "empty user name"),
    ("annexproxy::ssh:///r", "empty hostname"),
    ("annexproxy::http://host/r", "unsupported URL scheme"),
    ("annexproxy::file://host/r", "absolute path"),
    ("annexproxy::relative/dir", "must be absolute"),
    ("annexproxy::relative", "must be absolute"),
    ("annexproxy::", "empty URL"),
    ("annexproxy::host:a\nb", "newline"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_refused(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        parse_url(url)
    assert "\n" not in str(info.value)


def test_ssh_argv_is_what_git_runs() -> None:
    u = parse_url("annexproxy::ssh://bob@host:2222/~/it's.git")
    assert shell_argv(u, ["p2pstdio", u.path, U], NO_ENV) == [
        "ssh", "-o", "SendEnv=GIT_PROTOCOL", "-p", "2222", "bob@host",
        f"git-annex-shell 'p2pstdio' '/~/it'\"'\"'s.git' '{U}'",
    ]  # fmt: skip
    # git's own form for the fallback: `~/` for a home-relative path, which git expands.
    assert git_service_argv(u, "git-upload-pack", NO_ENV) == [
        "ssh", "-o", "SendEnv=GIT_PROTOCOL", "-p", "2222", "bob@host",
        "git-upload-pack '~/it'\"'\"'s.git'",
    ]  # fmt: skip


def test_git_ssh_command_runs_through_sh_with_positional_arguments() -> None:
    u = parse_url("annexproxy::host:$(touch pwned)")
    command = "ssh -i ~/.ssh/key -o 'IdentitiesOnly yes'"
    argv = shell_argv(u, ["p2pstdio", u.path, U], {"GIT_SSH_COMMAND": command})
    # git's run-command form: the script is the user's command and "$@", nothing of ours.
    assert argv[:4] == ["sh", "-c", f'{command} "$@"', command]
    assert argv[4:] == [
        "-o", "SendEnv=GIT_PROTOCOL", "host",
        f"git-annex-shell 'p2pstdio' '/~/$(touch pwned)' '{U}'",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "head"),
    [
        (
            {"GIT_SSH": "/opt/bin/myssh"},
            ["/opt/bin/myssh", "-o", "SendEnv=GIT_PROTOCOL", "-p", "22"],
        ),
        ({"GIT_SSH": "/opt/plink.exe"}, ["/opt/plink.exe", "-P", "22"]),
        ({"GIT_SSH": "/opt/tortoiseplink"}, ["/opt/tortoiseplink", "-P", "22", "-batch"]),
        ({"GIT_SSH": "/opt/myssh", "GIT_SSH_VARIANT": "putty"}, ["/opt/myssh", "-P", "22"]),
        ({"GIT_SSH_COMMAND": "plink -v"}, ["sh", "-c", 'plink -v "$@"', "plink -v", "-P", "22"]),
        # GIT_SSH_COMMAND wins over GIT_SSH, as in git.
        ({"GIT_SSH_COMMAND": "ssh", "GIT_SSH": "/x"}, ["sh", "-c", 'ssh "$@"', "ssh", "-o"]),
    ],
)
def test_ssh_programs_and_variants(env: dict[str, str], head: list[str]) -> None:
    u = parse_url("annexproxy::ssh://host:22/r")
    argv = shell_argv(u, ["p2pstdio", "/r", U], env)
    assert argv[: len(head)] == head
    assert argv[-2:] == ["host", f"git-annex-shell 'p2pstdio' '/r' '{U}'"]


def test_simple_variant_cannot_take_a_port() -> None:
    with pytest.raises(ValueError, match="simple"):
        shell_argv(parse_url("ssh://h:22/r"), ["p2pstdio", "/r"], {"GIT_SSH_VARIANT": "simple"})
    argv = shell_argv(parse_url("ssh://h/r"), ["p2pstdio", "/r"], {"GIT_SSH_VARIANT": "simple"})
    assert argv == ["ssh", "h", "git-annex-shell 'p2pstdio' '/r'"]


def test_local_url_runs_our_shell_and_git_directly() -> None:
    u = parse_url("annexproxy::/srv/r.git")
    argv = shell_argv(u, ["p2pstdio", u.path, U])
    assert argv[0].endswith("/git-annex-shell") and argv[1:] == ["p2pstdio", "/srv/r.git", U]
    assert git_service_argv(u, "git-receive-pack") == ["git-receive-pack", "/srv/r.git"]


def test_command_words_are_checked() -> None:
    u = parse_url("ssh://h/r")
    for words in (["-c", "x"], ["p2pstdio", "-x"], ["p2p stdio"], [], ["p2pstdio", "a\nb"]):
        with pytest.raises(ValueError):
            shell_argv(u, words, NO_ENV)
    assert shell_argv(u, ["p2pstdio", "/r", "--uuid", U], NO_ENV)[-1].endswith(f"'--uuid' '{U}'")
    with pytest.raises(ValueError, match="not a git service"):
        git_service_argv(u, "git-shell", NO_ENV)


# --- properties ------------------------------------------------------------------------------

# Characters that make URLs interesting: separators, quotes, shell syntax, option dashes.
TRICKY = string.ascii_letters[:6] + string.digits[:3] + "-_.:@/[]~'\" $`;|&()\\%*?#!\t"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=TRICKY, max_size=30))
def test_no_peer_string_in_option_position(text: str) -> None:
    """Whatever parses, the argv has only our own options, and the host is one argument."""
    try:
        u = parse_url("annexproxy::" + text)
    except ValueError:
        return
    if u.kind != "ssh":
        assert u.path.startswith("/")
        return
    for argv in (
        shell_argv(u, ["p2pstdio", u.path, U], NO_ENV),
        git_service_argv(u, "git-upload-pack", NO_ENV),
    ):
        *options, host, command = argv[1:]
        assert options in (
            ["-o", "SendEnv=GIT_PROTOCOL"],
            ["-o", "SendEnv=GIT_PROTOCOL", "-p", str(u.port)],
        )
        assert not host.startswith("-")
        assert host == (f"{u.user}@{u.host}" if u.user else u.host)
        # OpenSSH reads options after the host too: the command must start with our name.
        assert command.startswith(("git-annex-shell ", "git-upload-pack "))
    # The remote command reads back as exactly our words, by sh and by git-annex-shell.
    remote = shell_argv(u, ["p2pstdio", u.path, U], NO_ENV)[-1]
    assert shlex.split(remote) == ["git-annex-shell", "p2pstdio", u.path, U]
    assert shell_unescape(remote) == ["git-annex-shell", "p2pstdio", u.path, U]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=TRICKY, max_size=30))
def test_git_ssh_command_script_never_holds_a_peer_string(text: str) -> None:
    try:
        u = parse_url("annexproxy::" + text)
    except ValueError:
        return
    if u.kind != "ssh":
        return
    command = "ssh -F /dev/null"
    argv = shell_argv(u, ["p2pstdio", u.path, U], {"GIT_SSH_COMMAND": command})
    assert argv[:4] == ["sh", "-c", f'{command} "$@"', command]


@given(st.text(st.characters(exclude_characters="\x00"), max_size=40))
def test_quote_word_round_trips_in_both_splitters(word: str) -> None:
    quoted = quote_word(word)
    assert shlex.split(quoted) == [word]
    assert shell_unescape(quoted) == [word]
