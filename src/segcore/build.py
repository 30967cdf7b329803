"""Build rules from Python: the same AST as the rule text, checked as it is built.

Every rule the text language (:mod:`segcore.rules`) can say, the builder can say too, and both
end in one AST of :mod:`msgspec` Structs: ``(b.count("purchase", "90d") >= 3).node`` *is*
``parse("count(purchase, 90d) >= 3")``. Builder objects are thin wrappers around that AST:
:class:`Value` (``count(...)``, ``trait.x``, ``now - 7d`` …) and :class:`Cond` (a condition, a
whole rule or a ``where`` clause). Both carry ``.node`` (the AST) and ``.text`` (the rule text).

Examples
--------
A shop wants to nudge shoe browsers who have not bought anything lately:

>>> from segcore import build as b
>>> from segcore.rules import parse
>>> browsed = b.count("product_view", "5d", where=b.prop("category") == "shoes") >= 3
>>> intent = browsed & ~b.did("purchase", "30d")
>>> intent.text
'count(product_view where category == "shoes", 5d) >= 3 and not count(purchase, 30d) >= 1'
>>> intent.node == parse('count(product_view where category == "shoes", 5d) >= 3 '
...                      'and not did(purchase, 30d)')
True

Then only Swedish users who arrived this week, and the result is still one flat ``and``:

>>> campaign = intent & (b.trait("country") == "SE") & (b.first_seen >= b.now - "7d")
>>> len(campaign.node.items)
4
>>> campaign.node == parse(campaign.text)
True

A rule that cannot work is refused where it is written, not when the engine meets it:

>>> b.trait("country") == b.count("purchase")
Traceback (most recent call last):
...
segcore.errors.RuleError: a trait can only be compared with constants (`trait.x >= 18`)

Notes
-----
* **Parenthesise comparisons.** Python's ``&``, ``|`` bind tighter than ``>=``, ``==``:
  write ``(b.count("a") >= 3) & b.seen``. Forgetting raises a ``TypeError`` that says so, as
  do ``and`` / ``or`` / ``not`` and chained comparisons (``1 < v < 5``): conditions have no
  truth value. Use ``&``, ``|``, ``~`` and ``.between``.
* **Chains are flat.** ``x & y & z`` gives ``And((x, y, z))``, exactly like the text
  ``x and y and z``; so does ``x & (y & z)`` (Python's parentheses are invisible to the
  builder). The text ``(x and y) and z`` parses to a nested ``And((And((x, y)), z))``;
  build that with :func:`and_`, whose result is never flattened into an enclosing chain:
  ``and_(and_(x, y), z)``. The same holds for ``|`` and :func:`or_`. In short: a builder
  expression equals ``parse(expr.text)``.
* **Reflected comparisons.** ``3 <= b.count("a")`` is Python's ``b.count("a") >= 3``; use
  ``b.lit(3) <= b.count("a")`` for the AST of the text ``3 <= count(a)``.
* **Strings.** Durations are strings such as ``"7d"`` (or :func:`dur`, an int of ms, a
  :class:`datetime.timedelta`). A string added or subtracted is a duration
  (``b.now - "7d"``); a string compared with a time value (``now``, ``first_seen``,
  ``last_seen``, ``first(E)``, ``last(E)``, a duration) is a duration
  (``b.now - b.last("purchase") > "30d"``); any other string is a string
  (``b.trait("country") == "SE"``). :func:`lit` always makes a string.
* ``.text`` is :func:`segcore.rules.to_text`: durations come out in their largest whole unit
  (``"7d"`` reads ``1w``).
* Names must be what the text can spell: letters, digits and ``_``, not starting with a digit.
"""

from __future__ import annotations

import datetime as _dt
import math as _math
import numbers as _numbers
import re as _re
from collections.abc import Iterable

from . import rules as _r
from .errors import RuleError

__all__ = [
    "Value", "Cond", "count", "sum", "avg", "min", "max", "distinct", "did", "seen",
    "inactive", "abandoned", "first_seen", "last_seen", "now", "first", "last", "trait",
    "score", "prop", "in_", "bucket", "dur", "lit", "and_", "or_", "not_",
]

_NAME_RE = _re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Words the parser cannot read back in these places (see rules._Parser.event / .term).
_EVENT_RESERVED = frozenset(("and", "or", "not", "where", "in"))
_PROP_RESERVED = frozenset(("and", "or", "not", "in", "between", "exists", "where", "trait",
                            "score", "now"))
_TIME_NODES = (_r.Now, _r.FirstSeen, _r.LastSeen, _r.First, _r.Last, _r.Dur)
_VALUE_NODES = (_r.Num, _r.Str, _r.Dur, _r.Now, _r.FirstSeen, _r.LastSeen, _r.First, _r.Last,
                _r.Trait, _r.Score, _r.Prop, _r.Agg, _r.Arith)
_COND_NODES = (_r.Compare, _r.InList, _r.Between, _r.StrTest, _r.Exists, _r.Seen,
               _r.InSegment, _r.Bucket, _r.Inactive, _r.Abandoned, _r.And, _r.Or, _r.Not)
_NO_TRUTH = ("a rule condition has no truth value: combine conditions with `&`, `|` and `~` "
             "(not `and`, `or`, `not`), and use `.between(lo, hi)` instead of a chained "
             "comparison")


# --------------------------------------------------------------------------- checks
def _name(x, what: str, reserved=frozenset()) -> str:
    if not isinstance(x, str) or not _NAME_RE.match(x):
        raise RuleError(f"{what} must be a name (letters, digits and `_`, not starting with a "
                        f"digit), got {x!r}")
    if x in reserved:
        raise RuleError(f"{what} cannot be the keyword `{x}`")
    return x


def _ms(x, what: str) -> int:
    """A duration in ms from ``"7d"``, an int of ms, a timedelta or ``dur(...)``."""
    if isinstance(x, Value):
        if not isinstance(x.node, _r.Dur):
            raise RuleError(f"{what} must be a duration, got `{x.text}`")
        ms = x.node.ms
    elif isinstance(x, _dt.timedelta):
        ms, rest = divmod(x, _dt.timedelta(milliseconds=1))
        if rest:
            raise RuleError(f"{what} must be a whole number of milliseconds, got {x!r}")
    else:
        ms = _r.parse_duration(x)
    if not 0 <= ms < _r.MAX_TIME_MS:
        raise RuleError(f"{what} is out of range (0 to 2**48 ms)")
    return ms


def _window(w) -> int | None:
    if w is None or (isinstance(w, str) and w.strip() == "all"):
        return None
    ms = _ms(w, "a window")
    if ms == 0:
        raise RuleError("a window must be longer than 0")
    return ms


def _has_prop(node) -> bool:
    return any(isinstance(n, _r.Prop) for n in _r._walk(node, into_where=False))


def _validate(node, where: bool) -> None:
    """``rules.validate``, as a whole rule or as the ``where`` of an aggregate."""
    probe = node
    if where:
        probe = _r.Compare(">=", _r.Agg("count", "_", None, node, None), _r.Num(1))
    try:
        _r.validate(probe)
    except RuleError as e:
        # The JSON path would point into the probe; the traceback points at the mistake.
        raise RuleError(e.reason) from None


def _is_temporal(node) -> bool:
    return any(isinstance(t, _TIME_NODES) for _, t in _r._kinds(node))


def _const(x, temporal: bool):
    """The AST of a constant (or of a builder / AST value) on one side of a test."""
    if isinstance(x, Value):
        return x.node
    if isinstance(x, _VALUE_NODES):
        return x
    if isinstance(x, bool):
        raise RuleError(f"booleans are not rule values, got {x!r} (store flags as 1/0 or as "
                        "strings)")
    if isinstance(x, _numbers.Integral):
        return _r.Num(int(x))
    if isinstance(x, _numbers.Real):
        v = float(x)
        if not _math.isfinite(v):
            raise RuleError(f"numbers must be finite, got {v!r}")
        return _r.Num(v)
    if isinstance(x, str):
        return _r.Dur(_ms(x, "a duration")) if temporal else _r.Str(x)
    if isinstance(x, _dt.timedelta):
        return _r.Dur(_ms(x, "a duration"))
    if x is None:
        raise RuleError("`None` is not a rule value; test presence with `.exists()` and "
                        "absence with `~v.exists()`")
    if isinstance(x, Cond):
        raise TypeError(f"`{x.text}` is a condition, not a value")
    raise RuleError(f"cannot use {type(x).__name__} {x!r} in a rule")


def _operand(x):
    """An operand of ``+`` / ``-``: strings are durations there."""
    return _const(x, temporal=True)


def _list_item(x):
    if isinstance(x, Value) and isinstance(x.node, (_r.Num, _r.Str)):
        return x.node.value
    if isinstance(x, Value) and isinstance(x.node, _r.Dur):
        return x.node.ms
    if isinstance(x, str):
        return x
    node = _const(x, temporal=False)
    if not isinstance(node, (_r.Num, _r.Dur)):
        raise RuleError(f"list items must be numbers or strings, got `{_value_text(node)}`")
    return node.value if isinstance(node, _r.Num) else node.ms


def _value_text(node) -> str:
    return _r.to_text(_r.Exists(node))[: -len(" exists")]


def _test(node) -> "Cond":
    where = _has_prop(node)
    _validate(node, where)
    return Cond(node, where=where)


# --------------------------------------------------------------------------- wrappers
class Value:
    """A value in a rule: an aggregate, ``first_seen``, ``trait.x``, ``now - 7d``, a constant.

    Compare it (``==  !=  <  <=  >  >=``) or test it (:meth:`isin`, :meth:`between`,
    :meth:`exists` …) to get a :class:`Cond`; add or subtract (``+ -``) to get another value.

    >>> (now - last("purchase") > "30d").text
    'now - last(purchase) > 30d'
    """

    __slots__ = ("node",)
    __hash__ = None   # `==` builds a condition, so values cannot be dict keys

    def __init__(self, node):
        if not isinstance(node, _VALUE_NODES):
            raise TypeError(f"not a value node: {node!r}")
        object.__setattr__(self, "node", node)

    def __setattr__(self, name, value):
        raise AttributeError("builder values are immutable")

    @property
    def text(self) -> str:
        """The value as rule text."""
        return _value_text(self.node)

    def __repr__(self) -> str:
        return f"Value({self.text!r})"

    __str__ = text.fget

    def __bool__(self):
        raise TypeError(_NO_TRUTH)

    # comparisons
    def _cmp(self, op: str, other) -> "Cond":
        return _test(_r.Compare(op, self.node, _const(other, _is_temporal(self.node))))

    def __eq__(self, other) -> "Cond":   # type: ignore[override]
        return self._cmp("==", other)

    def __ne__(self, other) -> "Cond":   # type: ignore[override]
        return self._cmp("!=", other)

    def __lt__(self, other) -> "Cond":
        return self._cmp("<", other)

    def __le__(self, other) -> "Cond":
        return self._cmp("<=", other)

    def __gt__(self, other) -> "Cond":
        return self._cmp(">", other)

    def __ge__(self, other) -> "Cond":
        return self._cmp(">=", other)

    # arithmetic
    def __add__(self, other) -> "Value":
        return Value(_r.Arith("+", self.node, _operand(other)))

    def __radd__(self, other) -> "Value":
        return Value(_r.Arith("+", _operand(other), self.node))

    def __sub__(self, other) -> "Value":
        return Value(_r.Arith("-", self.node, _operand(other)))

    def __rsub__(self, other) -> "Value":
        return Value(_r.Arith("-", _operand(other), self.node))

    def __neg__(self) -> "Value":
        n = self.node
        if isinstance(n, _r.Num):
            return Value(_r.Num(-n.value))
        if isinstance(n, _r.Dur):
            return Value(_r.Dur(-n.ms))
        raise RuleError("unary minus is only allowed before a number")

    # tests
    def isin(self, items: Iterable) -> "Cond":
        """``v in [..]``: equal to one of the numbers or strings."""
        return self._inlist(items, False)

    def not_in(self, items: Iterable) -> "Cond":
        """``v not in [..]`` (false when ``v`` is missing, like every test)."""
        return self._inlist(items, True)

    def _inlist(self, items, negated: bool) -> "Cond":
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise TypeError(f"expected a list of numbers or strings, got {items!r}")
        return _test(_r.InList(self.node, tuple(_list_item(x) for x in items), negated))

    def between(self, low, high) -> "Cond":
        """``v between low and high``: ``low <= v <= high``."""
        t = _is_temporal(self.node)
        return _test(_r.Between(self.node, _const(low, t), _const(high, t)))

    def _str_test(self, op: str, s) -> "Cond":
        if not isinstance(s, str):
            raise RuleError(f"`{op}` takes a string, got {s!r}")
        return _test(_r.StrTest(op, self.node, s))

    def contains(self, s: str) -> "Cond":
        """``v contains "s"`` (false on non-strings)."""
        return self._str_test("contains", s)

    def startswith(self, s: str) -> "Cond":
        """``v startswith "s"``."""
        return self._str_test("startswith", s)

    def matches(self, regex: str) -> "Cond":
        """``v matches "regex"`` (Python ``re.search``)."""
        return self._str_test("matches", regex)

    def exists(self) -> "Cond":
        """``v exists``: the property, trait or score is present."""
        return _test(_r.Exists(self.node))


class Cond:
    """A condition: a whole rule, a part of one, or the ``where`` of an aggregate.

    Combine with ``&`` (and), ``|`` (or), ``~`` (not). ``.node`` is the AST, ``.text`` the rule
    text; a condition on event properties (:func:`prop`) is only usable as a ``where``.

    >>> rule = (count("app_open", "3d") >= 5) | in_("vip")
    >>> rule
    Cond('count(app_open, 3d) >= 5 or in(vip)')
    """

    __slots__ = ("node", "_chain", "_where")

    def __init__(self, node, *, where: bool | None = None, _chain: str | None = None):
        if not isinstance(node, _COND_NODES):
            raise TypeError(f"not a condition node: {node!r}")
        if where is None:
            where = _has_prop(node)
            _validate(node, where)
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "_where", where)
        # "and"/"or" when built by `&`/`|`: an open chain that the next `&`/`|` extends.
        object.__setattr__(self, "_chain", _chain)

    def __setattr__(self, name, value):
        raise AttributeError("builder conditions are immutable")

    @property
    def text(self) -> str:
        """The condition as rule text (``rules.parse(c.text) == c.node``)."""
        return _r.to_text(self.node)

    def __repr__(self) -> str:
        return f"Cond({self.text!r})"

    __str__ = text.fget

    def __bool__(self):
        raise TypeError(_NO_TRUTH)

    def _items(self, chain: str) -> tuple:
        return self.node.items if self._chain == chain else (self.node,)

    def _join(self, other, chain: str, reflected: bool) -> "Cond":
        other = _as_cond(other, "&" if chain == "and" else "|")
        left, right = (other, self) if reflected else (self, other)
        _same_scope((left, right))
        items = left._items(chain) + right._items(chain)
        node = _r.And(items) if chain == "and" else _r.Or(items)
        where = left._where or right._where
        _validate(node, where)
        return Cond(node, where=where, _chain=chain)

    def __and__(self, other) -> "Cond":
        return self._join(other, "and", False)

    def __rand__(self, other) -> "Cond":
        return self._join(other, "and", True)

    def __or__(self, other) -> "Cond":
        return self._join(other, "or", False)

    def __ror__(self, other) -> "Cond":
        return self._join(other, "or", True)

    def __invert__(self) -> "Cond":
        return Cond(_r.Not(self.node), where=self._where)


def _same_scope(conds) -> None:
    """A ``where`` condition (on event properties) cannot meet a rule condition."""
    wheres = [c for c in conds if c._where]
    rules_ = [c for c in conds if not c._where]
    if wheres and rules_:
        raise RuleError(f"`{wheres[0].text}` tests event properties, which are only available "
                        f"inside `where`; it cannot be joined with `{rules_[0].text}`")


def _as_cond(x, op: str = "&") -> Cond:
    if isinstance(x, Cond):
        return x
    if isinstance(x, _COND_NODES):
        return Cond(x)
    if isinstance(x, Value):
        raise TypeError(f"`{x.text}` is a value, not a condition: compare it "
                        f"(`{x.text} >= 1`) before joining it with `{op}`")
    raise TypeError(f"cannot join {type(x).__name__} {x!r} with `{op}`; if you wrote "
                    f"`a >= 3 {op} b`, parenthesise the comparison: `(a >= 3) {op} b`")


# --------------------------------------------------------------------------- aggregates
def _where(where):
    if where is None:
        return None
    c = _as_cond(where, "where")
    _validate(c.node, True)
    return c.node


def _agg(fn: str, event, prop_name, window, where) -> Value:
    ev = _name(event, "an event type", _EVENT_RESERVED)
    p = None if prop_name is None else _name(prop_name, "a property")
    return Value(_r.Agg(fn, ev, p, _where(where), _window(window)))


def count(event: str, window=None, *, where=None) -> Value:
    """``count(E where P, W)``: events of type ``E`` in the last ``W`` (all time without one).

    >>> (count("purchase", "90d") >= 3).text
    'count(purchase, 90d) >= 3'
    """
    return _agg("count", event, None, window, where)


def sum(event: str, prop: str, window=None, *, where=None) -> Value:  # noqa: A001
    """``sum(E.prop where P, W)``.

    >>> (sum("purchase", "amount") >= 500).text
    'sum(purchase.amount) >= 500'
    """
    return _agg("sum", event, prop, window, where)


def avg(event: str, prop: str, window=None, *, where=None) -> Value:
    """``avg(E.prop where P, W)`` (missing when there are no such events)."""
    return _agg("avg", event, prop, window, where)


def min(event: str, prop: str, window=None, *, where=None) -> Value:  # noqa: A001
    """``min(E.prop where P, W)``."""
    return _agg("min", event, prop, window, where)


def max(event: str, prop: str, window=None, *, where=None) -> Value:  # noqa: A001
    """``max(E.prop where P, W)``."""
    return _agg("max", event, prop, window, where)


def distinct(event: str, prop: str, window=None, *, where=None) -> Value:
    """``distinct(E.prop where P, W)``: the number of distinct present values."""
    return _agg("distinct", event, prop, window, where)


def did(event: str, window=None, *, where=None) -> Cond:
    """``did(E where P, W)``, which is ``count(E where P, W) >= 1`` (the parser's AST too).

    >>> did("support_ticket", "3d").text
    'count(support_ticket, 3d) >= 1'
    """
    return count(event, window, where=where) >= 1


# --------------------------------------------------------------------------- other terms
seen = Cond(_r.Seen(), where=False)
"""``seen``: the user has at least one event."""

now = Value(_r.Now())
"""``now``: the engine's time; only in comparisons of an age (``b.now - "7d"``)."""

first_seen = Value(_r.FirstSeen())
"""``first_seen``: the ts of the user's earliest event."""

last_seen = Value(_r.LastSeen())
"""``last_seen``: the ts of the user's latest event."""


def first(event: str) -> Value:
    """``first(E)``: the ts of the earliest ``E``."""
    return Value(_r.First(_name(event, "an event type", _EVENT_RESERVED)))


def last(event: str) -> Value:
    """``last(E)``: the ts of the latest ``E``."""
    return Value(_r.Last(_name(event, "an event type", _EVENT_RESERVED)))


def trait(name: str) -> Value:
    """``trait.NAME``: a user trait (compared with constants)."""
    return Value(_r.Trait(_name(name, "a trait")))


def score(name: str) -> Value:
    """``score.NAME``: a predictive score (missing until set)."""
    return Value(_r.Score(_name(name, "a score")))


def prop(name: str) -> Value:
    """An event property, for the ``where=`` of an aggregate.

    >>> prop("category").isin([3, 4]).text
    'category in [3, 4]'
    """
    return Value(_r.Prop(_name(name, "a property", _PROP_RESERVED)))


def dur(d) -> Value:
    """A duration constant: ``dur("7d")``, ``dur(250)`` (ms) or ``dur(timedelta(hours=1))``."""
    return Value(_r.Dur(_ms(d, "a duration")))


def lit(x) -> Value:
    """A constant as a value: a number, or a string that stays a string (``lit("7d")``)."""
    if isinstance(x, Value):
        return x
    return Value(_const(x, temporal=False))


def inactive(window) -> Cond:
    """``inactive(W)``: no event in the last ``W`` (true for a user never seen)."""
    ms = _ms(window, "inactive()'s duration")
    if ms == 0:
        raise RuleError("inactive() needs a duration longer than 0")
    return Cond(_r.Inactive(ms), where=False)


def abandoned(a: str, b: str, within, *, by: str | None = None) -> Cond:
    """``abandoned(A, B, T) [by KEY]``: the latest ``A`` is ``T`` old and no ``B`` followed it.

    >>> abandoned("add_to_cart", "purchase", "1h", by="cart_id").text
    'abandoned(add_to_cart, purchase, 1h) by cart_id'
    """
    return Cond(_r.Abandoned(_name(a, "an event type", _EVENT_RESERVED),
                             _name(b, "an event type", _EVENT_RESERVED),
                             _ms(within, "abandoned()'s duration"),
                             None if by is None else _name(by, "a property")), where=False)


def in_(segment: str) -> Cond:
    """``in(S)``: the user is a member of segment ``S``."""
    return Cond(_r.InSegment(_name(segment, "a segment")), where=False)


def bucket(lo: int, hi: int) -> Cond:
    """``bucket(lo, hi)``: the user's stable hash bucket (0..9999) is in ``lo..hi``."""
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, _numbers.Integral):
            raise RuleError(f"bucket() takes integers, got {v!r}")
    return Cond(_r.Bucket(int(lo), int(hi)))


# --------------------------------------------------------------------------- logic
def _group(conds, kind: str) -> Cond:
    cs = [_as_cond(c, "&" if kind == "and" else "|") for c in conds]
    if not cs:
        raise RuleError(f"`{kind}_` needs at least one condition")
    if len(cs) == 1:
        return Cond(cs[0].node, where=cs[0]._where)
    _same_scope(cs)
    items = tuple(c.node for c in cs)
    node = _r.And(items) if kind == "and" else _r.Or(items)
    where = any(c._where for c in cs)
    _validate(node, where)
    return Cond(node, where=where)


def and_(*conds) -> Cond:
    """All of ``conds``, as one ``and`` that later ``&`` will not merge into (the text's
    parentheses). One condition is returned as is.

    >>> x, y, z = seen, in_("vip"), bucket(0, 99)
    >>> (x & y & z).text, (and_(x & y) & z).text
    ('seen and in(vip) and bucket(0, 99)', '(seen and in(vip)) and bucket(0, 99)')
    """
    return _group(conds, "and")


def or_(*conds) -> Cond:
    """Any of ``conds``, as one ``or`` that later ``|`` will not merge into."""
    return _group(conds, "or")


def not_(cond) -> Cond:
    """``not cond`` (the same as ``~cond``)."""
    return ~_as_cond(cond, "not")
