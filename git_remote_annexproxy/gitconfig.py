"""Read git config files without running git and without dulwich.

git-annex-shell is started by sshd for every session, and `configlist` must answer in a few
milliseconds, so the config is parsed here directly (about 0.1 ms for a typical file) rather
than through `git config --list` (a fork and exec) or dulwich (a heavy import).

The grammar follows git-config(1): `[section]`, `[section "subsection"]` (subsection
case-sensitive, `\\"` and `\\\\` escapes), the deprecated `[section.subsection]`, case-insensitive
section and variable names, `#`/`;` comments outside quotes, double quotes, the `\\n \\t \\b
\\" \\\\` escapes, backslash-newline continuation, and a bare variable name (no `=`): a
value-less key, which git reads as "" as a string and as true as a boolean (`get` and
`get_bool` keep that difference; `git config --list -z` output is read by `parse_list_z`).

`include.path` and `includeIf.<condition>.path` are followed as git does (gitconfig.py's
`_includes`): relative to the including file, `~/` expanded, a missing file ignored, at
most 10 deep; conditions `gitdir:`, `gitdir/i:` and `onbranch:`. `hasconfig:remote.*.url:`
is not evaluated here and never matches (git would need every remote read first).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

# A value-less key (`[core] bare` without `=`): "" as a string, true as a boolean.
Value = str | None

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


def parse_config(text: str) -> Iterator[tuple[str, Value]]:
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
            yield key, None
            continue
        value, cont = _parse_value(rest, lineno)
        while cont and idx < len(lines):
            more, cont = _parse_value(lines[idx], idx + 1, continued=True)
            idx += 1
            value += more
        yield key, value


# git's MAX_INCLUDE_DEPTH.
MAX_INCLUDE_DEPTH = 10

# git's boolean words (config.c git_parse_maybe_bool_text); any integer is a boolean too.
_TRUE = frozenset({"true", "yes", "on"})
_FALSE = frozenset({"false", "no", "off", ""})


def parse_bool(value: Value) -> bool | None:
    """git's boolean reading of a value; None when git would refuse it."""
    if value is None:
        return True
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    try:
        return int(low, 10) != 0
    except ValueError:
        return None


def parse_list_z(data: bytes) -> Iterator[tuple[str, Value]]:
    """`git config --list -z` output: `key\nvalue\0`, or `key\0` for a value-less key."""
    for item in data.split(b"\0"):
        if item:
            key, newline, value = item.decode("utf-8", "surrogateescape").partition("\n")
            yield key, value if newline else None


class GitConfig:
    """A merged view of several config files; later files override earlier ones."""

    def __init__(self, pairs: Iterable[tuple[str, Value]] = ()) -> None:
        self._values: dict[str, list[Value]] = {}
        for key, value in pairs:
            self._values.setdefault(_normalise(key), []).append(value)

    @classmethod
    def read(
        cls, paths: Iterable[str | os.PathLike[str]], gitdir: str | None = None
    ) -> GitConfig:
        """The files in order, with their includes; `gitdir` is the repository the
        conditional includes ask about (None: no `includeIf` matches)."""
        conf = cls()
        for path in paths:
            conf._read_file(os.fspath(path), gitdir, 0)
        return conf

    def _read_file(self, path: str, gitdir: str | None, depth: int) -> None:
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError):
            return
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is too large to be a git config file")
        for key, value in parse_config(data.decode("utf-8", "surrogateescape")):
            self._values.setdefault(key, []).append(value)
            if key.endswith(".path") and key.startswith(("include.", "includeif.")):
                included = _include_target(key, value, path, gitdir)
                if included is not None:
                    if depth + 1 > MAX_INCLUDE_DEPTH:
                        raise ConfigError(f"exceeded maximum include depth in {path}")
                    self._read_file(included, gitdir, depth + 1)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The last value of `key` (section and variable names are case-insensitive); a
        value-less key reads as "" (as `git config --get` prints it)."""
        values = self._values.get(_normalise(key))
        if not values:
            return default
        last = values[-1]
        return "" if last is None else last

    def getraw(self, key: str) -> Value:
        """The last value as stored: None for a value-less key (or a missing one)."""
        values = self._values.get(_normalise(key))
        return values[-1] if values else None

    def __contains__(self, key: str) -> bool:
        return _normalise(key) in self._values

    def set(self, key: str, value: str) -> None:
        """Record a value set meanwhile (after `git config KEY VALUE`), as the last one."""
        self._values.setdefault(_normalise(key), []).append(value)

    def get_all(self, key: str) -> list[str]:
        return ["" if v is None else v for v in self._values.get(_normalise(key), ())]

    def get_bool(self, key: str, default: bool = False) -> bool:
        values = self._values.get(_normalise(key))
        if not values:
            return default
        value = values[-1]
        parsed = parse_bool(value)
        if parsed is None:
            raise ConfigError(f"bad boolean config value {value!r} for {key}")
        return parsed

    def items(self) -> Iterator[tuple[str, str]]:
        for key, values in self._values.items():
            for value in values:
                yield key, "" if value is None else value

    def subsections(self, section: str) -> list[str]:
        """Subsection names of `section` in first-seen order, e.g. remote names."""
        prefix = section.lower() + "."
        seen: dict[str, None] = {}
        for key in self._values:
            if key.startswith(prefix) and key.count(".") >= 2:
                seen[key[len(prefix) : key.rindex(".")]] = None
        return list(seen)


def _include_target(key: str, value: Value, including: str, gitdir: str | None) -> str | None:
    """The file an include key names, or None when its condition does not hold."""
    if not value:
        return None
    if key.startswith("includeif."):
        condition = key[len("includeif.") : -len(".path")]
        if not _condition_holds(condition, including, gitdir):
            return None
    path = _expand_home(value)
    if path is None:
        return None
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(including), path)
    return path


def _expand_home(path: str) -> str | None:
    if path == "~" or path.startswith("~/"):
        home = os.environ.get("HOME")
        return None if home is None else home + path[1:]
    if path.startswith("~"):
        return os.path.expanduser(path) if "/" in path else None
    return path


def _condition_holds(condition: str, including: str, gitdir: str | None) -> bool:
    if gitdir is None:
        return False
    kind, colon, pattern = condition.partition(":")
    if not colon:
        return False
    if kind in ("gitdir", "gitdir/i"):
        return _gitdir_matches(pattern, including, gitdir, fold=kind == "gitdir/i")
    if kind == "onbranch":
        branch = _current_branch(gitdir)
        if branch is None:
            return False
        if pattern.endswith("/"):
            pattern += "**"
        return wildmatch(pattern, branch)
    return False  # hasconfig:, and conditions newer git may add


def _gitdir_matches(pattern: str, including: str, gitdir: str, *, fold: bool) -> bool:
    """config.c include_by_gitdir: `./` is the including file's directory, a relative
    pattern matches anywhere (`**/` before it), a trailing `/` everything below it; the
    real path of the git directory is tried, then the path as given."""
    expanded = _expand_home(pattern)
    if expanded is None:
        return False
    if expanded.startswith("./"):
        expanded = os.path.dirname(os.path.realpath(including)) + expanded[1:]
    elif not os.path.isabs(expanded):
        expanded = "**/" + expanded
    if expanded.endswith("/"):
        expanded += "**"
    candidates = [os.path.realpath(gitdir), os.path.abspath(gitdir)]
    return any(wildmatch(expanded, c, fold=fold) for c in candidates)


def _current_branch(gitdir: str) -> str | None:
    try:
        with open(os.path.join(gitdir, "HEAD"), "rb") as fh:
            head = fh.read(4096).strip()
    except OSError:
        return None
    prefix = b"ref: refs/heads/"
    if not head.startswith(prefix):
        return None  # a detached HEAD is on no branch
    return head[len(prefix) :].decode("utf-8", "surrogateescape")


def wildmatch(pattern: str, text: str, *, fold: bool = False) -> bool:
    """git's wildmatch with WM_PATHNAME: `*` and `?` stop at `/`, `**/` is any number of
    directories, a final `/**` everything below, `[...]` classes (`!` or `^` negates)."""
    import re  # noqa: PLC0415 - only configs with conditional includes get here

    out = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if pattern.startswith("**", i):
                at_start = i == 0 or pattern[i - 1] == "/"
                after = pattern[i + 2 : i + 3]
                if at_start and after == "/":
                    out.append("(?:.*/)?")
                    i += 3
                    continue
                if at_start and i + 2 == n:
                    out.append(".*")
                    i += 2
                    continue
                out.append("[^/]*")
                i += 2
                continue
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            close = pattern.find("]", i + 2)
            if close < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : close]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = close
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(ch))
        i += 1
    flags = re.IGNORECASE if fold else 0
    return re.fullmatch("".join(out), text, flags) is not None


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
    gitdir = os.fspath(gitdir)
    return GitConfig.read([*global_config_paths(), os.path.join(gitdir, "config")], gitdir)
