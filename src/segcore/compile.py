"""Compile a set of segments into the flat plan the kernel runs.

Compile once, run many: name resolution, dependency order, counter sharing, interning and the
choice of state per aggregate happen here, once, whenever the segments change. The kernel then
sees only integers, floats and arrays.

State chosen per aggregate (all exact):

* ``count(E, W) op k`` against a constant keeps only the ``K`` latest timestamps
  (``K = ceil(k)`` for ``>=``/``<``, ``floor(k) + 1`` otherwise): the count in the window, capped
  at ``K``, decides the comparison. One such counter serves every segment that uses the same
  ``(E, where, W)`` with the largest ``K`` any of them needs.
* all-time ``count/sum/avg/min/max`` keep running totals; all-time ``distinct`` keeps the set of
  values; ``first/last/first_seen/last_seen`` keep one timestamp.
* any other windowed aggregate keeps the matching events of the window (timestamp and value).
* ``abandoned`` keeps the latest A and B timestamps (per key for ``by KEY``).
* ``seq(...)`` keeps the user's events of its steps in its window (capped, docs/patterns.md);
  sessions keep one entry per session that can still matter; all-time ``mode`` keeps a count
  and the latest event per value (windowed ``mode`` shares the windowed ``distinct`` state).
"""

from __future__ import annotations

import math
from typing import Callable

import msgspec
import numpy as np

from . import rules as R
from .errors import RuleError

__all__ = ["Plan", "compile_segments", "FeatureSpec"]

# feature kinds (mirrored in _kernel.pyx)
K_TOPK, K_COUNT, K_STATS, K_FIRST, K_LAST, K_WLIST, K_DISTINCT, K_ABANDON, K_ABANDON_BY, \
    K_SUM, K_MODE, K_SEQ, K_SESS, K_PRED = range(1, 15)
TIME_KINDS = (K_TOPK, K_WLIST, K_ABANDON, K_ABANDON_BY, K_SEQ, K_SESS)
VAR_KINDS = (K_WLIST, K_DISTINCT, K_ABANDON_BY, K_MODE, K_SEQ, K_SESS)
# atoms
A_CONST, A_COUNTK, A_NUM, A_TIME, A_TRAIT, A_BUCKET, A_IN, A_ABANDON, A_MODE, A_SEQ, \
    A_PRED = range(11)
OPS = {"==": 0, "!=": 1, "<": 2, "<=": 3, ">": 4, ">=": 5, "exists": 6}
MIRROR = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
T_CONST, T_FEAT, T_SCORE, T_ADD, T_SUB, T_DIV = range(6)
FN = {"count": 0, "sum": 1, "avg": 2, "min": 3, "max": 4, "distinct": 5, "ts": 6}
#: session aggregates over ``events`` are FN[fn] + FN_EV (over ``duration``: FN[fn])
FN_EV, FN_LAST_DUR, FN_LAST_EV = 8, 13, 14
#: the default session timeout (docs/patterns.md)
SESSION_MS = 1_800_000
P_ATOM, P_AND, P_OR, P_NOT = range(4)
ANY = -1
#: Largest K kept for a windowed count compared with a constant; above it the window's
#: events are kept instead (still exact).
MAX_TOPK = 4096
DAY_MS = 86_400_000
#: Days of event counts the predictive state keeps per user (docs/predictive.md): the 7 days
#: a convert score reads, the 7 before them that training reads, and two spare days.
RING_DAYS = 16
#: The most event types score.convert counts.
MAX_CONVERT_EVENTS = 8
#: Built-in score ids (mirrored in _kernel.pyx)
S_P_ALIVE, S_CHURN, S_EXPECTED, S_LTV, S_CONVERT = range(5)


class PredictSpec(msgspec.Struct, frozen=True):
    """What the built-in predictive scores read (``Engine(predictive=...)``)."""
    purchase: str = "purchase"
    amount: str = "amount"
    convert_events: tuple[str, ...] = ("product_view", "add_to_cart", "email_click")
    horizon_ms: int = 90 * DAY_MS

    @property
    def horizon_text(self) -> str:
        h = self.horizon_ms
        return f"{h // DAY_MS}d" if h % DAY_MS == 0 else R._fmt_dur(h)

    @property
    def score_ids(self) -> dict[str, int]:
        """Built-in score name -> score id."""
        h = self.horizon_text
        return {"p_alive": S_P_ALIVE, "churn": S_CHURN, f"expected_purchases_{h}": S_EXPECTED,
                f"ltv_{h}": S_LTV, "convert": S_CONVERT}

    @property
    def slots_per_day(self) -> int:
        return (len(self.convert_events) + 1 + 3) // 4


class FeatureSpec(msgspec.Struct, frozen=True):
    kind: int
    event: str | None          # None = any event
    event2: str | None = None  # B of abandoned
    where: bytes | None = None  # JSON of the where-AST
    val: str | None = None     # numeric property
    key: str | None = None     # property used as a key (distinct, abandoned by, mode, seq)
    window_ms: int = 0         # 0 = all time; for abandoned, T
    span_ms: int = 0           # seq: within (0 = no limit); sessions: the timeout
    steps: tuple = ()          # seq: (event, where JSON or None, negated) per step
    evlist: tuple = ()         # predictive state: the event types score.convert counts

    @property
    def events(self) -> tuple:
        if self.steps:
            return tuple(dict.fromkeys(st[0] for st in self.steps))
        return tuple(e for e in (self.event, self.event2) if e is not None) \
            if self.event is not None else (None,)


class Plan:
    """A compiled set of segments: the kernel arrays plus what the engine must feed them."""

    def __init__(self):
        self.names: list[str] = []            # segments in evaluation (kernel) order
        self.asts: dict[str, R.Cond] = {}
        self.features: list[FeatureSpec] = []
        self.feature_k: list[int] = []
        self.filters: list[R.Cond] = []
        self.val_props: list[str] = []
        self.key_props: list[str] = []
        self.numeric: set[tuple[str, str]] = set()   # (event type, prop) that must be numeric
        self.trait_tests: list[R.Cond] = []
        self.score_names: list[str] = []
        self.filter_events: list[set[str]] = []   # event types each where-filter applies to
        self.key_events: dict[str, set[str]] = {}  # key prop -> event types that read it
        self.arrays: dict = {}
        self.local_events: set[str] = set()   # event types a where reads hour/weekday of

    def feature_index(self, spec: FeatureSpec) -> int | None:
        try:
            return self.features.index(spec)
        except ValueError:
            return None


class _Builder:
    def __init__(self, event_code: Callable[[str], int], value_code=None,
                 session_ms: int = SESSION_MS, predict: PredictSpec | None = None):
        self.plan = Plan()
        self.predict = predict
        self.builtin = predict.score_ids if predict is not None else {}
        self.pred_f = -1
        if predict is not None:
            # the predictive state listens to every event (the convert score's activity days)
            self.pred_f = self.feature(FeatureSpec(
                K_PRED, None, predict.purchase, val=predict.amount,
                evlist=tuple(predict.convert_events)))
            for e in (predict.purchase, *predict.convert_events):
                event_code(e)
        self.event_code = event_code
        self.value_code = value_code
        self.session_ms = session_ms
        self._filters: dict[bytes, int] = {}
        self._traits: dict[bytes, int] = {}
        self._atoms: dict[tuple, int] = {}
        self.atoms: list[list] = []   # [kind, op, f, t0, t1, t2, t3, s, k, c]
        self.terms: list[tuple] = []  # (kind, a, b, v)
        self.seg_index: dict[str, int] = {}

    # ---- interning
    def filter_id(self, where) -> tuple[int, bytes | None]:
        if where is None:
            return -1, None
        key = R.to_json(where)
        if key not in self._filters:
            self._filters[key] = len(self.plan.filters)
            self.plan.filters.append(where)
        return self._filters[key], key

    def feature(self, spec: FeatureSpec, k: int = 0) -> int:
        p = self.plan
        for e in spec.events:
            if e is not None:
                self.event_code(e)
        i = p.feature_index(spec)
        if i is None:
            i = len(p.features)
            p.features.append(spec)
            p.feature_k.append(k)
        elif k > p.feature_k[i]:
            p.feature_k[i] = k
        if spec.val is not None:
            if spec.val not in p.val_props:
                p.val_props.append(spec.val)
            p.numeric.add((spec.event2 if spec.kind == K_PRED else spec.event, spec.val))
        if spec.key is not None and spec.key not in p.key_props:
            p.key_props.append(spec.key)
        return i

    def atom(self, kind, op=0, f=-1, t0=0, t1=0, t2=0, t3=0, s=0, k=0.0, c=0, key=None) -> int:
        akey = (kind, op, f, t0, t1, t2, t3, s, k, c) if key is None else key
        if akey in self._atoms:
            return self._atoms[akey]
        self.atoms.append([kind, op, f, t0, t1, t2, t3, s, k, c])
        self._atoms[akey] = len(self.atoms) - 1
        return len(self.atoms) - 1

    # ---- conditions -> postfix program
    def cond(self, c, prog: list) -> None:
        if isinstance(c, (R.And, R.Or)):
            op = P_AND if isinstance(c, R.And) else P_OR
            for i, it in enumerate(c.items):
                self.cond(it, prog)
                if i:
                    prog.append((op, 0))
        elif isinstance(c, R.Not):
            self.cond(c.item, prog)
            prog.append((P_NOT, 0))
        elif isinstance(c, R.InSession):
            # in_session <=> last_seen > now - T: an age test on the shared last_seen
            prog.append((P_ATOM, self.time_atom(
                R.Compare(">", R.LastSeen(), R.Arith("-", R.Now(), R.Dur(self.session_ms))))))
        elif isinstance(c, R.Seq):
            steps = tuple((st.event, self.filter_id(st.where)[1], st.negated)
                          for st in c.steps)
            spec = FeatureSpec(K_SEQ, c.steps[0].event, key=c.by, window_ms=c.window_ms or 0,
                               span_ms=c.within_ms or 0, steps=steps)
            prog.append((P_ATOM, self.atom(A_SEQ, f=self.feature(spec))))
        elif isinstance(c, R.Exists) and self._builtin(c.value) is not None:
            prog.append((P_ATOM, self.pred_atom(self._builtin(c.value), "exists", 0.0)))
        elif isinstance(c, R.Exists) and R._is_mode(c.value):
            prog.append((P_ATOM, self.atom(A_MODE, OPS["exists"], f=self.mode_feature(c.value))))
        elif isinstance(c, R.Seen):
            # seen <=> first_seen exists: shares the timestamp `first_seen` rules keep anyway
            t0, t1 = self.side(R.FirstSeen())
            prog.append((P_ATOM, self.atom(A_NUM, OPS["exists"], t0=t0, t1=t1)))
        elif isinstance(c, R.InSegment):
            prog.append((P_ATOM, self.atom(A_IN, f=self.seg_index[c.name])))
        elif isinstance(c, R.Bucket):
            prog.append((P_ATOM, self.atom(A_BUCKET, t0=c.lo, t1=c.hi)))
        elif isinstance(c, R.Inactive):
            # inactive(W) <=> not (last_seen > now - W): an age test on one shared timestamp,
            # true for a user without events (the test on a missing value is false)
            prog.append((P_ATOM, self.time_atom(
                R.Compare(">", R.LastSeen(), R.Arith("-", R.Now(), R.Dur(c.window_ms))))))
            prog.append((P_NOT, 0))
        elif isinstance(c, R.Abandoned):
            if c.by is None:
                spec = FeatureSpec(K_ABANDON, c.a, c.b, window_ms=c.within_ms)
            else:
                spec = FeatureSpec(K_ABANDON_BY, c.a, c.b, key=c.by, window_ms=c.within_ms)
            prog.append((P_ATOM, self.atom(A_ABANDON, f=self.feature(spec))))
        elif any(isinstance(n, R.Trait) for n in R._walk(c, into_where=False)):
            key = R.to_json(c)
            if key not in self._traits:
                self._traits[key] = len(self.plan.trait_tests)
                self.plan.trait_tests.append(c)
            prog.append((P_ATOM, self.atom(A_TRAIT, f=self._traits[key])))
        elif isinstance(c, R.Between):
            self.cond(R.And((R.Compare("<=", c.low, c.value),
                             R.Compare("<=", c.value, c.high))), prog)
        elif isinstance(c, R.InList):
            eqs = [R.Compare("==", c.value, R.Str(x) if isinstance(x, str) else R.Num(x))
                   for x in c.items]
            anyeq = None if not eqs else (eqs[0] if len(eqs) == 1 else R.Or(tuple(eqs)))
            if not c.negated:
                if anyeq is None:
                    prog.append((P_ATOM, self.atom(A_CONST, k=0.0)))
                else:
                    self.cond(anyeq, prog)
            else:
                self.cond(R.Exists(c.value), prog)
                if anyeq is not None:
                    self.cond(R.Not(anyeq), prog)
                    prog.append((P_AND, 0))
        elif isinstance(c, R.StrTest):
            # only scores get here (traits are evaluated in Python): never strings
            prog.append((P_ATOM, self.atom(A_CONST, k=0.0)))
        elif isinstance(c, R.Exists):
            t0, t1 = self.side(c.value)
            prog.append((P_ATOM, self.atom(A_NUM, OPS["exists"], t0=t0, t1=t1)))
        elif isinstance(c, R.Compare):
            prog.append((P_ATOM, self.compare(c)))
        else:  # pragma: no cover - validate() rejects everything else
            raise RuleError(f"cannot compile `{type(c).__name__}`")

    def _builtin(self, v) -> int | None:
        return self.builtin.get(v.name) if isinstance(v, R.Score) else None

    def pred_atom(self, sid: int, op: str, k: float) -> int:
        name = next(n for n, i in self.builtin.items() if i == sid)
        if name not in self.plan.score_names:        # a caller's set_scores() overrides it
            self.plan.score_names.append(name)
        ov = self.plan.score_names.index(name)
        return self.atom(A_PRED, OPS[op], f=self.pred_f, t0=sid, t1=ov, k=float(k),
                         key=("pred", sid, op, float(k)))

    def compare(self, c: R.Compare) -> int:
        bl, br = self._builtin(c.left), self._builtin(c.right)
        if bl is not None and isinstance(c.right, R.Num):
            return self.pred_atom(bl, c.op, c.right.value)
        if br is not None and isinstance(c.left, R.Num):
            return self.pred_atom(br, MIRROR[c.op], c.left.value)
        if R._is_mode(c.left) or R._is_mode(c.right):
            mode, const = (c.left, c.right) if R._is_mode(c.left) else (c.right, c.left)
            v = const.value if isinstance(const, (R.Num, R.Str)) else const.ms
            if self.value_code is None:
                raise RuleError("mode() needs an engine to intern values")
            return self.atom(A_MODE, OPS[c.op], f=self.mode_feature(mode),
                             c=self.value_code(v if isinstance(v, str) else v))
        nodes = [n for n in R._walk(c, into_where=False)]
        if any(isinstance(n, R.Now) for n in nodes):
            return self.time_atom(c)
        if any(isinstance(n, R.Str) for n in nodes):
            return self.atom(A_CONST, k=0.0)   # a number never equals a string
        op, left, right = c.op, c.left, c.right
        if isinstance(left, (R.Num, R.Dur)) and isinstance(right, R.Agg):
            op, left, right = MIRROR[op], right, left
        if isinstance(left, R.Agg) and left.fn == "count" and isinstance(right, (R.Num, R.Dur)):
            k = right.value if isinstance(right, R.Num) else right.ms
            need = math.ceil(k) if op in (">=", "<") else math.floor(k) + 1
            need = max(1, need)
            fid, fkey = self.filter_id(left.where)
            if left.window_ms is None:
                f = self.feature(FeatureSpec(K_COUNT, left.event, where=fkey))
                return self.atom(A_COUNTK, OPS[op], f, k=float(k))
            if need <= MAX_TOPK:
                f = self.feature(FeatureSpec(K_TOPK, left.event, where=fkey,
                                             window_ms=left.window_ms), need)
                return self.atom(A_COUNTK, OPS[op], f, k=float(k))
        t0, t1 = self.side(c.left)
        t2, t3 = self.side(c.right)
        return self.atom(A_NUM, OPS[c.op], t0=t0, t1=t1, t2=t2, t3=t3)

    def side(self, v) -> tuple[int, int]:
        start = len(self.terms)
        self.value(v)
        if len(self.terms) - start > 64:
            raise RuleError("value expression is too long (at most 64 terms)")
        return start, len(self.terms)

    def value(self, v) -> None:
        if isinstance(v, R.Num):
            self.terms.append((T_CONST, 0, 0, float(v.value)))
        elif isinstance(v, R.Dur):
            self.terms.append((T_CONST, 0, 0, float(v.ms)))
        elif isinstance(v, R.Score) and v.name in self.builtin:
            raise RuleError(f"`score.{v.name}` is a built-in predictive score: it can only be "
                            "compared with a number (`score.{v.name} >= 0.7`) or tested with "
                            "`exists`, because it changes with time and segcore schedules the "
                            "instant it crosses a constant (docs/predictive.md)")
        elif isinstance(v, R.Score):
            if v.name not in self.plan.score_names:
                self.plan.score_names.append(v.name)
            self.terms.append((T_SCORE, self.plan.score_names.index(v.name), 0, 0.0))
        elif isinstance(v, R.Arith):
            self.value(v.left)
            self.value(v.right)
            self.terms.append((T_ADD if v.op == "+" else T_SUB, 0, 0, 0.0))
        elif isinstance(v, (R.FirstSeen, R.LastSeen, R.First, R.Last)):
            self.terms.append((T_FEAT, self.time_feature(v), FN["ts"], 0.0))
        elif isinstance(v, R.Agg) and v.fn == "share":
            # share = count(E where P, W) / count(E, W); missing when the latter is 0
            self.terms.append((T_FEAT, self.agg_feature(R.Agg("count", v.event, None, v.where,
                                                              v.window_ms)), FN["count"], 0.0))
            self.terms.append((T_FEAT, self.agg_feature(R.Agg("count", v.event, None, None,
                                                              v.window_ms)), FN["count"], 0.0))
            self.terms.append((T_DIV, 0, 0, 0.0))
        elif isinstance(v, R.Agg):
            self.terms.append((T_FEAT, self.agg_feature(v), FN[v.fn], 0.0))
        elif isinstance(v, R.Sessions):
            f = self.feature(FeatureSpec(K_SESS, None, window_ms=v.window_ms or 0,
                                         span_ms=self.session_ms))
            fn = FN[v.fn] + (FN_EV if v.metric == "events" else 0)
            self.terms.append((T_FEAT, f, fn, 0.0))
        elif isinstance(v, R.LastSession):
            f = self.feature(FeatureSpec(K_SESS, None, span_ms=self.session_ms))
            self.terms.append((T_FEAT, f, FN_LAST_EV if v.metric == "events" else FN_LAST_DUR,
                               0.0))
        else:  # pragma: no cover
            raise RuleError(f"cannot compile value `{type(v).__name__}`")

    def mode_feature(self, a: R.Agg) -> int:
        _, fkey = self.filter_id(a.where)
        if a.window_ms is None:
            return self.feature(FeatureSpec(K_MODE, a.event, where=fkey, key=a.prop))
        # the same state as a windowed distinct of the property
        return self.feature(FeatureSpec(K_WLIST, a.event, where=fkey, key=a.prop,
                                        window_ms=a.window_ms))

    def time_feature(self, v) -> int:
        if isinstance(v, R.FirstSeen):
            return self.feature(FeatureSpec(K_FIRST, None))
        if isinstance(v, R.LastSeen):
            return self.feature(FeatureSpec(K_LAST, None))
        kind = K_FIRST if isinstance(v, R.First) else K_LAST
        return self.feature(FeatureSpec(kind, v.event))

    def agg_feature(self, a: R.Agg) -> int:
        _, fkey = self.filter_id(a.where)
        if a.window_ms is None:
            if a.fn == "count":
                return self.feature(FeatureSpec(K_COUNT, a.event, where=fkey))
            if a.fn == "distinct":
                return self.feature(FeatureSpec(K_DISTINCT, a.event, where=fkey, key=a.prop))
            if a.fn == "sum":       # a running sum alone: 8 bytes instead of 32
                return self.feature(FeatureSpec(K_SUM, a.event, where=fkey, val=a.prop))
            return self.feature(FeatureSpec(K_STATS, a.event, where=fkey, val=a.prop))
        if a.fn == "count":
            return self.feature(FeatureSpec(K_WLIST, a.event, where=fkey,
                                            window_ms=a.window_ms))
        if a.fn == "distinct":
            return self.feature(FeatureSpec(K_WLIST, a.event, where=fkey, key=a.prop,
                                            window_ms=a.window_ms))
        return self.feature(FeatureSpec(K_WLIST, a.event, where=fkey, val=a.prop,
                                        window_ms=a.window_ms))

    def time_atom(self, c: R.Compare) -> int:
        terms: list = []
        R._linear_terms(c.left, 1, terms)
        R._linear_terms(c.right, -1, terms)
        s = 0
        const = 0
        lin: dict[int, int] = {}
        for sign, t in terms:
            if isinstance(t, R.Now):
                s += sign
            elif isinstance(t, R.Num):
                const += sign * int(t.value)
            elif isinstance(t, R.Dur):
                const += sign * t.ms
            else:
                f = self.time_feature(t)
                lin[f] = lin.get(f, 0) + sign
        t0 = len(self.terms)
        for f, coef in lin.items():
            if coef:
                self.terms.append((T_FEAT, f, coef, 0.0))
        t1 = len(self.terms)
        key = ("time", c.op, s, const, tuple(sorted(lin.items())))
        return self.atom(A_TIME, OPS[c.op], t0=t0, t1=t1, s=s, c=const, key=key)


def compile_segments(asts: dict[str, R.Cond], event_code: Callable[[str], int],
                     items: list[dict] | None = None, *, value_code=None,
                     session_ms: int = SESSION_MS, seq_cap: int = 1024,
                     predict: PredictSpec | None = None) -> Plan:
    """Compile segments (name -> AST, in definition order) into a :class:`Plan`.

    ``event_code(name)`` interns an event type and returns its code; it is called for every
    event type the rules mention, so the listener table covers them. ``items`` are the timed
    items (triggers and journeys, docs/triggers.md) in registration order: dicts with
    ``kind`` ("trigger" or "journey"), ``segment``, and ``enter`` and ``delay_ms`` (triggers) or
    ``steps`` (list of ``(delay_ms, only_if segment name or None)``) and ``exits`` (journeys).
    ``value_code(v)`` interns a property value (the constants ``mode(...)`` is compared with);
    ``session_ms`` is the session timeout and ``seq_cap`` the most events a ``seq`` keeps per
    user (docs/patterns.md). ``predict`` enables the built-in predictive scores
    (docs/predictive.md): the plan then keeps their per-user state as feature 0.
    """
    deps = {name: R.references(ast) for name, ast in asts.items()}
    for name, refs in deps.items():
        for r in refs:
            if r not in asts:
                raise RuleError(f"unknown segment `{r}`{R._suggest(r, asts)}", segment=name)
    order = R.topo_order(deps)
    b = _Builder(event_code, value_code, session_ms, predict)
    b.seg_index = {name: i for i, name in enumerate(order)}
    progs = []
    for name in order:
        prog: list = []
        b.cond(asts[name], prog)
        progs.append(prog)
    p = b.plan
    p.names = order
    p.asts = dict(asts)
    _layout(p, b, progs, event_code)
    p.arrays["seq_cap"] = seq_cap
    p.arrays["pred_f"] = b.pred_f
    p.arrays["pr_buy"] = event_code(predict.purchase) if predict is not None else -1
    p.arrays["pr_conv"] = np.array([event_code(e) for e in predict.convert_events]
                                   if predict is not None else [], dtype=np.int32)
    p.local_events = set().union(*(evs for w, evs in zip(p.filters, p.filter_events)
                                   if any(isinstance(n, R.Local) for n in R._walk(w))))
    p.arrays.update(_item_arrays(items or [], b.seg_index))
    return p


def _item_arrays(items: list[dict], seg: dict[str, int]) -> dict:
    out: dict = {k: [] for k in ("it_kind", "it_seg", "it_enter", "it_delay", "it_sstart",
                                 "it_send", "it_xstart", "it_xend", "st_delay", "st_onlyif",
                                 "ex_seg")}
    for it in items:
        journey = it["kind"] == "journey"
        out["it_kind"].append(1 if journey else 0)
        out["it_seg"].append(seg[it["segment"]])
        out["it_enter"].append(1 if journey or it["enter"] else 0)
        out["it_delay"].append(0 if journey else it["delay_ms"])
        out["it_sstart"].append(len(out["st_delay"]))
        out["it_xstart"].append(len(out["ex_seg"]))
        if journey:
            for delay, only_if in it["steps"]:
                out["st_delay"].append(delay)
                out["st_onlyif"].append(-1 if only_if is None else seg[only_if])
            out["ex_seg"].extend(seg[x] for x in it["exits"])
        out["it_send"].append(len(out["st_delay"]))
        out["it_xend"].append(len(out["ex_seg"]))
    return out


def _layout(p: Plan, b: _Builder, progs: list, event_code) -> None:
    n_feat = len(p.features)
    ioff, foff = 0, 0
    f_ioff, f_foff, f_var = [], [], []
    irow, frow = [], []
    n_var = 0
    for spec, k in zip(p.features, p.feature_k):
        f_ioff.append(ioff)
        f_foff.append(foff)
        if spec.kind == K_TOPK:
            irow += [np.iinfo(np.int64).min] * k
            ioff += k
        elif spec.kind in (K_COUNT, K_STATS):
            irow.append(0)
            ioff += 1
        elif spec.kind == K_FIRST:
            irow.append(np.iinfo(np.int64).max)
            ioff += 1
        elif spec.kind == K_LAST:
            irow.append(np.iinfo(np.int64).min)
            ioff += 1
        elif spec.kind == K_ABANDON:
            irow += [np.iinfo(np.int64).min] * 2
            ioff += 2
        elif spec.kind == K_PRED:
            # first purchase ts, last purchase ts, newest day of the ring, the ring
            nring = RING_DAYS * ((len(spec.evlist) + 4) // 4)
            irow += [np.iinfo(np.int64).max, np.iinfo(np.int64).min,
                     np.iinfo(np.int64).min] + [0] * nring
            ioff += 3 + nring
            # purchases, amount of the first, sum of amounts, purchases with an amount
            frow += [0.0, float("nan"), 0.0, 0.0]
            foff += 4
        if spec.kind == K_STATS:
            frow += [0.0, 0.0, 0.0]
            foff += 3
        elif spec.kind == K_SUM:
            frow.append(0.0)
            foff += 1
        if spec.kind in VAR_KINDS:
            f_var.append(n_var)
            n_var += 1
        else:
            f_var.append(-1)
    codes = {}
    for i, spec in enumerate(p.features):
        for e in spec.events:
            c = ANY if e is None else event_code(e)
            codes.setdefault(c, [])
            if i not in codes[c]:
                codes[c].append(i)
    n_codes = max([c for c in codes if c >= 0], default=-1) + 1
    lst_start, lst_feat = [0], []
    for c in range(n_codes):
        lst_feat += codes.get(c, [])
        lst_start.append(len(lst_feat))
    atoms = b.atoms or [[A_CONST, 0, -1, 0, 0, 0, 0, 0, 0.0, 0]]
    for slot, i in enumerate(i for i, a in enumerate(atoms) if a[0] == A_PRED):
        atoms[i][7] = slot          # the atom's column in the kernel's crossing-time cache
    p_start, p_op, p_arg = [0], [], []
    for prog in progs:
        for op, arg in prog:
            p_op.append(op)
            p_arg.append(arg)
        p_start.append(len(p_op))
    filt = {R.to_json(w): i for i, w in enumerate(p.filters)}
    p.filter_events = [set() for _ in p.filters]
    for spec in p.features:
        if spec.where is not None:
            p.filter_events[filt[spec.where]].add(spec.event)
        for ev, where, _ in spec.steps:
            if where is not None:
                p.filter_events[filt[where]].add(ev)
        if spec.key is not None:
            p.key_events.setdefault(spec.key, set()).update(spec.events)
    es_start, es_list, time_segs = _segment_index(p, b, progs, codes, n_codes)
    terms = b.terms
    p.arrays = dict(
        f_kind=[s.kind for s in p.features],
        f_event=[ANY if s.event is None else event_code(s.event) for s in p.features],
        f_event2=[ANY if s.event2 is None else event_code(s.event2) for s in p.features],
        f_filter=[-1 if s.where is None else filt[s.where] for s in p.features],
        f_val=[-1 if s.val is None else p.val_props.index(s.val) for s in p.features],
        f_key=[-1 if s.key is None else p.key_props.index(s.key) for s in p.features],
        f_k=p.feature_k,
        f_ioff=f_ioff, f_foff=f_foff, f_var=f_var,
        f_window=[s.window_ms for s in p.features],
        f_span=np.array([s.span_ms for s in p.features], dtype=np.int64),
        sq_start=np.cumsum([0] + [len(s.steps) for s in p.features]).astype(np.int32),
        sq_event=[event_code(st[0]) for s in p.features for st in s.steps],
        sq_filter=[-1 if st[1] is None else filt[st[1]] for s in p.features
                   for st in s.steps],
        sq_neg=[int(st[2]) for s in p.features for st in s.steps],
        lst_start=lst_start, lst_feat=lst_feat, any_feat=codes.get(ANY, []),
        time_feats=[i for i, s in enumerate(p.features) if s.kind in TIME_KINDS],
        a_kind=[a[0] for a in atoms], a_op=[a[1] for a in atoms], a_f=[a[2] for a in atoms],
        a_t0=[a[3] for a in atoms], a_t1=[a[4] for a in atoms], a_t2=[a[5] for a in atoms],
        a_t3=[a[6] for a in atoms], a_s=[a[7] for a in atoms], a_k=[a[8] for a in atoms],
        a_c=[a[9] for a in atoms],
        time_atoms=[i for i, a in enumerate(atoms) if a[0] == A_TIME],
        pred_atoms=[i for i, a in enumerate(atoms) if a[0] == A_PRED],
        t_kind=[t[0] for t in terms], t_a=[t[1] for t in terms], t_b=[t[2] for t in terms],
        t_v=[t[3] for t in terms],
        p_start=p_start, p_op=p_op, p_arg=p_arg,
        es_start=es_start, es_list=es_list, time_segs=time_segs,
        istride=ioff, fstride=foff, n_var=n_var, n_trait=len(p.trait_tests),
        n_score=len(p.score_names), n_filter=len(p.filters), n_val=len(p.val_props),
        n_key=len(p.key_props),
        irow_init=np.array(irow, dtype=np.int64), frow_init=np.array(frow, dtype=np.float64),
    )
    assert n_feat == len(p.arrays["f_kind"])


def _segment_index(p: Plan, b: _Builder, progs: list, codes: dict, n_codes: int):
    """Which segments to re-evaluate: per event code (row ``n_codes`` serves codes no rule
    names), and on a timer. A segment is affected when one of its atoms reads a feature the
    event updates (or a time-dependent input, for timers), and so is every segment that
    references an affected one with ``in()``."""
    n_seg = len(progs)
    feats: list[set] = []
    timed: list[bool] = []
    refs: list[set] = []
    for prog in progs:
        fs, tm, rs = set(), False, set()
        for op, arg in prog:
            if op != P_ATOM:
                continue
            kind, _, f, t0, t1, t2, t3 = b.atoms[arg][:7]
            if kind in (A_COUNTK, A_ABANDON, A_MODE, A_SEQ):
                fs.add(f)
            elif kind == A_PRED:
                fs.add(f)
                tm = True
            elif kind == A_IN:
                rs.add(f)
            elif kind in (A_NUM, A_TIME):
                for lo, hi in ((t0, t1), (t2, t3)):
                    for ti in range(lo, hi):
                        if b.terms[ti][0] == T_FEAT:
                            fs.add(b.terms[ti][1])
                tm = tm or kind == A_TIME
        tm = tm or any(p.features[f].kind in TIME_KINDS for f in fs)
        feats.append(fs)
        timed.append(tm)
        refs.append(rs)

    def closure(direct: set) -> list[int]:
        out = set(direct)
        for s in range(n_seg):          # topological order: references come first
            if refs[s] & out:
                out.add(s)
        return sorted(out)

    any_feats = set(codes.get(ANY, []))
    es_start, es_list = [0], []
    for c in range(n_codes + 1):
        listen = any_feats | set(codes.get(c, [])) if c < n_codes else any_feats
        es_list += closure({s for s in range(n_seg) if feats[s] & listen})
        es_start.append(len(es_list))
    time_segs = closure({s for s in range(n_seg) if timed[s]})
    return es_start, es_list, time_segs


def feature_map(new: Plan, old: Plan | None) -> np.ndarray:
    """For each feature of ``new``, the index of the same feature in ``old`` (or -1)."""
    out = np.full(len(new.features), -1, dtype=np.int32)
    if old is None:
        return out
    for i, (spec, k) in enumerate(zip(new.features, new.feature_k)):
        j = old.feature_index(spec)
        if j is not None and (spec.kind != K_TOPK or old.feature_k[j] >= k):
            out[i] = j
    return out
