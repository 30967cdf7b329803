"""Randomised differential tests of the behaviour patterns (docs/patterns.md): the compiled
engine against the reference engine on random streams of sequences, sessions, hours and
weekdays in several timezones across DST changes, shares and modes.

Time moves in units of ``U`` (7 minutes) plus or minus 1 ms, so events land exactly on
session timeouts, ``within`` spans and windows, one millisecond either side, on equal
timestamps, and late. Streams start a few hours before a DST change or a weekend.
"""

import datetime as dt
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcore
import segcore_ref
from test_differential import _check_same, _run
from test_differential import events as differential_events

U = 7 * 60_000
T = 2 * U                       # the session timeout


def _utc(*args):
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp() * 1000)


STARTS = [
    _utc(2026, 3, 28, 22),      # Stockholm springs forward at 01:00 UTC
    _utc(2026, 11, 1, 3),       # New York falls back at 06:00 UTC
    _utc(2026, 10, 24, 22),     # Stockholm falls back at 01:00 UTC
    _utc(2026, 11, 20, 20),     # a Friday evening into Saturday
]
ZONES = ["Europe/Stockholm", "America/New_York", "Asia/Kolkata", "UTC", None]

RULES = {
    "seq3": f"seq(view, cart, buy within {3 * U}ms, {9 * U}ms)",
    "seq_all": "seq(view, buy)",
    "seq_where": f'seq(view where cat == "a", buy within {4 * U}ms)',
    "seq_by": f"seq(cart, buy by cid within {3 * U}ms, {6 * U}ms)",
    "seq_same": f"seq(view, view, view within {2 * U}ms)",
    "neg": f"seq(cart, not buy within {2 * U}ms, {6 * U}ms)",
    "neg_by": f"seq(cart, not buy by cid within {3 * U}ms)",
    "neg_self": f"seq(view, not view within {2 * U}ms)",
    "sess_n": f"count(session, {6 * U}ms) >= 2",
    "sess_all": "count(session) >= 3",
    "sess_avg": f"avg(session.duration, {9 * U}ms) >= {2 * U}ms",
    "sess_max": f"max(session.events, {6 * U}ms) >= 3",
    "sess_sum": f"sum(session.duration, {6 * U}ms) > {U}ms",
    "sess_min": f"min(session.events, {9 * U}ms) == 1",
    "last": f"last_session.duration >= {U}ms",
    "last_ev": "last_session.events >= 3",
    "live": "in_session",
    "live2": "in_session and last_session.events >= 2",
    "wkd": f'count(buy where weekday in ["sat", "sun"], {9 * U}ms) >= 1',
    "fri": 'count(view where weekday == "fri") >= 2',
    "hour": "count(view where hour between 1 and 2) >= 1",
    "hour2": f"count(buy where hour < 3 or hour >= 22, {9 * U}ms) >= 2",
    "share": f'share(view where cat == "a", {6 * U}ms) >= 0.5',
    "share_all": "share(buy where hour >= 1) > 0.3",
    "mode": f'mode(view.cat, {6 * U}ms) == "a"',
    "mode_all": 'mode(view.cat) in ["b", "c"]',
    "mode_num": f"mode(buy.amount, {9 * U}ms) == 3",
    "mode_ex": f'mode(cart.cid, {6 * U}ms) exists and not (mode(cart.cid, {6 * U}ms) == "x")',
}

USERS = [0, 1, 2, "ann", "bob"]
HOT_USERS = [0, 0, 0, "ann", "ann", 1] + USERS
EVENTS = ["view", "view", "view", "cart", "cart", "buy", "buy", "other"]
PROPS = {
    "buy": {"amount": [1, 3, 3.0, 9, None], "cid": ["x", "y", None]},
    "view": {"cat": ["a", "b", "c", None]},
    "cart": {"cid": ["x", "y", "z", None]},
}


#: whole units from now (often late), exactly or 1 ms either side
DT = st.builds(lambda units, ms: units * U + ms, st.one_of(st.integers(0, 2), st.integers(-8, 2)),
               st.sampled_from([0, 0, 0, 1, -1]))


def events():
    return differential_events(EVENTS, PROPS, HOT_USERS, DT)


ops = st.one_of(
    st.tuples(st.just("track"), events()),
    st.tuples(st.just("track"), events()),
    st.tuples(st.just("batch"), st.lists(events(), min_size=1, max_size=10)),
    st.tuples(st.just("advance"), st.integers(0, 6).map(lambda k: k * U) |
              st.integers(0, 6 * U)),
    st.tuples(st.just("traits"), st.sampled_from(HOT_USERS),
              st.fixed_dictionaries({"tz": st.sampled_from(ZONES)})),
    st.tuples(st.just("alias"), st.sampled_from(HOT_USERS), st.sampled_from(USERS + ["cy"])),
    st.tuples(st.just("forget"), st.sampled_from(USERS)),
)


#: deeper local runs: SEGCORE_PATTERN_EXAMPLES=5000 python -m pytest tests/test_patterns_differential.py
EXAMPLES = int(os.environ.get("SEGCORE_PATTERN_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(RULES)), min_size=1, max_size=6, unique=True),
       st.lists(ops, min_size=1, max_size=40), st.sampled_from(STARTS),
       st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(ZONES)), max_size=3))
def test_patterns_match_reference(names, script, start, zones):
    rules = {n: RULES[n] for n in names}
    a = segcore.Engine(session_timeout=f"{T}ms")
    b = segcore_ref.RefEngine(session_timeout=f"{T}ms")
    _check_same(a, b, a.add_segments(rules), b.add_segments(rules), "add_segments")
    _check_same(a, b, a.advance(start), b.advance(start), "start")
    for user, tz in zones:
        _check_same(a, b, a.set_traits(user, {"tz": tz}), b.set_traits(user, {"tz": tz}),
                    "tz")
    state = {"now": start}
    for i, op in enumerate(script):
        ta, tb = _run((a, b), op, state)
        _check_same(a, b, ta, tb, f"step {i}: {op}")
        state["now"] = a.now
    # time alone: sessions close, sequences and windows expire
    for k in (T - 1, T, 3 * U, 6 * U, 9 * U, 20 * U):
        t = state["now"] + k
        _check_same(a, b, a.advance(t), b.advance(t), f"advance to now + {k}")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=30), st.sampled_from(STARTS))
def test_patterns_all_rules_at_once(script, start):
    """Every pattern rule together (shared features: windowed mode and distinct, share and
    count, session features of several windows)."""
    a = segcore.Engine(session_timeout=f"{T}ms")
    b = segcore_ref.RefEngine(session_timeout=f"{T}ms")
    _check_same(a, b, a.add_segments(RULES), b.add_segments(RULES), "add_segments")
    _check_same(a, b, a.advance(start), b.advance(start), "start")
    state = {"now": start}
    for i, op in enumerate(script):
        ta, tb = _run((a, b), op, state)
        _check_same(a, b, ta, tb, f"step {i}: {op}")
        state["now"] = a.now
    _check_same(a, b, a.advance(state["now"] + 30 * U), b.advance(state["now"] + 30 * U),
                "final advance")
