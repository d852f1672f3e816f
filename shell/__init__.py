"""annexproxy's git-annex-shell: a drop-in for git-annex's own, for plain repositories,
proxies and clusters. The entry point is `shell.cli:main`."""
