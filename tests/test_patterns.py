"""Behaviour patterns (docs/patterns.md): sequences, sessions, hour/weekday, share, mode.

Every test runs on the compiled engine and on the reference engine (``make_engine``), with
exact memberships at exact instants, including instants reached by ``advance`` alone.
"""

import datetime as dt

import pytest

import segcore
from segcore import EventError, RuleError

S, M, H, D = 1_000, 60_000, 3_600_000, 86_400_000
T0 = 10 * D


def _tr(out):
    return [(t.user, t.segment, t.entered, t.ts) for t in out]


def _ms(*args, tz=dt.timezone.utc):
    return int(dt.datetime(*args, tzinfo=tz).timestamp() * 1000)


# ---------------------------------------------------------------- sequences
def test_seq_enters_when_the_last_step_arrives_and_leaves_with_the_first(make_engine):
    eng = make_engine()
    eng.add_segment("funnel", "seq(product_view, add_to_cart, purchase within 1d, 7d)")
    assert _tr(eng.track(1, "product_view", ts=T0)) == []
    assert _tr(eng.track(1, "add_to_cart", ts=T0 + H)) == []
    assert _tr(eng.track(1, "purchase", ts=T0 + 2 * H)) == [(1, "funnel", True, T0 + 2 * H)]
    # time alone: out when the first step leaves the window, at t1 + 7d exactly
    assert _tr(eng.advance(T0 + 7 * D - 1)) == []
    assert _tr(eng.advance(T0 + 10 * D)) == [(1, "funnel", False, T0 + 7 * D)]


def test_seq_steps_must_strictly_follow_each_other(make_engine):
    eng = make_engine()
    eng.add_segment("s", "seq(a, b)")
    eng.track(1, "b", ts=T0)
    eng.track(1, "a", ts=T0)          # same instant: not ordered
    assert eng.segments_of(1) == []
    eng.track(2, "b", ts=T0)          # wrong order
    eng.track(2, "a", ts=T0 + 1)
    assert eng.segments_of(2) == []
    assert _tr(eng.track(2, "b", ts=T0 + 2)) == [(2, "s", True, T0 + 2)]


def test_seq_within_is_exclusive(make_engine):
    eng = make_engine()
    eng.add_segment("s", "seq(a, b, c within 1h)")
    eng.track_many(user=[1, 1, 1, 2, 2, 2], event=["a", "b", "c"] * 2,
                   ts=[T0, T0 + 1, T0 + H, T0, T0 + 1, T0 + H - 1])
    assert list(eng.members("s")) == [2]


def test_seq_late_event_completes_a_match_and_where_filters_steps(make_engine):
    eng = make_engine()
    eng.add_segment("s", "seq(view where price > 100, cart, buy within 1d, 30d)")
    eng.track(1, "view", ts=T0, props={"price": 50})
    eng.track(1, "buy", ts=T0 + 2 * H)
    eng.track(1, "cart", ts=T0 + H)
    assert eng.segments_of(1) == []
    # a late expensive view before the cart completes the match, at the current now
    assert _tr(eng.track(1, "view", ts=T0 + 30 * M, props={"price": 150})) == [
        (1, "s", True, T0 + 2 * H)]
    assert _tr(eng.advance(T0 + 31 * D)) == [(1, "s", False, T0 + 30 * M + 30 * D)]


def test_seq_by_key_needs_the_same_item(make_engine):
    eng = make_engine()
    eng.add_segment("s", "seq(view, cart by sku within 1h)")
    eng.track(1, "view", ts=T0, props={"sku": "a"})
    eng.track(1, "cart", ts=T0 + 1, props={"sku": "b"})
    eng.track(1, "cart", ts=T0 + 2)                   # no key: takes no part
    assert eng.segments_of(1) == []
    assert _tr(eng.track(1, "cart", ts=T0 + 3, props={"sku": "a"})) == [(1, "s", True, T0 + 3)]


def test_seq_latest_start_decides_the_exit(make_engine):
    eng = make_engine()
    eng.add_segment("s", "seq(a, b, 1d)")
    eng.track_many(user=[1] * 4, event=["a", "b", "a", "b"], ts=[T0, T0 + H, T0 + 5 * H,
                                                                   T0 + 6 * H])
    assert _tr(eng.advance(T0 + 3 * D)) == [(1, "s", False, T0 + 5 * H + D)]


def test_negative_seq_is_confirmed_after_within_and_cancelled_by_a_late_b(make_engine):
    eng = make_engine()
    eng.add_segment("abandoned", "seq(add_to_cart, not purchase within 1h, 1d)")
    eng.track(1, "add_to_cart", ts=T0)
    assert _tr(eng.advance(T0 + H - 1)) == []
    assert _tr(eng.advance(T0 + H)) == [(1, "abandoned", True, T0 + H)]
    # a late purchase within the hour takes the cart back
    assert _tr(eng.track(1, "purchase", ts=T0 + 59 * M)) == [(1, "abandoned", False, T0 + H)]
    # another cart, bought exactly one hour later: the purchase is too late to cancel it
    eng.track(1, "add_to_cart", ts=T0 + 2 * H)
    eng.track(1, "purchase", ts=T0 + 3 * H)
    assert eng.segments_of(1) == ["abandoned"]
    assert _tr(eng.advance(T0 + 5 * D)) == [(1, "abandoned", False, T0 + 2 * H + D)]


def test_negative_seq_purchase_at_the_same_instant_cancels(make_engine):
    eng = make_engine()
    eng.add_segment("ab", "seq(cart, not buy within 1h)")
    eng.track_many(user=[1, 1, 2], event=["cart", "buy", "cart"], ts=[T0, T0, T0])
    assert _tr(eng.advance(T0 + H)) == [(2, "ab", True, T0 + H)]


def test_negative_seq_an_event_never_cancels_itself(make_engine):
    # "a page view with no other page view within 30 minutes"
    eng = make_engine()
    eng.add_segment("bounce", "seq(page, not page within 30m)")
    eng.track(1, "page", ts=T0)
    eng.track(2, "page", ts=T0)
    eng.track(2, "page", ts=T0 + 29 * M)
    assert _tr(eng.advance(T0 + 30 * M)) == [(1, "bounce", True, T0 + 30 * M)]
    # user 2's second view is itself followed by nothing: confirmed 30 minutes after it
    assert _tr(eng.advance(T0 + 2 * H)) == [(2, "bounce", True, T0 + 59 * M)]


def test_negative_seq_by_key(make_engine):
    eng = make_engine()
    eng.add_segment("ab", "seq(cart, not buy by sku within 1h)")
    eng.track(1, "cart", ts=T0, props={"sku": "a"})
    eng.track(1, "buy", ts=T0 + M, props={"sku": "b"})
    assert _tr(eng.advance(T0 + H)) == [(1, "ab", True, T0 + H)]


# ---------------------------------------------------------------- sessions
def test_a_gap_of_exactly_the_timeout_starts_a_new_session(make_engine):
    eng = make_engine(session_timeout="30m")
    eng.add_segments({"two": "count(session, 1d) >= 2", "long": "max(session.events, 1d) >= 2"})
    eng.track(1, "view", ts=T0)
    assert _tr(eng.track(1, "view", ts=T0 + 30 * M - 1)) == [(1, "long", True, T0 + 30 * M - 1)]
    assert _tr(eng.track(1, "view", ts=T0 + 60 * M - 1)) == [(1, "two", True, T0 + 60 * M - 1)]


def test_in_session_closes_by_time_alone(make_engine):
    eng = make_engine(session_timeout="30m")
    eng.add_segment("live", "in_session")
    assert _tr(eng.track(1, "app_open", ts=T0)) == [(1, "live", True, T0)]
    eng.track(1, "view", ts=T0 + 10 * M)
    assert _tr(eng.advance(T0 + 40 * M - 1)) == []
    assert _tr(eng.advance(T0 + H)) == [(1, "live", False, T0 + 40 * M)]
    assert eng.segments_of(2) == []


def test_a_late_event_joins_two_sessions(make_engine):
    eng = make_engine(session_timeout="30m")
    eng.add_segments({"many": "count(session, 1d) >= 2",
                      "long": "last_session.duration >= 50m",
                      "avg": "avg(session.duration, 1d) >= 50m"})
    eng.track(1, "view", ts=T0)
    eng.track(1, "view", ts=T0 + 58 * M)
    assert eng.segments_of(1) == ["many"]
    out = _tr(eng.track(1, "view", ts=T0 + 29 * M))   # late, 29 minutes from both: one session
    assert out == [(1, "many", False, T0 + 58 * M), (1, "long", True, T0 + 58 * M),
                   (1, "avg", True, T0 + 58 * M)]


def test_sessions_leave_the_window_at_start_plus_w(make_engine):
    eng = make_engine(session_timeout="10m")
    eng.add_segments({"active": "count(session, 1h) >= 2",
                      "deep": "sum(session.events, 1h) >= 3",
                      "short": "min(session.duration, 1h) < 1m"})
    eng.track_many(user=[1, 1, 1], event=["a", "b", "a"], ts=[T0, T0 + 5 * M, T0 + 20 * M])
    assert eng.segments_of(1) == ["active", "deep", "short"]
    # the first session (started T0) leaves at T0 + 1h; the second (T0 + 20m) at + 1h20m
    assert _tr(eng.advance(T0 + 2 * H)) == [
        (1, "active", False, T0 + H), (1, "deep", False, T0 + H),
        (1, "short", False, T0 + 80 * M)]


def test_session_aggregates_of_no_sessions(make_engine):
    eng = make_engine()
    eng.add_segments({"none": "count(session, 1d) == 0", "sum0": "sum(session.events) == 0",
                      "avg": "avg(session.duration) >= 0",
                      "last": "not (last_session.events >= 0)"})
    eng.set_traits(1, {"x": 1})
    assert eng.segments_of(1) == ["none", "sum0", "last"]


def test_session_timeout_must_be_positive(make_engine):
    with pytest.raises(segcore.SegcoreError, match="session_timeout must be longer than 0"):
        make_engine(session_timeout=0)


# ---------------------------------------------------------------- hour and weekday
def test_weekday_and_hour_in_the_users_timezone(make_engine):
    eng = make_engine()
    eng.add_segments({"weekend": 'count(purchase where weekday in ["sat", "sun"], 90d) >= 1',
                      "evening": "count(purchase where hour between 18 and 22) >= 1"})
    # Saturday 2026-11-21 23:30 UTC is Sunday 00:30 in Stockholm and Saturday 18:30 in New York
    t = _ms(2026, 11, 21, 23, 30)
    eng.set_traits("ny", {"tz": "America/New_York"})
    eng.set_traits("se", {"tz": "Europe/Stockholm"})
    eng.track_many(user=["ny", "se", "utc"], event=["purchase"] * 3, ts=[t] * 3)
    assert eng.segments_of("ny") == ["weekend", "evening"]
    assert eng.segments_of("se") == ["weekend"]
    assert eng.segments_of("utc") == ["weekend"]
    # a friday: in Stockholm 2026-11-20 23:30 UTC is already saturday
    f = _ms(2026, 11, 20, 23, 30)
    eng.track("se2", "purchase", ts=f)
    eng.set_traits("se3", {"tz": "Europe/Stockholm"})
    eng.track("se3", "purchase", ts=f)
    assert eng.segments_of("se2") == [] and eng.segments_of("se3") == ["weekend"]


def test_hours_across_a_dst_change(make_engine):
    eng = make_engine()
    eng.add_segments({"h2": "count(x where hour == 2) >= 1",
                      "h1": "count(x where hour == 1) >= 2"})
    eng.set_traits_many(user=["a", "b"], tz=["Europe/Stockholm", "America/New_York"])
    # Stockholm springs forward 2026-03-29 01:00 UTC: 01:59:59 CET is followed by 03:00 CEST
    eng.track("a", "x", ts=_ms(2026, 3, 29, 0, 59, 59))
    eng.track("a", "x", ts=_ms(2026, 3, 29, 1, 0, 0))
    assert eng.segments_of("a") == []
    # New York falls back 2026-11-01 06:00 UTC: the hour 01:00-02:00 happens twice
    eng.track("b", "x", ts=_ms(2026, 11, 1, 5, 30))
    eng.track("b", "x", ts=_ms(2026, 11, 1, 6, 30))
    assert eng.segments_of("b") == ["h1"]


def test_events_keep_the_timezone_they_were_accepted_with(make_engine):
    eng = make_engine()
    eng.add_segment("night", "count(x where hour < 6) >= 2")
    t = _ms(2026, 6, 1, 2, 0)                # 02:00 UTC, 22:00 in New York
    eng.track(1, "x", ts=t)
    eng.set_traits(1, {"tz": "America/New_York"})
    assert _tr(eng.track(1, "x", ts=t + 1)) == []       # 22:00 local: not at night
    eng.set_traits(1, {"tz": None})                      # back to UTC
    assert _tr(eng.track(1, "x", ts=t + 2)) == [(1, "night", True, t + 2)]


def test_an_unknown_timezone_is_rejected_and_changes_nothing(make_engine):
    eng = make_engine()
    eng.add_segment("se", 'trait.tz == "Europe/Stockholm"')
    eng.set_traits(1, {"tz": "Europe/Stockholm"})
    for bad in ("Mars/Base", "../etc/passwd", "", 5):
        with pytest.raises(EventError) as ei:
            eng.set_traits(1, {"tz": bad, "x": 1})
        assert ei.value.field == "traits.tz"
        assert "IANA timezone name" in str(ei.value)
    with pytest.raises(EventError) as ei:
        eng.set_traits_many(user=[2, 3], tz=["UTC", "Nowhere/Land"])
    assert ei.value.field == "traits.tz" and ei.value.index == 1
    assert eng.segments_of(1) == ["se"]
    assert eng.stats()["users"] == 1


def test_weekday_is_compared_with_day_names_only():
    eng = segcore.Engine()
    with pytest.raises(RuleError, match='`weekday` is one of "mon"'):
        eng.add_segment("x", 'count(a where weekday == "saturday") >= 1')
    with pytest.raises(RuleError, match="`weekday` is tested with"):
        eng.add_segment("x", 'count(a where weekday > "fri") >= 1')
    with pytest.raises(RuleError, match="only available inside `where`"):
        segcore.rules.from_json({"kind": "compare", "op": "==", "left": {"kind": "local",
                                 "field": "hour"}, "right": {"kind": "num", "value": 1}})
    assert eng.segments == {}


# ---------------------------------------------------------------- share
def test_share_is_a_fraction_and_missing_without_events(make_engine):
    eng = make_engine()
    eng.add_segments({"mostly_app": 'share(open where channel == "app", 1d) >= 0.5',
                      "no_app": 'not (share(open where channel == "app", 1d) > 0)'})
    eng.set_traits(1, {"x": 1})
    assert eng.segments_of(1) == ["no_app"]           # missing: every test of it is false
    eng.track(1, "open", ts=T0, props={"channel": "web"})
    eng.track(1, "open", ts=T0 + H, props={"channel": "app"})
    assert eng.segments_of(1) == ["mostly_app"]
    eng.track(1, "open", ts=T0 + 2 * H, props={"channel": "web"})
    assert eng.segments_of(1) == []
    # the first web open leaves the window: 1 of 2 again
    assert _tr(eng.advance(T0 + D)) == [(1, "mostly_app", True, T0 + D)]
    assert _tr(eng.advance(T0 + 3 * D)) == [(1, "mostly_app", False, T0 + H + D),
                                            (1, "no_app", True, T0 + H + D)]


# ---------------------------------------------------------------- mode
def test_mode_ties_go_to_the_latest_event(make_engine):
    eng = make_engine()
    eng.add_segments({"sms": 'mode(click.channel, 30d) == "sms"',
                      "not_sms": 'mode(click.channel, 30d) not in ["sms"]',
                      "any": "mode(click.channel, 30d) exists",
                      "sms_all": 'mode(click.channel) == "sms"'})
    eng.track(1, "click", ts=T0 + 5, props={"channel": "sms"})
    eng.track(1, "click", ts=T0, props={"channel": "email"})     # late: sms is the latest
    assert eng.segments_of(1) == ["sms", "any", "sms_all"]
    eng.track(1, "click", ts=T0 + 5, props={"channel": "email"})  # same ts, arrived later
    assert eng.segments_of(1) == ["not_sms", "any"]
    eng.track(1, "click", ts=T0 + 6, props={"channel": "push"})
    eng.track(1, "click", ts=T0 + 7, props={"channel": "sms"})
    assert eng.segments_of(1) == ["sms", "any", "sms_all"]
    # the window forgets events one by one; sms keeps winning the ties by its latest event
    assert _tr(eng.advance(T0 + 30 * D + 6)) == []
    assert _tr(eng.advance(T0 + 31 * D)) == [(1, "sms", False, T0 + 30 * D + 7),
                                             (1, "any", False, T0 + 30 * D + 7)]
    assert eng.segments_of(1) == ["sms_all"]


def test_mode_numbers_compare_by_value(make_engine):
    eng = make_engine()
    eng.add_segment("two", "mode(pick.n, 1d) == 2")
    eng.track_many(user=[1, 1, 1], event=["pick"] * 3, ts=[T0, T0 + 1, T0 + 2],
                   props={"n": [2, 2.0, 3]})
    assert eng.segments_of(1) == ["two"]


def test_mode_only_compares_with_constants():
    eng = segcore.Engine()
    with pytest.raises(RuleError, match="`mode\\(...\\)` is tested with"):
        eng.add_segment("x", "mode(a.b, 1d) > 1")
    with pytest.raises(RuleError, match="can only be compared with constants"):
        eng.add_segment("x", "mode(a.b, 1d) == trait.c")


# ---------------------------------------------------------------- rules and errors
@pytest.mark.parametrize("rule, message", [
    ("seq(a)", "`seq` needs at least two steps"),
    ("seq(a, not b)", "needs `within`"),
    ("seq(not a, b within 1h)", "`not` is supported as the second of two steps"),
    ("seq(a, not b within 2h, 1h)", "must be longer than its `within`"),
    ("count(session where x == 1, 1d) > 1", "sessions cannot be filtered"),
    ("avg(session.foo) > 1", "a session has `duration` and `events`, not `foo`"),
    ("count(session.duration) > 1", "takes no metric"),
    ("first(session) > 1", "`session` is reserved"),
    ("share(a.b, 1d) > 0.5", "`share` is a fraction of events and takes no property"),
])
def test_pattern_rule_errors(make_engine, rule, message):
    eng = make_engine()
    with pytest.raises(RuleError, match=message.replace("(", "\\(").replace(")", "\\)")):
        eng.add_segment("x", rule)
    assert eng.segments == {}


@pytest.mark.parametrize("rule", [
    "seq(view where price > 100, cart by sku within 1h, 30d)",
    "seq(cart, not buy within 1h)",
    'count(session, 1w) >= 3 and avg(session.duration, 30d) > 5m',
    "last_session.events >= 3 or in_session",
    'share(buy where hour between 18 and 22 and weekday in ["sat", "sun"], 90d) >= 0.5',
    'mode(click.channel, 90d) in ["sms", "push"]',
])
def test_pattern_rules_round_trip(rule):
    ast = segcore.rules.parse(rule)
    assert segcore.rules.parse(segcore.rules.to_text(ast)) == ast
    assert segcore.rules.from_json(segcore.rules.to_json(ast)) == ast


# ---------------------------------------------------------------- compiled engine only
def test_seq_state_is_capped_and_evictions_are_counted():
    eng = segcore.Engine(seq_max_events=4)
    eng.add_segment("s", "seq(a, b)")
    eng.track_many(user=[1] * 6, event=["a"] * 6, ts=list(range(T0, T0 + 6)))
    assert eng.stats()["seq_evicted"] == 2
    assert _tr(eng.track(1, "b", ts=T0 + 10)) == [(1, "s", True, T0 + 10)]
    with pytest.raises(segcore.SegcoreError, match="seq_max_events must be an int >= 1"):
        segcore.Engine(seq_max_events=0)


def test_patterns_survive_a_snapshot(tmp_path):
    rules = {"f": "seq(a, b within 1h, 1d)", "live": "in_session",
             "n": "count(session, 1d) >= 2", "m": 'mode(c.ch, 1d) == "sms"',
             "w": 'count(a where weekday == "sat") >= 1'}
    eng = segcore.Engine(session_timeout="10m")
    eng.add_segments(rules)
    eng.set_traits(1, {"tz": "Europe/Stockholm"})
    sat = _ms(2026, 11, 21, 12)
    eng.track_many(user=[1, 1, 1], event=["a", "b", "c"], ts=[sat, sat + M, sat + 20 * M],
                   props={"ch": [None, None, "sms"]})
    eng.snapshot(tmp_path / "s.snap")
    back = segcore.Engine.restore(tmp_path / "s.snap")
    assert back.segments_of(1) == eng.segments_of(1) == ["f", "live", "n", "m", "w"]
    assert _tr(back.advance(sat + 2 * D)) == _tr(eng.advance(sat + 2 * D))
    assert back.track(1, "c", ts=sat + 2 * D, props={"ch": "sms"}) == eng.track(
        1, "c", ts=sat + 2 * D, props={"ch": "sms"})


# ---------------------------------------------------------------- scale-out
def test_sharded_engine_runs_patterns_like_one_engine(tmp_path):
    from test_sharded import same
    rules = {"f": "seq(view, cart by sku within 1h, 1d)", "ab": "seq(cart, not buy within 1h)",
             "n": "count(session, 1d) >= 2", "live": "in_session",
             "m": 'mode(view.sku, 1d) == "a"', "sh": 'share(view where sku == "a", 1d) > 0.5'}
    one = segcore.Engine(session_timeout="20m")
    many = segcore.ShardedEngine(3, None, session_timeout="20m", data_dir=tmp_path / "d")
    same(one, many, one.add_segments(rules), many.add_segments(rules))
    users = [1, 2, 3, "ann", "bob", 7]
    rows = [(users[i % 6], ev, T0 + i * 7 * M + (i % 5) * S, {"sku": "ab"[i % 3 == 0]})
            for i, ev in enumerate(["view", "cart", "buy", "view", "cart"] * 12)]
    for k in range(0, len(rows), 9):
        part = rows[k:k + 9]
        cols = dict(user=[r[0] for r in part], event=[r[1] for r in part],
                    ts=[r[2] for r in part], props={"sku": [r[3]["sku"] for r in part]})
        same(one, many, one.track_many(**cols), many.track_many(**cols), f"rows {k}")
    same(one, many, one.advance(T0 + 3 * D), many.advance(T0 + 3 * D), "advance")
    many.close()
    back = segcore.ShardedEngine.open(tmp_path / "d")
    assert back._options["session_timeout"] == 20 * M
    for name in rules:
        assert back.members(name) == one.members(name)
    with pytest.raises(RuleError, match="not supported on a ShardedEngine"):
        back.add_segment("w", 'count(view where weekday == "sat") >= 1')
    assert "w" not in back.segments
    back.close()
