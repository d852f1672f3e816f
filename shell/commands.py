"""The builtins of git-annex-shell (annex-shell.md §2), after argv parsing and the checks.

Each builtin opens the repository (no upward search), checks `--uuid`, and does its work.
Only `p2pstdio` and `notifychanges` run for long; trio and dulwich are imported by the
commands that need them, so `configlist` stays cheap.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from shell import restrict
from shell.errors import ShellError
from shell.repo import Repo, has_annex_branch, open_repo

# typing.TYPE_CHECKING without importing typing (start-up cost).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from git_remote_annexproxy.keys import Key
    from shell.cli import Invocation
    from shell.proxyselect import Target

# Commands that may run with --uuid naming a repository this one proxies for.
PROXYABLE = frozenset({"p2pstdio", "notifychanges"})

# git-annex derives a gcrypt repository's UUID from its gcrypt-id in this namespace.
_GCRYPT_NAMESPACE_URL = "http://git-annex.branchable.com/design/gcrypt/"


def gcrypt_uuid(gcrypt_id: str) -> str:
    import uuid  # noqa: PLC0415 - rare path

    namespace = uuid.uuid5(uuid.NAMESPACE_URL, _GCRYPT_NAMESPACE_URL)
    return str(uuid.uuid5(namespace, gcrypt_id))


def check_uuid(repo: Repo, inv: Invocation) -> Target | None:
    """Check `--uuid`; returns the UUID to proxy for, or None to serve this repository."""
    wanted = inv.uuid
    local = repo.uuid
    if wanted is None or wanted == local:
        return None
    if local is None:
        gcrypt_id = repo.config.get("core.gcrypt-id")
        if gcrypt_id and gcrypt_uuid(gcrypt_id) == wanted:
            return None
        raise ShellError(f"expected repository UUID {wanted} but found uninitialized repository")
    from shell import proxyselect  # noqa: PLC0415 - reads the git-annex branch

    target = proxyselect.select(repo, wanted)
    if inv.command not in PROXYABLE:
        raise ShellError(f"Cannot proxy {inv.command} command.")
    return target


def parse_keys(words: list[str]) -> list[Key]:
    from git_remote_annexproxy.keys import BadKey, Key  # noqa: PLC0415

    keys = []
    for word in words:
        try:
            keys.append(Key.parse(word))
        except BadKey:
            raise ShellError(f"bad key {word}") from None
    return keys


def _need_args(inv: Invocation, count: int, what: str) -> None:
    if len(inv.args) != count:
        raise ShellError(f"{inv.command} needs {what}")


def cmd_configlist(inv: Invocation) -> int:
    _need_args(inv, 0, "only a directory")
    repo = open_repo(inv.directory)
    check_uuid(repo, inv)
    uuid = repo.uuid
    if uuid is None and (inv.fields.get("autoinit") == "1" or has_annex_branch(repo.gitdir_str)):
        # Autoinit writes the repository, so it counts as an action READONLY blocks.
        restrict.check_mode(restrict.Mode.APPENDONLY)
        from git_remote_annexproxy import branch  # noqa: PLC0415

        uuid = branch.initialize(repo.gitdir, repo.annexdir, description=_description(repo))
    gcrypt_id = repo.config.get("core.gcrypt-id") or ""
    sys.stdout.write(f"annex.uuid={uuid or ''}\ncore.gcrypt-id={gcrypt_id}\n")
    return 0


def _description(repo: Repo) -> str:
    from git_remote_annexproxy.branch import default_description  # noqa: PLC0415

    return default_description(repo.path)


def _store(repo: Repo):  # type: ignore[no-untyped-def]  # refined once store lands
    from git_remote_annexproxy.store import AnnexStore  # noqa: PLC0415

    return AnnexStore(repo.gitdir, bare=repo.bare)


def _local_repo(inv: Invocation) -> Repo:
    repo = open_repo(inv.directory)
    check_uuid(repo, inv)
    if repo.uuid is None:
        raise ShellError("not a git-annex repository (no annex.uuid)")
    return repo


def cmd_inannex(inv: Invocation) -> int:
    if not inv.args:
        raise ShellError("inannex needs at least one key")
    repo = _local_repo(inv)
    keys = parse_keys(inv.args)
    store = _store(repo)
    from git_remote_annexproxy.store import ContentLocked  # noqa: PLC0415

    try:
        present = all(store.has(k) for k in keys)
    except ContentLocked:
        return 100
    return 0 if present else 1


def cmd_dropkey(inv: Invocation) -> int:
    if not inv.force:
        raise ShellError(
            "dropkey can cause data loss; use --force if you're sure you want to do this"
        )
    if not inv.args:
        raise ShellError("dropkey needs at least one key")
    repo = _local_repo(inv)
    keys = parse_keys(inv.args)
    store = _store(repo)
    from git_remote_annexproxy.branch import AnnexBranch  # noqa: PLC0415
    from git_remote_annexproxy.store import ContentLocked  # noqa: PLC0415

    branch = AnnexBranch(repo.gitdir, repo.annexdir)
    assert repo.uuid is not None
    failed = 0
    for key in keys:
        try:
            store.remove(key)
        except ContentLocked:
            sys.stderr.write(f"git-annex-shell: {key} is locked; not dropped\n")
            failed += 1
            continue
        # Like git-annex, dropkey leaves the change in the journal; a later commit takes it.
        branch.log_presence(key, repo.uuid, present=False)
    return 1 if failed else 0


def cmd_p2pstdio(inv: Invocation) -> int:
    if len(inv.args) != 1 or not inv.args[0]:
        raise ShellError("missing UUID parameter")
    repo = open_repo(inv.directory)
    target = check_uuid(repo, inv)
    if target is not None:
        from shell import proxy  # noqa: PLC0415

        return proxy.serve(repo, target, client_uuid=inv.args[0])
    if repo.uuid is None:
        raise ShellError("not a git-annex repository (no annex.uuid)")
    from shell import p2pserver  # noqa: PLC0415

    return p2pserver.serve(repo, client_uuid=inv.args[0])


def cmd_notifychanges(inv: Invocation) -> int:
    _need_args(inv, 0, "only a directory")
    repo = open_repo(inv.directory)
    check_uuid(repo, inv)
    from shell import notify  # noqa: PLC0415

    return notify.run(repo)


def cmd_gcryptsetup(inv: Invocation) -> int:
    _need_args(inv, 1, "a gcrypt id")
    repo = open_repo(inv.directory)
    gcrypt_id = inv.args[0]
    if repo.uuid is not None:
        raise ShellError(
            "gcryptsetup refusing to run; this repository already has a git-annex uuid!"
        )
    existing = repo.config.get("core.gcrypt-id")
    if existing and existing != gcrypt_id:
        raise ShellError("gcryptsetup uuid mismatch")
    if not repo.bare:
        raise ShellError("cannot use gcrypt in a non-bare repository")
    if not gcrypt_id or gcrypt_id.startswith("-") or "\n" in gcrypt_id:
        raise ShellError("bad gcrypt id")
    import subprocess  # noqa: PLC0415

    subprocess.run(
        ["git", "config", "--file", str(repo.gitdir / "config"), "core.gcrypt-id", gcrypt_id],
        check=True,
    )
    return 0


def cmd_sendkey(inv: Invocation) -> int:
    _need_args(inv, 1, "one key")
    repo = _local_repo(inv)
    from shell import rsyncserve  # noqa: PLC0415

    return rsyncserve.send(repo, parse_keys(inv.args)[0], inv)


def cmd_recvkey(inv: Invocation) -> int:
    _need_args(inv, 1, "one key")
    repo = _local_repo(inv)
    from shell import rsyncserve  # noqa: PLC0415

    return rsyncserve.receive(repo, parse_keys(inv.args)[0], inv)


def cmd_noderpc(inv: Invocation) -> int:
    """Our node worker for a proxy (shell/noderpc.py); never proxied (not in PROXYABLE)."""
    if len(inv.args) > 1:
        raise ShellError("noderpc needs a directory and at most the proxy's UUID")
    client_uuid = inv.args[0] if inv.args else None
    # It names a directory of transfer records: a UUID's characters only.
    if client_uuid is not None and not (
        client_uuid and all(c.isalnum() or c == "-" for c in client_uuid)
    ):
        raise ShellError("bad UUID parameter")
    repo = _local_repo(inv)
    from shell import noderpc  # noqa: PLC0415

    return noderpc.serve(repo, client_uuid)


COMMANDS: dict[str, Callable[[Invocation], int]] = {
    "configlist": cmd_configlist,
    "p2pstdio": cmd_p2pstdio,
    "notifychanges": cmd_notifychanges,
    "inannex": cmd_inannex,
    "dropkey": cmd_dropkey,
    "gcryptsetup": cmd_gcryptsetup,
    "sendkey": cmd_sendkey,
    "recvkey": cmd_recvkey,
    "noderpc": cmd_noderpc,
}


def run(inv: Invocation) -> int:
    return COMMANDS[inv.command](inv)
