"""annexproxy: the shared core (keys, P2P codec, git-annex branch logs, object store) and
the git-remote-annexproxy helper."""

__version__ = "0.1.0"
