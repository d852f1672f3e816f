"""`python -m shell ...` runs git-annex-shell; a proxy uses it to start its own node hops."""

from shell.cli import entry

entry()
