"""The environment for a git process that must see its own repository, not ours.

git hands a remote helper `GIT_DIR` (and may add `GIT_CONFIG_PARAMETERS` and friends); a
git service we start for another repository must not inherit them, or it would serve the
client's repository, or apply the client's `-c` settings on the server. The list is
`git rev-parse --local-env-vars` (git 2.39), which is what git itself clears for a local
transport.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LOCAL_REPO_ENV = frozenset(
    {
        "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS",
        "GIT_CONFIG_COUNT", "GIT_OBJECT_DIRECTORY", "GIT_DIR", "GIT_WORK_TREE",
        "GIT_IMPLICIT_WORK_TREE", "GIT_GRAFT_FILE", "GIT_INDEX_FILE", "GIT_NO_REPLACE_OBJECTS",
        "GIT_REPLACE_REF_BASE", "GIT_PREFIX", "GIT_INTERNAL_SUPER_PREFIX", "GIT_SHALLOW_FILE",
        "GIT_COMMON_DIR",
    }
)  # fmt: skip


def without_local_repo(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A copy of env without the variables that tie git to one repository.

    `GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n` go too: they only mean something together with
    `GIT_CONFIG_COUNT`, and a stale pair must not come back to life.
    """
    return {
        name: value
        for name, value in env.items()
        if name not in LOCAL_REPO_ENV
        and not name.startswith(("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_"))
    }
