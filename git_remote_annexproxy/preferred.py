"""git-annex preferred-content expressions: parse, evaluate, and a repository's policy.

Pure module: no I/O. A cluster gateway PUTs a key to the nodes whose preferred content wants
it, so this answers "does repository U want KEY (for FILE)" as git-annex 10.20261026 would.
Sources: ``Utility/Matcher.hs``, ``Annex/FileMatcher.hs``, ``Limit.hs``,
``Logs/PreferredContent.hs``, ``Types/StandardGroups.hs``; every rule below was checked
against the binary (``git annex matchexpression``, ``vicfg``; see ``tests/test_preferred.py``).

Grammar, as git-annex has it (it has no syntax errors, only bad terms):

* Tokens are split on whitespace, and ``(``/``)`` always stand alone.
* No precedence: ``a or b and c`` is ``(a or b) and c``, strictly left to right. ``not``
  negates the one term or group after it. Adjacent terms are and-ed.
* Forgiving: unbalanced parentheses are fine, a trailing ``or``/``and`` joins "anything"
  (so ``x or`` matches everything), a trailing ``not`` is "not anything".
* Quirk kept: inside parentheses a group right after a term shares that term's accumulator,
  so ``( a ( b or c ) )`` is ``(a and b) or c`` while ``a ( b or c )`` is ``a and (b or c)``.

Evaluation quirks kept: with no file name, ``include=`` is false and ``exclude=`` true; with
no size, ``smallerthan=`` is true and ``largerthan=`` false; an expression where ``present``
(also via ``standard``/``groupwanted``) is negated never matches ("not stable").
"""

from __future__ import annotations

import enum
import functools
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from git_remote_annexproxy import maplog, repologs
from git_remote_annexproxy.keys import Key
from git_remote_annexproxy.preferred_values import Glob, read_int, read_size, split_words
from git_remote_annexproxy.reposize import RepoSizes, balanced_pick, emptiest, with_space

__all__ = [
    "STANDARD_GROUPS",
    "Expr",
    "MatchContext",
    "PreferredContentError",
    "RepoPolicy",
    "TrustLevel",
    "UnsupportedTermError",
    "associated_file_path",
    "is_cluster_uuid",
    "parse",
    "parse_trust_log",
]


class PreferredContentError(ValueError):
    """An expression git-annex rejects (one line, git-annex's wording), or a glob that fails
    when first evaluated (git-annex aborts then too)."""


class UnsupportedTermError(PreferredContentError):
    """A term git-annex accepts but this module cannot evaluate (it needs state we do not
    have: metadata, unused keys, repository sizes...). Never treated as true or false."""


class TrustLevel(enum.IntEnum):
    DEAD = 0
    UNTRUSTED = 1
    SEMITRUSTED = 2
    TRUSTED = 3


_TRUST_NAMES = {
    "dead": TrustLevel.DEAD,
    "untrusted": TrustLevel.UNTRUSTED,
    "semitrusted": TrustLevel.SEMITRUSTED,
    "trusted": TrustLevel.TRUSTED,
}


def is_cluster_uuid(u: str) -> bool:
    """git-annex's isClusterUUID: starts with ``ac`` and has ``8`` as its 15th character."""
    return u.startswith("ac") and len(u) > 14 and u[14] == "8"


@dataclass(frozen=True)
class MatchContext:
    """What an expression is matched against: one key for one repository.

    ``present_uuids`` is git-annex's ``loggedLocations``: the UUIDs the location log says have
    the key, plus each cluster one of whose nodes has it (cluster UUIDs never count as copies).
    Dead repositories (per ``trust``, default semitrusted) are ignored here. ``file`` is the
    path globs see, relative to the repository top (None: no associated file). ``size``
    overrides ``key.size``. ``groups`` maps a UUID to its groups, ``groupwanted`` a group to
    its expression, ``preferreddir`` is the repository's remote config (``inpreferreddir``),
    ``equivalent_keys`` the recorded equivalents of a VURL key (``securehash``), ``sizes``
    the repositories' sizes and maxsizes (the ``balanced`` family; unknown means not full).
    """

    key: Key
    file: str | None = None
    size: int | None = None
    this_uuid: str | None = None
    present_uuids: AbstractSet[str] = frozenset()
    groups: Mapping[str, AbstractSet[str]] = field(default_factory=dict)
    trust: Mapping[str, TrustLevel] = field(default_factory=dict)
    numcopies: int = 1
    groupwanted: Mapping[str, str] = field(default_factory=dict)
    preferreddir: str = "public"
    equivalent_keys: tuple[Key, ...] = ()
    sizes: RepoSizes = field(default_factory=RepoSizes)

    def trust_of(self, u: str) -> TrustLevel:
        return self.trust.get(u, TrustLevel.SEMITRUSTED)

    def locations(self) -> set[str]:
        """``Remote.keyLocations``: logged locations minus dead repositories."""
        return {u for u in self.present_uuids if self.trust_of(u) != TrustLevel.DEAD}

    def members(self, group: str) -> set[str]:
        return {u for u, gs in self.groups.items() if group in gs}


def _count_copies(uuids: set[str]) -> int:
    return sum(1 for u in uuids if not is_cluster_uuid(u))


# --- expression tree ---------------------------------------------------------------------------

# Deeper trees are refused: every walk below recurses, and no real expression comes close
# (a long "include=a or include=b or ..." list is flat, see _join).
MAX_DEPTH = 64


class Expr:
    """A parsed expression. ``str()`` prints it back so that ``parse(str(e)) == e``."""

    depth: int = 1

    def matches(self, ctx: MatchContext) -> bool:
        """Does the expression want ``ctx.key``? ``standard`` and ``groupwanted`` are
        resolved for ``ctx.this_uuid`` from ``ctx.groups``/``ctx.groupwanted`` as git-annex
        does (no single standard group, or a bad group expression: the whole expression
        becomes ``present``). Raises UnsupportedTermError, or PreferredContentError for a glob
        that does not compile (only if that term is reached, as in git-annex)."""
        expr = self
        if not self.is_bound():
            groups = ctx.groups.get(ctx.this_uuid, frozenset()) if ctx.this_uuid else frozenset()
            expr = bind_or_present(self, groups, ctx.groupwanted)
        result = expr.evaluate(ctx)  # first: a bad glob fails even if the answer is "no"
        # checkMatcher': negating a term whose answer flips as content moves (present) makes
        # the expression unstable, and git-annex then answers no.
        return result and not any(t.unstable() for t in expr.negated_leaves(False))

    @property
    def is_empty(self) -> bool:
        """No terms at all: git-annex treats the expression as not configured."""
        return isinstance(self, Empty)

    # Internal walks, overridden below.
    def evaluate(self, ctx: MatchContext) -> bool:
        raise NotImplementedError

    def is_bound(self) -> bool:
        return True

    def bind(self, groups: AbstractSet[str], gw: Mapping[str, str], std: bool, grp: bool) -> Expr:
        return self

    def negated_leaves(self, negated: bool) -> Iterator[Leaf]:
        return iter(())

    def leaves(self) -> Iterator[Leaf]:
        return iter(())

    def needs_sizes(self) -> bool:
        """Does evaluating it need ``MatchContext.sizes`` (a balanced term)? A caller can
        skip computing repository sizes when not."""
        return any(t.uses_sizes() for t in self.leaves())


@dataclass(frozen=True)
class Empty(Expr):
    """git-annex's MAny: no term; matches everything."""

    def evaluate(self, ctx: MatchContext) -> bool:
        return True

    def __str__(self) -> str:
        return "( )"


EMPTY = Empty()


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr
    depth: int = field(default=1, compare=False, repr=False)

    def evaluate(self, ctx: MatchContext) -> bool:
        return not self.operand.evaluate(ctx)

    def is_bound(self) -> bool:
        return self.operand.is_bound()

    def bind(self, groups: AbstractSet[str], gw: Mapping[str, str], std: bool, grp: bool) -> Expr:
        return _not(self.operand.bind(groups, gw, std, grp))

    def negated_leaves(self, negated: bool) -> Iterator[Leaf]:
        return self.operand.negated_leaves(not negated)

    def leaves(self) -> Iterator[Leaf]:
        return self.operand.leaves()

    def __str__(self) -> str:
        inner = self.operand
        return f"not ( {inner} )" if isinstance(inner, _Nary) else f"not {inner}"


@dataclass(frozen=True)
class _Nary(Expr):
    """And/Or over two or more operands, left to right with short circuit (nested chains of
    the same operator are flattened: same meaning, same evaluation order)."""

    operands: tuple[Expr, ...]
    depth: int = field(default=1, compare=False, repr=False)
    word = ""

    def is_bound(self) -> bool:
        return all(o.is_bound() for o in self.operands)

    def bind(self, groups: AbstractSet[str], gw: Mapping[str, str], std: bool, grp: bool) -> Expr:
        bound = [o.bind(groups, gw, std, grp) for o in self.operands]
        return functools.reduce(lambda a, b: _join(type(self), a, b), bound)

    def negated_leaves(self, negated: bool) -> Iterator[Leaf]:
        for o in self.operands:
            yield from o.negated_leaves(negated)

    def leaves(self) -> Iterator[Leaf]:
        for o in self.operands:
            yield from o.leaves()

    def __str__(self) -> str:
        # Left to right without precedence, so only later operands need parentheses.
        parts = [str(self.operands[0])]
        for o in self.operands[1:]:
            parts.append(f"( {o} )" if isinstance(o, _Nary) else str(o))
        return f" {self.word} ".join(parts)


@dataclass(frozen=True, repr=False)
class And(_Nary):
    word = "and"

    def evaluate(self, ctx: MatchContext) -> bool:
        return all(o.evaluate(ctx) for o in self.operands)


@dataclass(frozen=True, repr=False)
class Or(_Nary):
    word = "or"

    def evaluate(self, ctx: MatchContext) -> bool:
        return any(o.evaluate(ctx) for o in self.operands)


class Leaf(Expr):
    text: str

    def unstable(self) -> bool:
        return False

    def uses_sizes(self) -> bool:
        return False

    def negated_leaves(self, negated: bool) -> Iterator[Leaf]:
        if negated:
            yield self

    def leaves(self) -> Iterator[Leaf]:
        yield self

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Term(Leaf):
    """One term; equal terms have equal text (the text fixes the meaning)."""

    text: str
    test: Callable[[MatchContext], bool] = field(compare=False, repr=False)
    is_unstable: bool = field(default=False, compare=False, repr=False)
    sized: bool = field(default=False, compare=False, repr=False)

    def evaluate(self, ctx: MatchContext) -> bool:
        return self.test(ctx)

    def unstable(self) -> bool:
        return self.is_unstable

    def uses_sizes(self) -> bool:
        return self.sized


@dataclass(frozen=True)
class Call(Leaf):
    """``standard`` or ``groupwanted``: another expression, chosen by the repository's groups.
    ``body`` is None until bound (``Expr.matches`` and ``RepoPolicy`` bind it)."""

    text: str
    body: Expr | None = field(default=None)

    def evaluate(self, ctx: MatchContext) -> bool:
        if self.body is None:
            raise PreferredContentError(f"{self.text} is not bound to a repository")
        return self.body.evaluate(ctx)

    def is_bound(self) -> bool:
        return self.body is not None

    def unstable(self) -> bool:
        # git-annex flags the whole call when any term inside is unstable, negated or not.
        return self.body is not None and any(t.unstable() for t in self.body.leaves())

    def uses_sizes(self) -> bool:
        return self.body is not None and self.body.needs_sizes()

    def bind(self, groups: AbstractSet[str], gw: Mapping[str, str], std: bool, grp: bool) -> Expr:
        body: Expr = PRESENT
        if self.text == "standard" and std:
            standard = [g for g in groups if g in STANDARD_GROUPS]
            if len(standard) == 1:
                body = parse(STANDARD_GROUPS[standard[0]]).bind(groups, gw, False, False)
        elif self.text == "groupwanted" and grp:
            exprs = [gw[g] for g in groups if g in gw]
            if len(exprs) == 1:  # parse errors propagate: the caller falls back to present
                body = parse(exprs[0]).bind(groups, gw, True, False)
        return Call(self.text, body)


def associated_file_path(af: str) -> str | None:
    """The path a gateway matches a P2P AssociatedFile (already decoded) against: None when
    empty, else normalised like git-annex's toTopFilePath (``./x`` and ``a/../x`` are ``x``,
    ``a//x`` is ``a/x``), which the real gateway does whatever its working directory."""
    return posixpath.normpath(af) if af else None


def bind_or_present(expr: Expr, groups: AbstractSet[str], groupwanted: Mapping[str, str]) -> Expr:
    """Resolve ``standard``/``groupwanted`` for a repository in ``groups`` (makeMatcher).

    A groupwanted expression git-annex rejects makes the whole expression ``present``;
    UnsupportedTermError propagates."""
    try:
        return expr.bind(groups, groupwanted, True, True)
    except UnsupportedTermError:
        raise
    except PreferredContentError:
        return PRESENT


def _checked(e: Expr) -> Expr:
    if e.depth > MAX_DEPTH:
        raise PreferredContentError("preferred content expression nested too deeply")
    return e


def _join(kind: type[_Nary], a: Expr, b: Expr) -> Expr:
    # Dropping "anything"-by-default operands of "and" is git-annex's simplify; keeping the
    # operand order keeps the evaluation order (a glob error must surface at the same point).
    if kind is And and a is EMPTY:
        return b
    if kind is And and b is EMPTY:
        return a
    ops = (*(a.operands if type(a) is kind else (a,)), *(b.operands if type(b) is kind else (b,)))
    return _checked(kind(ops, depth=1 + max(o.depth for o in ops)))


def _not(e: Expr) -> Expr:
    return _checked(Not(e, depth=1 + e.depth))


# --- terms --------------------------------------------------------------------------------------

_SECURE_HASH = re.compile(
    r"(SHA(224|256|384|512)|SHA3_(224|256|384|512)|SKEIN(256|512)|BLAKE2B(160|224|256|384|512)"
    r"|BLAKE2BP512|BLAKE2S(160|224|256)|BLAKE2SP(224|256)|BLAKE3_256)E?"
)


def _secure(key: Key, equivalents: tuple[Key, ...]) -> bool:
    """isCryptographicallySecureKey. A VURL key is as secure as all its recorded equivalent
    keys (other VURLs excluded), and secure when none is recorded yet. External backends
    would be asked; a gateway cannot, and git-annex says no when the program is missing."""
    if key.backend == "VURL":
        return all(_secure(k, ()) for k in equivalents if k.backend != "VURL")
    return _SECURE_HASH.fullmatch(key.backend) is not None


def _size_test(limit: int, larger: bool) -> Callable[[MatchContext], bool]:
    def test(ctx: MatchContext) -> bool:
        size = ctx.size if ctx.size is not None else ctx.key.size
        if size is None:  # Haskell compares Nothing below every Just
            return not larger
        return size > limit if larger else size < limit

    return test


def _glob_test(glob: str, include: bool) -> Callable[[MatchContext], bool]:
    g = Glob(glob)

    def test(ctx: MatchContext) -> bool:
        if ctx.file is None:  # no file to match: include fails, exclude passes
            return not include
        try:
            return g.matches(ctx.file) == include
        except ValueError as e:
            raise PreferredContentError(str(e)) from None

    return test


def _copies_test(value: str) -> Callable[[MatchContext], bool]:
    parts = value.split(":")
    # As the binary behaves: "x:n" filters by trust level or group (a trust level wins over a
    # group of the same name); any other shape is read as a plain number ("1:x:0" is 1).
    spec, num = (parts[0], parts[1]) if len(parts) == 2 else (None, value)
    n = read_int(num)
    if n is None:
        raise PreferredContentError("bad number for copies")
    level = _TRUST_NAMES.get(spec.removesuffix("+")) if spec is not None else None

    def good(ctx: MatchContext, u: str) -> bool:
        if spec is None:
            return True
        if level is None:
            return spec in ctx.groups.get(u, ())
        return ctx.trust_of(u) >= level if spec.endswith("+") else ctx.trust_of(u) == level

    return lambda ctx: _count_copies({u for u in ctx.locations() if good(ctx, u)}) >= n


def _lacking_test(value: str) -> Callable[[MatchContext], bool]:
    needed = read_int(value)
    if needed is None:
        raise PreferredContentError("bad value for number of lacking copies")

    def test(ctx: MatchContext) -> bool:
        locs = ctx.locations()
        have = _count_copies({u for u in locs if ctx.trust_of(u) != TrustLevel.UNTRUSTED})
        return ctx.numcopies - have >= needed

    return test


def _inallgroup(ctx: MatchContext, group: str) -> bool:
    want = ctx.members(group)
    return not want or want <= ctx.locations()


def _onlyingroup(ctx: MatchContext, group: str) -> bool:
    want, locs = ctx.members(group), ctx.locations()
    return bool(want) and bool(locs & want) and locs <= want


def _take_directory(path: str) -> str:
    # System.FilePath takeDirectory (POSIX): drop the last component and trailing slashes.
    head = path[: path.rfind("/") + 1] or "./"
    stripped = head.rstrip("/")
    return stripped if stripped else head[-1]


def _split_path(path: str) -> list[str]:
    # System.FilePath splitPath: components keep their trailing slashes ("a/b" -> "a/", "b").
    return re.findall(r"^/+|[^/]+/*", path)


def _in_preferred_dir(ctx: MatchContext) -> bool:
    """limitInDir: only the file's immediate directory counts, because splitPath keeps
    separators (``public/x`` matches, ``public/sub/x`` does not, ``a/public/x`` does)."""
    if ctx.file is None:
        return False
    return ctx.preferreddir in _split_path(_take_directory(ctx.file))


def _present(ctx: MatchContext) -> bool:
    return ctx.this_uuid is not None and ctx.this_uuid in ctx.locations()


# --- the balanced family (Limit.hs limitBalanced and friends, checked against the binary) ---


def _group_copies(ctx: MatchContext, group: str) -> tuple[int, int]:
    """(copies that count toward numcopies, those of them in ``group``): live, not
    untrusted, not a cluster, as lackingcopies counts."""
    have = {
        u
        for u in ctx.locations()
        if ctx.trust_of(u) != TrustLevel.UNTRUSTED and not is_cluster_uuid(u)
    }
    return len(have), sum(1 for u in have if group in ctx.groups.get(u, ()))


def _how_many(ctx: MatchContext, group: str, number: int | None) -> int:
    """How many repositories of the group should have the key. ``group:lackingcopies``
    (number None): as many as numcopies still needs plus the group's own counted copies,
    i.e. numcopies minus the counted copies outside the group."""
    if number is not None:
        return number
    have, in_group = _group_copies(ctx, group)
    return ctx.numcopies - have + in_group


def _fully(group: str, number: int | None, by_size: bool) -> Callable[[MatchContext], bool]:
    def test(ctx: MatchContext) -> bool:
        if ctx.this_uuid is None:
            return False
        n = _how_many(ctx, group, number)
        members = ctx.members(group)
        locs = ctx.present_uuids  # loggedLocations: dead holders included, as git-annex
        if by_size:
            candidates = emptiest(ctx.sizes, members, ctx.key, locs, n)
        else:
            candidates = with_space(ctx.sizes, members, ctx.key, locs)
        return ctx.this_uuid in balanced_pick(members, candidates, ctx.key, n)

    return test


def _balanced(group: str, number: int | None, by_size: bool) -> Callable[[MatchContext], bool]:
    """present, or the group lacks copies and the picker chooses this repository (the
    gateway never rebalances, so that is all of limitBalanced)."""
    fully = _fully(group, number, by_size)
    copies = _copies_test(f"{group}:{number}") if number is not None else None

    def lacking(ctx: MatchContext) -> bool:
        if copies is not None:
            return not copies(ctx)
        have, _ = _group_copies(ctx, group)
        return ctx.numcopies - have > 0

    return lambda ctx: _present(ctx) or (lacking(ctx) and fully(ctx))


def _balanced_term(token: str, name: str, value: str) -> Term:
    parts = value.split(":")
    if len(parts) > 2:
        raise PreferredContentError(f"bad value for {name}")
    number: int | None = 1
    if len(parts) == 2:
        number = None if parts[1] == "lackingcopies" else read_int(parts[1])
        if number is None and parts[1] != "lackingcopies":
            raise PreferredContentError(f"bad number for {name}")
    by_size = "size" in name
    if name.startswith("fully"):
        return Term(token, _fully(parts[0], number, by_size), sized=True)
    # Both contain present, so negating them is unstable as "not present" is.
    return Term(token, _balanced(parts[0], number, by_size), is_unstable=True, sized=True)


_SIMPLE: dict[str, Callable[[MatchContext], bool] | None] = {
    "anything": lambda ctx: True,
    "nothing": lambda ctx: False,
    "present": _present,
    "securehash": lambda ctx: _secure(ctx.key, ctx.equivalent_keys),
    "inpreferreddir": _in_preferred_dir,
    "unused": None,  # needs the unused log
}
_VALUE: dict[str, Callable[[str], Callable[[MatchContext], bool]] | None] = {
    "include": lambda v: _glob_test(v, True),
    "exclude": lambda v: _glob_test(v, False),
    "largerthan": lambda v: _size_test(_need_size(v), True),
    "smallerthan": lambda v: _size_test(_need_size(v), False),
    "copies": _copies_test,
    "lackingcopies": _lacking_test,
    # Same as lackingcopies here: the caller supplies one numcopies for the key.
    "approxlackingcopies": _lacking_test,
    "inbackend": lambda v: lambda ctx: ctx.key.backend == v,
    "inallgroup": lambda v: lambda ctx: _inallgroup(ctx, v),
    "onlyingroup": lambda v: lambda ctx: _onlyingroup(ctx, v),
    "metadata": None,  # needs the metadata log
    "url": None,  # needs the web log
}


def _need_size(v: str) -> int:
    size = read_size(v)
    if size is None:
        raise PreferredContentError("bad size")
    return size


PRESENT = Term("present", _present, is_unstable=True)


# showLitChar's names for the control characters (a few use letters, like "\\t").
_ASCII_NAMES = (
    *("NUL", "SOH", "STX", "ETX", "EOT", "ENQ", "ACK", "a", "b", "t", "n", "v", "f", "r"),
    *("SO", "SI", "DLE", "DC1", "DC2", "DC3", "DC4", "NAK", "SYN", "ETB", "CAN", "EM", "SUB"),
    *("ESC", "FS", "GS", "RS", "US"),
)


def _hs_show(s: str) -> str:
    """Haskell ``show`` of a string (git-annex quotes bad tokens with it); printable ASCII only,
    so a message stays on one line."""
    out = ['"']
    for i, c in enumerate(s):
        nxt = s[i + 1 : i + 2]
        if c in '"\\':
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        elif c == "\x7f":
            out.append("\\DEL")
        elif ord(c) < 32:
            out.append("\\" + _ASCII_NAMES[ord(c)])
            if c == "\x0e" and nxt == "H":  # "\SO" then "H" would read back as "\SOH"
                out.append("\\&")
        else:
            out.append(f"\\{ord(c)}")
            if nxt.isascii() and nxt.isdigit():
                out.append("\\&")
    out.append('"')
    return "".join(out)


def _term(token: str) -> Expr:
    """One non-syntax token (parseToken): a simple term, or ``name=value`` split at the
    first ``=`` (a bare ``include`` is ``include=``)."""
    if token in ("standard", "groupwanted"):
        return Call(token)
    if token in _SIMPLE:
        test = _SIMPLE[token]
        if test is None:
            raise UnsupportedTermError(f"unknown preferred-content term {token}")
        return Term(token, test, is_unstable=test is _present)
    name, _, value = token.partition("=")
    if name in ("balanced", "fullybalanced", "sizebalanced", "fullysizebalanced"):
        return _balanced_term(token, name, value)
    if name not in _VALUE:
        raise PreferredContentError(f"near {_hs_show(token)}")
    make = _VALUE[name]
    if make is None:
        raise UnsupportedTermError(f"unknown preferred-content term {token}")
    return Term(token, make(value))


# --- parser ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    items: list[_Item]


_Item = Expr | str | _Group  # a term, "and"/"or"/"not", or a parenthesised group
_SYNTAX = ("and", "or", "not")


def _tokenize(expr: str) -> list[str]:
    return [t for w in split_words(expr) for t in re.split(r"([()])", w) if t]


def _groups(tokens: list[str | Expr]) -> list[_Item]:
    """tokenGroups/findClose: a stray ``)`` is dropped, a missing one is implied."""
    stack: list[list[_Item]] = [[]]
    for t in tokens:
        if t == "(":
            if len(stack) > MAX_DEPTH:
                raise PreferredContentError("preferred content expression nested too deeply")
            stack.append([])
        elif t == ")":
            if len(stack) > 1:
                items = stack.pop()
                stack[-1].append(_Group(items))
        else:
            stack[-1].append(t)
    while len(stack) > 1:
        items = stack.pop()
        stack[-1].append(_Group(items))
    return stack[0]


def _implicit_and(items: list[_Item]) -> list[_Item]:
    # Only between two terms/groups, and only at the top level, exactly like git-annex.
    out: list[_Item] = []
    for it in items:
        if out and not isinstance(it, str) and not isinstance(out[-1], str):
            out.append("and")
        out.append(it)
    return out


def _process(m: Expr, items: list[_Item]) -> Expr:
    i = 0
    while i < len(items):
        m, i = _consume(m, items, i)
    return m


def _consume(m: Expr, items: list[_Item], i: int) -> tuple[Expr, int]:
    # An operator applies to exactly one following unit; a run of operators recurses.
    if i >= len(items):
        return m, i
    it = items[i]
    if isinstance(it, _Group):
        return _process(m, it.items), i + 1
    if isinstance(it, Expr):
        return _join(And, m, it), i + 1
    p, j = _consume(EMPTY, items, i + 1)
    if it == "and":
        return _join(And, m, p), j
    if it == "or":
        return _join(Or, m, p), j
    return _join(And, m, _not(p)), j


@functools.lru_cache(maxsize=256)
def parse(expr: str) -> Expr:
    """Parse a preferred-content expression (trees are immutable, so results are shared).

    Raises PreferredContentError with git-annex's message (``Parse failure: near "foo"``,
    ``Parse failure: bad size``...; several joined by spaces) when git-annex would reject
    the expression, else UnsupportedTermError for a valid term we cannot evaluate.
    ``standard``/``groupwanted`` stay unbound (see ``Expr.matches``).
    """
    tokens: list[str | Expr] = []
    errors: list[str] = []
    unsupported: list[str] = []
    for tok in _tokenize(expr):
        if tok in (*_SYNTAX, "(", ")"):
            tokens.append(tok)
            continue
        try:
            tokens.append(_term(tok))
        except UnsupportedTermError as e:
            unsupported.append(str(e))
        except PreferredContentError as e:
            errors.append(f"Parse failure: {e}")
    if errors:
        raise PreferredContentError(" ".join(errors))
    if unsupported:
        raise UnsupportedTermError("; ".join(unsupported))
    try:
        return _process(EMPTY, _implicit_and(_groups(tokens)))
    except RecursionError:  # a long run of and/or/not: each operator recurses once
        raise PreferredContentError("preferred content expression nested too deeply") from None


# --- standard groups ----------------------------------------------------------------------------


def _last_resort(s: str) -> str:
    # Most groups also want content that lacks copies.
    return f"({s}) or approxlackingcopies=1"


_NOT_ARCHIVED = "not (copies=archive:1 or copies=smallarchive:1)"
_CLIENT = _last_resort(
    f"include=* and ((exclude=*/archive/* and exclude=archive/*) or ({_NOT_ARCHIVED}))"
)
_ARCHIVE = _last_resort(_NOT_ARCHIVED)

#: Types/StandardGroups.hs, exactly as ``git annex vicfg`` of 10.20261026 prints them.
STANDARD_GROUPS: Mapping[str, str] = {
    "client": _CLIENT,
    "transfer": _last_resort(f"not (inallgroup=client and copies=client:2) and ({_CLIENT})"),
    "backup": "anything",
    "incrementalbackup": _last_resort("(not copies=backup:1) and (not copies=incrementalbackup:1)"),
    "smallarchive": _last_resort(f"(include=*/archive/* or include=archive/*) and ({_ARCHIVE})"),
    "archive": _ARCHIVE,
    "source": "not (copies=1)",
    "manual": f"present and ({_CLIENT})",
    "public": "inpreferreddir",
    "unwanted": "not anything",
}


# --- the policy recorded in the git-annex branch --------------------------------------------------

def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def parse_old_log(text: str) -> dict[str, str]:
    """``UUID VALUE[ timestamp=T]`` lines (parseLogOld), newest per UUID (maplog.py)."""
    return maplog.parse_old(_bytes(text), maplog.text_value)


def parse_map_log(text: str) -> dict[str, str]:
    """``T FIELD VALUE`` lines (parseMapLog), newest per field (maplog.py)."""
    return maplog.parse_new(_bytes(text), maplog.text_value)


_TRUST_CHARS = {
    repologs.Trust.TRUSTED: TrustLevel.TRUSTED,
    repologs.Trust.UNTRUSTED: TrustLevel.UNTRUSTED,
    repologs.Trust.DEAD: TrustLevel.DEAD,
}


def parse_trust_log(text: str) -> dict[str, TrustLevel]:
    """``trust.log`` as repologs reads it: the repositories whose level is not semitrusted."""
    levels = repologs.parse_trust_log(_bytes(text))
    return {u: _TRUST_CHARS[v] for u, v in levels.items() if v in _TRUST_CHARS}


@dataclass(frozen=True)
class RepoPolicy:
    """Preferred/required content, groups and group expressions from the git-annex branch."""

    preferred: Mapping[str, str] = field(default_factory=dict)
    required: Mapping[str, str] = field(default_factory=dict)
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    groupwanted: Mapping[str, str] = field(default_factory=dict)
    #: trust.log: what ``context`` uses unless told otherwise. Copies are counted with it
    #: (an untrusted holder is no copy for ``lackingcopies`` and the balanced family, a dead
    #: one no location at all), so a caller that leaves it out counts too many copies.
    trust: Mapping[str, TrustLevel] = field(default_factory=dict)

    @classmethod
    def from_logs(
        cls,
        preferred_content: str = "",
        group: str = "",
        group_preferred_content: str = "",
        required_content: str = "",
        trust_log: str = "",
    ) -> RepoPolicy:
        """From the contents of ``preferred-content.log``, ``group.log``,
        ``group-preferred-content.log``, ``required-content.log`` and ``trust.log``."""
        groups = maplog.parse_old(_bytes(group), maplog.loose_word_set)
        return cls(
            preferred=parse_old_log(preferred_content),
            required=parse_old_log(required_content),
            groups=groups,
            groupwanted=parse_map_log(group_preferred_content),
            trust=parse_trust_log(trust_log),
        )

    def wanted_expr(self, uuid: str) -> str | None:
        """The raw preferred-content expression of a repository (``git annex wanted``)."""
        return self.preferred.get(uuid)

    def matcher(self, uuid: str) -> Expr | None:
        """The bound expression git-annex uses for ``uuid``: preferred content or-ed with
        required content; ``present`` if either fails to parse. None when neither is set.
        Raises UnsupportedTermError."""
        parts = [e for e in (self.preferred.get(uuid), self.required.get(uuid)) if e is not None]
        if not parts:
            return None
        groups = self.groups.get(uuid, frozenset())
        bound: list[Expr] = []
        unsupported: UnsupportedTermError | None = None
        for e in parts:
            try:
                bound.append(parse(e).bind(groups, self.groupwanted, True, True))
            except UnsupportedTermError as err:
                unsupported = err
            except PreferredContentError:
                return PRESENT  # git-annex's unknownMatcher, whatever the other part says
        if unsupported is not None:
            raise unsupported
        nonempty = [b for b in bound if not b.is_empty]  # combineMatchers
        if not nonempty:
            return EMPTY
        return functools.reduce(lambda a, b: _join(Or, a, b), nonempty)

    def context(
        self,
        uuid: str,
        key: Key,
        *,
        file: str | None = None,
        present_uuids: AbstractSet[str] = frozenset(),
        trust: Mapping[str, TrustLevel] | None = None,
        numcopies: int = 1,
        preferreddir: str = "public",
        sizes: RepoSizes | None = None,
    ) -> MatchContext:
        """A MatchContext asking about ``uuid``, with this policy's groups (and its trust
        levels unless ``trust`` is given)."""
        return MatchContext(
            sizes=sizes or RepoSizes(),
            key=key,
            file=file,
            this_uuid=uuid,
            present_uuids=present_uuids,
            groups=self.groups,
            trust=self.trust if trust is None else trust,
            numcopies=numcopies,
            groupwanted=self.groupwanted,
            preferreddir=preferreddir,
        )

    def wants(self, ctx: MatchContext, default: bool = True) -> bool:
        """Does ``ctx.this_uuid`` want the key? ``default`` when nothing is configured (a
        cluster gateway uses True). Raises UnsupportedTermError/PreferredContentError."""
        if ctx.this_uuid is None:
            return default
        m = self.matcher(ctx.this_uuid)
        if m is None or m.is_empty:
            return default
        return m.matches(ctx)
