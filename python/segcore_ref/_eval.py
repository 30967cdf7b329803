"""From-scratch evaluation of one rule for one user at one instant.

Everything here is deliberately naive: every aggregate rescans the user's events of the type it
needs. It is the literal reading of ``docs/semantics.md``; the comments quote the contract where
the semantics are subtle.
"""

from __future__ import annotations

import operator
import re

from segcore import rules as R

#: The value of anything that is absent (a missing property or trait, a score never set, the
#: ``avg`` of no events, ``first(E)`` without an ``E``...). Every test of it is false.
MISSING = object()

_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
        ">": operator.gt, ">=": operator.ge}


class Event:
    """One accepted event: its ``ts``, type, properties (None and NaN already dropped) and its
    global arrival index (the order in which the engine accepted it)."""

    __slots__ = ("ts", "type", "props", "arrival")

    def __init__(self, ts: int, type: str, props: dict, arrival: int):
        self.ts = ts
        self.type = type
        self.props = props
        self.arrival = arrival

    def __repr__(self) -> str:
        return f"Event(ts={self.ts}, type={self.type!r}, props={self.props!r}, #{self.arrival})"


def is_num(v) -> bool:
    """Numbers are int and float (bools arrive here already as 1/0). Values are plain
    int/float/str (the engine normalises its input)."""
    t = type(v)
    return t is int or t is float


def compare(op: str, a, b) -> bool:
    """A comparison of two values: false if either is missing, numbers compare with numbers
    (exactly, as Python compares int and float), strings with strings (by code point); any
    other pairing is false, ``!=`` included."""
    if a is MISSING or b is MISSING:
        return False
    ta, tb = type(a), type(b)
    if (ta is int or ta is float) and (tb is int or tb is float) or (ta is str and tb is str):
        return _OPS[op](a, b)
    return False


def value_key(v):
    """Key under which two present values are "the same" (``distinct``, ``abandoned … by``):
    numbers by value (``1 == 1.0 == true``; Python's set does that), strings by text."""
    return v


def _latest_by_key(events, key: str) -> dict:
    """The latest ``ts`` per value of property ``key`` (events without it are ignored)."""
    latest: dict = {}
    for e in events:
        k = e.props.get(key, MISSING)
        if k is MISSING:
            continue
        k = value_key(k)
        if k not in latest or e.ts > latest[k]:
            latest[k] = e.ts
    return latest


def walk(node):
    """Every node of a rule, ``where`` clauses included."""
    yield node
    if isinstance(node, (R.And, R.Or)):
        for it in node.items:
            yield from walk(it)
    elif isinstance(node, R.Not):
        yield from walk(node.item)
    elif isinstance(node, (R.Compare, R.Arith)):
        yield from walk(node.left)
        yield from walk(node.right)
    elif isinstance(node, R.Between):
        yield from walk(node.value)
        yield from walk(node.low)
        yield from walk(node.high)
    elif isinstance(node, (R.InList, R.StrTest, R.Exists)):
        yield from walk(node.value)
    elif isinstance(node, R.Agg) and node.where is not None:
        yield from walk(node.where)


def has_now(node) -> bool:
    return any(isinstance(n, R.Now) for n in walk(node))


class Evaluator:
    """Evaluates conditions and values for ``user`` at instant ``now``.

    ``memb`` holds the memberships already computed at this same instant (segments earlier in
    evaluation order), which is what ``in(S)`` reads. ``bucket`` is the user's bucket.
    """

    def __init__(self, user, now: int, memb: dict, bucket: int, now_ids=None):
        self.user = user
        self.now = now
        self.memb = memb
        self.bucket = bucket
        # ids of the Compare nodes that mention `now` (precomputed by the engine, which keeps
        # the ASTs alive); None means "find out by walking the node".
        self.now_ids = now_ids

    # ------------------------------------------------------------------ conditions
    def cond(self, node, ev: Event | None = None) -> bool:
        """Truth of condition ``node`` (``ev``: the event a ``where`` clause is tested on)."""
        return _COND[type(node)](self, node, ev)

    def _and(self, node, ev):
        return all(self.cond(it, ev) for it in node.items)

    def _or(self, node, ev):
        return any(self.cond(it, ev) for it in node.items)

    def _not(self, node, ev):
        # Plain negation: `not (trait.x == 1)` is true when x is missing.
        return not self.cond(node.item, ev)

    def _compare(self, node, ev):
        # Comparisons with `now` are evaluated in exact integer arithmetic; all their terms
        # (now, ts-valued terms, integer constants, durations) are ints.
        exact = has_now(node) if self.now_ids is None else id(node) in self.now_ids
        return compare(node.op, self.value(node.left, ev, exact),
                       self.value(node.right, ev, exact))

    def _in_list(self, node, ev):
        v = self.value(node.value, ev)
        if v is MISSING:
            return False                          # missing: false, `not in` included
        hit = any(compare("==", v, item) for item in node.items)
        # `in [..]` uses `==` on each item; `not in` is its negation for a present value.
        return not hit if node.negated else hit

    def _between(self, node, ev):
        v = self.value(node.value, ev)
        return (compare("<=", self.value(node.low, ev), v)
                and compare("<=", v, self.value(node.high, ev)))

    def _str_test(self, node, ev):
        v = self.value(node.value, ev)
        if type(v) is not str:
            return False                          # false on non-strings and on missing
        if node.op == "contains":
            return node.pattern in v
        if node.op == "startswith":
            return v.startswith(node.pattern)
        return re.search(node.pattern, v) is not None

    def _exists(self, node, ev):
        return self.value(node.value, ev) is not MISSING

    def _seen(self, node, ev):
        return bool(self.user.events)

    def _in_segment(self, node, ev):
        return self.memb[node.name]

    def _bucket(self, node, ev):
        return node.lo <= self.bucket <= node.hi

    def _inactive(self, node, ev):
        # No event with now - W < ts <= now; true for a user without events.
        lo = self.now - node.window_ms
        now = self.now
        return not any(lo < e.ts <= now for e in self.user.events)

    def _abandoned(self, node, ev):
        a_events = self.user.by_type.get(node.a, ())
        b_events = self.user.by_type.get(node.b, ())
        limit = self.now - node.within_ms
        if node.by is None:
            # The user has an A; the latest A (max ts) is older than or exactly T
            # (ts(A) <= now - T); and no B has ts >= ts(latest A).
            if not a_events:
                return False
            latest = max(e.ts for e in a_events)
            if latest > limit:
                return False
            return not any(e.ts >= latest for e in b_events)
        # Keyed: the same per value of property KEY; events without KEY are ignored.
        latest_a = _latest_by_key(a_events, node.by)
        latest_b = _latest_by_key(b_events, node.by)
        for k, la in latest_a.items():
            if la <= limit and not (k in latest_b and latest_b[k] >= la):
                return True
        return False

    # ------------------------------------------------------------------ values
    def value(self, node, ev: Event | None = None, exact: bool = False):
        """Value of ``node`` (MISSING when absent). ``exact``: integer arithmetic (for
        comparisons with ``now``) instead of float64."""
        return _VALUE[type(node)](self, node, ev, exact)

    def _const(self, node, ev, exact):
        return node.value

    def _dur(self, node, ev, exact):
        return node.ms

    def _now(self, node, ev, exact):
        return self.now

    def _first_seen(self, node, ev, exact):
        evs = self.user.events
        return min(e.ts for e in evs) if evs else MISSING

    def _last_seen(self, node, ev, exact):
        evs = self.user.events
        return max(e.ts for e in evs) if evs else MISSING

    def _first(self, node, ev, exact):
        evs = self.user.by_type.get(node.event)
        return min(e.ts for e in evs) if evs else MISSING

    def _last(self, node, ev, exact):
        evs = self.user.by_type.get(node.event)
        return max(e.ts for e in evs) if evs else MISSING

    def _trait(self, node, ev, exact):
        return self.user.traits.get(node.name, MISSING)

    def _score(self, node, ev, exact):
        return self.user.scores.get(node.name, MISSING)

    def _prop(self, node, ev, exact):
        if ev is None:
            raise TypeError("a property outside `where`")
        return ev.props.get(node.name, MISSING)

    def _agg(self, node, ev, exact):
        return self.agg(node)

    def _arith(self, node, ev, exact):
        a = self.value(node.left, ev, exact)
        b = self.value(node.right, ev, exact)
        if a is MISSING or b is MISSING or not is_num(a) or not is_num(b):
            return MISSING
        if exact:
            return a + b if node.op == "+" else a - b            # Python ints: exact
        # Value arithmetic is evaluated left to right in float64.
        a, b = float(a), float(b)
        return a + b if node.op == "+" else a - b

    def agg(self, node: R.Agg):
        now = self.now
        evs = self.user.by_type.get(node.event, ())
        windowed = node.window_ms is not None
        if windowed:
            lo = now - node.window_ms
            # An event exactly W old is out: now - W < ts <= now.
            evs = [e for e in evs if lo < e.ts <= now]
        if node.where is not None:
            evs = [e for e in evs if self.cond(node.where, e)]
        if node.fn == "count":
            return len(evs)
        present = [(e, e.props[node.prop]) for e in evs if node.prop in e.props]
        if node.fn == "distinct":
            return len({value_key(v) for _, v in present})
        nums = [(e, v) for e, v in present if is_num(v)]   # non-numeric values are skipped
        if node.fn in ("sum", "avg"):
            # All-time sums accumulate in arrival order; windowed sums add the events in the
            # window in (ts, arrival) order. Accumulation is float64 from 0.0.
            if windowed:
                nums.sort(key=lambda p: (p[0].ts, p[0].arrival))
            else:
                nums.sort(key=lambda p: p[0].arrival)
            s = 0.0
            for _, v in nums:
                s += v
            if node.fn == "sum":
                return s
            return s / len(nums) if nums else MISSING
        if not nums:
            return MISSING
        vals = [v for _, v in nums]
        return min(vals) if node.fn == "min" else max(vals)


_COND = {R.And: Evaluator._and, R.Or: Evaluator._or, R.Not: Evaluator._not,
         R.Compare: Evaluator._compare, R.InList: Evaluator._in_list,
         R.Between: Evaluator._between, R.StrTest: Evaluator._str_test,
         R.Exists: Evaluator._exists, R.Seen: Evaluator._seen,
         R.InSegment: Evaluator._in_segment, R.Bucket: Evaluator._bucket,
         R.Inactive: Evaluator._inactive, R.Abandoned: Evaluator._abandoned}
_VALUE = {R.Num: Evaluator._const, R.Str: Evaluator._const, R.Dur: Evaluator._dur,
          R.Now: Evaluator._now, R.FirstSeen: Evaluator._first_seen,
          R.LastSeen: Evaluator._last_seen, R.First: Evaluator._first, R.Last: Evaluator._last,
          R.Trait: Evaluator._trait, R.Score: Evaluator._score, R.Prop: Evaluator._prop,
          R.Agg: Evaluator._agg, R.Arith: Evaluator._arith}
