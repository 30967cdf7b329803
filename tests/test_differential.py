"""Randomised differential tests: the compiled engine against the reference engine.

Hypothesis drives both engines through the same random sequence of calls (single events, batches,
late events, advances, traits, scores) with tiny windows, so that timestamps land exactly on
window edges, one millisecond either side, on equal timestamps, and on exits with no new event.
After every call the transitions returned and every segment's members must be identical.
"""

import io
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcore
import segcore_ref

RULES = {
    "c3": "count(buy, 50ms) >= 3",
    "c_eq": "count(view, 30ms) == 2",
    "c_lt": 'count(view where cat == "a", 40ms) < 2 and seen',
    "sum_all": "sum(buy.amount) >= 10",
    "sum_w": "sum(buy.amount, 60ms) > 5",
    "avg_w": "avg(buy.amount, 25ms) >= 2.5",
    "min_max": "min(buy.amount, 80ms) < 2 or max(buy.amount) > 8",
    "dist": "distinct(view.cat, 45ms) >= 2",
    "dist_all": "distinct(view.cat) >= 3",
    "did": "did(ticket, 20ms)",
    "inactive": "seen and inactive(35ms)",
    "inactive2": "inactive(15ms)",
    "ab": "abandoned(cart, buy, 30ms)",
    "ab_by": "abandoned(cart, buy, 20ms) by cid",
    "new": "first_seen >= now - 40ms",
    "age": "now - last(buy) > 25ms",
    "age2": "last(view) + 10ms <= now",
    "trait": 'trait.country == "SE" and in(c3)',
    "trait2": 'trait.age between 18 and 30 or trait.country in ["NO", "DK"]',
    "score": "score.churn >= 0.5 and not in(inactive)",
    "score2": "score.churn + count(buy) > 2",
    "bucket": "bucket(0, 4999)",
    "gen": "count(view, 30ms) + count(buy, 30ms) >= 3",
    "cnt_all": "count(view) >= 2 and count(buy) == 0",
    "neg": "not (count(view, 30ms) >= 1) and seen",
    "first_e": "first(buy) < first(view)",
    "where_num": "count(buy where amount > 3, 50ms) >= 1",
    "where_str": 'count(view where cat startswith "b" or cat matches "^c", 30ms) >= 1',
    "where_missing": "count(view where not cat exists, 30ms) >= 1",
    "chain": "in(c3) or in(ab)",
    "chain2": "not in(chain) and in(new)",
}
DEPS = {"trait": ["c3"], "score": ["inactive"], "chain": ["c3", "ab"],
        "chain2": ["chain", "new", "c3", "ab"]}

USERS = [0, 1, 2, 7, "ann", "bob"]
# Skewed choices so that a few users get many events: thresholds are reached and windows fill.
HOT_USERS = [0, 0, 0, 0, "ann", "ann", 1] + USERS
EVENTS = ["buy", "buy", "buy", "view", "view", "view", "cart", "ticket", "other"]
PROPS = {
    # plain values, and the kinds the single-event fast path hands to the general one: bools,
    # numpy scalars, NaN, a number where a string is tested and the other way round
    "buy": {"amount": [0.5, 1, 2.5, 3, 4.25, 9, None, True, np.float64(3.5), np.int64(4),
                       float("nan")],
            "cid": ["x", "y", None, np.str_("x"), 3]},
    "view": {"cat": ["a", "b", "c", "d", None, np.str_("b"), 7, 2.5, False]},
    "cart": {"cid": ["x", "y", None]},
}


#: ms from now: mostly forward, often late
DT = st.one_of(st.integers(0, 12), st.integers(-45, 45))


@st.composite
def events(draw, names=EVENTS, prop_choices=PROPS, users=HOT_USERS, dt=DT):
    """``(user, event, ms from now, props)``; a None choice is either left out or given."""
    ev = draw(st.sampled_from(names))
    props = {}
    for name, choices in prop_choices.get(ev, {}).items():
        v = draw(st.sampled_from(choices))
        if v is not None or draw(st.booleans()):
            props[name] = v
    return draw(st.sampled_from(users)), ev, draw(dt), props


ops = st.one_of(
    st.tuples(st.just("track"), events()),
    st.tuples(st.just("batch"), st.lists(events(), min_size=1, max_size=12)),
    st.tuples(st.just("advance"), st.integers(0, 70)),
    st.tuples(st.just("traits"), st.sampled_from(HOT_USERS),
              st.fixed_dictionaries({}, optional={
                  "country": st.sampled_from(["SE", "NO", "DK", "US", None]),
                  "age": st.sampled_from([17, 18, 25, 30, 31, None])})),
    st.tuples(st.just("scores"), st.sampled_from(HOT_USERS),
              st.fixed_dictionaries({"churn": st.sampled_from([0.1, 0.5, 0.9, 2.5, None])})),
    st.tuples(st.just("alias"), st.sampled_from(HOT_USERS), st.sampled_from(USERS + ["cy"])),
    st.tuples(st.just("forget"), st.sampled_from(USERS)),
)


def _rules(names):
    need = set(names)
    for n in names:
        need.update(DEPS.get(n, []))
    return {n: RULES[n] for n in RULES if n in need}


def _check_same(a, b, ta, tb, what):
    assert list(ta) == list(tb), f"transitions differ after {what}"
    for name in a.segments:
        assert a.members(name) == b.members(name), f"members of {name} differ after {what}"
    assert a.now == b.now


def _run(engines, op, state):
    kind = op[0]
    outs = []
    for eng in engines:
        if kind == "track":
            user, ev, dt, props = op[1]
            outs.append(eng.track(user, ev, ts=max(0, state["now"] + dt), props=props))
        elif kind == "batch":
            rows = op[1]
            now = state["now"]
            ts = np.array([max(0, now + dt) for _, _, dt, _ in rows], dtype=np.int64)
            users = np.empty(len(rows), dtype=object)
            users[:] = [r[0] for r in rows]
            names = sorted({k for r in rows for k in r[3]})
            props = {}
            for k in names:
                col = np.empty(len(rows), dtype=object)
                col[:] = [r[3].get(k) for r in rows]
                props[k] = col
            outs.append(eng.track_many(user=users, event=np.array([r[1] for r in rows]),
                                       ts=ts, props=props))
        elif kind == "advance":
            outs.append(eng.advance(state["now"] + op[1]))
        elif kind == "traits":
            outs.append(eng.set_traits(op[1], op[2]))
        elif kind == "alias":
            if op[1] == op[2]:
                outs.append([])
                continue
            outs.append(eng.alias(op[1], op[2]))
        elif kind == "forget":
            eng.forget(op[1])
            outs.append([])
        else:
            outs.append(eng.set_scores(op[1], op[2]))
    return outs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(RULES)), min_size=1, max_size=8, unique=True),
       st.lists(ops, min_size=1, max_size=40), st.integers(0, 3))
def test_kernel_matches_reference(names, script, seed):
    rules = _rules(names)
    a = segcore.Engine(seed=seed)
    b = segcore_ref.RefEngine(seed=seed)
    ta, tb = a.add_segments(rules), b.add_segments(rules)
    _check_same(a, b, ta, tb, "add_segments")
    state = {"now": 100}
    a.advance(100), b.advance(100)
    for i, op in enumerate(script):
        ta, tb = _run((a, b), op, state)
        _check_same(a, b, ta, tb, f"step {i}: {op}")
        state["now"] = a.now
    # finally let time run out: every window expires, every timer fires
    ta, tb = a.advance(a.now + 10_000), b.advance(b.now + 10_000)
    _check_same(a, b, ta, tb, "final advance")


@settings(max_examples=60, deadline=None)
@given(st.lists(events(), min_size=1, max_size=40), st.integers(0, 1))
def test_batch_equals_one_by_one(rows, seed):
    """track_many(batch) is exactly tracking its rows one by one, in order."""
    rules = _rules(sorted(RULES))
    one = segcore.Engine(seed=seed)
    many = segcore.Engine(seed=seed)
    one.add_segments(rules)
    many.add_segments(rules)
    now = 100
    singles = []
    tss = []
    for user, ev, dt, props in rows:
        now = max(now, 100 + dt * 3)
        tss.append(max(0, 100 + dt * 3))
        singles.extend(one.track(user, ev, ts=tss[-1], props=props))
    users = np.empty(len(rows), dtype=object)
    users[:] = [r[0] for r in rows]
    props = {}
    for k in sorted({k for r in rows for k in r[3]}):
        col = np.empty(len(rows), dtype=object)
        col[:] = [r[3].get(k) for r in rows]
        props[k] = col
    batch = many.track_many(user=users, event=[r[1] for r in rows],
                            ts=np.array(tss, dtype=np.int64), props=props)
    assert list(batch) == singles
    for name in rules:
        assert one.members(name) == many.members(name)


def _bulk_stream(rng, n_events):
    """A denser stream than the op-by-op strategy: 12 users, all event types, ~10 % late."""
    users = np.array([0, 1, 2, 3, 4, 5, 6, 7, "ann", "bob", "cy", "di"], dtype=object)
    ev_names = np.array(["buy", "view", "cart", "ticket", "other"])
    u = users[rng.integers(0, len(users), n_events)]
    e = ev_names[rng.choice(5, n_events, p=[0.3, 0.35, 0.15, 0.1, 0.1])]
    steps = rng.integers(0, 6, n_events)
    ts = 100 + np.cumsum(steps)
    late = rng.random(n_events) < 0.1
    ts = np.where(late, np.maximum(0, ts - rng.integers(1, 60, n_events)), ts).astype(np.int64)
    amount = np.empty(n_events, dtype=object)
    amount[:] = rng.choice([0.5, 1.0, 2.5, 3.0, 4.25, 9.0, None], n_events).tolist()
    cat = np.empty(n_events, dtype=object)
    cat[:] = rng.choice(["a", "b", "c", "d", None], n_events).tolist()
    cid = np.empty(n_events, dtype=object)
    cid[:] = rng.choice(["x", "y", "z", None], n_events).tolist()
    return u, e, ts, {"amount": amount, "cat": cat, "cid": cid}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_bulk_stream_matches_reference(seed):
    rng = np.random.default_rng(seed)
    a = segcore.Engine(seed=seed % 5)
    b = segcore_ref.RefEngine(seed=seed % 5)
    _check_same(a, b, a.add_segments(RULES), b.add_segments(RULES), "add_segments")
    for user, country in [(0, "SE"), (1, "SE"), ("ann", "NO"), (3, "US")]:
        _check_same(a, b, a.set_traits(user, {"country": country, "age": 20}),
                    b.set_traits(user, {"country": country, "age": 20}), "traits")
    u, e, ts, props = _bulk_stream(rng, 600)
    i = 0
    while i < len(u):
        k = int(rng.integers(1, 80))
        sl = slice(i, i + k)
        ta = a.track_many(user=u[sl], event=e[sl], ts=ts[sl],
                          props={p: c[sl] for p, c in props.items()})
        tb = b.track_many(user=u[sl], event=e[sl], ts=ts[sl],
                          props={p: c[sl] for p, c in props.items()})
        _check_same(a, b, ta, tb, f"batch at row {i}")
        if rng.random() < 0.3:
            t = a.now + int(rng.integers(0, 50))
            _check_same(a, b, a.advance(t), b.advance(t), f"advance to {t}")
        if rng.random() < 0.2:
            user = u[int(rng.integers(0, len(u)))]
            sc = {"churn": float(rng.choice([0.1, 0.6, 3.0]))}
            _check_same(a, b, a.set_scores(user, sc), b.set_scores(user, sc), "scores")
        i += k
    _check_same(a, b, a.advance(a.now + 1_000), b.advance(b.now + 1_000), "final advance")


WHERES = [
    'a == "s"', 'a != "s"', '"s" == a', "a == 2", "a != 2", "a < 2.5", "a >= 1", "2 < a",
    'a == "s" and b > 2', 'a != "s" or not b exists', 'not (a <= 1 or b == "t")',
    'a in ["s", 3]', "a between 1 and 2", 'a startswith "s"', 'a matches "^t"', "a == 1s",
]
VALUES = st.sampled_from(["s", "t", "", 0, 1, 2, 3, 2.5, -1.0, float("nan"), True, False, None,
                          np.int64(2), np.float64(2.5), np.str_("s"), np.bool_(True), 1000])


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(WHERES), st.fixed_dictionaries({}, optional={"a": VALUES, "b": VALUES}))
def test_compiled_where_clauses_decide_like_the_tree_walk(text, props):
    from segcore.engine import compile_cond_scalar, eval_cond_scalar
    from segcore.rules import parse
    where = parse(f"count(x where {text}) >= 1").left.where
    assert compile_cond_scalar(where)(props.get) == eval_cond_scalar(where, props.get)


PLAIN = ["s", "t", "", 0, 1, 2, 3, 2.5, -1.0, -0.0, float("nan"), float("inf"), -float("inf"),
         None, 1000, 2 ** 53, 2 ** 53 + 1, -(2 ** 53) - 1, 2 ** 70, True, 1e300, "2.5"]
FAST_WHERES = WHERES + ["a > 9007199254740992", "a == 9007199254740993", "a <= 1e300",
                        "a < -9007199254740993", "a != 0", "a >= -0.5", "a > 2.5",
                        "a <= 2.5", "a == 2.5", "a != 2.5", "a < 1" + "0" * 400,
                        "a != -1" + "0" * 400, "a > 1e308"]


def test_single_events_decide_where_clauses_like_the_reference():
    """``Engine.track``'s compiled path decides the common leaves (a property against a
    string, or a number exact as a double) in C and hands every other value to the compiled
    closure: every clause against every value (one user per value, one event each) gives the
    reference engine's memberships."""
    for text in FAST_WHERES:
        a, b = segcore.Engine(), segcore_ref.RefEngine()
        rules = {"w": f"count(x where {text}) >= 1"}
        _check_same(a, b, a.add_segments(rules), b.add_segments(rules), "add_segments")
        user = 0
        for va in PLAIN + ["-"]:
            for vb in ("-", "t", 3):
                props = {k: v for k, v in (("a", va), ("b", vb)) if v != "-"}
                _check_same(a, b, a.track(user, "x", ts=user, props=props),
                            b.track(user, "x", ts=user, props=props), f"{text}: {props}")
                user += 1
        assert a.size("w") == b.size("w") and 0 < a.size("w") < user, text


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(FAST_WHERES),
       st.lists(st.fixed_dictionaries({}, optional={"a": st.sampled_from(PLAIN),
                                                    "b": st.sampled_from(PLAIN)}),
                min_size=1, max_size=6))
def test_single_event_sequences_match_the_reference(text, rows):
    """The same, one user, a windowed count too, events in sequence."""
    a, b = segcore.Engine(), segcore_ref.RefEngine()
    rules = {"w": f"count(x where {text}) >= 1", "w2": f"count(x where {text}, 3ms) >= 2"}
    _check_same(a, b, a.add_segments(rules), b.add_segments(rules), "add_segments")
    for i, props in enumerate(rows):
        _check_same(a, b, a.track(1, "x", ts=i, props=props), b.track(1, "x", ts=i, props=props),
                    f"event {i} {props}")
    assert a.stats()["events"] == b.stats()["events"] == len(rows)


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from(
    [2**53 + 1, 2**63, -2**70, 1e300, 2.5, 0.5, "a", "b", "cat", "", [1], {"x": 1}]))
JSON_ROWS = st.fixed_dictionaries(
    # (bad users and times one draw in ten or so, so that most bodies are accepted)
    {"user": st.sampled_from([0, 1, 7, "ann", "bob"] * 4 + [-1, 2**32, 2**70, True, 1.5]),
     "event": st.sampled_from(["buy", "view", "cart", "ticket"]),
     "ts": st.one_of(*[st.integers(0, 120)] * 3, st.sampled_from(
         [-1, 2**48, 2**70, True, 2.5, "1970-01-01T00:00:00.050Z", "soon"]))},
    optional={"props": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["amount", "cat", "cid", "other"]), JSON_VALUES, max_size=4)),
              "id": st.one_of(st.none(), st.sampled_from(["m1", "m2", 3]))})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(JSON_ROWS, max_size=12), min_size=1, max_size=4))
def test_json_bodies_match_the_reference(bodies):
    """``track_json`` on random bodies (good and bad users, times, property values, ids):
    the same transitions, or an error from both naming one of the body's rows (with several
    bad values, which one an engine names first may differ), then the same members."""
    import json
    names = ["c3", "sum_all", "where_str", "ab_by", "new", "dist"]
    engines = []
    for cls in (segcore.Engine, segcore_ref.RefEngine):
        eng = cls()
        eng.add_segments({n: RULES[n] for n in names})
        engines.append(eng)
    for rows in bodies:
        body = json.dumps(rows).encode()
        outs = []
        for eng in engines:
            try:
                outs.append([(t.user, t.segment, t.entered, t.ts) for t in eng.track_json(body)])
            except segcore.EventError as e:
                assert e.index is None or 0 <= e.index < len(rows), body
                outs.append("error")
        assert outs[0] == outs[1], body
        for n in names:
            assert list(engines[0].members(n)) == list(engines[1].members(n)), n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(RULES)), min_size=1, max_size=8, unique=True),
       st.lists(ops, min_size=1, max_size=40), st.integers(0, 3), st.integers(0, 40),
       st.sampled_from(sorted(RULES)))
def test_packed_rows_match_int64_rows(names, script, seed, at, extra):
    """The same script on an engine with packed counter rows (``compact_rows=True``) and on
    one with int64 rows: the same transitions, members and exported counters after every
    step, through a plan change (a segment added at step ``at``) and a snapshot round trip
    (which keeps the rows packed)."""
    rules = _rules(names)
    a = segcore.Engine(seed=seed, compact_rows=True)
    b = segcore.Engine(seed=seed)
    tb = b.add_segments(rules)
    ta = a.add_segments(rules)
    _check_same(a, b, ta, tb, "add_segments")
    assert a._kernel.packed == (a._kernel.istride > 0) and not b._kernel.packed
    state = {"now": 100}
    a.advance(100)
    b.advance(100)
    for i, op in enumerate(script):
        if i == at and extra not in a.segments:
            more = {n: r for n, r in _rules([extra]).items() if n not in a.segments}
            try:                            # (refused when it needs history not kept)
                ta = a.add_segments(more)
            except segcore.RuleError as e:
                with pytest.raises(segcore.RuleError, match=re.escape(str(e))):
                    b.add_segments(more)
            else:
                tb = b.add_segments(more)
                _check_same(a, b, ta, tb, f"adding {more}")
            buf = io.BytesIO()
            a.snapshot(buf)
            buf.seek(0)
            a = segcore.Engine.restore(buf)
        (ta,) = _run((a,), op, state)
        (tb,) = _run((b,), op, state)
        _check_same(a, b, ta, tb, f"step {i}: {op}")
        assert a._kernel.packed == (a._kernel.istride > 0) and not b._kernel.packed
        ka, kb = a._kernel.export_state(), b._kernel.export_state()
        assert np.array_equal(ka["istate"], kb["istate"]), f"counters differ after step {i}"
        state["now"] = a.now
    ta, tb = a.advance(a.now + 10_000), b.advance(b.now + 10_000)
    _check_same(a, b, ta, tb, "final advance")
