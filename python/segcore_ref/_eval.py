"""From-scratch evaluation of one rule for one user at one instant.

Everything here is deliberately naive: every aggregate rescans the user's events of the type it
needs. It is the literal reading of ``docs/semantics.md``; the comments quote the contract where
the semantics are subtle.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import operator
import re
from zoneinfo import ZoneInfo

from segcore import rules as R

#: The value of anything that is absent (a missing property or trait, a score never set, the
#: ``avg`` of no events, ``first(E)`` without an ``E``...). Every test of it is false.
MISSING = object()

_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
        ">": operator.gt, ">=": operator.ge}


#: ZoneInfo objects by IANA name (only names that loaded).
_ZONES: dict = {}
_UTC = _dt.timezone.utc
#: 400 Gregorian years in seconds: the calendar, the weekdays (146097 days is a whole number of
#: weeks) and zoneinfo's rules past its last listed transition repeat with this period.
_CYCLE_S = 146097 * 86400
#: From here on (year 9000), instants are moved back by whole cycles before dating them, since
#: ``datetime`` stops at year 9999 and timestamps go up to 2**48 ms (year 10889).
_LATE_S = 221845392000


def zone(name: str):
    """The ZoneInfo of IANA name ``name`` (cached); raises whatever ZoneInfo raises."""
    z = _ZONES.get(name)
    if z is None:
        z = ZoneInfo(name)
        _ZONES[name] = z
    return z


def local_time(ts: int, tz=_UTC) -> tuple[int, str]:
    """``(hour, weekday)`` of instant ``ts`` (ms) in timezone ``tz`` (a tzinfo): the local time
    of ``ts // 1000`` seconds, as zoneinfo has it."""
    s = ts // 1000
    if s >= _LATE_S:
        s -= ((s - _LATE_S) // _CYCLE_S + 1) * _CYCLE_S
    d = _dt.datetime.fromtimestamp(s, tz)
    return d.hour, R.WEEKDAYS[d.weekday()]


class Event:
    """One accepted event: its ``ts``, type, properties (None and NaN already dropped), its
    global arrival index (the order in which the engine accepted it), its local ``(hour,
    weekday)`` in the user's timezone when it was accepted (UTC when not given), and ``mrank``,
    which only orders the ties of ``mode`` after ``alias`` (see :meth:`Event.order`)."""

    __slots__ = ("ts", "type", "props", "arrival", "local", "mrank")

    def __init__(self, ts: int, type: str, props: dict, arrival: int,
                 local: tuple[int, str] | None = None, mrank: int = 0):
        self.ts = ts
        self.type = type
        self.props = props
        self.arrival = arrival
        self.local = local_time(ts) if local is None else local
        self.mrank = mrank

    def order(self) -> tuple[int, int, int]:
        """Which of two events is the latest, for the ties of ``mode``: by ts, then by
        arrival, where ``alias`` makes the old profile's events arrive after the new one's
        (``mrank``: every alias raises the merged-in events' rank above all the others)."""
        return (self.ts, self.mrank, self.arrival)

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
    elif isinstance(node, R.Seq):
        for st in node.steps:
            if st.where is not None:
                yield from walk(st.where)


def has_now(node) -> bool:
    return any(isinstance(n, R.Now) for n in walk(node))


class Evaluator:
    """Evaluates conditions and values for ``user`` at instant ``now``.

    ``memb`` holds the memberships already computed at this same instant (segments earlier in
    evaluation order), which is what ``in(S)`` reads. ``bucket`` is the user's bucket.
    ``session_ms`` is the engine's session timeout ``T`` (docs/patterns.md).
    """

    def __init__(self, user, now: int, memb: dict, bucket: int, now_ids=None, *,
                 session_ms: int, pred=None):
        self.user = user
        self.pred = pred            # (PredictSpec, PredictiveModel) on a predictive engine
        self.now = now
        self.memb = memb
        self.bucket = bucket
        # ids of the Compare nodes that mention `now` (precomputed by the engine, which keeps
        # the ASTs alive); None means "find out by walking the node".
        self.now_ids = now_ids
        self.session_ms = session_ms
        self._sessions = None       # the user's sessions (computed when first needed)

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

    def _in_session(self, node, ev):
        # A session is open now: now - last_seen < T (false without events).
        evs = self.user.events
        return bool(evs) and self.now - max(e.ts for e in evs) < self.session_ms

    def _seq(self, node, ev):
        steps = node.steps
        # Only the user's events of the steps' types take part; with `by KEY`, only those
        # carrying KEY, and a match uses one value of KEY (numbers by value): one group each.
        types = []
        for st in steps:
            if st.event not in types:
                types.append(st.event)
        evs = [e for t in types for e in self.user.by_type.get(t, ())]
        groups: dict = {}
        for e in evs:
            if node.by is None:
                groups.setdefault(None, []).append(e)
            elif node.by in e.props:
                groups.setdefault(value_key(e.props[node.by]), []).append(e)
        # which steps each event matches (its type and the step's `where`)
        match = {id(e): [st.event == e.type and (st.where is None or self.cond(st.where, e))
                         for st in steps] for e in evs}
        if steps[-1].negated:
            return any(self._seq_not(node, g, match) for g in groups.values())
        return any(self._seq_match(node, g, match) for g in groups.values())

    def _seq_match(self, node, evs, match) -> bool:
        """Is there a match ``e1 ... en`` (t1 < ... < tn, tn - t1 < within) among ``evs`` with
        (when windowed) ``t1 > now - W``?

        Dynamic programming over the events in ts order: ``best[k]`` is the latest t1 of a
        partial match of steps 0..k ending at an event already processed. A later t1 is
        always better (for `within` and for the window alike), so the latest is enough. The
        events of one instant are one group: they extend only partial matches ending strictly
        before that instant (``best`` as it was before the group)."""
        n = len(node.steps)
        best: list = [None] * n
        evs = sorted(evs, key=lambda e: e.ts)
        i = 0
        while i < len(evs):
            t = evs[i].ts
            j = i
            while j < len(evs) and evs[j].ts == t:
                j += 1
            new = list(best)
            for e in evs[i:j]:
                for k, hit in enumerate(match[id(e)]):
                    if not hit:
                        continue
                    t1 = t if k == 0 else best[k - 1]
                    if t1 is None:
                        continue
                    if node.within_ms is not None and t - t1 >= node.within_ms:
                        continue            # every step less than D after the first
                    if new[k] is None or t1 > new[k]:
                        new[k] = t1
            best = new
            i = j
        t1 = best[n - 1]
        if t1 is None:
            return False
        # With a window, the first step must be in it: t1 > now - W.
        return node.window_ms is None or t1 > self.now - node.window_ms

    def _seq_not(self, node, evs, match) -> bool:
        """``seq(A, not B within D [, W])``: some A at tA with tA + D <= now (and, windowed,
        tA > now - W) and no *other* B with tA <= tB < tA + D."""
        d = node.within_ms
        b_ts = sorted(e.ts for e in evs if match[id(e)][1])
        for a in evs:
            if not match[id(a)][0]:
                continue
            if a.ts + d > self.now:
                continue                    # counts only from tA + D on
            if node.window_ms is not None and not a.ts > self.now - node.window_ms:
                continue
            # the B events in [tA, tA + D), the A itself excluded (it never cancels itself)
            n_b = bisect.bisect_left(b_ts, a.ts + d) - bisect.bisect_left(b_ts, a.ts)
            if match[id(a)][1]:
                n_b -= 1
            if n_b == 0:
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
        v = self.user.scores.get(node.name, MISSING)
        if v is MISSING and self.pred is not None and node.name in self.pred[0].score_ids:
            from ._predict import value          # a caller's value of the name wins
            return value(self.pred[0], self.pred[1], self.user, node.name, self.now)
        return v

    def _prop(self, node, ev, exact):
        if ev is None:
            raise TypeError("a property outside `where`")
        return ev.props.get(node.name, MISSING)

    def _agg(self, node, ev, exact):
        return self.agg(node)

    def _local(self, node, ev, exact):
        # hour / weekday of the event in the user's timezone when it was accepted
        if ev is None:
            raise TypeError(f"`{node.field}` outside `where`")
        return ev.local[0] if node.field == "hour" else ev.local[1]

    def sessions(self) -> list[tuple[int, int, int]]:
        """The user's sessions as ``(start, end, events)``, by start: runs of the events in ts
        order (every type, not arrival order) whose consecutive gaps are less than ``T`` (a
        gap of exactly ``T`` starts a new session; equal timestamps share one)."""
        if self._sessions is None:
            out: list = []
            for ts in sorted(e.ts for e in self.user.events):
                if out and ts - out[-1][1] < self.session_ms:
                    out[-1][1] = ts
                    out[-1][2] += 1
                else:
                    out.append([ts, ts, 1])
            self._sessions = [tuple(x) for x in out]
        return self._sessions

    def _sessions_value(self, node, ev, exact):
        now = self.now
        ss = self.sessions()
        if node.window_ms is not None:
            lo = now - node.window_ms
            ss = [x for x in ss if lo < x[0] <= now]       # sessions started in the window
        if node.fn == "count":
            return len(ss)
        # in start order
        return _reduce(node.fn, [end - start if node.metric == "duration" else n
                                 for start, end, n in ss])

    def _last_session(self, node, ev, exact):
        ss = self.sessions()
        if not ss:
            return MISSING
        start, end, n = ss[-1]              # the latest start
        return end - start if node.metric == "duration" else n

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
        if node.fn == "share":
            # count(E where P, W) / count(E, W) in float64; missing without an E
            if not evs:
                return MISSING
            hits = len(evs) if node.where is None else sum(
                1 for e in evs if self.cond(node.where, e))
            return hits / len(evs)
        if node.where is not None:
            evs = [e for e in evs if self.cond(node.where, e)]
        if node.fn == "count":
            return len(evs)
        present = [(e, e.props[node.prop]) for e in evs if node.prop in e.props]
        if node.fn == "distinct":
            return len({value_key(v) for _, v in present})
        if node.fn == "mode":
            # The most frequent value (numbers by value); ties: the value whose latest event
            # is the latest (by ts, then arrival, alias included: Event.order).
            groups: dict = {}               # value key -> [count, latest order, its value]
            for e, v in present:
                g = groups.get(value_key(v))
                if g is None:
                    groups[value_key(v)] = [1, e.order(), v]
                else:
                    g[0] += 1
                    if e.order() > g[1]:
                        g[1], g[2] = e.order(), v
            if not groups:
                return MISSING
            return max(groups.values(), key=lambda g: (g[0], g[1]))[2]
        nums = [(e, v) for e, v in present if is_num(v)]   # non-numeric values are skipped
        if node.fn in ("sum", "avg"):
            # All-time sums accumulate in arrival order; windowed sums add the events in the
            # window in (ts, arrival) order. Accumulation is float64 from 0.0.
            if windowed:
                nums.sort(key=lambda p: (p[0].ts, p[0].arrival))
            else:
                nums.sort(key=lambda p: p[0].arrival)
        return _reduce(node.fn, [v for _, v in nums])


def _reduce(fn: str, vals: list):
    """``sum`` (float64 from 0.0, in the order given), ``avg``, ``min`` or ``max`` of numbers;
    all but ``sum`` are MISSING of none."""
    if fn in ("sum", "avg"):
        s = 0.0
        for v in vals:
            s += v
        if fn == "sum":
            return s
        return s / len(vals) if vals else MISSING
    if not vals:
        return MISSING
    return min(vals) if fn == "min" else max(vals)


_COND = {R.And: Evaluator._and, R.Or: Evaluator._or, R.Not: Evaluator._not,
         R.Compare: Evaluator._compare, R.InList: Evaluator._in_list,
         R.Between: Evaluator._between, R.StrTest: Evaluator._str_test,
         R.Exists: Evaluator._exists, R.Seen: Evaluator._seen,
         R.InSegment: Evaluator._in_segment, R.Bucket: Evaluator._bucket,
         R.Inactive: Evaluator._inactive, R.Abandoned: Evaluator._abandoned,
         R.InSession: Evaluator._in_session, R.Seq: Evaluator._seq}
_VALUE = {R.Num: Evaluator._const, R.Str: Evaluator._const, R.Dur: Evaluator._dur,
          R.Now: Evaluator._now, R.FirstSeen: Evaluator._first_seen,
          R.LastSeen: Evaluator._last_seen, R.First: Evaluator._first, R.Last: Evaluator._last,
          R.Trait: Evaluator._trait, R.Score: Evaluator._score, R.Prop: Evaluator._prop,
          R.Agg: Evaluator._agg, R.Arith: Evaluator._arith, R.Local: Evaluator._local,
          R.Sessions: Evaluator._sessions_value, R.LastSession: Evaluator._last_session}
