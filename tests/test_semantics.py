"""Exact semantics (docs/semantics.md), pinned edge by edge, on both engines."""

import datetime as dt

import numpy as np
import pytest

import segcore
from segcore import Engine, EventError, RuleError, SegcoreError, Transition

H = 3_600_000
D = 24 * H


def T(user, seg, entered, ts):
    return Transition(user, seg, entered, ts)


def members(eng, name):
    return sorted(eng.members(name))


# ------------------------------------------------------------------ the README story
def test_three_purchases_enter_and_time_alone_exits(make_engine):
    eng = make_engine()
    eng.add_segment("frequent_buyers", "count(purchase, 90d) >= 3")
    assert eng.track(42, "purchase", ts=1 * D) == []
    assert eng.track(42, "purchase", ts=2 * D) == []
    assert eng.track(42, "purchase", ts=3 * D) == [T(42, "frequent_buyers", True, 3 * D)]
    assert members(eng, "frequent_buyers") == [42]
    # the first of the three leaves the window exactly 90 days after it happened
    assert list(eng.advance(91 * D - 1)) == []
    assert members(eng, "frequent_buyers") == [42]
    assert list(eng.advance(91 * D)) == [T(42, "frequent_buyers", False, 91 * D)]
    assert members(eng, "frequent_buyers") == []


# ------------------------------------------------------------------ windows
def test_event_exactly_w_old_is_out(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(ping, 10ms)")
    assert eng.track(1, "ping", ts=100) == [T(1, "recent", True, 100)]
    assert list(eng.advance(109)) == []
    assert eng.segments_of(1) == ["recent"]
    assert list(eng.advance(110)) == [T(1, "recent", False, 110)]
    assert eng.segments_of(1) == []


def test_exit_discovered_by_a_later_event_has_the_boundary_ts(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(ping, 10ms)")
    eng.track(1, "ping", ts=100)
    # user 2's event at 500 moves time; user 1's exit is reported at its own instant, first
    assert eng.track(2, "other", ts=500) == [T(1, "recent", False, 110)]


def test_late_event_inside_window_counts_from_now(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(ping, 10ms)")
    eng.advance(1000)
    assert eng.track(1, "ping", ts=995) == [T(1, "recent", True, 1000)]
    assert list(eng.advance(1005)) == [T(1, "recent", False, 1005)]


def test_late_event_older_than_window_counts_all_time_only(make_engine):
    eng = make_engine()
    eng.add_segments({"recent": "did(ping, 10ms)", "ever": "count(ping) >= 1"})
    eng.advance(1000)
    assert eng.track(1, "ping", ts=990) == [T(1, "ever", True, 1000)]
    assert eng.segments_of(1) == ["ever"]


def test_equal_timestamps_count_separately(make_engine):
    eng = make_engine()
    eng.add_segment("two", "count(x, 5ms) >= 2")
    assert eng.track(1, "x", ts=10) == []
    assert eng.track(1, "x", ts=10) == [T(1, "two", True, 10)]
    assert list(eng.advance(15)) == [T(1, "two", False, 15)]


def test_count_equality_enters_and_leaves(make_engine):
    eng = make_engine()
    eng.add_segment("exactly2", "count(x, 100ms) == 2")
    eng.track(1, "x", ts=0)
    assert eng.track(1, "x", ts=10) == [T(1, "exactly2", True, 10)]
    assert eng.track(1, "x", ts=20) == [T(1, "exactly2", False, 20)]
    # at 100 the first drops out: two left in the window
    assert list(eng.advance(100)) == [T(1, "exactly2", True, 100)]
    assert list(eng.advance(110)) == [T(1, "exactly2", False, 110)]


def test_where_filters_events(make_engine):
    eng = make_engine()
    eng.add_segment("shoe_fans", 'count(product_view where category == "shoes", 7d) >= 2')
    eng.track(1, "product_view", ts=1, props={"category": "shoes"})
    assert eng.track(1, "product_view", ts=2, props={"category": "hats"}) == []
    assert eng.track(1, "product_view", ts=3) == []
    assert eng.track(1, "product_view", ts=4, props={"category": "shoes"}) == [
        T(1, "shoe_fans", True, 4)]


def test_windowed_sum_and_avg(make_engine):
    eng = make_engine()
    eng.add_segments({"big": "sum(purchase.amount, 1h) > 100",
                      "avg": "avg(purchase.amount, 1h) >= 60"})
    assert eng.track(1, "purchase", ts=0, props={"amount": 70}) == [T(1, "avg", True, 0)]
    assert eng.track(1, "purchase", ts=10, props={"amount": 40}) == [
        T(1, "big", True, 10), T(1, "avg", False, 10)]
    # amount-less purchases are skipped by sum/avg
    assert eng.track(1, "purchase", ts=20) == []
    assert list(eng.advance(H)) == [T(1, "big", False, H)]


def test_all_time_sum_min_max_avg_and_missing(make_engine):
    eng = make_engine()
    eng.add_segments({"ltv": "sum(purchase.amount) >= 500",
                      "cheap": "min(purchase.amount) < 5",
                      "no_avg": "not (avg(purchase.amount) >= 0)"})
    # a user with traits only: avg of nothing is missing, so the test is false and `not` is true
    assert eng.set_traits(9, {"x": 1}) == [T(9, "no_avg", True, 0)]
    assert eng.track(9, "purchase", ts=1, props={"amount": 499.5}) == [
        T(9, "no_avg", False, 1)]
    assert eng.track(9, "purchase", ts=2, props={"amount": 0.5}) == [
        T(9, "ltv", True, 2), T(9, "cheap", True, 2)]


def test_distinct_counts_numbers_by_value(make_engine):
    eng = make_engine()
    eng.add_segment("varied", "distinct(view.item) >= 3")
    eng.track(1, "view", ts=1, props={"item": 1})
    eng.track(1, "view", ts=2, props={"item": 1.0})
    eng.track(1, "view", ts=3, props={"item": "1"})
    assert eng.segments_of(1) == []
    assert eng.track(1, "view", ts=4, props={"item": "b"}) == [T(1, "varied", True, 4)]


# ------------------------------------------------------------------ time tests
def test_new_users_leave_one_ms_after_seven_days(make_engine):
    eng = make_engine()
    eng.add_segment("new_users", "first_seen >= now - 7d")
    assert eng.track(5, "signup", ts=1000) == [T(5, "new_users", True, 1000)]
    assert list(eng.advance(1000 + 7 * D)) == []
    assert list(eng.advance(1000 + 7 * D + 1)) == [T(5, "new_users", False, 1000 + 7 * D + 1)]


def test_age_of_last_event(make_engine):
    eng = make_engine()
    eng.add_segment("lapsed", "now - last(purchase) > 30d")
    eng.track(1, "purchase", ts=0)
    assert list(eng.advance(30 * D)) == []
    assert list(eng.advance(30 * D + 5)) == [T(1, "lapsed", True, 30 * D + 1)]
    # a late purchase that is older changes nothing; a newer one brings the user back
    assert eng.track(1, "purchase", ts=1) == []
    assert eng.track(1, "purchase", ts=20 * D) == [T(1, "lapsed", False, 30 * D + 5)]


def test_inactive_is_true_for_users_without_events(make_engine):
    eng = make_engine()
    eng.add_segments({"inactive": "inactive(30d)", "lapsed": "seen and inactive(30d)"})
    assert eng.set_traits(1, {"a": 1}) == [T(1, "inactive", True, 0)]
    assert eng.track(1, "open", ts=10) == [T(1, "inactive", False, 10)]
    assert list(eng.advance(10 + 30 * D)) == [T(1, "inactive", True, 10 + 30 * D),
                                              T(1, "lapsed", True, 10 + 30 * D)]


# ------------------------------------------------------------------ anchored absence
def test_cart_abandoner_enters_exactly_one_hour_after(make_engine):
    eng = make_engine()
    eng.add_segment("cart", "abandoned(add_to_cart, purchase, 1h)")
    eng.track(1, "add_to_cart", ts=1000)
    assert list(eng.advance(1000 + H - 1)) == []
    assert list(eng.advance(1000 + H)) == [T(1, "cart", True, 1000 + H)]
    # a purchase before the cart does not count; one at or after it does
    assert eng.track(1, "purchase", ts=999) == []
    assert eng.track(1, "purchase", ts=1000) == [T(1, "cart", False, 1000 + H)]


def test_new_add_to_cart_restarts_the_hour(make_engine):
    eng = make_engine()
    eng.add_segment("cart", "abandoned(add_to_cart, purchase, 1h)")
    eng.track(1, "add_to_cart", ts=0)
    eng.track(1, "purchase", ts=10)
    eng.track(1, "add_to_cart", ts=20)
    assert list(eng.advance(2 * H)) == [T(1, "cart", True, 20 + H)]


def test_abandoned_by_key_matches_purchases_per_cart(make_engine):
    eng = make_engine()
    eng.add_segment("cart", "abandoned(add_to_cart, purchase, 1h) by cart_id")
    eng.track(1, "add_to_cart", ts=0, props={"cart_id": "a"})
    eng.track(1, "add_to_cart", ts=5, props={"cart_id": "b"})
    eng.track(1, "purchase", ts=10, props={"cart_id": "a"})
    eng.track(1, "purchase", ts=11)              # no key: ignored by the keyed test
    assert list(eng.advance(H + 5)) == [T(1, "cart", True, H + 5)]
    assert eng.track(1, "purchase", ts=H + 6, props={"cart_id": "b"}) == [
        T(1, "cart", False, H + 6)]


# ------------------------------------------------------------------ traits, scores, refs
def test_trait_only_user_is_in_segments_that_hold_without_events(make_engine):
    eng = make_engine()
    eng.add_segments({"se": 'trait.country == "SE"', "none": "count(x) == 0",
                      "seen": "seen", "se_buyers": 'trait.country == "SE" and did(x)'})
    out = eng.set_traits("anna", {"country": "SE"})
    assert out == [T("anna", "se", True, 0), T("anna", "none", True, 0)]
    assert eng.set_traits("anna", {"country": None}) == [T("anna", "se", False, 0)]


def test_trait_operators(make_engine):
    eng = make_engine()
    eng.add_segments({
        "adult": "trait.age >= 18", "nordic": 'trait.country in ["SE", "NO"]',
        "not_nordic": 'trait.country not in ["SE", "NO"]', "mid": "trait.age between 20 and 30",
        "gmail": 'trait.email contains "@gmail."', "a_name": 'trait.name startswith "A"',
        "code": 'trait.code matches "^[0-9]{3}$"', "has_email": "trait.email exists",
        "not_adult": "not (trait.age >= 18)"})
    eng.set_traits(1, {"age": 25, "country": "SE", "email": "x@gmail.com", "name": "Ada",
                       "code": "123"})
    assert eng.segments_of(1) == ["adult", "nordic", "mid", "gmail", "a_name", "code",
                                  "has_email"]
    # mistyped values: comparisons are false, `not` is plain negation, and `not in` holds
    # for any present value that equals no item
    eng.set_traits(2, {"age": "old", "country": 5})
    assert eng.segments_of(2) == ["not_nordic", "not_adult"]
    # missing values: every test is false
    eng.set_traits(3, {"zzz": 1})
    assert eng.segments_of(3) == ["not_adult"]


def test_scores_and_references(make_engine):
    eng = make_engine()
    eng.add_segments({"high_ltv": "sum(purchase.amount) >= 500",
                      "churn_risk": "score.churn >= 0.7 and in(high_ltv)"})
    eng.track(1, "purchase", ts=5, props={"amount": 800})
    assert eng.set_scores(1, {"churn": 0.81}) == [T(1, "churn_risk", True, 5)]
    assert eng.set_scores(1, {"churn": None}) == [T(1, "churn_risk", False, 5)]


def test_referenced_segment_flips_first_at_the_same_instant(make_engine):
    eng = make_engine()
    # `both` is defined first but depends on `recent`, so `recent` is evaluated first
    eng.add_segments({"both": "in(recent) and seen", "recent": "did(x, 10ms)"})
    assert eng.track(1, "x", ts=0) == [T(1, "recent", True, 0), T(1, "both", True, 0)]
    assert list(eng.advance(10)) == [T(1, "recent", False, 10), T(1, "both", False, 10)]


def test_bucket_uses_the_salted_stable_hash(make_engine):
    eng = make_engine(seed=3)
    eng.add_segment("holdout", "bucket(0, 999)")
    ids = list(range(200)) + ["u%d" % i for i in range(50)]
    for u in ids:
        eng.set_traits(u, {"k": 1})
    expected = sorted(eng.user_number(u) for u in ids if segcore.bucket_of(u, 3) <= 999)
    assert members(eng, "holdout") == expected
    assert 0 < len(expected) < len(ids)


# ------------------------------------------------------------------ ordering, batches
def test_time_driven_transitions_order_by_time_then_user(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(x, 10ms)")
    eng.track(2, "x", ts=0)
    eng.track(1, "x", ts=0)
    eng.track(3, "x", ts=5)
    assert list(eng.advance(100)) == [T(2, "recent", False, 10), T(1, "recent", False, 10),
                                      T(3, "recent", False, 15)]


@pytest.mark.parametrize("seed", [0, 1])
def test_timers_from_a_millisecond_to_years_ahead_fire_exactly_and_in_order(make_engine, seed):
    # windows from 1 ms to ~8 years: timers due in the next ms, in a few hours, and far
    # beyond any near horizon; time moves in steps from 1 ms to ~30 years
    day = 86_400_000
    windows = {"ms": 1, "hour": 3_600_000, "days": 250 * day, "years": 3000 * day}
    eng = make_engine()
    for name, w in windows.items():
        eng.add_segment(name, f"did({name}, {w}ms)")
    rng = np.random.default_rng(seed)
    t, order, due, exits, got = 1_700_000_000_000, [], {}, [], []
    for _ in range(60):
        user = int(rng.integers(1, 15))
        name = str(rng.choice(list(windows)))
        if user not in order:
            order.append(user)
        if (user, name) in due and due[(user, name)] <= t:
            exits.append((due[(user, name)], order.index(user), name))   # left before
        due[(user, name)] = t + windows[name]        # (re)enters, or stays in longer
        got += [x for x in eng.track(user, name, ts=t) if not x.entered]
        t += int(rng.choice([0, 1, 7, 3_600_000, 40 * day, 400 * day]))
        if rng.random() < 0.3:
            got += [x for x in eng.advance(t) if not x.entered]
    got += [x for x in eng.advance(t + 30 * 365 * day) if not x.entered]
    exits += [(d, order.index(user), name) for (user, name), d in due.items()]
    assert [(x.ts, order.index(x.user), x.segment) for x in got] == sorted(exits)
    assert all(list(eng.members(name)) == [] for name in windows)


def test_batch_user_enters_and_leaves_within_one_batch(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(x, 10ms)")
    out = eng.track_many(user=np.array([1, 2]), event=np.array(["x", "y"]),
                         ts=np.array([0, 50]))
    assert list(out) == [T(1, "recent", True, 0), T(1, "recent", False, 10)]
    assert members(eng, "recent") == []


def test_track_many_accepts_event_codes_and_datetime64(make_engine):
    eng = make_engine()
    eng.add_segment("two", "count(x) >= 2")
    if not hasattr(eng, "event_code"):
        pytest.fail("engine lacks event_code")
    code = eng.event_code("x")
    ts = np.array(["2026-01-01T00:00:00", "2026-01-01T00:00:01"], dtype="datetime64[ms]")
    out = eng.track_many(user=np.array([3, 3]), event=np.array([code, code]), ts=ts)
    assert list(out) == [T(3, "two", True, int(ts[1].astype(np.int64)))]


def test_datetime_timestamps(make_engine):
    eng = make_engine()
    eng.add_segment("any", "seen")
    when = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)
    out = eng.track(1, "x", ts=when)
    assert out == [T(1, "any", True, int(when.timestamp() * 1000))]
    assert eng.now == int(when.timestamp() * 1000)


def test_track_json(make_engine):
    eng = make_engine()
    eng.add_segment("big", "sum(purchase.amount) >= 10")
    out = eng.track_json(b'[{"user": 1, "event": "purchase", "ts": 5, "props": {"amount": 6}},'
                         b' {"user": "z", "event": "view", "ts": "1970-01-01T00:00:00.007Z"},'
                         b' {"user": 1, "event": "purchase", "ts": 8, "props": {"amount": 4}}]')
    assert list(out) == [T(1, "big", True, 8)]
    assert eng.now == 8


def test_track_json_takes_property_ints_of_any_size_like_track(make_engine):
    eng = make_engine()
    eng.add_segments({"big": "sum(buy.amount) >= 10", "huge": "max(buy.amount) > 1e30"})
    body = b'[{"user": 1, "event": "buy", "ts": 5, "props": {"amount": 9223372036854775808}},' \
        b' {"user": 2, "event": "buy", "ts": 6, "props": {"amount": %d}}]' % 10 ** 40
    assert [(t.user, t.segment) for t in eng.track_json(body)] == \
        [(1, "big"), (2, "big"), (2, "huge")]


@pytest.mark.parametrize("field, value", [
    ("user", "4294967296"), ("user", "-1"), ("user", str(2 ** 70)), ("user", "true"),
    ("user", "1.5"), ("ts", "-5"), ("ts", str(2 ** 48)), ("ts", str(2 ** 70)), ("ts", "true"),
    ("ts", "2.5")])
def test_track_json_rejects_a_bad_user_or_ts_with_its_row(make_engine, field, value):
    """Ints columns of a JSON body are taken whole when every value is a plain int; any other
    value (out of range, too large, a bool, a float) is the same error as in track_many."""
    eng = make_engine()
    eng.add_segment("all", "seen")
    eng.track(1, "x", ts=1)
    before = eng.stats()
    row = {"user": "2", "ts": "3"} | {field: value}
    body = ('[{"user": 1, "event": "x", "ts": 2}, {"user": %s, "event": "x", "ts": %s}]'
            % (row["user"], row["ts"])).encode()
    with pytest.raises(EventError) as e:
        eng.track_json(body)
    assert (e.value.index, e.value.field) == (1, field)
    assert eng.stats() == before and list(eng.members("all")) == [1] and eng.now == 1


# ------------------------------------------------------------------ ids
def test_string_ids_get_numbers_counting_down(make_engine):
    eng = make_engine()
    eng.add_segment("all", "seen")
    eng.track("alice", "x", ts=1)
    eng.track(5, "x", ts=2)
    eng.track("bob", "x", ts=3)
    assert eng.user_number("alice") == 2**32 - 1
    assert eng.user_number("bob") == 2**32 - 2
    assert eng.user_id(2**32 - 2) == "bob"
    assert members(eng, "all") == [5, 2**32 - 2, 2**32 - 1]
    with pytest.raises(EventError) as e:
        eng.track(2**32 - 1, "x", ts=4)
    assert e.value.field == "user"


def test_duplicate_message_ids_are_ignored(make_engine):
    eng = make_engine()
    eng.add_segment("two", "count(x) >= 2")
    eng.track(1, "x", ts=1, id="m1")
    assert eng.track(1, "x", ts=2, id="m1") == []
    assert eng.now == 1
    assert eng.stats()["duplicates"] == 1
    out = eng.track_many(user=[1, 1], event=["x", "x"], ts=[3, 4], id=["m1", "m2"])
    assert list(out.duplicates) == [0]
    assert list(out) == [T(1, "two", True, 4)]


# ------------------------------------------------------------------ bad input
def _snapshot_of(eng):
    return (eng.now, eng.sizes(), {k: v for k, v in eng.stats().items()
                                   if k in ("users", "events", "transitions")})


@pytest.mark.parametrize("kwargs, field, index", [
    (dict(user=[1, -1], event=["x", "x"], ts=[1, 2]), "user", 1),
    (dict(user=[1, 2**32], event=["x", "x"], ts=[1, 2]), "user", 1),
    (dict(user=[1, True], event=["x", "x"], ts=[1, 2]), "user", 1),
    (dict(user=[1, 2.5], event=["x", "x"], ts=[1, 2]), "user", 1),
    (dict(user=[1, 2], event=["x", ""], ts=[1, 2]), "event", 1),
    (dict(user=[1, 2], event=["x", "x"], ts=[1, -5]), "ts", 1),
    (dict(user=[1, 2], event=["x", "x"], ts=[1, 2**48]), "ts", 1),
    (dict(user=[1, 2], event=["x", "x"], ts=[1]), "ts", None),
    (dict(user=[1, 2], event=["purchase", "purchase"], ts=[1, 2],
          props={"amount": np.array([5, "lots"], dtype=object)}), "props.amount", 1),
])
def test_bad_batch_is_rejected_whole(make_engine, kwargs, field, index):
    eng = make_engine()
    eng.add_segments({"ltv": "sum(purchase.amount) >= 1", "any": "seen"})
    eng.track(7, "x", ts=0)
    before = _snapshot_of(eng)
    with pytest.raises(EventError) as e:
        eng.track_many(**kwargs)
    assert e.value.field == field
    assert e.value.index == index
    assert _snapshot_of(eng) == before


def test_bad_single_events(make_engine):
    eng = make_engine()
    eng.add_segment("ltv", "sum(purchase.amount) >= 1")
    for args, kwargs, field in [
        ((None, "x"), dict(ts=1), "user"),
        ((1, None), dict(ts=1), "event"),
        ((1, "x"), dict(ts="yesterday"), "ts"),
        ((1, "x"), dict(ts=1.5), "ts"),
        ((1, "purchase"), dict(ts=1, props={"amount": "5"}), "props.amount"),
        ((1, "x"), dict(ts=1, props={"nested": {"a": 1}}), "props.nested"),
    ]:
        with pytest.raises(EventError) as e:
            eng.track(*args, **kwargs)
        assert e.value.field == field, (args, kwargs)
    assert eng.stats()["events"] == 0 and eng.stats()["users"] == 0


def test_bad_single_events_of_a_known_user_and_type_change_nothing(make_engine):
    # (the common case the compiled engine takes a short path for)
    eng = make_engine()
    eng.add_segment("ltv", "sum(purchase.amount) >= 1")
    eng.add_segment("shoes", 'count(view where cat == "shoes") >= 1')
    eng.track(1, "purchase", ts=1, props={"amount": 0.5})
    eng.track(1, "view", ts=1, props={"cat": "hats"})
    before = eng.stats()
    for props, field in [({"amount": "5"}, "props.amount"), ({"amount": [1]}, "props.amount"),
                         ({"amount": 1, "x": {"a": 1}}, "props.x"),
                         ({"amount": 1, 7: "k"}, "props")]:
        with pytest.raises(EventError) as e:
            eng.track(1, "purchase", ts=2, props=props)
        assert e.value.field == field, props
    with pytest.raises(EventError) as e:
        eng.track(1, "view", ts=2, props=[("cat", "shoes")])
    assert e.value.field == "props"
    assert eng.stats() == before and eng.now == 1
    assert list(eng.members("ltv")) == [] and list(eng.members("shoes")) == []
    # accepted: numbers of any kind, a numpy string in a where-clause
    eng.track(1, "purchase", ts=3, props={"amount": np.float32(0.25)})
    eng.track(1, "purchase", ts=4, props={"amount": True})
    assert list(eng.members("ltv")) == [1]
    eng.track(1, "view", ts=5, props={"cat": np.str_("shoes")})
    assert list(eng.members("shoes")) == [1]


def test_single_events_follow_plan_changes(make_engine):
    eng = make_engine()
    eng.add_segment("a", 'count(view where cat == "x") >= 2')
    assert eng.track(1, "view", ts=1, props={"cat": "x"}) == []
    eng.add_segment("b", "sum(buy.amount) >= 3")       # new columns: a number, a filter
    assert eng.track(1, "buy", ts=2, props={"amount": 2, "cat": "x"}) == []
    assert eng.track(1, "view", ts=3, props={"cat": "x"}) == [T(1, "a", True, 3)]
    assert list(eng.replace_segment("a", "sum(buy.amount) >= 2.5")) == [T(1, "a", False, 3)]
    assert eng.track(1, "buy", ts=4, props={"amount": 1.5}) == [T(1, "a", True, 4),
                                                                 T(1, "b", True, 4)]
    eng.remove_segment("a")
    assert eng.track(1, "buy", ts=5, props={"amount": -9}) == [T(1, "b", False, 5)]
    assert eng.track(1, "view", ts=6) == [] and eng.stats()["events"] == 6


def test_new_users_one_event_at_a_time_match_a_batch(make_engine):
    one, batch = make_engine(seed=3), make_engine(seed=3)
    for eng in (one, batch):
        eng.add_segments({"hold": "bucket(0, 4999)", "seen": "seen",
                          "vip": 'trait.tier == "gold"'})
        eng.set_traits(7, {"tier": "gold"})          # a user known before its first event
    for u in range(40):
        one.track(u, "x", ts=u, props={"n": u})
    batch.track_many(user=list(range(40)), event=["x"] * 40, ts=list(range(40)))
    for name in ("hold", "seen", "vip"):
        assert list(one.members(name)) == list(batch.members(name)), name
    assert 0 < one.size("hold") < 40 and one.size("seen") == 40
    assert one.stats()["users"] == batch.stats()["users"] == 40
    one.track("ann", "x", ts=50)                     # a string id's number is no int user's
    assert one.user_number("ann") >= 40 and one.size("seen") == 41


def test_a_number_too_large_for_a_float_is_rejected_and_changes_nothing(make_engine):
    eng = make_engine()
    eng.add_segment("ltv", "sum(purchase.amount) >= 1")
    eng.track(1, "purchase", ts=1, props={"amount": 0.5})
    before = eng.stats()
    for user in (1, 2):                      # a known user, and one not yet seen
        with pytest.raises(EventError) as e:
            eng.track(user, "purchase", ts=2, props={"amount": 10 ** 400})
        assert e.value.field == "props.amount" and "fit in a float" in e.value.reason
    with pytest.raises(EventError) as e:
        eng.track_many(user=[1, 3], event=["purchase"] * 2, ts=[2, 3],
                       props={"amount": [1, 2 ** 1024]})
    assert (e.value.index, e.value.field) == (1, "props.amount")
    assert eng.stats() == before and eng.now == 1 and list(eng.members("ltv")) == []
    eng.track(1, "view", ts=4, props={"amount": 10 ** 400})     # no rule reads it here
    assert eng.stats()["events"] == 2


def test_bad_json_reports_the_row(make_engine):
    eng = make_engine()
    eng.add_segment("any", "seen")
    with pytest.raises(EventError) as e:
        eng.track_json(b'[{"user": 1, "event": "x", "ts": 1}, {"user": 1, "event": "x"}]')
    assert e.value.index == 1
    with pytest.raises(EventError):
        eng.track_json(b'[{"user": 1, "event": "x", "ts": 1}')
    assert eng.stats()["events"] == 0


@pytest.mark.parametrize("body", [
    b'[{"user": 1, "event": "\xff", "ts": 2}]',            # bytes that are not UTF-8
    '[{"user": 1, "event": "\ud800", "ts": 2}]',           # a str with a lone surrogate
])
def test_json_that_is_not_unicode_is_an_event_error(make_engine, body):
    eng = make_engine()
    eng.add_segment("any", "seen")
    eng.track(1, "x", ts=1)
    before = eng.stats()
    with pytest.raises(EventError, match="invalid JSON"):
        eng.track_json(body)
    assert eng.stats() == before and eng.now == 1 and list(eng.members("any")) == [1]


@pytest.mark.parametrize("batch", [False, True])
def test_the_last_millisecond_before_2_48_is_exact(make_engine, engine_kind, batch):
    """With compact_rows the kernel packs counters in 48 bits; the last valid ts (2**48 - 1)
    does not fit, and must change nothing about the answers (the kernel then keeps int64
    rows)."""
    last = 2**48 - 1
    eng = make_engine(compact_rows=True)
    eng.add_segments({"recent": "did(x, 1h)", "three": "count(x) >= 3",
                      "new": "first_seen >= now - 7d", "quiet": "seen and inactive(1h)"})
    eng.track(1, "x", ts=last - 3 * 3_600_000)
    eng.track(1, "x", ts=last - 2)
    assert sorted(eng.members("recent")) == [1] and not list(eng.members("three"))
    if engine_kind == "kernel":
        assert eng._kernel.packed

    def send(user, ts):
        if batch:
            return eng.track_many(user=[user], event=["x"], ts=[ts])
        return eng.track(user, "x", ts=ts)

    got = send(1, last)
    assert [(t.user, t.segment, t.entered, t.ts) for t in got] == [(1, "three", True, last)]
    if engine_kind == "kernel":
        assert not eng._kernel.packed
    got = send(2, last)
    assert sorted((t.segment, t.entered) for t in got) == [("new", True), ("recent", True)]
    assert sorted(eng.members("recent")) == [1, 2] and sorted(eng.members("three")) == [1]
    assert sorted(eng.members("new")) == [1, 2] and not list(eng.members("quiet"))
    got = send(3, last - 1)                 # late, after the rows changed form
    assert sorted(t.segment for t in got) == ["new", "recent"]
    assert eng.now == last and eng.stats()["events"] == 5


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_compact_rows_must_be_a_bool(make_engine, bad):
    with pytest.raises(SegcoreError, match="compact_rows must be True or False"):
        make_engine(compact_rows=bad)


def test_compact_rows_are_packed_unless_the_plan_has_predictive_scores():
    eng = Engine(compact_rows=True)
    eng.add_segment("two", "count(x) >= 2")
    assert eng._kernel.packed and not Engine()._new_kernel(eng._plan).packed
    pred = Engine(compact_rows=True, predictive=True)
    pred.add_segment("two", "count(x) >= 2")
    assert not pred._kernel.packed
    for e in (eng, pred):
        e.track_many(user=[1, 1, 2], event=["x", "x", "x"], ts=[1, 2, 3])
        assert list(e.members("two")) == [1]


def test_rule_errors_leave_segments_unchanged(make_engine):
    eng = make_engine()
    eng.add_segment("a", "seen")
    with pytest.raises(RuleError) as e:
        eng.add_segments({"b": "count(purchase, 90d) >= 3", "c": "cnt(x) > 1"})
    assert e.value.segment == "c" and (e.value.line, e.value.column) == (1, 1)
    assert "did you mean `count`" in str(e.value)
    with pytest.raises(RuleError, match="already exists"):
        eng.add_segment("a", "seen")
    with pytest.raises(RuleError, match="cycle"):
        eng.add_segments({"p": "in(q)", "q": "in(p)"})
    with pytest.raises(RuleError, match="unknown segment `vipp`"):
        eng.add_segment("d", "in(vipp)")
    assert list(eng.segments) == ["a"]


def test_clock_mode_rejects_far_future_and_advances_itself(make_engine):
    now = [1000.0]
    eng = make_engine(clock=lambda: now[0], max_future="5m")
    eng.add_segment("recent", "did(x, 1m)")
    eng.track(1, "x", ts=1000 * 1000)
    with pytest.raises(EventError) as e:
        eng.track(1, "x", ts=1000 * 1000 + 5 * 60_000 + 1)
    assert e.value.field == "ts"
    now[0] = 1000.0 + 61
    # the next call first catches up with the clock, so the exit is seen
    eng.set_traits(2, {"a": 1})
    assert members(eng, "recent") == []
    assert eng.now == 1_061_000


# ------------------------------------------------------------------ callbacks, reads
def test_callbacks_fire_and_errors_are_counted(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(x, 10ms)")
    seen = []

    @eng.on_enter("recent")
    def hello(t):
        seen.append(("in", t.user, t.ts))

    def boom(t):
        raise RuntimeError("callback failure")

    eng.on_exit("recent", boom)
    eng.track(1, "x", ts=0)
    eng.advance(100)
    assert seen == [("in", 1, 0)]
    assert eng.stats()["callback_errors"] == 1
    assert eng.segments_of(1) == []


def test_query_sizes_and_remove(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "count(x) >= 1", "b": "count(y) >= 1"})
    eng.track(1, "x", ts=1)
    eng.track(2, "y", ts=1)
    eng.track(3, "x", ts=1)
    eng.track(3, "y", ts=1)
    assert sorted(eng.query("a & b")) == [3]
    assert sorted(eng.query("a - b | b & ~a")) == [1, 2]
    assert sorted(eng.query("~(a | b)")) == []
    assert eng.sizes() == {"a": 2, "b": 2}
    with pytest.raises(RuleError, match="unknown segment `c`"):
        eng.query("a & c")
    eng.remove_segment("b")
    assert eng.sizes() == {"a": 2}
    with pytest.raises(RuleError):
        eng.size("b")


def test_add_segment_later_is_exact_from_shared_state(make_engine):
    eng = make_engine()
    eng.add_segment("fb", "count(purchase, 90d) >= 3")
    for d in (1, 2, 3):
        eng.track(1, "purchase", ts=d * D)
    # the same counter with a smaller threshold: back-filled from the kept state
    out = eng.add_segment("fb2", "count(purchase, 90d) >= 2")
    assert list(out) == [T(1, "fb2", True, 3 * D)]
    # trait segments added later see existing traits
    eng.set_traits(1, {"country": "SE"})
    assert list(eng.add_segment("se", 'trait.country == "SE" and in(fb)')) == [
        T(1, "se", True, 3 * D)]


def test_remove_referenced_segment_is_refused(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "seen", "b": "in(a)"})
    with pytest.raises(RuleError, match="referenced by `b`"):
        eng.remove_segment("a")


def test_rejected_call_does_not_move_the_clock(make_engine):
    now = [10.0]
    eng = make_engine(clock=lambda: now[0])
    eng.add_segment("recent", "did(x, 1s)")
    eng.track(1, "x", ts=10_000)
    now[0] = 20.0
    with pytest.raises(EventError):
        eng.track(1, "x", ts=-1)
    with pytest.raises(EventError):
        eng.set_traits(1, {"bad": object()})
    # the exit at 11 s was not consumed by the rejected calls: the next call reports it
    assert list(eng.advance(0)) == [T(1, "recent", False, 11_000)]
    assert eng.now == 20_000


def test_reads_catch_up_with_the_clock(make_engine):
    now = [10.0]
    exits = []
    eng = make_engine(clock=lambda: now[0])
    eng.add_segment("recent", "did(x, 1s)")
    eng.on_exit("recent", exits.append)
    eng.track(1, "x", ts=10_000)
    now[0] = 12.0
    assert members(eng, "recent") == [] and eng.size("recent") == 0
    # callbacks receive Firing objects (docs/triggers.md): Transition-like fields
    assert [(f.user, f.segment, f.entered, f.ts) for f in exits] == [(1, "recent", False, 11_000)]
    assert eng.now == 12_000


def test_transitions_a_read_caught_up_are_returned_by_the_next_call(make_engine):
    """Reads catch up with the clock; the transitions that causes are not lost: the next call
    that returns transitions returns them first (except a forgotten user's)."""
    now = [10.0]
    eng = make_engine(clock=lambda: now[0])
    eng.add_segment("recent", "did(x, 1s)")
    eng.track(1, "x", ts=10_000)
    eng.track("ann", "x", ts=10_000)
    eng.track(2, "x", ts=10_500)
    now[0] = 11.2
    assert eng.size("recent") == 1                       # 1 and ann left at 11 000
    assert eng.forget("ann") is True
    now[0] = 11.4
    assert eng.now == 11_400
    out = eng.track(3, "x", ts=11_400)
    assert [(t.user, t.entered, t.ts) for t in out] == [(1, False, 11_000), (3, True, 11_400)]
    now[0] = 12.0
    assert eng.segments_of(2) == []
    assert [(t.user, t.entered, t.ts) for t in eng.advance(0)] == [(2, False, 11_500)]
    assert list(eng.advance(0)) == []


def test_ints_beyond_64_bits_are_rejected_and_change_nothing(make_engine):
    eng = make_engine()
    eng.add_segment("vip", "trait.level >= 1")
    eng.track(1, "x", ts=1, id="a")
    with pytest.raises(EventError) as e:
        eng.set_traits(1, {"level": 2 ** 64})
    assert (e.value.field, e.value.reason) == ("traits.level",
                                               f"trait `level` must fit in 64 bits, got {2 ** 64}")
    with pytest.raises(EventError) as e:
        eng.track_many(user=[2, 3], event=["x", "x"], ts=[2, 3], id=["b", 2 ** 63])
    assert (e.value.index, e.value.field) == (1, "id")
    assert "must fit in 64 bits" in e.value.reason
    assert eng.size("vip") == 0 and eng.stats()["users"] == 1
    # `b` was not remembered by the rejected batch
    assert len(eng.track_many(user=[2], event=["x"], ts=[4], id=["b"]).duplicates) == 0


def test_duplicate_rows_create_no_user(make_engine):
    eng = make_engine()
    eng.add_segment("any", "seen")
    eng.track(1, "x", ts=1, id="m")
    out = eng.track_many(user=["new_user"], event=["x"], ts=[2], id=["m"])
    assert list(out.duplicates) == [0] and list(out) == []
    assert eng.stats()["users"] == 1
    with pytest.raises(KeyError):
        eng.user_number("new_user")


def test_bools_are_numbers(make_engine):
    eng = make_engine()
    eng.add_segments({"opens": "sum(email.opened) >= 2", "flag": "count(x where f == 1) >= 1",
                      "vip": "trait.vip == 1", "kinds": "distinct(y.v) >= 2"})
    eng.track(1, "email", ts=1, props={"opened": True})
    assert eng.track(1, "email", ts=2, props={"opened": True}) == [T(1, "opens", True, 2)]
    assert eng.track(1, "x", ts=3, props={"f": True}) == [T(1, "flag", True, 3)]
    assert eng.set_traits(1, {"vip": True}) == [T(1, "vip", True, 3)]
    eng.track(1, "y", ts=4, props={"v": True})
    assert eng.track(1, "y", ts=5, props={"v": 1}) == []     # true and 1 are the same value
    assert eng.track(1, "y", ts=6, props={"v": False}) == [T(1, "kinds", True, 6)]


def test_forget_erases_the_user_everywhere(make_engine):
    eng = make_engine()
    eng.add_segments({"buyers": "did(purchase)", "recent": "did(x, 1h)",
                      "se": 'trait.country == "SE"', "risky": "score.churn >= 0.5"})
    eng.add_trigger("later", "recent", after="30m")
    eng.track("ann", "purchase", ts=1)
    eng.track("ann", "x", ts=2)
    eng.set_traits("ann", {"country": "SE"})
    eng.set_scores("ann", {"churn": 0.9})
    eng.track(7, "x", ts=3)
    number = eng.user_number("ann")
    assert eng.forget("ann") is True
    assert eng.forget("ann") is False and eng.forget(12345) is False
    assert eng.segments_of("ann") == []
    assert all(number not in eng.members(s) for s in eng.segments)
    assert eng.stats()["users"] == 1
    with pytest.raises(KeyError):
        eng.user_number("ann")
    # the pending firing went with the user; user 7's still comes
    eng.advance(2 * H)
    assert [(f.user, f.trigger) for f in eng.drain_firings()] == [(7, "later")]
    # the id may come back: a brand-new user with no history and a new number
    assert eng.track("ann", "x", ts=3 * H) == [T("ann", "recent", True, 3 * H)]
    assert eng.user_number("ann") != number
    assert eng.segments_of("ann") == ["recent"]


def test_replace_segment_reports_the_changes(make_engine):
    eng = make_engine()
    eng.add_segments({"big": "sum(purchase.amount) >= 100", "vip": "in(big) and seen"})
    got = []
    eng.on_exit("vip", got.append)
    eng.track(1, "purchase", ts=5, props={"amount": 60})
    eng.track(2, "purchase", ts=6, props={"amount": 150})
    assert list(eng.replace_segment("big", "sum(purchase.amount) >= 50")) == [
        T(1, "big", True, 6), T(1, "vip", True, 6)]
    out = eng.replace_segment("big", "sum(purchase.amount) >= 200")
    assert list(out) == [T(1, "big", False, 6), T(1, "vip", False, 6),
                         T(2, "big", False, 6), T(2, "vip", False, 6)]
    assert [(f.user, f.ts) for f in got] == [(1, 6), (2, 6)]     # triggers stay registered
    assert eng.segments["big"] == "sum(purchase.amount) >= 200"
    assert list(eng.segments) == ["big", "vip"]
    with pytest.raises(RuleError, match="cycle"):
        eng.replace_segment("big", "in(vip)")
    with pytest.raises(RuleError, match="unknown segment `bigg`"):
        eng.replace_segment("bigg", "seen")
    assert eng.segments["big"] == "sum(purchase.amount) >= 200" and eng.size("big") == 0


def test_alias_merges_profiles(make_engine):
    eng = make_engine()
    eng.add_segments({"two": "count(purchase, 1h) >= 2", "spend": "sum(purchase.amount) >= 30",
                      "carts": "abandoned(cart, purchase, 1h)", "se": 'trait.country == "SE"',
                      "first": "first_seen <= 1"})
    eng.track("dev-1", "purchase", ts=1, props={"amount": 20})
    eng.track("dev-1", "cart", ts=5)
    eng.set_traits("dev-1", {"country": "SE", "tier": "gold"})
    eng.track(42, "purchase", ts=10, props={"amount": 15})
    eng.set_traits(42, {"tier": "silver"})
    out = eng.alias(42, "dev-1")
    assert list(out) == [T(42, "two", True, 10), T(42, "spend", True, 10),
                         T(42, "se", True, 10), T(42, "first", True, 10)]
    assert eng.segments_of("dev-1") == [] and eng.stats()["users"] == 1
    # the merged profile behaves as if 42 had sent everything: the cart (5) is older than the
    # latest purchase (10), so no abandonment; one window expiry at 1 + 1h
    assert list(eng.advance(2 * H)) == [T(42, "two", False, 1 + H)]
    with pytest.raises(EventError):
        eng.alias(42, 42)
    assert list(eng.alias(42, "nobody")) == []


def test_single_events_and_batches_are_counted_alike(make_engine):
    eng = make_engine()
    eng.add_segment("s", 'count(view where cat == "x") >= 2')
    for t in range(5):
        eng.track(t % 2, "view", ts=t, props={"cat": "x"})
        assert eng.stats()["events"] == t + 1
    eng.track_many(user=[1, 2], event=["view", "view"], ts=[6, 7])
    eng.track(3, "view", ts=8)
    assert eng.stats()["events"] == 8 and eng.stats()["transitions"] == 2


def test_a_forgotten_user_never_comes_back_through_a_re_evaluation(make_engine):
    """A forgotten user's slot holds nothing, and re-evaluating everyone (a new segment, a
    replaced one, traits) must not make it a member of a segment true of "nobody", such as
    ``not seen`` or a bucket range: it used to come back as user 0."""
    eng = make_engine()
    eng.add_segments({"seen": "seen", "quiet": "not did(x, 10ms)"})
    eng.track(5, "x", ts=1)
    eng.track("ann", "x", ts=2)
    eng.track(7, "x", ts=3)
    assert eng.forget(5) and eng.forget("ann")
    assert list(eng.add_segment("never", "not seen")) == []
    assert list(eng.add_segment("all", "bucket(0, 9999)")) == [T(7, "all", True, 3)]
    assert list(eng.advance(20)) == [T(7, "quiet", True, 13)]
    assert list(eng.replace_segment("never", "not seen or bucket(0, 9999)")) == \
        [T(7, "never", True, 20)]
    eng.set_traits(7, {"tier": "gold"})
    assert list(eng.add_segment("gold", 'not (trait.tier == "gold")')) == []
    for name in ("never", "all", "quiet", "seen"):
        assert list(eng.members(name)) == [7], name
    assert eng.stats()["users"] == 1


@pytest.mark.parametrize("n", [5, 600, 3000])
def test_bitmaps_follow_large_and_small_batches(make_engine, n):
    """Members after a batch of n transitions (a few, some hundreds, thousands: the compiled
    engine updates its bitmaps one member at a time or by sorted groups) are the kernel's."""
    eng = make_engine()
    eng.add_segments({"recent": "did(x, 10ms)", "twice": "count(x) >= 2"})
    users = list(range(n))
    out = eng.track_many(user=users + users[::2], event=["x"] * (n + len(users[::2])),
                         ts=[1] * n + [2] * len(users[::2]))
    assert len(out) == n + len(users[::2])
    assert list(eng.members("recent")) == users
    assert list(eng.members("twice")) == users[::2]
    out = eng.advance(11)                        # the odd users leave at 11, the even at 12
    assert sorted(t.user for t in out) == users[1::2] and not any(t.entered for t in out)
    assert list(eng.members("recent")) == users[::2]
    eng.track_many(user=users[1::2], event=["x"] * len(users[1::2]), ts=[12] * len(users[1::2]))
    assert list(eng.members("recent")) == users[1::2] and eng.size("twice") == n


def test_members_after_unread_batches_then_plan_changes_and_forget(make_engine):
    """Batches nobody reads in between (the compiled engine brings its bitmaps up to date on
    the next read), then a plan change and a forget, which renumber segments and users."""
    eng = make_engine()
    eng.add_segments({"a": "count(x) >= 1", "b": "did(y, 10ms)", "c": "count(y) >= 2"})
    users = list(range(40))
    eng.track_many(user=users, event=["x"] * 40, ts=[1] * 40)
    eng.track_many(user=users[::2], event=["y"] * 20, ts=[2] * 20)
    eng.track_many(user=users[::4], event=["y"] * 10, ts=[3] * 10)
    eng.remove_segment("b")                     # c's index moves down
    assert list(eng.members("c")) == users[::4]
    eng.track_many(user=users[1::4] * 2, event=["y"] * 20, ts=[4] * 20)
    eng.add_segments({"d": "count(x) >= 2"})
    eng.track_many(user=[3, 3, 0, 8], event=["x"] * 4, ts=[5] * 4)   # 3, 0 and 8 enter d
    eng.forget(8)                               # right after a batch that moved 8
    eng.track_many(user=[1000, 9], event=["x", "y"], ts=[6, 6])
    assert list(eng.members("a")) == [u for u in users if u != 8] + [1000]
    assert list(eng.members("c")) == sorted(set(users[::4] + users[1::4]) - {8})
    assert list(eng.members("d")) == [0, 3]
    assert eng.sizes() == {"a": 40, "c": 19, "d": 2}


def test_alias_with_a_clock_returns_what_catching_up_caused_first(make_engine):
    """alias catches up with the clock first: the transitions that causes come first, the
    merged-away user's under its own id (it existed then), and never under another's."""
    now = [10.0]
    eng = make_engine(clock=lambda: now[0])
    eng.add_segment("r", "did(x, 1s)")
    for user, ts in ((1, 10_000), (5, 10_000), (9, 10_500), (0, 10_900)):
        eng.track(user, "x", ts=ts)
    now[0] = 11.2                               # 1 and 5 left at 11 000
    out = eng.alias(9, 5)
    assert [(t.user, t.segment, t.entered, t.ts) for t in out] == [(1, "r", False, 11_000),
                                                                  (5, "r", False, 11_000)]
    assert members(eng, "r") == [0, 9]
    assert eng.sizes() == {"r": 2}


def test_a_single_event_returns_the_expiries_it_moves_time_past_for_every_user(make_engine):
    """One event moves time: the other users' timers due by then fire first, and their
    transitions come back with it, string ids as strings, the bitmaps updated."""
    eng = make_engine()
    eng.add_segments({"recent": "did(x, 10ms)", "twice": "count(x) >= 2"})
    eng.track("ann", "x", ts=1)
    eng.track(7, "x", ts=2)
    out = eng.track(7, "x", ts=11)
    assert [(t.user, t.segment, t.entered, t.ts) for t in out] == [
        ("ann", "recent", False, 11), (7, "twice", True, 11)]
    assert list(eng.members("recent")) == [7] and list(eng.members("twice")) == [7]
    assert eng.stats()["transitions"] == 4
