"""`git-annex-shell notifychanges`: tell a client when refs move (git-annex's remotedaemon).

Prints `READY`, then `CHANGED <sha>...` with the new shas of refs that changed, until the
client closes stdin. Refs are polled (loose ref files and packed-refs) rather than watched
with inotify, which the standard library lacks; a poll of a few hundred refs is cheap.
"""

from __future__ import annotations

import os
import select
import sys
from pathlib import Path

from shell.repo import Repo

POLL_SECONDS = 0.5


def read_refs(gitdir: Path) -> dict[str, str]:
    refs: dict[str, str] = {}
    try:
        with open(gitdir / "packed-refs", "rb") as fh:
            for raw in fh:
                if raw[:1] in (b"#", b"^"):
                    continue
                sha_b, _, name_b = raw.strip().partition(b" ")
                refs[name_b.decode("utf-8", "surrogateescape")] = sha_b.decode("ascii", "replace")
    except FileNotFoundError:
        pass
    root = gitdir / "refs"
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            try:
                sha = path.read_bytes()[:64].strip().decode("ascii", "replace")
            except OSError:
                continue
            if sha.startswith("ref:"):
                continue
            refs[str(path.relative_to(gitdir))] = sha
    return refs


def run(repo: Repo) -> int:
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    known = read_refs(repo.gitdir)
    while True:
        ready, _, _ = select.select([0], [], [], POLL_SECONDS)
        if ready and not os.read(0, 4096):
            return 0  # the client closed stdin: the normal end
        current = read_refs(repo.gitdir)
        changed = sorted({sha for name, sha in current.items() if known.get(name) != sha})
        known = current
        if changed:
            out.write("CHANGED " + " ".join(changed) + "\n")
            out.flush()
