"""The rule language: a typed AST (msgspec Structs), a parser, a JSON form and validation.

A rule is one line of text such as ``count(purchase, 90d) >= 3 and trait.country == "SE"``.
:func:`parse` turns it into an AST of frozen :mod:`msgspec` Structs; :func:`to_json` /
:func:`from_json` give the same AST as JSON; :mod:`segcore.build` builds it from Python.
The parser is a hand-written recursive-descent parser (no ``eval``); every error is a
:class:`~segcore.RuleError` that points at the line and column.

>>> parse("count(purchase, 90d) >= 3")
Compare(op='>=', left=Agg(fn='count', event='purchase', prop=None, where=None, window_ms=7776000000), right=Num(value=3))
>>> from_json(to_json(parse("did(support_ticket, 3d)"))) == parse("did(support_ticket, 3d)")
True
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Union

import msgspec

from .errors import RuleError

__all__ = [
    "parse", "to_json", "from_json", "to_text", "parse_duration", "validate", "references",
    "topo_order", "load_rules_file", "DURATION_MS", "MAX_TIME_MS",
    "Num", "Str", "Dur", "Now", "FirstSeen", "LastSeen", "First", "Last", "Trait", "Score",
    "Prop", "Agg", "Arith", "Compare", "InList", "Between", "StrTest", "Exists", "Seen",
    "InSegment", "Bucket", "Inactive", "Abandoned", "And", "Or", "Not", "Value", "Cond",
    "Local", "Sessions", "LastSession", "InSession", "Step", "Seq", "WEEKDAYS",
]

DURATION_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
               "w": 604_800_000}
#: Timestamps and durations must stay below this (2**48 ms, about year 10889) so that every
#: sum of a few of them is exact in int64 and in float64.
MAX_TIME_MS = 2 ** 48


class _Node(msgspec.Struct, frozen=True, tag_field="kind", tag=str.lower,
            forbid_unknown_fields=True):
    pass


# --------------------------------------------------------------------------- values
class Num(_Node, frozen=True):
    value: Union[int, float]


class Str(_Node, frozen=True):
    value: str


class Dur(_Node, frozen=True):
    """A duration literal such as ``7d``; its value is in milliseconds."""
    ms: int


class Now(_Node, frozen=True):
    pass


class FirstSeen(_Node, frozen=True):
    pass


class LastSeen(_Node, frozen=True):
    pass


class First(_Node, frozen=True):
    """``first(E)``: timestamp of the earliest ``E`` event (by ts)."""
    event: str


class Last(_Node, frozen=True):
    """``last(E)``: timestamp of the latest ``E`` event (by ts)."""
    event: str


class Trait(_Node, frozen=True):
    name: str


class Score(_Node, frozen=True):
    name: str


class Prop(_Node, frozen=True):
    """An event property; only valid inside ``where``."""
    name: str


class Local(_Node, frozen=True):
    """``hour`` (0-23) or ``weekday`` (``"mon"`` … ``"sun"``) of an event in the user's
    timezone (``trait.tz``); only valid inside ``where``."""
    field: str


class Agg(_Node, frozen=True):
    """``count(E where P, W)``, ``sum(E.prop, W)``, ``share(E where P, W)``, ``mode(E.prop, W)``
    …; ``window_ms`` None means all time."""
    fn: str
    event: str
    prop: Union[str, None] = None
    where: Union["Cond", None] = None
    window_ms: Union[int, None] = None


class Sessions(_Node, frozen=True):
    """``count(session, W)``, ``avg(session.duration, W)``, ``max(session.events, W)`` …:
    an aggregate over the user's sessions that started in the window."""
    fn: str
    metric: Union[str, None] = None     # "duration" or "events"; None for count
    window_ms: Union[int, None] = None


class LastSession(_Node, frozen=True):
    """``last_session.duration`` / ``last_session.events``: of the user's latest session."""
    metric: str


class Arith(_Node, frozen=True):
    op: str
    left: "Value"
    right: "Value"


# --------------------------------------------------------------------------- conditions
class Compare(_Node, frozen=True):
    op: str
    left: "Value"
    right: "Value"


class InList(_Node, frozen=True):
    value: "Value"
    items: tuple[Union[int, float, str], ...]
    negated: bool = False


class Between(_Node, frozen=True):
    """``v between lo and hi``: ``lo <= v <= hi``."""
    value: "Value"
    low: "Value"
    high: "Value"


class StrTest(_Node, frozen=True):
    """``contains`` / ``startswith`` / ``matches`` (``re.search``) against a string."""
    op: str
    value: "Value"
    pattern: str


class Exists(_Node, frozen=True):
    value: "Value"


class Seen(_Node, frozen=True):
    pass


class InSegment(_Node, frozen=True):
    name: str


class Bucket(_Node, frozen=True):
    lo: int
    hi: int


class Inactive(_Node, frozen=True):
    """``inactive(W)``: no event in the last ``W`` (true for a user never seen)."""
    window_ms: int


class Abandoned(_Node, frozen=True):
    a: str
    b: str
    within_ms: int
    by: Union[str, None] = None


class InSession(_Node, frozen=True):
    """``in_session``: the user's latest event is younger than the session timeout."""
    pass


class Step(_Node, frozen=True):
    """One step of ``seq(...)``: an event type, an optional ``where``, or ``not E`` (the
    event must *not* follow)."""
    event: str
    where: Union["Cond", None] = None
    negated: bool = False


class Seq(_Node, frozen=True):
    """``seq(A, B where P, C by KEY within D, W)``: the steps occurred in this order (strictly
    increasing ts), all within ``D`` of the first (``within_ms`` None: no limit), with the
    first step inside the window ``W`` (None: all time)."""
    steps: tuple[Step, ...]
    by: Union[str, None] = None
    within_ms: Union[int, None] = None
    window_ms: Union[int, None] = None


class And(_Node, frozen=True):
    items: tuple["Cond", ...]


class Or(_Node, frozen=True):
    items: tuple["Cond", ...]


class Not(_Node, frozen=True):
    item: "Cond"


Value = Union[Num, Str, Dur, Now, FirstSeen, LastSeen, First, Last, Trait, Score, Prop, Agg,
              Arith, Local, Sessions, LastSession]
Cond = Union[Compare, InList, Between, StrTest, Exists, Seen, InSegment, Bucket, Inactive,
             Abandoned, And, Or, Not, InSession, Seq]

AGG_FNS = ("count", "sum", "avg", "min", "max", "distinct", "share", "mode")
#: The aggregates over sessions and the session metrics.
SESSION_FNS = ("count", "sum", "avg", "min", "max")
SESSION_METRICS = ("duration", "events")
#: ``weekday`` values, Monday first (``datetime.weekday()`` order).
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: Most steps in one ``seq(...)``.
MAX_SEQ_STEPS = 16
CMP_OPS = ("==", "!=", "<", "<=", ">", ">=")
STR_OPS = ("contains", "startswith", "matches")
KEYWORDS = ("and", "or", "not", "in", "between", "contains", "startswith", "matches", "exists",
            "where", "by", "all", "now", "seen", "first_seen", "last_seen", "did", "inactive",
            "abandoned", "bucket", "first", "last", "trait", "score", "seq", "within",
            "session", "last_session", "in_session") + AGG_FNS
_FUNCS = ("count", "sum", "avg", "min", "max", "distinct", "share", "mode", "did", "inactive",
          "abandoned", "bucket", "first", "last", "in", "seen", "first_seen", "last_seen", "now",
          "trait", "score", "seq", "last_session", "in_session")


# --------------------------------------------------------------------------- lexer
_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<dur>\d+(?:ms|s|m|h|d|w)(?![A-Za-z0-9_]))
  | (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,|\.|\+|-)
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "/": "/", "b": "\b",
            "f": "\f"}


class _Tok(msgspec.Struct):
    kind: str
    text: str
    pos: int
    value: object = None


def _unescape(body: str, text: str, pos: int, segment: str | None) -> str:
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt == "u":
                # JSON's \u escape (four hex digits), which to_text emits for control characters.
                hexd = body[i + 2:i + 6]
                if not re.fullmatch(r"[0-9a-fA-F]{4}", hexd):
                    raise _err("`\\u` needs four hex digits", text, pos + 1 + i, segment)
                out.append(chr(int(hexd, 16)))
                i += 6
                continue
            if nxt not in _ESCAPES:
                raise _err(f"unknown escape `\\{nxt}` in string", text, pos + 1 + i, segment)
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    s = "".join(out)
    if re.search("[\ud800-\udfff]", s):
        try:   # a surrogate pair written as two \u escapes is one character
            s = s.encode("utf-16", "surrogatepass").decode("utf-16")
        except UnicodeDecodeError:
            raise _err("unpaired surrogate in `\\u` escape", text, pos, segment) from None
    return s


def _lex(text: str, segment: str | None) -> list[_Tok]:
    toks = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            if text[pos] == '"':
                raise _err("unterminated string", text, pos, segment)
            raise _err(f"unexpected character `{text[pos]}`", text, pos, segment)
        kind = m.lastgroup
        s = m.group()
        if kind == "dur":
            num = re.match(r"\d+", s).group()
            unit = s[len(num):]
            toks.append(_Tok("dur", s, pos, int(num) * DURATION_MS[unit]))
        elif kind == "num":
            v = float(s) if any(c in s for c in ".eE") else int(s)
            toks.append(_Tok("num", s, pos, v))
        elif kind == "str":
            toks.append(_Tok("str", s, pos, _unescape(s[1:-1], text, pos, segment)))
        elif kind != "ws":
            toks.append(_Tok(kind, s, pos))
        pos = m.end()
    toks.append(_Tok("eof", "", n))
    toks.append(_Tok("eof", "", n))   # lookahead past the end is always safe
    return toks


def _linecol(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


def _err(reason: str, text: str, pos: int, segment: str | None) -> RuleError:
    line, col = _linecol(text, pos)
    return RuleError(reason, segment=segment, line=line, column=col)


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def parse_duration(text: str | int) -> int:
    """Parse ``"90d"`` / ``"1h"`` / ``"250ms"`` (or an int of ms) into milliseconds.

    >>> parse_duration("90d"), parse_duration("1h"), parse_duration(250)
    (7776000000, 3600000, 250)
    """
    if isinstance(text, bool):
        raise RuleError(f"a duration must be a string like `1h` or an int of ms, got `{text!r}`")
    if isinstance(text, int):
        ms = text
    elif isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d|w)\s*", text)
        if m is None:
            raise RuleError(f"`{text}` is not a duration (expected an integer and a unit out of "
                            "ms s m h d w, such as `90d`)")
        ms = int(m.group(1)) * DURATION_MS[m.group(2)]
    else:
        raise RuleError(f"a duration must be a string like `1h` or an int of ms, got `{text!r}`")
    if not 0 <= ms < MAX_TIME_MS:
        raise RuleError(f"duration `{text}` is out of range (0 to 2**48 ms)")
    return ms


# --------------------------------------------------------------------------- parser
class _Parser:
    """Recursive descent over the grammar of DESIGN §3; validates as it goes."""

    def __init__(self, text: str, segment: str | None, segments, event_types):
        self.text = text
        self.segment = segment
        self.segments = segments
        self.event_types = event_types
        self.toks = _lex(text, segment)
        self.i = 0
        self.in_where = False
        self.refs: list[tuple[str, int]] = []

    # token helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def err(self, reason: str, pos: int | None = None) -> RuleError:
        return _err(reason, self.text, self.tok.pos if pos is None else pos, self.segment)

    def at(self, text: str) -> bool:
        t = self.tok
        return t.kind in ("name", "op") and t.text == text

    def take(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str, what: str | None = None) -> _Tok:
        if not self.at(text):
            raise self.err(f"expected `{text}`{' ' + what if what else ''}, found "
                           f"{self.describe(self.tok)}")
        t = self.tok
        self.i += 1
        return t

    @staticmethod
    def describe(t: _Tok) -> str:
        return "end of rule" if t.kind == "eof" else f"`{t.text}`"

    def name(self, what: str) -> _Tok:
        t = self.tok
        if t.kind != "name":
            raise self.err(f"expected {what}, found {self.describe(t)}")
        self.i += 1
        return t

    def event(self) -> str:
        t = self.name("an event type")
        if t.text in ("and", "or", "not", "where", "in"):
            raise self.err(f"expected an event type, found keyword `{t.text}`", t.pos)
        if t.text == "session":
            raise self.err("`session` is reserved for sessions (as in `count(session, 7d)`); "
                           "it cannot be used as an event type here", t.pos)
        if self.event_types is not None and t.text not in self.event_types:
            raise self.err(f"unknown event type `{t.text}`{_suggest(t.text, self.event_types)}",
                           t.pos)
        return t.text

    def duration(self, allow_all: bool) -> int | None:
        t = self.tok
        if allow_all and self.take("all"):
            return None
        if t.kind != "dur":
            if t.kind == "num":
                raise self.err(f"`{t.text}` needs a unit (ms, s, m, h, d or w), such as "
                               f"`{t.text}d`")
            raise self.err(f"expected a duration such as `7d`{' or `all`' if allow_all else ''}"
                           f", found {self.describe(t)}")
        self.i += 1
        if t.value >= MAX_TIME_MS:
            raise self.err(f"duration `{t.text}` is too long (at most 2**48 ms)", t.pos)
        if t.value == 0 and allow_all:
            raise self.err("a window must be longer than 0", t.pos)
        return t.value

    # grammar
    def parse(self) -> Cond:
        if self.tok.kind == "eof":
            raise self.err("empty rule")
        node = self.or_()
        if self.tok.kind != "eof":
            raise self.err(f"unexpected {self.describe(self.tok)} after a complete rule"
                           + (" (conditions are joined with `and` / `or`)"
                              if self.tok.kind in ("name", "num", "str", "dur") else ""))
        return node

    def or_(self) -> Cond:
        items = [self.and_()]
        while self.take("or"):
            items.append(self.and_())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_(self) -> Cond:
        items = [self.unary()]
        while self.take("and"):
            items.append(self.unary())
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary(self) -> Cond:
        if self.take("not"):
            return Not(self.unary())
        return self.atom()

    def atom(self) -> Cond:
        t = self.tok
        start = t.pos
        nxt = self.toks[self.i + 1]
        is_call = nxt.kind == "op" and nxt.text == "("
        if self.at("("):
            # Either a parenthesised condition or a parenthesised value in a test.
            save = self.i
            self.i += 1
            cond_err = None
            try:
                node = self.or_()
                self.expect(")")
                if not self._starts_test_tail():
                    return node
            except RuleError as e:
                cond_err = e
            self.i = save
            try:
                return self.test()
            except RuleError as e:
                # Report whichever reading got further (`(seen and seen` is a missing `)`,
                # not a misplaced keyword).
                if cond_err is not None and (cond_err.line, cond_err.column) > (e.line,
                                                                                 e.column):
                    raise cond_err from None
                raise
        if t.kind == "name" and not self.in_where:
            if t.text == "seen":
                self.i += 1
                return Seen()
            if t.text == "in_session" and not is_call:
                self.i += 1
                return InSession()
            if t.text == "seq" and is_call:
                return self.seq()
            if t.text == "in" and is_call:
                self.i += 2
                nt = self.name("a segment name")
                self.expect(")")
                if self.segments is not None and nt.text not in self.segments:
                    raise self.err(f"unknown segment `{nt.text}`"
                                   f"{_suggest(nt.text, self.segments)}", nt.pos)
                self.refs.append((nt.text, nt.pos))
                return InSegment(nt.text)
            if t.text == "bucket" and is_call:
                self.i += 2
                lo = self.int_arg("bucket's low end")
                self.expect(",")
                hi = self.int_arg("bucket's high end")
                self.expect(")")
                if not 0 <= lo <= hi <= 9999:
                    raise self.err(f"bucket({lo}, {hi}) needs 0 <= lo <= hi <= 9999", start)
                return Bucket(lo, hi)
            if t.text == "did" and is_call:
                self.i += 2
                ev = self.event()
                where = self.where()
                window = None
                if self.take(","):
                    window = self.duration(allow_all=True)
                self.expect(")")
                return Compare(">=", Agg("count", ev, None, where, window), Num(1))
            if t.text == "inactive" and is_call:
                self.i += 2
                w = self.duration(allow_all=False)
                if w == 0:
                    raise self.err("inactive() needs a duration longer than 0", start)
                self.expect(")")
                return Inactive(w)
            if t.text == "abandoned" and is_call:
                self.i += 2
                a = self.event()
                self.expect(",")
                b = self.event()
                self.expect(",")
                w = self.duration(allow_all=False)
                self.expect(")")
                by = None
                if self.take("by"):
                    by = self.name("a property name after `by`").text
                return Abandoned(a, b, w, by)
        return self.test()

    def seq(self) -> "Seq":
        start = self.tok.pos
        self.i += 2
        steps = []
        window = None
        while True:
            negated = self.take("not")
            ev = self.event()
            steps.append(Step(ev, self.where(), negated))
            if not self.at(","):
                break
            nxt = self.toks[self.i + 1]
            if nxt.kind in ("dur", "num") or (nxt.kind == "name" and nxt.text == "all"):
                break
            self.i += 1
        by = None
        within = None
        if self.take("by"):
            by = self.name("a property name after `by`").text
        if self.take("within"):
            within = self.duration(allow_all=False)
        if self.take(","):
            window = self.duration(allow_all=True)
        self.expect(")", "to close `seq(`")
        node = Seq(tuple(steps), by, within, window)

        def fail(reason):
            raise self.err(reason, start)

        _check_seq(node, fail)
        return node

    def int_arg(self, what: str) -> int:
        t = self.tok
        neg = self.take("-")
        t = self.tok
        if t.kind != "num" or not isinstance(t.value, int):
            raise self.err(f"expected an integer for {what}, found {self.describe(t)}")
        self.i += 1
        return -t.value if neg else t.value

    def _starts_test_tail(self) -> bool:
        t = self.tok
        if t.kind == "op" and t.text in CMP_OPS + ("+", "-"):
            return True
        if t.kind == "name" and t.text in ("in", "between", "exists") + STR_OPS:
            return True
        if t.kind == "name" and t.text == "not":
            nxt = self.toks[self.i + 1]
            return nxt.kind == "name" and nxt.text == "in"
        return False

    def where(self) -> Cond | None:
        if not self.take("where"):
            return None
        if self.in_where:
            raise self.err("`where` cannot be nested")
        self.in_where = True
        try:
            cond = self.or_()
        finally:
            self.in_where = False
        return cond

    def test(self) -> Cond:
        start = self.tok.pos
        left = self.value()
        t = self.tok
        if t.kind == "op" and t.text in CMP_OPS:
            self.i += 1
            right = self.value()
            node = Compare(t.text, left, right)
        elif self.at("not") or self.at("in"):
            negated = self.take("not")
            self.expect("in", "after `not`" if negated else None)
            node = InList(left, self.list_(), negated)
        elif self.take("between"):
            low = self.value()
            self.expect("and", "in `between … and …`")
            high = self.value()
            node = Between(left, low, high)
        elif t.kind == "name" and t.text in STR_OPS:
            self.i += 1
            s = self.tok
            if s.kind != "str":
                raise self.err(f"`{t.text}` takes a string, found {self.describe(s)}")
            self.i += 1
            if t.text == "matches":
                try:
                    re.compile(s.value)
                except re.error as e:
                    raise self.err(f"bad regular expression: {e}", s.pos) from None
            node = StrTest(t.text, left, s.value)
        elif self.take("exists"):
            node = Exists(left)
        else:
            if isinstance(left, (Agg,)) or t.kind == "eof":
                raise self.err(f"expected a comparison (== != < <= > >=, in, between, …) "
                               f"after the value, found {self.describe(t)}")
            raise self.err(f"expected a comparison after the value, found {self.describe(t)}")
        def fail(reason: str):
            raise self.err(reason, start)

        _check_test(node, fail, self.in_where)
        return node

    def list_(self) -> tuple:
        self.expect("[", "to open a list")
        items = []
        if not self.at("]"):
            while True:
                items.append(self.literal())
                if not self.take(","):
                    break
        self.expect("]", "to close the list")
        return tuple(items)

    def literal(self):
        t = self.tok
        neg = False
        if self.take("-"):
            neg = True
            t = self.tok
        if t.kind in ("num", "dur"):
            self.i += 1
            return -t.value if neg else t.value
        if t.kind == "str" and not neg:
            self.i += 1
            return t.value
        raise self.err(f"list items must be numbers or strings, found {self.describe(t)}")

    def value(self):
        node = self.term()
        while self.tok.kind == "op" and self.tok.text in ("+", "-"):
            op = self.tok.text
            self.i += 1
            node = Arith(op, node, self.term())
        return node

    def term(self):
        t = self.tok
        if t.kind == "op" and t.text == "-":
            nt = self.toks[self.i + 1]
            if nt.kind in ("num", "dur"):
                self.i += 2
                return Num(-nt.value) if nt.kind == "num" else Dur(-nt.value)
            raise self.err("unary minus is only allowed before a number")
        if t.kind == "num":
            self.i += 1
            return Num(t.value)
        if t.kind == "str":
            self.i += 1
            return Str(t.value)
        if t.kind == "dur":
            self.i += 1
            return Dur(t.value)
        if self.at("("):
            self.i += 1
            v = self.value()
            self.expect(")")
            return v
        if t.kind != "name":
            raise self.err(f"expected a value, found {self.describe(t)}")
        nxt = self.toks[self.i + 1]
        is_call = nxt.kind == "op" and nxt.text == "("
        if self.in_where:
            if t.text in ("trait", "score", "now") or is_call:
                raise self.err(f"inside `where`, only event properties and constants can be "
                               f"compared; found `{t.text}`")
            if t.text in ("and", "or", "not", "in", "between", "exists", "where"):
                raise self.err(f"expected a property name, found keyword `{t.text}`")
            self.i += 1
            if t.text in ("hour", "weekday"):
                return Local(t.text)
            return Prop(t.text)
        word = t.text
        if word == "now":
            self.i += 1
            return Now()
        if word == "first_seen":
            self.i += 1
            return FirstSeen()
        if word == "last_seen":
            self.i += 1
            return LastSeen()
        if word == "last_session":
            self.i += 1
            if not self.take("."):
                raise self.err("expected `.duration` or `.events` after `last_session`")
            n = self.name("`duration` or `events`")
            if n.text not in SESSION_METRICS:
                raise self.err(f"a session has `duration` and `events`, not `{n.text}`"
                               f"{_suggest(n.text, SESSION_METRICS)}", n.pos)
            return LastSession(n.text)
        if word in ("trait", "score"):
            self.i += 1
            if not self.take("."):
                raise self.err(f"expected `.` and a name after `{word}` (as in `{word}.x`)")
            n = self.name(f"a {word} name")
            return Trait(n.text) if word == "trait" else Score(n.text)
        if word in ("first", "last") and is_call:
            self.i += 2
            ev = self.event()
            self.expect(")")
            return First(ev) if word == "first" else Last(ev)
        if word in AGG_FNS and is_call:
            return self.aggregate()
        if is_call:
            raise self.err(f"unknown function `{word}`{_suggest(word, _FUNCS)}")
        if word in KEYWORDS:
            raise self.err(f"expected a value, found keyword `{word}`")
        raise self.err(f"unknown name `{word}`{_suggest(word, _FUNCS)} (event properties "
                       "are only available inside `where`; traits are `trait.NAME`)")

    def aggregate(self):
        fn = self.tok.text
        self.i += 2
        if self.at("session"):
            return self.session_agg(fn)
        ev = self.event()
        prop = None
        if fn == "share":
            if self.at("."):
                raise self.err("`share` is a fraction of events and takes no property "
                               f"(`share({ev} where ..., 90d)`)")
        elif fn != "count":
            if not self.take("."):
                raise self.err(f"`{fn}` needs a property, as in `{fn}({ev}.amount)`")
            prop = self.name("a property name").text
        elif self.at("."):
            raise self.err("`count` counts events and takes no property "
                           f"(`count({ev})`, or `distinct({ev}.prop)`)")
        where = self.where()
        window = None
        if self.take(","):
            window = self.duration(allow_all=True)
        self.expect(")", f"to close `{fn}(`")
        return Agg(fn, ev, prop, where, window)

    def session_agg(self, fn: str) -> "Sessions":
        t = self.tok
        self.i += 1
        if fn not in SESSION_FNS:
            raise self.err(f"`{fn}` does not apply to sessions (use count, sum, avg, min or "
                           "max)", t.pos)
        metric = None
        if fn == "count":
            if self.at("."):
                raise self.err("`count(session, W)` counts sessions and takes no metric")
        else:
            if not self.take("."):
                raise self.err(f"`{fn}` needs a session metric, as in `{fn}(session.duration)`"
                               f" or `{fn}(session.events)`")
            n = self.name("`duration` or `events`")
            if n.text not in SESSION_METRICS:
                raise self.err(f"a session has `duration` and `events`, not `{n.text}`"
                               f"{_suggest(n.text, SESSION_METRICS)}", n.pos)
            metric = n.text
        if self.at("where"):
            raise self.err("sessions cannot be filtered with `where`")
        window = None
        if self.take(","):
            window = self.duration(allow_all=True)
        self.expect(")", f"to close `{fn}(`")
        return Sessions(fn, metric, window)


# --------------------------------------------------------------------------- validation
_TIME_TERMS = (FirstSeen, LastSeen, First, Last)


def _linear_terms(v, sign: int, out: list) -> None:
    if isinstance(v, Arith):
        _linear_terms(v.left, sign, out)
        _linear_terms(v.right, sign if v.op == "+" else -sign, out)
    else:
        out.append((sign, v))


def _kinds(v) -> list:
    out: list = []
    _linear_terms(v, 1, out)
    return out


def _check_test(node, fail, in_where: bool) -> None:
    """Static checks of one test; ``fail(reason)`` builds the error to raise."""
    values = []
    if isinstance(node, Compare):
        values = [node.left, node.right]
    elif isinstance(node, Between):
        values = [node.value, node.low, node.high]
    elif isinstance(node, (InList, StrTest, Exists)):
        values = [node.value]
    terms = []
    for i, v in enumerate(values):
        sign = 1 if i == 0 else -1
        _linear_terms(v, sign, terms)
    nodes = [t for _, t in terms]
    if _check_categorical(node, values, nodes, fail):
        return
    has_str = any(isinstance(t, Str) for t in nodes)
    n_parts = sum(1 for v in values for _ in _kinds(v))
    if has_str and n_parts != len(values):
        fail("strings cannot be added or subtracted")
    if has_str and isinstance(node, (Compare, Between)):
        numeric = [t for t in nodes if not isinstance(t, (Str, Prop, Trait))]
        if numeric:
            fail("a number cannot be compared with a string (the test would always be false)")
    if isinstance(node, (InList, StrTest, Exists)):
        if any(isinstance(v, Arith) for v in values):
            fail(f"`{type(node).__name__.lower()}` applies to a single property, trait or value")
        v = values[0]
        if not isinstance(v, (Prop, Trait, Score, Local)):
            what = {InList: "`in [...]`", StrTest: f"`{getattr(node, 'op', '')}`",
                    Exists: "`exists`"}[type(node)]
            fail(f"{what} applies to an event property, a trait or a score")
        return
    if any(isinstance(t, Local) for t in nodes):
        if sum(isinstance(t, Local) for t in nodes) != 1 or any(
                isinstance(v, Arith) for v in values) or not all(
                isinstance(t, (Local, Num, Dur)) for t in nodes):
            fail("a `where` test compares `hour` with constants")
        return
    has_prop = any(isinstance(t, Prop) for t in nodes)
    has_trait = any(isinstance(t, Trait) for t in nodes)
    has_now = any(isinstance(t, Now) for t in nodes)
    dynamic = [t for t in nodes if not isinstance(t, (Num, Str, Dur))]
    if not dynamic:
        fail("this comparison has only constants; it is always true or always false")
    if has_prop and any(isinstance(t, (Prop,)) is False and not isinstance(t, (Num, Str, Dur))
                        for t in nodes):
        fail("an event property can only be compared with constants")
    if has_trait:
        if any(not isinstance(t, (Trait, Num, Str, Dur)) for t in nodes):
            fail("a trait can only be compared with constants (`trait.x >= 18`)")
        if sum(isinstance(t, Trait) for t in nodes) > 1:
            fail("a test can use only one trait")
        if len(dynamic) != 1 or any(isinstance(v, Arith) for v in values):
            fail("a trait test compares one trait with constants")
    if has_prop:
        if sum(isinstance(t, Prop) for t in nodes) > 1 or any(isinstance(v, Arith)
                                                             for v in values):
            fail("a `where` test compares one property with constants")
    if has_now:
        coef = sum(s for s, t in terms if isinstance(t, Now))
        if sum(isinstance(t, Now) for t in nodes) != 1:
            fail("`now` must appear exactly once in a comparison")
        if isinstance(node, Between):
            fail("`now` cannot be used with `between`; write two comparisons")
        bad = [t for t in nodes if not isinstance(t, _TIME_TERMS + (Now, Num, Dur))]
        if bad or any(isinstance(t, Num) and not isinstance(t.value, int) for t in nodes):
            fail("a comparison with `now` may only use first_seen, last_seen, first(E), "
                 "last(E), durations and whole numbers (as in `first_seen >= now - 7d`)")
        tcoef = sum(s for s, t in terms if isinstance(t, _TIME_TERMS))
        if tcoef != -coef:
            fail("a comparison with `now` must compare an age, as in `last_seen < now - 7d` "
                 "or `now - first(purchase) > 30d`")


def _is_mode(v) -> bool:
    return isinstance(v, Agg) and v.fn == "mode"


def _check_categorical(node, values, nodes, fail) -> bool:
    """Tests of ``mode(...)`` and of ``weekday``: equality with constants only. True when
    ``node`` is one of them (and valid)."""
    modes = [t for t in nodes if _is_mode(t)]
    days = [t for t in nodes if isinstance(t, Local) and t.field == "weekday"]
    if not modes and not days:
        return False
    what = "`mode(...)`" if modes else "`weekday`"
    consts = [t for t in nodes if isinstance(t, (Num, Str, Dur))]
    if len(modes) + len(days) != 1 or any(isinstance(v, Arith) for v in values) or \
            len(consts) != len(nodes) - 1:
        fail(f"{what} can only be compared with constants, as in "
             + ('`mode(message_click.channel, 90d) == "sms"`' if modes
                else '`weekday in ["sat", "sun"]`'))
    if isinstance(node, (Between, StrTest)) or (
            isinstance(node, Compare) and node.op not in ("==", "!=")):
        fail(f"{what} is tested with `==`, `!=`, `in [...]`, `not in [...]` or `exists`")
    if days:
        items = list(node.items) if isinstance(node, InList) else [
            t.ms if isinstance(t, Dur) else t.value for t in consts]
        for c in items:
            if c not in WEEKDAYS:
                fail("`weekday` is one of " + ", ".join(f'"{d}"' for d in WEEKDAYS)
                     + f", not {_fmt_lit(c)}")
    return True


def _check_seq(node: "Seq", fail) -> None:
    """Static checks of ``seq(...)``."""
    n = len(node.steps)
    if n < 2:
        fail("`seq` needs at least two steps")
    if n > MAX_SEQ_STEPS:
        fail(f"`seq` takes at most {MAX_SEQ_STEPS} steps")
    negs = [i for i, st in enumerate(node.steps) if st.negated]
    if negs:
        if negs != [n - 1] or n != 2:
            fail("`not` is supported as the second of two steps, as in "
                 "`seq(add_to_cart, not purchase within 1h)`")
        if node.within_ms is None:
            fail("a `seq` with `not` needs `within`, as in "
                 "`seq(add_to_cart, not purchase within 1h)`")
    if node.within_ms is not None and not 0 < node.within_ms < MAX_TIME_MS:
        fail("`within` needs a duration longer than 0")
    if node.window_ms is not None and not 0 < node.window_ms < MAX_TIME_MS:
        fail("a window must be longer than 0")
    if negs and node.window_ms is not None and node.window_ms <= node.within_ms:
        fail("the window of a `seq` with `not` must be longer than its `within` (the user "
             "is in from the end of `within` until the first step leaves the window)")


def _walk(node, into_where: bool = True):
    yield node
    if isinstance(node, (And, Or)):
        for it in node.items:
            yield from _walk(it, into_where)
    elif isinstance(node, Not):
        yield from _walk(node.item, into_where)
    elif isinstance(node, (Compare, Arith)):
        yield from _walk(node.left, into_where)
        yield from _walk(node.right, into_where)
    elif isinstance(node, Between):
        yield from _walk(node.value, into_where)
        yield from _walk(node.low, into_where)
        yield from _walk(node.high, into_where)
    elif isinstance(node, (InList, StrTest, Exists)):
        yield from _walk(node.value, into_where)
    elif isinstance(node, Agg) and node.where is not None and into_where:
        yield from _walk(node.where, into_where)
    elif isinstance(node, Seq) and into_where:
        for st in node.steps:
            if st.where is not None:
                yield from _walk(st.where, into_where)


def _walk_paths(node, p: str):
    """The values of one test with their JSON paths (not into ``where``)."""
    yield node, p
    fields = {Compare: ("left", "right"), Arith: ("left", "right"),
              Between: ("value", "low", "high"), InList: ("value",), StrTest: ("value",),
              Exists: ("value",)}.get(type(node), ())
    for f in fields:
        yield from _walk_paths(getattr(node, f), f"{p}.{f}")


def references(node) -> list[str]:
    """Names of the segments a rule refers to with ``in(NAME)``, in order, without repeats."""
    out: list[str] = []
    for n in _walk(node):
        if isinstance(n, InSegment) and n.name not in out:
            out.append(n.name)
    return out


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _check_names(node, fail_at) -> None:
    """Every name in an AST must be one the rule text can spell."""
    reserved = ("and", "or", "not", "in", "where")
    for n in _walk(node):
        names = []      # (name, whether a keyword would be ambiguous there)
        if isinstance(n, (First, Last)):
            names = [(n.event, True)]
        elif isinstance(n, Agg):
            names = [(n.event, True)] + ([(n.prop, False)] if n.prop is not None else [])
        elif isinstance(n, Prop):
            names = [(n.name, True)]
        elif isinstance(n, (Trait, Score, InSegment)):
            names = [(n.name, False)]
        elif isinstance(n, Abandoned):
            names = [(n.a, True), (n.b, True)] + ([(n.by, False)] if n.by is not None else [])
        elif isinstance(n, Seq):
            names = [(st.event, True) for st in n.steps] + (
                [(n.by, False)] if n.by is not None else [])
        for name, strict in names:
            if not isinstance(name, str) or not _IDENT.match(name) or (
                    strict and name in reserved + ("session",)):
                fail_at(f"`{name}` is not a valid name (letters, digits and _, not starting "
                        "with a digit)")


def event_types_of(node) -> list[str]:
    """The event types a rule reads, in order of first mention."""
    out: list[str] = []
    for n in _walk(node):
        evs = []
        if isinstance(n, (First, Last, Agg)):
            evs = [n.event]
        elif isinstance(n, Abandoned):
            evs = [n.a, n.b]
        elif isinstance(n, Seq):
            evs = [st.event for st in n.steps]
        for e in evs:
            if e not in out:
                out.append(e)
    return out


def validate(node, segment: str | None = None, path: str = "$") -> None:
    """Check an AST built from Python or JSON with the same rules the parser applies."""

    def check(n, p: str, in_where: bool) -> None:
        def fail(reason):
            raise RuleError(reason, segment=segment, path=p)

        if isinstance(n, (And, Or)):
            if len(n.items) < 2:
                fail(f"`{type(n).__name__.lower()}` needs at least two conditions")
            for i, it in enumerate(n.items):
                check(it, f"{p}.items[{i}]", in_where)
        elif isinstance(n, Not):
            check(n.item, f"{p}.item", in_where)
        elif isinstance(n, (Compare, InList, Between, StrTest, Exists)):
            if isinstance(n, Compare) and n.op not in CMP_OPS:
                fail(f"unknown comparison `{n.op}`")
            if isinstance(n, StrTest):
                if n.op not in STR_OPS:
                    fail(f"unknown string test `{n.op}`")
                if n.op == "matches":
                    try:
                        re.compile(n.pattern)
                    except re.error as e:
                        fail(f"bad regular expression: {e}")
            for v, vp in _walk_paths(n, p):
                def vfail(reason):
                    raise RuleError(reason, segment=segment, path=vp)
                if isinstance(v, Prop) and not in_where:
                    vfail(f"property `{v.name}` is only available inside `where`")
                if isinstance(v, Local):
                    if not in_where:
                        vfail(f"`{v.field}` (of an event) is only available inside `where`")
                    if v.field not in ("hour", "weekday"):
                        vfail(f"unknown event time field `{v.field}` (hour or weekday)")
                if in_where and isinstance(v, (Agg, Trait, Score, Now, FirstSeen, LastSeen,
                                               First, Last, Sessions, LastSession)):
                    vfail("inside `where`, only event properties and constants can be compared")
                if isinstance(v, Sessions):
                    if v.fn not in SESSION_FNS:
                        vfail(f"`{v.fn}` does not apply to sessions")
                    if (v.fn == "count") != (v.metric is None) or (
                            v.metric is not None and v.metric not in SESSION_METRICS):
                        vfail("`count(session)` takes no metric; the others take `duration` "
                              "or `events`")
                    if v.window_ms is not None and not 0 < v.window_ms < MAX_TIME_MS:
                        vfail("a window must be longer than 0")
                if isinstance(v, LastSession) and v.metric not in SESSION_METRICS:
                    vfail("`last_session` has `duration` and `events`")
                if isinstance(v, Agg):
                    check_agg(v, vp)
                if isinstance(v, Arith) and v.op not in ("+", "-"):
                    vfail(f"unknown operator `{v.op}`")
                if isinstance(v, Dur) and not abs(v.ms) < MAX_TIME_MS:
                    vfail("duration out of range")
                if (isinstance(v, Num) and isinstance(v.value, float)
                        and not math.isfinite(v.value)):
                    vfail("numbers must be finite")
            _check_test(n, fail, in_where)
        elif isinstance(n, Bucket):
            if not 0 <= n.lo <= n.hi <= 9999:
                fail(f"bucket({n.lo}, {n.hi}) needs 0 <= lo <= hi <= 9999")
        elif isinstance(n, Inactive):
            if not 0 < n.window_ms < MAX_TIME_MS:
                fail("inactive() needs a duration longer than 0")
        elif isinstance(n, Abandoned):
            if not 0 <= n.within_ms < MAX_TIME_MS:
                fail("abandoned() needs a duration of 0 or more")
        elif isinstance(n, Seq):
            if in_where:
                fail("only property tests are allowed inside `where`")
            _check_seq(n, fail)
            for i, st in enumerate(n.steps):
                if st.where is not None:
                    check(st.where, f"{p}.steps[{i}].where", True)
        elif isinstance(n, (Seen, InSegment, InSession)):
            if in_where:
                fail("only property tests are allowed inside `where`")
        else:
            fail(f"`{type(n).__name__}` is not a condition")

    def check_agg(a: Agg, p: str) -> None:
        if a.fn not in AGG_FNS:
            raise RuleError(f"unknown aggregate `{a.fn}`{_suggest(a.fn, AGG_FNS)}",
                            segment=segment, path=p)
        if (a.fn in ("count", "share")) != (a.prop is None):
            raise RuleError(f"`{a.fn}` {'takes no' if a.fn in ('count', 'share') else 'needs a'}"
                            " property", segment=segment, path=p)
        if a.event == "session":
            raise RuleError("`session` is reserved for sessions", segment=segment, path=p)
        if a.window_ms is not None and not 0 < a.window_ms < MAX_TIME_MS:
            raise RuleError("a window must be longer than 0", segment=segment, path=p)
        if a.where is not None:
            check(a.where, f"{p}.where", True)

    def fail_names(reason):
        raise RuleError(reason, segment=segment, path=path)

    _check_names(node, fail_names)
    check(node, path, False)


# --------------------------------------------------------------------------- entry points
class Parsed(msgspec.Struct, frozen=True):
    """A parsed rule: the AST plus where each ``in(NAME)`` reference stands (for errors)."""
    ast: Cond
    text: str
    refs: tuple[tuple[str, int, int], ...] = ()   # (segment name, line, column)


def parse(text: str, *, segment: str | None = None, segments=None, event_types=None):
    """Parse one rule into its AST.

    Parameters
    ----------
    text : str
        The rule, e.g. ``'count(purchase, 90d) >= 3'``.
    segment : str, optional
        Name of the segment being defined (named in errors).
    segments : collection of str, optional
        When given, ``in(NAME)`` must name one of these.
    event_types : collection of str, optional
        When given, every event type must be one of these ("did you mean" otherwise).

    >>> parse('trait.country == "SE" and not in(vip)')
    And(items=(Compare(op='==', left=Trait(name='country'), right=Str(value='SE')), Not(item=InSegment(name='vip'))))
    >>> parse("count(purchase, 90d >= 3", segment="fb")
    Traceback (most recent call last):
    ...
    segcore.errors.RuleError: expected `)` to close `count(`, found `>=` - at line 1, column 21 of `fb`
    """
    return parse_full(text, segment=segment, segments=segments, event_types=event_types).ast


def parse_full(text: str, *, segment: str | None = None, segments=None,
               event_types=None) -> Parsed:
    if not isinstance(text, str):
        raise RuleError(f"a rule must be a string, got {type(text).__name__}", segment=segment)
    p = _Parser(text, segment, segments, event_types)
    try:
        ast = p.parse()
    except RecursionError:
        raise RuleError("the rule is nested too deeply", segment=segment) from None
    refs = tuple((name, *_linecol(text, pos)) for name, pos in p.refs)
    return Parsed(ast, text, refs)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Cond)


def to_json(node) -> bytes:
    """The JSON form of a rule's AST (a tagged tree; ``kind`` names the node type)."""
    return _encoder.encode(node)


def from_json(data, *, segment: str | None = None):
    """Decode and validate a rule from its JSON form (bytes, str, or a decoded dict)."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview, str)):
            node = _decoder.decode(data)
        else:
            node = msgspec.convert(data, Cond)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        msg = str(e)
        # msgspec names no path for a problem at the root; malformed JSON has none at all.
        path = "$" if isinstance(e, msgspec.ValidationError) else None
        m = re.search(r" - at `(\$[^`]*)`$", msg)
        if m:
            path = m.group(1)
            msg = msg[: m.start()]
        raise RuleError(f"invalid rule JSON: {msg}", segment=segment, path=path) from None
    validate(node, segment)
    return node


# --------------------------------------------------------------------------- unparse
_PREC = {Or: 1, And: 2, Not: 3}


def _fmt_dur(ms: int) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        n = DURATION_MS[unit]
        if ms and ms % n == 0:
            return f"{ms // n}{unit}"
    return f"{ms}ms"


def _fmt_lit(v) -> str:
    if isinstance(v, str):
        return msgspec.json.encode(v).decode()
    return repr(v)


def to_text(node) -> str:
    """Render an AST back as rule text (parsing the result gives the same AST).

    >>> to_text(parse("did(support_ticket, 3d) and   not seen"))
    'count(support_ticket, 3d) >= 1 and not seen'
    """
    def val(v) -> str:
        if isinstance(v, Num):
            return repr(v.value)
        if isinstance(v, Str):
            return _fmt_lit(v.value)
        if isinstance(v, Dur):
            return ("-" if v.ms < 0 else "") + _fmt_dur(abs(v.ms))
        if isinstance(v, Now):
            return "now"
        if isinstance(v, FirstSeen):
            return "first_seen"
        if isinstance(v, LastSeen):
            return "last_seen"
        if isinstance(v, (First, Last)):
            return f"{type(v).__name__.lower()}({v.event})"
        if isinstance(v, Trait):
            return f"trait.{v.name}"
        if isinstance(v, Score):
            return f"score.{v.name}"
        if isinstance(v, Prop):
            return v.name
        if isinstance(v, Agg):
            s = v.event + (f".{v.prop}" if v.prop else "")
            if v.where is not None:
                s += " where " + cond(v.where, 0)
            if v.window_ms is not None:
                s += ", " + _fmt_dur(v.window_ms)
            return f"{v.fn}({s})"
        if isinstance(v, Local):
            return v.field
        if isinstance(v, Sessions):
            s = "session" + (f".{v.metric}" if v.metric else "")
            if v.window_ms is not None:
                s += ", " + _fmt_dur(v.window_ms)
            return f"{v.fn}({s})"
        if isinstance(v, LastSession):
            return f"last_session.{v.metric}"
        if isinstance(v, Arith):
            r = val(v.right)
            if isinstance(v.right, Arith):
                r = f"({r})"
            return f"{val(v.left)} {v.op} {r}"
        raise TypeError(v)

    def cond(c, prec: int) -> str:
        if isinstance(c, (And, Or)):
            word = " and " if isinstance(c, And) else " or "
            s = word.join(cond(it, _PREC[type(c)] + (0 if not isinstance(it, type(c)) else 1))
                          for it in c.items)
            return f"({s})" if _PREC[type(c)] < prec else s
        if isinstance(c, Not):
            return "not " + cond(c.item, 3)
        if isinstance(c, Compare):
            return f"{val(c.left)} {c.op} {val(c.right)}"
        if isinstance(c, InList):
            items = ", ".join(_fmt_lit(x) for x in c.items)
            return f"{val(c.value)} {'not in' if c.negated else 'in'} [{items}]"
        if isinstance(c, Between):
            return f"{val(c.value)} between {val(c.low)} and {val(c.high)}"
        if isinstance(c, StrTest):
            return f"{val(c.value)} {c.op} {_fmt_lit(c.pattern)}"
        if isinstance(c, Exists):
            return f"{val(c.value)} exists"
        if isinstance(c, Seen):
            return "seen"
        if isinstance(c, InSegment):
            return f"in({c.name})"
        if isinstance(c, Bucket):
            return f"bucket({c.lo}, {c.hi})"
        if isinstance(c, Inactive):
            return f"inactive({_fmt_dur(c.window_ms)})"
        if isinstance(c, InSession):
            return "in_session"
        if isinstance(c, Seq):
            steps = []
            for st in c.steps:
                x = ("not " if st.negated else "") + st.event
                if st.where is not None:
                    x += " where " + cond(st.where, 0)
                steps.append(x)
            s = "seq(" + ", ".join(steps)
            if c.by is not None:
                s += f" by {c.by}"
            if c.within_ms is not None:
                s += f" within {_fmt_dur(c.within_ms)}"
            if c.window_ms is not None:
                s += f", {_fmt_dur(c.window_ms)}"
            return s + ")"
        if isinstance(c, Abandoned):
            s = f"abandoned({c.a}, {c.b}, {_fmt_dur(c.within_ms) if c.within_ms else '0ms'})"
            return s + (f" by {c.by}" if c.by else "")
        raise TypeError(c)

    return cond(node, 0)


# --------------------------------------------------------------------------- segment sets
def topo_order(deps: dict[str, list[str]]) -> list[str]:
    """Evaluation order: every segment after the segments it references, otherwise in
    definition order (the order of ``deps``). Raises RuleError naming a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        st = state.get(name, 0)
        if st == 2:
            return
        if st == 1:
            cyc = stack[stack.index(name):] + [name]
            raise RuleError("segments reference each other in a cycle: "
                            + " -> ".join(f"`{c}`" for c in cyc), segment=cyc[0])
        state[name] = 1
        stack.append(name)
        for d in deps.get(name, ()):
            if d in deps:
                visit(d, stack)
        stack.pop()
        state[name] = 2
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def load_rules_file(text: str) -> dict[str, str]:
    """Segments from a rules file: one ``name: rule`` per line (``#`` starts a comment, blank
    lines are skipped), or a JSON object ``{"name": "rule", ...}``. Every rule is parsed;
    errors are RuleErrors with the line and column **in the file**.

    >>> load_rules_file('''
    ... # the shop's segments
    ... frequent_buyers: count(purchase, 90d) >= 3
    ... swedes: trait.country == "SE"   # a trailing comment
    ... ''')
    {'frequent_buyers': 'count(purchase, 90d) >= 3', 'swedes': 'trait.country == "SE"'}
    """
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = msgspec.json.decode(text, type=dict[str, str])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RuleError(f"invalid rules JSON: {e}") from None
        for name, rule in obj.items():
            parse(rule, segment=name, segments=obj)
        return obj
    out: dict[str, str] = {}
    where: dict[str, tuple[int, int]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        body = _strip_comment(line)
        if not body.strip():
            continue
        name, sep, rule = body.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RuleError("expected `name: rule`", line=lineno, column=1)
        if name in out:
            raise RuleError(f"segment `{name}` is defined twice", segment=name, line=lineno,
                            column=1)
        col = body.index(":") + 1 + (len(rule) - len(rule.lstrip())) + 1
        out[name] = rule.strip()
        where[name] = (lineno, col)
    for name, rule in out.items():
        try:
            parse(rule, segment=name, segments=out)
        except RuleError as e:
            line, col = where[name]
            raise RuleError(e.reason, segment=name, line=line,
                            column=col + (e.column or 1) - 1) from None
    return out


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside a string literal stays)."""
    in_str = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and in_str:
            i += 2
            continue
        if c == '"':
            in_str = not in_str
        elif c == "#" and not in_str:
            return line[:i]
        i += 1
    return line
