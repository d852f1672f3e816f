"""`sendkey` / `recvkey`: content over rsync in server mode (used by gcrypt remotes).

rsync is run with an argv list (never a shell), with git-annex's server parameters, and the
client's extra options are filtered down to the ones that cannot name files or programs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

from git_remote_annexproxy.keys import Key
from shell.errors import ShellError
from shell.repo import Repo

TYPE_CHECKING = False
if TYPE_CHECKING:
    from shell.cli import Invocation

# git-annex's rsyncServerParams: timestamps, in-place writes (so a cut transfer resumes),
# and the options rsync itself passes to a server.
SERVER_PARAMS = ["--server", "-t", "--inplace", "-e.Lsf", "."]

# Options a client may add: only ones that take no path and run no program.
SAFE_OPTION_PREFIXES = ("--bwlimit=",)


def safe_options(extra: list[str]) -> list[str]:
    words = " ".join(extra).split()
    return [w for w in words if w.startswith(SAFE_OPTION_PREFIXES)]


def _rsync(args: list[str]) -> int:
    try:
        return subprocess.run(["rsync", *args], check=False).returncode
    except FileNotFoundError:
        raise ShellError("rsync is not installed on the server") from None


def send(repo: Repo, key: Key, inv: Invocation) -> int:
    from git_remote_annexproxy.store import AnnexStore  # noqa: PLC0415

    store = AnnexStore(repo.gitdir, bare=repo.bare)
    path = store.find_object(key)
    if path is None:
        raise ShellError("requested key is not present")
    remote = inv.fields.get("remoteuuid", "")
    with store.lock_shared(key), store.transfer("upload", remote or "unknown", key, None):
        code = _rsync(
            [
                *SERVER_PARAMS[:1],
                "--sender",
                *SERVER_PARAMS[1:],
                *safe_options(inv.extra),
                str(path),
            ]
        )
    return 0 if code == 0 else 1


def receive(repo: Repo, key: Key, inv: Invocation) -> int:
    """rsync the content into a private temp file, then store it through the object
    store's safe write (verify, fsync, rename) like any other upload. The copy costs a
    read of the file; recvkey only serves gcrypt remotes, where safety matters more."""
    import tempfile  # noqa: PLC0415

    from git_remote_annexproxy.branch import AnnexBranch  # noqa: PLC0415
    from git_remote_annexproxy.store import AnnexStore  # noqa: PLC0415

    store = AnnexStore(repo.gitdir, bare=repo.bare)
    if store.has(key):
        return 0
    othertmp = repo.annexdir / "othertmp"
    othertmp.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="recvkey.", dir=othertmp)
    os.close(fd)
    try:
        code = _rsync([*SERVER_PARAMS, *safe_options(inv.extra), tmp])
        if code != 0:
            raise ShellError(f"rsync failed with exit code {code}")
        rec = store.begin_receive(key)
        if rec.offset:
            # A partial from an earlier PUT: start over, rsync brought the whole file.
            rec.discard()
            rec = store.begin_receive(key)
        with rec:
            with open(tmp, "rb") as fh:
                while piece := fh.read(1 << 20):
                    rec.write(piece)
            if not rec.finish():
                raise ShellError("received content failed verification")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    assert repo.uuid is not None
    AnnexBranch(repo.gitdir, repo.annexdir).log_presence(key, repo.uuid, present=True)
    return 0
