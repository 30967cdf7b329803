"""The reference engine's built-in predictive scores (docs/predictive.md), computed naively
from every kept event at the instant asked: no per-user statistics, no ring, no cache."""

from __future__ import annotations

import math

from segcore import rules as R
from segcore.errors import RuleError

from ._eval import MISSING, is_num

DAY = 86_400_000
#: how far ahead a crossing is looked for (the kernel re-checks past it)
REACH = 1 << 46


def builtin_message(name: str) -> str:
    return (f"`score.{name}` is a built-in predictive score: it can only be compared with a "
            f"number (`score.{name} >= 0.7`) or tested with `exists`, because it changes with "
            "time and segcore schedules the instant it crosses a constant "
            "(docs/predictive.md)")


def check_rule(ast, names) -> None:
    """RuleError unless every built-in score is compared with a number or tested."""
    def bad(v):
        return isinstance(v, R.Score) and v.name in names

    def visit(node, ok_here=False):
        if bad(node) and not ok_here:
            raise RuleError(builtin_message(node.name))
        if isinstance(node, R.Compare):
            for v, other in ((node.left, node.right), (node.right, node.left)):
                visit(v, ok_here=bad(v) and isinstance(other, R.Num))
            return
        if isinstance(node, (R.Exists, R.InList, R.StrTest)):
            if isinstance(node, R.StrTest) or bad(node.value):
                return
            visit(node.value)
            return
        if isinstance(node, R.Between):
            # desugared to two comparisons with the bounds
            visit(R.Compare("<=", node.low, node.value))
            visit(R.Compare("<=", node.value, node.high))
            return
        for child in _children(node):
            visit(child)

    visit(ast)


def _children(node):
    for f in getattr(node, "__struct_fields__", ()):
        v = getattr(node, f)
        if isinstance(v, tuple):
            yield from (x for x in v if hasattr(x, "__struct_fields__"))
        elif hasattr(v, "__struct_fields__"):
            yield v


def _buys(spec, user):
    return user.by_type.get(spec.purchase, [])


class Purchases:
    """What the BG/NBD and Gamma-Gamma models read of a buyer at ``now``: ``x``, ``t_x``,
    ``T`` (days), the first purchase's ts, and the repeat purchases with an amount (``xm``) and
    the sum of their amounts (``repeat_spend``: all amounts, summed in arrival order like the
    kernel, minus the first purchase's)."""

    def __init__(self, spec, buys, now):
        first = min(buys, key=lambda e: e.order())
        last = max(e.ts for e in buys)
        self.first = first.ts
        self.x = len(buys) - 1
        self.t_x = (last - first.ts) / DAY
        self.T = (max(now, last) - first.ts) / DAY
        amounts = [e.props[spec.amount] for e in buys if is_num(e.props.get(spec.amount))]
        total = 0.0
        for v in amounts:
            total += float(v)
        fa = first.props.get(spec.amount)
        self.xm = len(amounts) - (1 if is_num(fa) else 0)
        self.repeat_spend = total - (float(fa) if is_num(fa) else 0.0)


def purchases(spec, user, now) -> Purchases | None:
    buys = _buys(spec, user)
    return Purchases(spec, buys, now) if buys else None


def _expected(b, t, x, tx, T):
    """BG/NBD conditional expectation, eq. 10 of Fader, Hardie & Lee (2005), with the
    2F1 term rewritten by Pfaff's transformations (see segcore.predict)."""
    r, al, a, bb = b.r, b.alpha, b.a, b.b
    c = a + bb + x - 1.0
    A = a + bb - 1.0 - r
    a1 = a - 1.0
    z = t / (al + T + t)
    L = math.log1p(t / (al + T))
    if c == 0:
        return MISSING
    term = A * z / c
    total = 0.0
    k = 1
    while k < 100_000:
        total += term
        if term == 0 or abs(term) <= 1e-17 * abs(total):
            break
        if c + k == 0:
            return MISSING
        term *= (A + k) * (a + k - 1.0) * z / ((c + k) * (k + 1.0))
        k += 1
    head = L if abs(a1) < 1e-12 else -math.expm1(-a1 * L) / a1
    E = c * (head - math.exp(-a1 * L) * total)
    if x > 0:
        E /= 1.0 + (a / (bb + x - 1.0)) * math.exp((r + x) * math.log((al + T) / (al + tx)))
    return E


def value(spec, model, user, name: str, now: int):
    """The model's value of built-in score ``name`` for ``user`` at ``now`` (or MISSING)."""
    h = spec.horizon_text
    if name == "convert":
        return _convert(spec, model, user, now)
    p = purchases(spec, user, now)
    b = model.bgnbd
    if p is None or b is None:
        return MISSING
    x, tx, T = p.x, p.t_x, p.T
    if name in ("p_alive", "churn"):
        if x == 0:
            pa = 1.0
        else:
            pa = 1.0 / (1.0 + (b.a / (b.b + x - 1.0)) *
                        math.exp((b.r + x) * math.log((b.alpha + T) / (b.alpha + tx))))
        return pa if name == "p_alive" else 1.0 - pa
    E = _expected(b, spec.horizon_ms / DAY, x, tx, T)
    if E is MISSING or name == f"expected_purchases_{h}":
        return E
    g = model.gamma_gamma
    if g is None:
        return MISSING
    if p.xm >= 1:
        return E * (g.p * (g.v + p.repeat_spend) / (g.p * p.xm + g.q - 1.0))
    return E * (g.p * g.v / (g.q - 1.0))


def convert_features(spec, user, day: int):
    """(features, True) of score.convert on UTC day ``day``, or (None, False) when the user
    had no event in days day-6 .. day."""
    per_day: dict[int, list[int]] = {}
    for e in user.events:
        d = e.ts // DAY
        if day - 6 <= d <= day:
            row = per_day.setdefault(d, [0] * len(spec.convert_events))
            if e.type in spec.convert_events:
                row[spec.convert_events.index(e.type)] += 1
    if not per_day:
        return None, False
    counts = [sum(row[j] for row in per_day.values()) for j in range(len(spec.convert_events))]
    feats = [math.log1p(c) for c in counts]
    feats.append(len(per_day) / 7.0)
    feats.append((day - max(per_day)) / 7.0)
    return feats, True


def _convert(spec, model, user, now):
    lr = model.convert
    if lr is None or _buys(spec, user):
        return MISSING
    feats, ok = convert_features(spec, user, now // DAY)
    if not ok:
        return MISSING
    z = lr.coef[0] + sum(c * f for c, f in zip(lr.coef[1:], feats))
    return 1.0 / (1.0 + math.exp(-z))


def _sign(v, k):
    if v is MISSING or (isinstance(v, float) and math.isnan(v)):
        return 2
    return (v > k) - (v < k)


def crossings(spec, model, user, name: str, k: float) -> list[int]:
    """The instants at which ``score.name`` vs ``k`` can change for ``user`` with no new
    event: for convert, the UTC midnights after each event's day for 7 days; for the BG/NBD
    scores, where sign(value - k) changes (monotone in time: at most twice)."""
    if name == "convert":
        days = {e.ts // DAY for e in user.events}
        return sorted({(d + i) * DAY for d in days for i in range(1, 8)})
    buys = _buys(spec, user)
    if not buys or model.bgnbd is None:
        return []
    out = []
    t = max(e.ts for e in buys)         # the value is constant before the last purchase
    for _ in range(2):
        s0 = _sign(value(spec, model, user, name, t), k)
        if s0 == 2:
            break
        step = 1
        while _sign(value(spec, model, user, name, t + step), k) == s0:
            if step >= REACH:
                return out
            step *= 2
        lo, hi = t + step // 2 if step > 1 else t, t + step
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _sign(value(spec, model, user, name, mid), k) == s0:
                lo = mid
            else:
                hi = mid
        out.append(hi)
        t = hi
    return out
