"""Values inside preferred-content terms, read exactly as git-annex reads them.

Pure module: no I/O. Split out of ``preferred.py`` because each piece mirrors a different
corner of git-annex 10.20261026 and its Haskell libraries, checked against the real binary
(``tests/test_preferred.py``):

* ``split_words``: Haskell's ``words`` (its ``isSpace`` is narrower than Python's).
* ``read_int``: ``readish :: Maybe Int`` (``copies=``, ``lackingcopies=``): a *prefix* parse
  of a Haskell literal, so ``5x`` is 5, ``0x10`` is 16 and big values wrap to 64 bits.
* ``read_size``: ``Utility.DataUnits.readSize dataUnits`` (``largerthan=``/``smallerthan=``).
* ``Glob``: ``Utility.Glob`` turns a glob into a POSIX regex for regex-tdfa (case sensitive,
  "multiline"); we translate the same way and then interpret that regex as regex-tdfa does,
  quirks included (``'`` ``<`` ``>`` `````` become anchors, ``*`` crosses ``/``, one ``/``
  matches a run of slashes, a bad bracket fails only when the glob is first used).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

# --- Haskell character classes --------------------------------------------------------------


def hs_is_space(c: str) -> bool:
    """GHC's ``isSpace``: Latin-1 blanks, then only Unicode category Zs (not \\x1c-\\x1f, \\x85,
    U+2028 which Python's ``str.split`` also splits on)."""
    if ord(c) <= 0x377:
        return c in " \t\n\r\f\v\xa0"
    return unicodedata.category(c) == "Zs"


def split_words(s: str) -> list[str]:
    """Haskell ``words``: split on runs of ``hs_is_space``, no empty words."""
    out: list[str] = []
    cur: list[str] = []
    for c in s:
        if hs_is_space(c):
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


def _hs_lower(s: str) -> str:
    # Haskell's toLower is the simple one-to-one mapping; Python's full mapping turns U+0130
    # into two characters, the only such case.
    return "".join("i" if c == "\u0130" else c.lower() for c in s)


# --- Haskell number literals (GHC.Read.Lex) -------------------------------------------------

_OCT = "01234567"
_HEX = "0123456789abcdefABCDEF"
_DEC = "0123456789"


@dataclass(frozen=True, slots=True)
class _Lexeme:
    text: str  # the literal, e.g. "0x1F" or "1.5e3" (a valid Python float literal if base 10)
    base: int  # 8, 10 or 16
    integral: bool  # no fraction and no exponent: what Read Int accepts
    rest: str


def _digits(s: str, i: int, alphabet: str) -> int:
    j = i
    while j < len(s) and s[j] in alphabet:
        j += 1
    return j


def _lex_number(s: str) -> _Lexeme | None:
    """GHC's ``lexNumber`` on the start of ``s`` (no sign). Hex and octal first, then decimal
    with an optional ``.digits`` and ``e[+-]digits``; each optional part is dropped, not an
    error, when incomplete (``5e`` lexes as ``5`` followed by ``e``)."""
    if len(s) >= 3 and s[0] == "0" and s[1] in "xXoO":
        alphabet, base = (_HEX, 16) if s[1] in "xX" else (_OCT, 8)
        end = _digits(s, 2, alphabet)
        if end > 2:
            return _Lexeme(s[:end], base, True, s[end:])
    end = _digits(s, 0, _DEC)
    if end == 0:
        return None
    integral = True
    if end + 1 < len(s) and s[end] == "." and s[end + 1] in _DEC:
        end, integral = _digits(s, end + 1, _DEC), False
    if end < len(s) and s[end] in "eE":
        j = end + 2 if s[end + 1 : end + 2] in ("+", "-") else end + 1
        if _digits(s, j, _DEC) > j:
            end, integral = _digits(s, j, _DEC), False
    return _Lexeme(s[:end], 10, integral, s[end:])


def _int_value(lex: _Lexeme) -> int:
    if lex.base != 10:  # int() has no length limit for power-of-two bases
        return int(lex.text[2:], lex.base)
    # Python refuses int() of a decimal string over 4300 digits; only the low 64 bits matter.
    n = 0
    for i in range(0, len(lex.text), 1000):
        chunk = lex.text[i : i + 1000]
        n = (n * 10 ** len(chunk) + int(chunk)) % 2**64
    return n


def _skip_spaces(s: str) -> str:
    i = 0
    while i < len(s) and hs_is_space(s[i]):
        i += 1
    return s[i:]


def _split_sign(s: str) -> tuple[bool, str]:
    """GHC's ``readNumber``: an optional ``-`` before the literal (``--5`` or ``-+5`` then fail
    to lex as a number)."""
    s = _skip_spaces(s)
    if not s.startswith("-"):
        return False, s
    return True, _skip_spaces(s[1:])


def _wrap64(n: int) -> int:
    return (n + 2**63) % 2**64 - 2**63


def read_int(s: str) -> int | None:
    """``readish s :: Maybe Int``: the first parse of a prefix, trailing text ignored.

    A fraction or exponent makes it fail (``1.0``, ``1e3``), but a lone ``.`` or ``e`` is just
    trailing text. ``fromInteger`` wraps to 64 bits, so ``18446744073709551616`` reads as 0.
    """
    negative, body = _split_sign(s)
    lex = _lex_number(body)
    if lex is None or not lex.integral:
        return None
    n = _wrap64(_int_value(lex))
    return _wrap64(-n) if negative else n


def _is_ident_char(c: str) -> bool:
    return c.isalnum() or c in "_'"


def _read_double(s: str) -> tuple[float, str] | None:
    """``reads :: ReadS Double`` (first result): a number literal or ``NaN``/``Infinity``."""
    negative, body = _split_sign(s)
    value: float
    if body[:1].isalpha() or body[:1] == "_":
        end = 1
        while end < len(body) and _is_ident_char(body[end]):
            end += 1
        ident, rest = body[:end], body[end:]
        if ident == "NaN":
            value = math.nan
        elif ident == "Infinity":
            value = math.inf
        else:
            return None
    else:
        lex = _lex_number(body)
        if lex is None:
            return None
        rest = lex.rest
        if lex.base == 10:
            # Correctly rounded like fromRational; huge exponents give inf or 0, as in GHC.
            value = float(lex.text)
        else:
            try:
                value = float(_int_value(lex))
            except OverflowError:
                value = math.inf
    return (-value if negative else value), rest


def _hs_round(x: float) -> int:
    """Haskell ``round :: Double -> Integer``: half to even; GHC turns the non-finite values
    into these integers (what decodeFloat gives for them)."""
    if math.isnan(x):
        return -3 * 2**1023
    if math.isinf(x):
        return 2**1024 if x > 0 else -(2**1024)
    return round(x)


# git-annex's dataUnits, in its lookup order: storage (powers of 1000), committee (powers of
# 1024), bandwidth (bits). "B"/"byte" also appear in the second list; first match wins anyway.
_UNITS: tuple[tuple[int, str, str], ...] = (
    *(
        (1000**p, a, n)
        for p, a, n in (
            (10, "QB", "quettabyte"),
            (9, "RB", "ronnabyte"),
            (8, "YB", "yottabyte"),
            (7, "ZB", "zettabyte"),
            (6, "EB", "exabyte"),
            (5, "PB", "petabyte"),
            (4, "TB", "terabyte"),
            (3, "GB", "gigabyte"),
            (2, "MB", "megabyte"),
            (1, "kB", "kilobyte"),
            (0, "B", "byte"),
        )
    ),
    *(
        (1024**p, a, n)
        for p, a, n in (
            (8, "YiB", "yobibyte"),
            (7, "ZiB", "zebibyte"),
            (6, "EiB", "exbibyte"),
            (5, "PiB", "pebibyte"),
            (4, "TiB", "tebibyte"),
            (3, "GiB", "gibibyte"),
            (2, "MiB", "mebibyte"),
            (1, "KiB", "kibibyte"),
        )
    ),
    *(
        (1000**p // 8, a, n)
        for p, a, n in (
            (8, "Ybit", "yottabit"),
            (7, "Zbit", "zettabit"),
            (6, "Ebit", "exabit"),
            (5, "Pbit", "petabit"),
            (4, "Tbit", "terabit"),
            (3, "Gbit", "gigabit"),
            (2, "Mbit", "megabit"),
            (1, "kbit", "kilobit"),
        )
    ),
)


def _unit_multiplier(name: str) -> int | None:
    if not name:
        return 1
    v = _hs_lower(name)
    for size, abbrev, full in _UNITS:
        a, n = _hs_lower(abbrev), _hs_lower(full)
        # Case-insensitive abbreviation, name or plural; "k", "m", "gi" etc. work because an
        # abbreviation also matches the given name plus "b".
        if v in (a, n, n + "s") or a == v + "b":
            return size
    return None


def read_size(s: str) -> int | None:
    """``readSize dataUnits``: a Double, then a unit made of the letters that follow.

    Anything after the unit's letters is ignored (``10kb!`` is 10000, ``5.kb`` is 5 bytes),
    units are case-insensitive and SI unless they say ``i`` (``1kb`` = 1000, ``1KiB`` = 1024,
    ``1Mbit`` = 125000), and the product is computed in Double and rounded half to even.
    """
    parsed = _read_double(s)
    if parsed is None:
        return None
    number, rest = parsed
    rest = _skip_spaces(rest)
    end = 0
    while end < len(rest) and rest[end].isalpha():
        end += 1
    multiplier = _unit_multiplier(rest[:end])
    if multiplier is None:
        return None
    return _hs_round(number * float(multiplier))


# --- globs ------------------------------------------------------------------------------------


class GlobError(ValueError):
    """The regex made from a glob does not compile; git-annex fails when it first uses it."""


def glob_to_regex(glob: str) -> str:
    """``Utility.Glob.wildToRegex`` for file paths on POSIX, anchored with ``^...$``.

    Note that it closes a bracket at the first ``]`` even where POSIX would not, and escapes
    every character that is not a letter or ASCII digit, which regex-tdfa reads as an anchor
    for `````, ``'``, ``<`` and ``>``. Reproduced on purpose: that is what git-annex matches.
    """
    out = ["^"]
    i = 0
    in_bracket = False
    while i < len(glob):
        c = glob[i]
        i += 1
        if in_bracket:
            if c == "]":
                out.append("]")
                in_bracket = False
            else:
                out.append("\\\\" if c == "\\" else c)
        elif c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            if i < len(glob) and glob[i] == "!":
                out.append("[^")
                i += 1
            else:
                out.append("[")
            in_bracket = True
        elif c == "/":
            out.append("[/]+")
        elif c == "\\":
            out.append("[\\]+")
        elif c.isalpha() or c in _DEC:
            out.append(c)
        else:
            out.append("\\" + c)
    out.append("$")
    return "".join(out)


_WORD = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")


def _chars(*ranges: tuple[str, str]) -> frozenset[str]:
    return frozenset(chr(c) for lo, hi in ranges for c in range(ord(lo), ord(hi) + 1))


# regex-tdfa's POSIX classes are ASCII only; an unknown class name is the empty set.
_CLASSES: dict[str, frozenset[str]] = {
    "alnum": _chars(("0", "9"), ("A", "Z"), ("a", "z")),
    "digit": _chars(("0", "9")),
    "punct": _chars(("!", "/"), (":", "@"), ("[", "`"), ("{", "~")),
    "alpha": _chars(("A", "Z"), ("a", "z")),
    "graph": _chars((")", "~")),
    "space": frozenset("\t\n\v\f\r "),
    "blank": frozenset("\t "),
    "lower": _chars(("a", "z")),
    "upper": _chars(("A", "Z")),
    "cntrl": _chars(("\0", "\x1f"), ("\x7f", "\x7f")),
    "print": _chars((" ", "~")),
    "xdigit": _chars(("0", "9"), ("A", "F"), ("a", "f")),
    "word": _WORD,
}


@dataclass(frozen=True, slots=True)
class _CharSet:
    chars: frozenset[str]
    ranges: tuple[tuple[str, str], ...]
    negated: bool

    def __call__(self, c: str) -> bool:
        hit = c in self.chars or any(lo <= c <= hi for lo, hi in self.ranges)
        # Multiline mode: a negated bracket never matches a newline (nor does ".").
        return (not hit and c != "\n") if self.negated else hit


_CharTest = Callable[[str], bool]
# A piece is an assertion (by name) or a one-character test with its repetition: "1" or "*".
_Piece = tuple[str, _CharTest | None, str]


def _parse_bracket(r: str, i: int) -> tuple[_CharSet, int]:
    """regex-tdfa's ``p_bracket`` from just after ``[``; returns the set and the index after
    its ``]``. Collating elements ``[.x.]`` are parsed and ignored, as regex-tdfa does."""
    negated = r.startswith("^", i)
    if negated:
        i += 1
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
    if r.startswith("]", i):  # a "]" first is literal
        chars.add("]")
        i += 1
    while True:
        if i >= len(r):
            raise GlobError("unterminated bracket")
        if r[i] == "]":
            return _CharSet(frozenset(chars), tuple(ranges), negated), i + 1
        for opener, closer in (("[:", ":]"), ("[=", "=]"), ("[.", ".]")):
            if r.startswith(opener, i):
                end = i + 2
                while end < len(r) and r[end] not in (closer[0], "]"):
                    end += 1
                if end > i + 2 and r.startswith(closer, end):
                    name = r[i + 2 : end]
                    if opener == "[:":
                        chars |= _CLASSES.get(name, frozenset())
                    elif opener == "[=":
                        chars |= set(name)
                    i = end + 2
                    break
        else:
            if i + 2 < len(r) and r[i + 1] == "-" and r[i + 2] != "]":
                lo, hi = r[i], r[i + 2]
                if lo > hi:
                    raise GlobError("bad character range")
                ranges.append((lo, hi))
                i += 3
            else:
                chars.add(r[i])
                i += 1


# Backslash escapes that regex-tdfa (newSyntax) reads as assertions; others are literal.
_ESCAPE_ASSERTIONS = {"`": "bob", "'": "eob", "<": "bow", ">": "eow", "b": "edge", "B": "noedge"}


def _parse_regex(r: str) -> list[_Piece]:
    """Parse the regexes ``glob_to_regex`` produces, which use only ``^ $ . * + [..] \\c`` and
    literal letters and digits outside brackets (everything else is escaped or bracketed)."""
    pieces: list[_Piece] = []
    i = 0
    while i < len(r):
        c = r[i]
        if c in "*+":
            if not pieces or pieces[-1][1] is None:
                raise GlobError("repetition of nothing")
            kind, test, rep = pieces[-1]
            if c == "*":
                pieces[-1] = (kind, test, "*")
            elif rep == "1":  # x+ is x then x*
                pieces.append((kind, test, "*"))
            i += 1
            continue
        if c == "^":
            pieces.append(("bol", None, "1"))
        elif c == "$":
            pieces.append(("eol", None, "1"))
        elif c == ".":
            pieces.append(("char", lambda ch: ch != "\n", "1"))
        elif c == "[":
            charset, i = _parse_bracket(r, i + 1)
            pieces.append(("char", charset, "1"))
            continue
        elif c == "\\":
            if i + 1 >= len(r):
                raise GlobError("trailing backslash")
            esc = r[i + 1]
            i += 1
            if esc in _ESCAPE_ASSERTIONS:
                pieces.append((_ESCAPE_ASSERTIONS[esc], None, "1"))
            else:
                pieces.append(("char", esc.__eq__, "1"))
        elif c not in "()|?{":
            pieces.append(("char", c.__eq__, "1"))
        else:  # cannot come out of glob_to_regex (escaped or inside a bracket)
            raise GlobError(f"unexpected {c!r}")
        i += 1
    return pieces


def _assertion(kind: str, s: str, pos: int) -> bool:
    # regex-tdfa's multiline tests: the character before the start counts as a newline.
    prev = s[pos - 1] if pos > 0 else "\n"
    nxt = s[pos] if pos < len(s) else None
    if kind == "bol":
        return prev == "\n"
    if kind == "eol":
        return nxt is None or nxt == "\n"
    if kind == "bob":
        return pos == 0
    if kind == "eob":
        return nxt is None
    prev_w, next_w = prev in _WORD, nxt is not None and nxt in _WORD
    if kind == "bow":
        return not prev_w and next_w
    if kind == "eow":
        return prev_w and not next_w
    edge = prev_w != next_w
    return edge if kind == "edge" else not edge


class Glob:
    """A preferred-content glob. Matching simulates the pattern as an automaton, so it is
    linear in the path length times the pattern length: globs come from the git-annex branch
    and paths from the network, and a backtracking regex engine could be made to stall."""

    __slots__ = ("_error", "_pieces", "regex")

    def __init__(self, glob: str) -> None:
        self.regex = glob_to_regex(glob)
        self._pieces: list[_Piece] = []
        self._error: str | None = None
        try:
            self._pieces = _parse_regex(self.regex)
        except GlobError:
            self._error = f"failed to compile regex: {self.regex}"

    def matches(self, s: str) -> bool:
        """Search semantics, like regex-tdfa's ``matchTest``. Raises GlobError when the regex
        did not compile: git-annex compiles lazily, so a bad glob only fails when used."""
        if self._error is not None:
            raise GlobError(self._error)
        pieces = self._pieces
        end = len(pieces)

        def closure(states: set[int], pos: int) -> set[int]:
            todo = list(states)
            while todo:
                st = todo.pop()
                if st == end:
                    continue
                kind, _test, rep = pieces[st]
                passes = rep == "*" or (kind != "char" and _assertion(kind, s, pos))
                if passes and st + 1 not in states:
                    states.add(st + 1)
                    todo.append(st + 1)
            return states

        active: set[int] = set()
        for pos in range(len(s) + 1):
            active = closure(active | {0}, pos)  # a match may start anywhere
            if end in active:
                return True
            if pos == len(s):
                return False
            ch = s[pos]
            nxt: set[int] = set()
            for st in active:
                if st < end:
                    _kind, test, rep = pieces[st]
                    if test is not None and test(ch):
                        nxt.add(st if rep == "*" else st + 1)
            active = nxt
        return False
