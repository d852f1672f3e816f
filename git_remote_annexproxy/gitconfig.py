"""Read git config files without running git and without dulwich.

git-annex-shell is started by sshd for every session, and `configlist` must answer in a few
milliseconds, so the config is parsed here directly (about 0.1 ms for a typical file) rather
than through `git config --list` (a fork and exec) or dulwich (a heavy import).

The grammar follows git-config(1): `[section]`, `[section "subsection"]` (subsection
case-sensitive, `\\"` and `\\\\` escapes), the deprecated `[section.subsection]`, case-insensitive
section and variable names, `#`/`;` comments outside quotes, double quotes, the `\\n \\t \\b
\\" \\\\` escapes, backslash-newline continuation, and a bare variable name meaning `true`.
`include`/`includeIf` are not followed: the server only reads repository-local settings
(annex.uuid, remotes) and settings an admin writes in the plain files read here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

# A git config file is small; a huge one is hostile or broken, and we refuse to read it
# rather than spend memory on it.
MAX_CONFIG_BYTES = 4 << 20


class ConfigError(ValueError):
    """A config file that git itself would refuse to read."""


_ESCAPES = {"n": "\n", "t": "\t", "b": "\b", '"': '"', "\\": "\\"}


def _parse_section(header: str, lineno: int) -> str:
    """Turn the inside of `[...]` into the dotted prefix used for variable names."""
    header = header.strip()
    if " " in header or "\t" in header or '"' in header:
        name, _, rest = header.partition('"')
        name = name.strip()
        if not rest.endswith('"'):
            raise ConfigError(f"bad section header on line {lineno}")
        raw = rest[:-1]
        sub: list[str] = []
        i = 0
        while i < len(raw):
            ch = raw[i]
            if ch == "\\" and i + 1 < len(raw):
                i += 1
                ch = raw[i]
            sub.append(ch)
            i += 1
        return f"{name.lower()}.{''.join(sub)}"
    name, dot, sub_legacy = header.partition(".")
    if dot:
        # [section.subsection] is the deprecated form; git lowercases the subsection.
        return f"{name.lower()}.{sub_legacy.lower()}"
    return name.lower()


def _parse_value(text: str, lineno: int, continued: bool = False) -> tuple[str, bool]:
    """Parse a value; returns it and whether it ends in a continuation backslash.

    On a continuation line git keeps the leading whitespace, so `continued` counts it.
    """
    out: list[str] = [""] if continued else []
    pending_space = ""
    in_quote = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                out.append(pending_space)
                return "".join(out), True
            nxt = text[i + 1]
            if nxt not in _ESCAPES:
                raise ConfigError(f"bad escape in config value on line {lineno}")
            out.append(pending_space)
            pending_space = ""
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        if ch == '"':
            in_quote = not in_quote
            out.append(pending_space)
            pending_space = ""
        elif not in_quote and ch in "#;":
            break
        elif not in_quote and ch in " \t":
            # Whitespace is kept only between words, never at the ends.
            if out:
                pending_space += ch
        else:
            out.append(pending_space)
            pending_space = ""
            out.append(ch)
        i += 1
    if in_quote:
        raise ConfigError(f"unterminated quote in config value on line {lineno}")
    return "".join(out), False


def parse_config(text: str) -> Iterator[tuple[str, str]]:
    """Yield (`section[.subsection].name`, value) pairs in file order."""
    section: str | None = None
    lines = text.split("\n")
    idx = 0
    while idx < len(lines):
        lineno = idx + 1
        line = lines[idx].strip()
        idx += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            close = line.find("]")
            if close < 0:
                raise ConfigError(f"bad section header on line {lineno}")
            section = _parse_section(line[1:close], lineno)
            line = line[close + 1 :].strip()
            if not line or line[0] in "#;":
                continue
        if section is None:
            raise ConfigError(f"variable outside any section on line {lineno}")
        name, eq, rest = line.partition("=")
        name = name.strip()
        if (
            not name
            or not (name[0].isascii() and name[0].isalpha())
            or not all(c.isascii() and (c.isalnum() or c == "-") for c in name)
        ):
            raise ConfigError(f"bad variable name on line {lineno}")
        key = f"{section}.{name.lower()}"
        if not eq:
            yield key, "true"
            continue
        value, cont = _parse_value(rest, lineno)
        while cont and idx < len(lines):
            more, cont = _parse_value(lines[idx], idx + 1, continued=True)
            idx += 1
            value += more
        yield key, value


class GitConfig:
    """A merged view of several config files; later files override earlier ones."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._values: dict[str, list[str]] = {}
        for key, value in pairs:
            self._values.setdefault(key, []).append(value)

    @classmethod
    def read(cls, paths: Iterable[str | os.PathLike[str]]) -> GitConfig:
        conf = cls()
        for path in paths:
            try:
                with open(path, "rb") as fh:
                    data = fh.read(MAX_CONFIG_BYTES + 1)
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigError(f"{path} is too large to be a git config file")
            for key, value in parse_config(data.decode("utf-8", "surrogateescape")):
                conf._values.setdefault(key, []).append(value)
        return conf

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value of `key` (section and variable names are case-insensitive)."""
        values = self._values.get(_normalise(key))
        return values[-1] if values else default

    def get_all(self, key: str) -> list[str]:
        return list(self._values.get(_normalise(key), ()))

    def get_bool(self, key: str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        low = value.strip().lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0", ""):
            return False
        raise ConfigError(f"bad boolean config value {value!r} for {key}")

    def items(self) -> Iterator[tuple[str, str]]:
        for key, values in self._values.items():
            for value in values:
                yield key, value

    def subsections(self, section: str) -> list[str]:
        """Subsection names of `section` in first-seen order, e.g. remote names."""
        prefix = section.lower() + "."
        seen: dict[str, None] = {}
        for key in self._values:
            if key.startswith(prefix) and key.count(".") >= 2:
                seen[key[len(prefix) : key.rindex(".")]] = None
        return list(seen)


def _normalise(key: str) -> str:
    first, _, rest = key.partition(".")
    if "." in rest:
        sub, _, name = rest.rpartition(".")
        return f"{first.lower()}.{sub}.{name.lower()}"
    return f"{first.lower()}.{rest.lower()}"


def global_config_paths() -> list[str]:
    """System and user config files, in the order git reads them.

    Plain strings, not pathlib: importing pathlib costs milliseconds at start-up.
    """
    paths = [os.environ.get("GIT_CONFIG_SYSTEM", "/etc/gitconfig")]
    xdg = os.environ.get("XDG_CONFIG_HOME")
    home = os.environ.get("HOME")
    if xdg:
        paths.append(os.path.join(xdg, "git", "config"))
    elif home:
        paths.append(os.path.join(home, ".config", "git", "config"))
    if home:
        paths.append(os.path.join(home, ".gitconfig"))
    return paths


def read_repo_config(gitdir: str | os.PathLike[str]) -> GitConfig:
    """The effective config of the repository whose git directory is `gitdir`."""
    return GitConfig.read([*global_config_paths(), os.path.join(gitdir, "config")])
