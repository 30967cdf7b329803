"""Triggers, journeys, caps and firings (docs/triggers.md), pinned edge by edge on both engines,
plus a randomised differential test of the compiled engine against the reference engine."""

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcore
import segcore_ref
from segcore import Firing, RuleError, SegcoreError, Transition

H = 3_600_000
D = 24 * H
T0 = 1000 * D            # a start far from 0, so that windows never reach before the epoch



def F(user, segment, entered, ts, trigger, reason, delivered=True, suppressed_by=None,
      channel=None, journey=None, step=None):
    return Firing(user, segment, entered, ts, trigger, reason, delivered, suppressed_by, channel,
                  journey, step)


def tup(firings):
    """Firings as tuples of all their fields (exact, whichever module defines the type)."""
    out = []
    for f in firings:
        assert type(f).__name__ == "Firing"
        out.append(msgspec.structs.astuple(f))
    return out


def T(user, seg, entered, ts):
    return Transition(user, seg, entered, ts)


def J(journey, k, user, segment, ts, channel=None, delivered=True, suppressed_by=None):
    """A journey step's firing."""
    return F(user, segment, True, ts, f"{journey}:{k}", f"journey {journey} step {k + 1}",
             delivered, suppressed_by, channel, journey, k)


def pulse(eng, user, t, event="x"):
    """One event at ``t``: with segment ``did(x, 1ms)`` the user enters at t and leaves at t+1."""
    return list(eng.track(user, event, ts=t))


# ------------------------------------------------------------------ immediate triggers
def test_immediate_enter_and_exit_firings(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(x, 1h)")
    got = []
    eng.on_enter("recent", got.append)
    eng.on_exit("recent", got.append)
    assert list(eng.track(1, "x", ts=T0)) == [T(1, "recent", True, T0)]
    assert list(eng.advance(T0 + 2 * H)) == [T(1, "recent", False, T0 + H)]
    expected = [F(1, "recent", True, T0, "recent:enter:0", "entered recent"),
                F(1, "recent", False, T0 + H, "recent:exit:1", "left recent")]
    assert tup(got) == tup(expected)
    assert tup(eng.drain_firings()) == tup(expected)
    assert eng.drain_firings() == []
    st_ = eng.stats()
    assert (st_["firings"], st_["suppressed"], st_["firings_dropped"]) == (2, 0, 0)


def test_on_enter_returns_fn_and_decorator(make_engine):
    eng = make_engine()
    eng.add_segment("recent", "did(x, 1h)")

    def f(firing):
        pass

    assert eng.on_enter("recent", f) is f

    @eng.on_exit("recent", name="bye")
    def g(firing):
        pass

    assert callable(g) and g.__name__ == "g"
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + H)
    assert [x.trigger for x in eng.drain_firings()] == ["recent:enter:0", "bye"]


def test_callbacks_receive_firings_after_the_call_in_order(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "did(x, 1h)", "b": "did(x, 2h)"})
    calls = []
    # registered on b first: within one evaluation firings follow registration order
    eng.on_enter("b", lambda f: calls.append((f.trigger, eng.segments_of(1))), name="tb")
    eng.on_enter("a", lambda f: calls.append((f.trigger, eng.segments_of(1))), name="ta")
    assert list(eng.track(1, "x", ts=T0)) == [T(1, "a", True, T0), T(1, "b", True, T0)]
    # both ran after all state was updated, in firing (= registration) order
    assert calls == [("tb", ["a", "b"]), ("ta", ["a", "b"])]


def test_registered_later_does_not_fire_for_users_already_in(make_engine):
    eng = make_engine()
    eng.add_segment("s", 'trait.on == 1')
    eng.set_traits(1, {"on": 1})
    eng.advance(T0)
    eng.add_trigger("now", "s")
    eng.add_trigger("later", "s", after="1h")
    eng.add_trigger("out", "s", on="exit")
    eng.advance(T0 + 5 * H)
    assert eng.drain_firings() == []
    eng.set_traits(1, {"on": None})
    eng.set_traits(2, {"on": 1})
    assert tup(eng.drain_firings()) == tup([
        F(1, "s", False, T0 + 5 * H, "out", "left s"),
        F(2, "s", True, T0 + 5 * H, "now", "entered s")])
    eng.advance(T0 + 7 * H)
    assert tup(eng.drain_firings()) == tup([
        F(2, "s", True, T0 + 6 * H, "later", "in s for 1h")])


# ------------------------------------------------------------------ delayed triggers
def test_delayed_fires_exactly_after(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 2h)")
    got = []
    eng.on_enter("s", got.append, after="1h")
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + H - 1)
    assert eng.drain_firings() == [] and got == []
    assert list(eng.advance(T0 + H)) == []          # no transition, only a firing
    expected = [F(1, "s", True, T0 + H, "s:enter:0", "in s for 1h")]
    assert tup(eng.drain_firings()) == tup(expected)
    assert tup(got) == tup(expected)


def test_delayed_reported_at_its_instant_when_time_jumps(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 2h)")
    eng.add_trigger("t", "s", after="90m")
    eng.track(1, "x", ts=T0)
    # the exit at T0 + 2h comes after the firing at T0 + 90m: both found by one jump
    assert list(eng.advance(T0 + 10 * D)) == [T(1, "s", False, T0 + 2 * H)]
    assert tup(eng.drain_firings()) == tup([F(1, "s", True, T0 + 90 * 60_000, "t",
                                                "in s for 90m")])


def test_delayed_reason_renders_the_duration(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1d)")
    eng.add_trigger("a", "s", after=1500)
    eng.add_trigger("b", "s", after="2d")      # never: the user leaves after 1d
    eng.add_trigger("c", "s", after="60m")     # the largest exact unit: 1h
    eng.add_trigger("d", "s", on="exit", after="1w")
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + 30 * D)
    assert tup(eng.drain_firings()) == tup([
        F(1, "s", True, T0 + 1500, "a", "in s for 1500ms"),
        F(1, "s", True, T0 + H, "c", "in s for 1h"),
        F(1, "s", False, T0 + D + 7 * D, "d", "out of s for 1w")])


def test_exit_at_exactly_the_deadline_cancels(make_engine):
    eng = make_engine()
    # in for exactly [T0, T0 + 1h): the exit at T0 + 1h cancels the firing due then
    eng.add_segments({"one": "did(x, 1h)", "two": "did(x, 2h)", "half": "did(x, 30m)"})
    for seg in ("one", "two", "half"):
        eng.add_trigger(seg, seg, after="1h")
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + 5 * H)
    assert tup(eng.drain_firings()) == tup([F(1, "two", True, T0 + H, "two", "in two for 1h")])


def test_exit_one_ms_before_the_deadline_cancels(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 3599999ms)")
    eng.add_trigger("t", "s", after="1h")
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + D)
    assert eng.drain_firings() == []


def test_reentry_restarts_the_wait(make_engine):
    eng = make_engine()
    eng.add_segment("s", "trait.on == 1")
    eng.add_trigger("t", "s", after="1h")
    eng.advance(T0)
    eng.set_traits(1, {"on": 1})
    eng.advance(T0 + 30 * 60_000)
    eng.set_traits(1, {"on": 0})                  # out: cancelled
    eng.advance(T0 + 40 * 60_000)
    eng.set_traits(1, {"on": 1})                  # in again: a new wait of 1h
    eng.advance(T0 + H)                           # the first deadline: nothing
    assert eng.drain_firings() == []
    eng.advance(T0 + 100 * 60_000 - 1)
    assert eng.drain_firings() == []
    eng.advance(T0 + 100 * 60_000)
    assert tup(eng.drain_firings()) == tup([F(1, "s", True, T0 + 100 * 60_000, "t",
                                                "in s for 1h")])


def test_exit_and_reentry_at_one_instant_restart_the_wait(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1h)")
    eng.add_trigger("t", "s", after="90m")
    eng.track(1, "x", ts=T0)
    # time-driven exit at T0 + 1h, then the event re-enters at T0 + 1h
    assert list(eng.track(1, "x", ts=T0 + H)) == [T(1, "s", False, T0 + H),
                                                  T(1, "s", True, T0 + H)]
    eng.track(1, "x", ts=T0 + 2 * H)             # exit + re-entry again
    eng.track(1, "x", ts=T0 + 3 * H - 1)         # still in (no exit): the wait goes on
    eng.advance(T0 + 10 * H)
    assert tup(eng.drain_firings()) == tup([F(1, "s", True, T0 + 2 * H + 90 * 60_000, "t",
                                                "in s for 90m")])


def test_event_driven_exit_at_the_deadline_comes_after_the_firing(make_engine):
    # Resolution of the contract: a firing due at t is produced by the time-driven processing
    # of t, which comes before an event applied at t; only an exit found by that same
    # evaluation (a time-driven exit at t) cancels it.
    eng = make_engine()
    eng.add_segment("s", "trait.on == 1 and count(stop) == 0")
    eng.add_trigger("t", "s", after="1h")
    eng.advance(T0)
    eng.set_traits(1, {"on": 1})
    assert list(eng.track(1, "stop", ts=T0 + H)) == [T(1, "s", False, T0 + H)]
    assert tup(eng.drain_firings()) == tup([F(1, "s", True, T0 + H, "t", "in s for 1h")])


def test_event_at_the_deadline_first_delivers_the_due_firings(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1h)")
    got = []
    eng.on_enter("s", got.append, after="30m", name="late")
    eng.on_enter("s", got.append, name="now")
    eng.track(1, "x", ts=T0)
    eng.track(2, "x", ts=T0 + 1)
    got.clear()
    eng.drain_firings()
    # an event of the same user at exactly the deadline (no transition): the firing is due
    # at T0 + 30m and is delivered by this very call
    assert list(eng.track(1, "x", ts=T0 + 30 * 60_000)) == []
    expected = [F(1, "s", True, T0 + 30 * 60_000, "late", "in s for 30m")]
    assert tup(got) == tup(expected)
    assert tup(eng.drain_firings()) == tup(expected)
    # another user's event at exactly user 2's deadline: the time-driven firing comes first
    got.clear()
    assert list(eng.track(3, "x", ts=T0 + 1 + 30 * 60_000)) == [
        T(3, "s", True, T0 + 1 + 30 * 60_000)]
    expected = [F(2, "s", True, T0 + 1 + 30 * 60_000, "late", "in s for 30m"),
                F(3, "s", True, T0 + 1 + 30 * 60_000, "now", "entered s")]
    assert tup(got) == tup(expected)
    assert tup(eng.drain_firings()) == tup(expected)


def test_cap_counts_deliveries_since_it_was_set(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s", channel="email")
    pulse(eng, 1, T0)
    pulse(eng, 1, T0 + 10)
    eng.cap("email", max_per=(1, "1d"))       # the two deliveries before it do not count
    pulse(eng, 1, T0 + 20)
    pulse(eng, 1, T0 + 30)
    assert [(f.ts - T0, f.suppressed_by) for f in eng.drain_firings()] == [
        (0, None), (10, None), (20, None), (30, "cap:email")]


def test_delayed_exit_trigger(make_engine):
    eng = make_engine()
    eng.add_segment("s", "trait.on == 1")
    eng.add_trigger("gone", "s", on="exit", after="1h")
    eng.advance(T0)
    eng.set_traits(1, {"on": 1})
    eng.set_traits(2, {"on": 1})
    eng.set_traits(1, {"on": 0})                  # 1 out at T0
    eng.advance(T0 + H // 2)
    eng.set_traits(2, {"on": 0})                  # 2 out at T0 + 30m ...
    eng.advance(T0 + H)
    eng.set_traits(2, {"on": 1})                  # ... and back in at T0 + 1h: cancelled
    eng.advance(T0 + 5 * H)
    assert tup(eng.drain_firings()) == tup([F(1, "s", False, T0 + H, "gone",
                                                "out of s for 1h")])


def test_thousands_of_timers_due_at_one_instant(make_engine):
    eng = make_engine()
    eng.add_segment("carted", "did(add_to_cart, 1d)")
    eng.add_trigger("remind", "carted", after="1h")
    n = 3000
    users = [(i * 7919) % n for i in range(n)]   # a permutation: appearance order != id order
    out = eng.track_many(user=np.array(users), event=np.array(["add_to_cart"] * n),
                         ts=np.full(n, T0, dtype=np.int64))
    assert len(out) == n
    eng.advance(T0 + H - 1)
    assert eng.drain_firings() == []
    assert list(eng.advance(T0 + 2 * H)) == []
    got = eng.drain_firings()
    assert [f.user for f in got] == users
    assert {f.ts for f in got} == {T0 + H}
    assert tup(got[:1]) == tup([F(users[0], "carted", True, T0 + H, "remind",
                                  "in carted for 1h")])
    assert eng.stats()["firings"] == n


def test_registration_catches_up_with_the_clock(make_engine):
    now = [10.0]
    eng = make_engine(clock=lambda: now[0])
    eng.add_segment("recent", "did(x, 1s)")
    eng.track(1, "x", ts=10_000)
    now[0] = 12.0
    eng.add_trigger("out", "recent", on="exit")     # the exit at 11 s happened before it
    eng.track(1, "x", ts=12_500)
    now[0] = 20.0
    assert tup(eng.drain_firings()) == tup([F(1, "recent", False, 13_500, "out",
                                                "left recent")])


# ------------------------------------------------------------------ order
def test_firing_order_follows_processing_order(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "did(x, 1h)", "b": "did(y, 1h)"})
    eng.add_trigger("a_out", "a", on="exit")
    eng.add_trigger("b_in", "b")
    eng.add_trigger("a_late", "a", after="1h")     # never (exit at the deadline)
    eng.track(2, "x", ts=T0)
    eng.track(1, "x", ts=T0)
    eng.track(3, "y", ts=T0 + 1)
    # at T0 + 1h: time-driven exits of 2 then 1 (first appearance), then the event of 1
    out = eng.track(1, "y", ts=T0 + H)
    assert list(out) == [T(2, "a", False, T0 + H), T(1, "a", False, T0 + H),
                         T(1, "b", True, T0 + H)]
    assert tup(eng.drain_firings()) == tup([
        F(3, "b", True, T0 + 1, "b_in", "entered b"),
        F(2, "a", False, T0 + H, "a_out", "left a"),
        F(1, "a", False, T0 + H, "a_out", "left a"),
        F(1, "b", True, T0 + H, "b_in", "entered b")])


def test_firings_of_one_evaluation_follow_registration_order(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "did(x, 1h)", "b": "did(x, 2h)", "c": "did(y, 1h)"})
    eng.add_trigger("first", "b")
    eng.add_trigger("second", "a", after="30m")
    j = eng.journey("jr", entry="a")
    j.step(after="30m")
    eng.add_trigger("third", "a")
    eng.add_trigger("fourth", "c", on="exit")
    eng.track(1, "y", ts=T0 - H // 2)
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + D)
    assert tup(eng.drain_firings()) == tup([
        F(1, "b", True, T0, "first", "entered b"),
        F(1, "a", True, T0, "third", "entered a"),
        F(1, "a", True, T0 + H // 2, "second", "in a for 30m"),
        J("jr", 0, 1, "a", T0 + H // 2),
        F(1, "c", False, T0 + H // 2, "fourth", "left c")])


# ------------------------------------------------------------------ policies
def test_cooldown_edges(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s", cooldown="24h")
    pulse(eng, 1, T0)
    pulse(eng, 1, T0 + D - 1)          # 24h - 1ms later: suppressed
    pulse(eng, 1, T0 + D)              # exactly 24h after the last *delivered* one: allowed
    pulse(eng, 1, T0 + 2 * D - 1)
    assert tup(eng.drain_firings()) == tup([
        F(1, "s", True, T0, "t", "entered s"),
        F(1, "s", True, T0 + D - 1, "t", "entered s", False, "cooldown"),
        F(1, "s", True, T0 + D, "t", "entered s"),
        F(1, "s", True, T0 + 2 * D - 1, "t", "entered s", False, "cooldown")])
    st_ = eng.stats()
    assert (st_["firings"], st_["suppressed"]) == (2, 2)


def test_cooldown_is_per_user(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s", cooldown="1d")
    pulse(eng, 1, T0)
    pulse(eng, 2, T0 + 5)
    assert [f.delivered for f in eng.drain_firings()] == [True, True]


def test_max_per_edges(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s", max_per=(3, "7d"))
    for t in (T0, T0 + D, T0 + 2 * D, T0 + 3 * D, T0 + 7 * D - 1, T0 + 7 * D, T0 + 8 * D,
              T0 + 8 * D + 1, T0 + 9 * D):
        pulse(eng, 1, t)
    got = eng.drain_firings()
    assert [(f.ts - T0, f.delivered, f.suppressed_by) for f in got] == [
        (0, True, None), (D, True, None), (2 * D, True, None),
        (3 * D, False, "max_per"),        # 3 delivered in (T0 - 4d, T0 + 3d]
        (7 * D - 1, False, "max_per"),    # T0 is 7d - 1ms old: still counts
        (7 * D, True, None),              # T0 is exactly 7d old: out of the window
        (8 * D, True, None),              # window (T0 + 1d, T0 + 8d]: 2 + 2d, 7d
        (8 * D + 1, False, "max_per"),    # 2d, 7d, 8d
        (9 * D, True, None)]              # 7d, 8d
    assert tup(got[3:4]) == tup([F(1, "s", True, T0 + 3 * D, "t", "entered s", False,
                                   "max_per")])


def test_once(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s", once=True)
    pulse(eng, 1, T0)
    pulse(eng, 1, T0 + D)
    pulse(eng, 2, T0 + 2 * D)
    assert tup(eng.drain_firings()) == tup([
        F(1, "s", True, T0, "t", "entered s"),
        F(1, "s", True, T0 + D, "t", "entered s", False, "once"),
        F(2, "s", True, T0 + 2 * D, "t", "entered s")])


def test_suppressed_firings_do_not_count_for_once(make_engine):
    eng = make_engine()
    eng.add_segments({"s": "did(x, 1ms)", "s2": "did(y, 1ms)"})
    eng.cap("c", max_per=(1, "1d"))
    eng.add_trigger("other", "s2", channel="c")
    eng.add_trigger("t", "s", once=True, channel="c")
    pulse(eng, 1, T0, "y")             # other delivered on channel c
    pulse(eng, 1, T0 + 1)              # t capped: not counted for once
    pulse(eng, 1, T0 + D + 1)          # the cap window passed: t delivered
    pulse(eng, 1, T0 + 2 * D + 2)      # once
    got = [(f.trigger, f.ts - T0, f.suppressed_by) for f in eng.drain_firings()]
    assert got == [("other", 0, None), ("t", 1, "cap:c"), ("t", D + 1, None),
                   ("t", 2 * D + 2, "once")]


def test_policies_are_checked_in_order(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.cap("email", max_per=(1, "30d"))
    eng.add_trigger("t", "s", once=True, cooldown="1d", max_per=(1, "10d"), channel="email")
    eng.add_trigger("u", "s", cooldown="1d", max_per=(1, "10d"), channel="email")
    eng.add_trigger("v", "s", max_per=(1, "10d"), channel="email")
    pulse(eng, 1, T0)
    pulse(eng, 1, T0 + H)
    pulse(eng, 1, T0 + 2 * D)
    got = [(f.trigger, f.ts - T0, f.suppressed_by) for f in eng.drain_firings()]
    assert got == [
        ("t", 0, None), ("u", 0, "cap:email"), ("v", 0, "cap:email"),
        ("t", H, "once"), ("u", H, "cap:email"), ("v", H, "cap:email"),
        ("t", 2 * D, "once"), ("u", 2 * D, "cap:email"), ("v", 2 * D, "cap:email")]
    eng2 = make_engine()
    eng2.add_segment("s", "did(x, 1ms)")
    eng2.cap("email", max_per=(1, "30d"))
    eng2.add_trigger("u", "s", cooldown="1d", max_per=(1, "10d"), channel="email")
    pulse(eng2, 1, T0)
    pulse(eng2, 1, T0 + H)            # cooldown before max_per before the cap
    pulse(eng2, 1, T0 + 2 * D)        # max_per before the cap
    pulse(eng2, 1, T0 + 20 * D)       # only the cap
    pulse(eng2, 1, T0 + 30 * D)       # the cap window passed: delivered
    got = [(f.ts - T0, f.suppressed_by) for f in eng2.drain_firings()]
    assert got == [(0, None), (H, "cooldown"), (2 * D, "max_per"), (20 * D, "cap:email"),
                   (30 * D, None)]


def test_channel_cap_across_triggers_and_journey_steps(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "did(x, 1ms)", "b": "did(y, 1ms)", "c": "did(z, 3d)"})
    eng.cap("email", max_per=(2, "1d"))
    got = []
    eng.on_enter("a", got.append, name="ta", channel="email")
    eng.on_enter("b", got.append, name="tb", channel="email")
    eng.on_enter("a", got.append, name="sms_a", channel="sms")
    j = eng.journey("jr", entry="c")
    j.step(after="1h", do=got.append, channel="email").step(after="1d", do=got.append,
                                                            channel="email")
    pulse(eng, 1, T0)                        # ta delivered (1), sms delivered
    pulse(eng, 1, T0 + 1, "y")               # tb delivered (2)
    pulse(eng, 2, T0 + 2)                    # another user: its own cap
    pulse(eng, 1, T0 + 2 * H)                # ta capped, sms delivered
    pulse(eng, 1, T0 + 3 * H, "z")           # journey: step 0 at T0 + 4h capped ...
    eng.advance(T0 + 10 * D)                 # ... step 1 at T0 + 1d + 4h delivered
    expected = [
        F(1, "a", True, T0, "ta", "entered a", channel="email"),
        F(1, "a", True, T0, "sms_a", "entered a", channel="sms"),
        F(1, "b", True, T0 + 1, "tb", "entered b", channel="email"),
        F(2, "a", True, T0 + 2, "ta", "entered a", channel="email"),
        F(2, "a", True, T0 + 2, "sms_a", "entered a", channel="sms"),
        F(1, "a", True, T0 + 2 * H, "ta", "entered a", False, "cap:email", channel="email"),
        F(1, "a", True, T0 + 2 * H, "sms_a", "entered a", channel="sms"),
        J("jr", 0, 1, "c", T0 + 4 * H, "email", False, "cap:email"),
        J("jr", 1, 1, "c", T0 + D + 4 * H, "email")]
    assert tup(eng.drain_firings()) == tup(expected)
    assert tup(got) == tup([f for f in expected if f.delivered])


def test_cap_counts_deliveries_in_the_window(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.cap("push", max_per=(2, "1h"))
    eng.add_trigger("t", "s", channel="push")
    for t in (T0, T0 + 10, T0 + 20, T0 + H - 1, T0 + H, T0 + H + 10, T0 + H + 11):
        pulse(eng, 1, t)
    got = [(f.ts - T0, f.suppressed_by) for f in eng.drain_firings()]
    assert got == [(0, None), (10, None), (20, "cap:push"), (H - 1, "cap:push"),
                   (H, None),                  # T0 is exactly 1h old
                   (H + 10, None),             # T0 + 10 is exactly 1h old
                   (H + 11, "cap:push")]


# ------------------------------------------------------------------ delivery
def test_callback_exceptions_are_counted(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1h)")
    seen = []

    def boom(f):
        raise RuntimeError("callback failure")

    eng.on_enter("s", boom)
    eng.on_enter("s", seen.append, after="30m")
    eng.on_exit("s", boom, name="boom_exit")
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + 2 * H)
    assert [f.ts for f in seen] == [T0 + H // 2]
    st_ = eng.stats()
    assert (st_["callback_errors"], st_["firings"]) == (2, 3)
    assert eng.segments_of(1) == []
    assert len(eng.drain_firings()) == 3


def test_drain_firings_and_stats(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s", once=True)
    pulse(eng, 1, T0)
    pulse(eng, 1, T0 + 10)
    first = eng.drain_firings()
    assert [(f.ts, f.delivered) for f in first] == [(T0, True), (T0 + 10, False)]
    assert eng.drain_firings() == []
    pulse(eng, 2, T0 + 20)
    assert [(f.user, f.delivered) for f in eng.drain_firings()] == [(2, True)]
    st_ = eng.stats()
    assert (st_["firings"], st_["suppressed"], st_["firings_dropped"]) == (2, 1, 0)


def test_queue_drops_the_oldest(make_engine):
    eng = make_engine(max_queued_firings=3)
    eng.add_segment("s", "did(x, 1ms)")
    eng.add_trigger("t", "s")
    for i in range(5):
        pulse(eng, 1, T0 + 10 * i)
    assert [f.ts - T0 for f in eng.drain_firings()] == [20, 30, 40]
    assert eng.stats()["firings_dropped"] == 2
    assert eng.stats()["firings"] == 5


def test_add_trigger_without_fn(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x, 1h)")
    eng.add_trigger("left", "s", on="exit", after="1h")
    eng.add_trigger("came", "s")
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + D)
    assert tup(eng.drain_firings()) == tup([
        F(1, "s", True, T0, "came", "entered s"),
        F(1, "s", False, T0 + 2 * H, "left", "out of s for 1h")])
    assert eng.stats()["callback_errors"] == 0


def test_default_names_count_all_triggers(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "did(x, 1h)", "b": "did(x, 2h)"})
    eng.on_enter("a")(lambda f: None)
    eng.add_trigger("mine", "b", on="exit")
    eng.journey("jr", entry="a").step(after="0ms")
    eng.on_exit("a", lambda f: None)
    eng.on_enter("b", lambda f: None, name="named")
    eng.on_enter("b", lambda f: None)
    eng.track(1, "x", ts=T0)
    eng.advance(T0 + D)
    assert [f.trigger for f in eng.drain_firings()] == [
        "a:enter:0", "jr:0", "named", "b:enter:4", "a:exit:2", "mine"]


# ------------------------------------------------------------------ journeys
def _cart_engine(make_engine, **kw):
    eng = make_engine(**kw)
    eng.add_segments({"cart_abandoners": "abandoned(add_to_cart, purchase, 1h)",
                      "buyers": "did(purchase, 30d)"})
    sent = []
    j = eng.journey("cart_recovery", entry="cart_abandoners", exit_on=["buyers"])
    j.step(after="1h", do=sent.append, channel="email")
    j.step(after="24h", do=sent.append, only_if="in(cart_abandoners)", channel="sms")
    return eng, sent


def test_cart_recovery_journey(make_engine):
    eng, sent = _cart_engine(make_engine)
    eng.track(1, "add_to_cart", ts=T0)
    assert eng.journey_state(1) == {}
    assert list(eng.advance(T0 + H)) == [T(1, "cart_abandoners", True, T0 + H)]
    assert eng.journey_state(1) == {"cart_recovery": {"step": 0, "due": T0 + 2 * H,
                                                      "since": T0 + H}}
    eng.advance(T0 + 2 * H - 1)
    assert eng.drain_firings() == []
    eng.advance(T0 + 2 * H)
    email = J("cart_recovery", 0, 1, "cart_abandoners", T0 + 2 * H, "email")
    assert tup(eng.drain_firings()) == tup([email])
    assert eng.journey_state(1) == {"cart_recovery": {"step": 1, "due": T0 + 26 * H,
                                                      "since": T0 + H}}
    eng.advance(T0 + 30 * H)
    sms = J("cart_recovery", 1, 1, "cart_abandoners", T0 + 26 * H, "sms")
    assert tup(eng.drain_firings()) == tup([sms])
    assert tup(sent) == tup([email, sms])
    assert eng.journey_state(1) == {}                   # completed
    assert eng.journey_state("nobody") == {}
    assert eng.segments_of(1) == ["cart_abandoners"]
    # completed: staying in the entry segment does nothing more
    eng.advance(T0 + 10 * D)
    assert eng.drain_firings() == []


def test_journey_left_on_purchase(make_engine):
    eng, sent = _cart_engine(make_engine)
    eng.track(1, "add_to_cart", ts=T0)
    eng.track(2, "add_to_cart", ts=T0)
    eng.advance(T0 + 3 * H)                              # both emailed at T0 + 2h
    out = eng.track(1, "purchase", ts=T0 + 4 * H)
    assert list(out) == [T(1, "cart_abandoners", False, T0 + 4 * H),
                         T(1, "buyers", True, T0 + 4 * H)]
    assert eng.journey_state(1) == {}
    assert set(eng.journey_state(2)) == {"cart_recovery"}
    eng.advance(T0 + 5 * D)
    assert [(f.user, f.step, f.ts - T0) for f in eng.drain_firings()] == [
        (1, 0, 2 * H), (2, 0, 2 * H), (2, 1, 26 * H)]
    assert [f.user for f in sent] == [1, 2, 2]


def test_journey_left_when_entering_exit_on_while_still_in_entry(make_engine):
    eng = make_engine()
    eng.add_segments({"e": "did(x, 10d)", "stop": "trait.unsub == 1"})
    eng.journey("jr", entry="e", exit_on=["stop"]).step(after="1h").step(after="1h")
    eng.track(1, "x", ts=T0)
    eng.track(2, "x", ts=T0)
    eng.advance(T0 + 90 * 60_000)
    eng.set_traits(1, {"unsub": 1})
    assert eng.journey_state(1) == {}
    assert eng.segments_of(1) == ["e", "stop"]
    eng.set_traits(1, {"unsub": 0})                     # no new entry into e: stays out
    eng.advance(T0 + D)
    assert [(f.user, f.step, f.ts - T0) for f in eng.drain_firings()] == [
        (1, 0, H), (2, 0, H), (2, 1, 2 * H)]
    # a new entry into e (exit, then re-entry) enters the journey again
    eng.track(1, "x", ts=T0 + 11 * D)
    assert eng.journey_state(1) == {"jr": {"step": 0, "due": T0 + 11 * D + H,
                                           "since": T0 + 11 * D}}


def test_journey_only_if_false_is_reported_and_the_journey_goes_on(make_engine):
    eng = make_engine()
    eng.add_segment("e", "did(x, 10d)")
    done = []
    j = eng.journey("jr", entry="e")
    j.step(after="1h", do=done.append, only_if='trait.sms_ok == 1', channel="sms")
    j.step(after="2h", do=done.append, only_if='not (trait.sms_ok == 1)')
    j.step(after="0ms", do=done.append, only_if=segcore.rules.parse("count(x) >= 2"))
    eng.track(1, "x", ts=T0)
    eng.set_traits(2, {"sms_ok": 1})
    eng.track(2, "x", ts=T0)
    eng.advance(T0 + D)
    assert tup(eng.drain_firings()) == tup([
        J("jr", 0, 1, "e", T0 + H, "sms", False, "only_if"),
        J("jr", 0, 2, "e", T0 + H, "sms"),
        J("jr", 1, 1, "e", T0 + 3 * H),
        J("jr", 2, 1, "e", T0 + 3 * H, None, False, "only_if"),
        J("jr", 1, 2, "e", T0 + 3 * H, None, False, "only_if"),
        J("jr", 2, 2, "e", T0 + 3 * H, None, False, "only_if")])
    assert [(f.user, f.step) for f in done] == [(2, 0), (1, 1)]
    assert eng.journey_state(1) == {} and eng.journey_state(2) == {}
    st_ = eng.stats()
    assert (st_["firings"], st_["suppressed"]) == (2, 4)


def test_journey_only_if_sees_the_instant(make_engine):
    eng = make_engine()
    eng.add_segments({"e": "did(x, 10d)", "recent_y": "did(y, 1h)"})
    eng.journey("jr", entry="e").step(after="2h", only_if="in(recent_y)").step(
        after="1h", only_if="count(y, 3h) >= 1")
    eng.track(1, "x", ts=T0)
    eng.track(1, "y", ts=T0 + H)            # in recent_y during [T0 + 1h, T0 + 2h)
    eng.advance(T0 + D)
    assert [(f.step, f.ts - T0, f.suppressed_by) for f in eng.drain_firings()] == [
        (0, 2 * H, "only_if"),              # recent_y left at exactly T0 + 2h
        (1, 3 * H, None)]                   # the y at T0 + 1h is 2h old


def test_journey_completion_and_reentry(make_engine):
    eng, sent = _cart_engine(make_engine)
    eng.track(1, "add_to_cart", ts=T0)
    eng.advance(T0 + 2 * D)                 # completed at T0 + 26h, still in the segment
    assert eng.journey_state(1) == {}
    assert eng.segments_of(1) == ["cart_abandoners"]
    # a new add-to-cart: out of cart_abandoners at once, in again 1h later -> a new journey
    t1 = T0 + 3 * D
    assert list(eng.track(1, "add_to_cart", ts=t1)) == [T(1, "cart_abandoners", False, t1)]
    eng.advance(t1 + H)
    assert eng.journey_state(1) == {"cart_recovery": {"step": 0, "due": t1 + 2 * H,
                                                      "since": t1 + H}}
    eng.advance(t1 + 5 * D)
    assert [(f.step, f.ts) for f in eng.drain_firings()] == [
        (0, T0 + 2 * H), (1, T0 + 26 * H), (0, t1 + 2 * H), (1, t1 + 26 * H)]


def test_journey_leave_at_a_due_instant_cancels_the_step(make_engine):
    eng = make_engine()
    eng.add_segment("e", "did(cart, 2h)")
    eng.journey("jr", entry="e").step(after="1h").step(after="1h")
    eng.track(1, "cart", ts=T0)             # in e during [T0, T0 + 2h)
    eng.advance(T0 + D)
    assert [(f.step, f.ts) for f in eng.drain_firings()] == [(0, T0 + H)]


def test_journey_zero_delay_steps_fire_at_the_entry_instant(make_engine):
    eng = make_engine()
    eng.add_segments({"e": "did(x, 1h)", "f": "did(x, 2h)"})
    eng.add_trigger("before", "f")
    eng.journey("jr", entry="e").step(after="0ms").step(after=0).step(after="5m")
    eng.add_trigger("after", "e")
    out = eng.track(1, "x", ts=T0)
    assert list(out) == [T(1, "e", True, T0), T(1, "f", True, T0)]
    eng.advance(T0 + D)
    assert tup(eng.drain_firings()) == tup([
        F(1, "f", True, T0, "before", "entered f"),
        J("jr", 0, 1, "e", T0),
        J("jr", 1, 1, "e", T0),
        F(1, "e", True, T0, "after", "entered e"),
        J("jr", 2, 1, "e", T0 + 5 * 60_000)])


def test_journey_entry_is_processed_before_leave_conditions(make_engine):
    eng = make_engine()
    eng.add_segments({"e": "did(x, 1d)", "big": "did(x where big == 1, 1d)"})
    eng.journey("jr", entry="e", exit_on=["big"]).step(after="0ms").step(after="1h")
    eng.track(1, "x", ts=T0, props={"big": 1})      # enters e and big at once: in, then out
    eng.track(2, "x", ts=T0)
    eng.advance(T0 + D // 2)
    assert [(f.user, f.step) for f in eng.drain_firings()] == [(2, 0), (2, 1)]
    assert eng.journey_state(1) == {}


def test_entry_and_exit_at_one_instant_cancel_and_exit_on_needs_an_entry(make_engine):
    eng = make_engine()
    eng.add_segments({"s": "abandoned(cart, buy, 1h) and count(stop) == 0",
                      "ex": "trait.z == 1"})
    eng.add_trigger("t", "s", after="30m")
    eng.journey("j", entry="s", exit_on=["ex"]).step(after="1h")
    eng.journey("empty", entry="s")                 # no steps: nothing ever fires
    eng.set_traits(2, {"z": 1})                     # 2 is in `ex` already: not a leave
    eng.track(1, "cart", ts=T0)
    eng.track(2, "cart", ts=T0)
    # user 1 enters s at T0 + 1h (time-driven) and leaves at T0 + 1h (the event)
    assert list(eng.track(1, "stop", ts=T0 + H)) == [
        T(2, "s", True, T0 + H), T(1, "s", True, T0 + H), T(1, "s", False, T0 + H)]
    assert eng.journey_state(1) == {}
    assert eng.journey_state(2) == {"j": {"step": 0, "due": T0 + 2 * H, "since": T0 + H}}
    eng.advance(T0 + 10 * H)
    assert tup(eng.drain_firings()) == tup([
        F(2, "s", True, T0 + 90 * 60_000, "t", "in s for 30m"),
        J("j", 0, 2, "s", T0 + 2 * H)])


def test_journey_registered_later_and_steps_reregister(make_engine):
    eng = make_engine()
    eng.add_segment("e", "did(x, 10d)")
    eng.track(1, "x", ts=T0)
    j = eng.journey("jr", entry="e")
    j.step(after="1h")
    eng.track(2, "x", ts=T0 + 1)
    assert eng.journey_state(1) == {}                 # already in e when registered
    assert eng.journey_state(2) == {"jr": {"step": 0, "due": T0 + 1 + H, "since": T0 + 1}}
    eng.advance(T0 + 2 * H)
    eng.track(3, "x", ts=T0 + 2 * H)
    j.step(after="1h")                                # re-registers: user 3 leaves it
    assert eng.journey_state(3) == {}
    eng.track(4, "x", ts=T0 + 2 * H)
    eng.advance(T0 + D)
    assert [(f.user, f.step, f.ts - T0) for f in eng.drain_firings()] == [
        (2, 0, 1 + H), (4, 0, 3 * H), (4, 1, 4 * H)]


def test_journey_state_of_several_journeys(make_engine):
    eng, _ = _cart_engine(make_engine)
    eng.journey("second", entry="cart_abandoners").step(after="3h")
    eng.track("ann", "add_to_cart", ts=T0)
    eng.advance(T0 + H)
    assert eng.journey_state("ann") == {
        "cart_recovery": {"step": 0, "due": T0 + 2 * H, "since": T0 + H},
        "second": {"step": 0, "due": T0 + 4 * H, "since": T0 + H}}
    assert list(eng.journey_state("ann")) == ["cart_recovery", "second"]
    assert eng.journey_state(12345) == {}


# ------------------------------------------------------------------ errors
def test_unknown_segment_with_did_you_mean(make_engine):
    eng = make_engine()
    eng.add_segments({"cart_abandoners": "abandoned(add_to_cart, purchase, 1h)",
                      "buyers": "did(purchase)"})
    for call in (lambda: eng.on_enter("cart_abandoner", lambda f: None),
                 lambda: eng.on_exit("cart_abandoner"),
                 lambda: eng.add_trigger("t", "cart_abandoner"),
                 lambda: eng.journey("j", entry="cart_abandoner"),
                 lambda: eng.journey("k", entry="buyers", exit_on=["cart_abandoner"])):
        with pytest.raises(RuleError, match=r"unknown segment `cart_abandoner` \(did you mean "
                                            r"`cart_abandoners`\?\)"):
            call()
    j = eng.journey("jr", entry="cart_abandoners")
    with pytest.raises(RuleError, match=r"unknown segment `buyer` \(did you mean `buyers`\?\)"):
        j.step(after="1h", only_if="in(buyer)")
    with pytest.raises(RuleError):
        j.step(after="1h", only_if="cnt(x) >= 1")
    with pytest.raises(SegcoreError):
        eng.add_trigger("bad_on", "buyers", on="entry")
    with pytest.raises(SegcoreError):
        eng.on_enter("buyers", after="soon")(lambda f: None)
    with pytest.raises(SegcoreError):
        eng.cap("email", max_per=(0, "1d"))
    with pytest.raises(SegcoreError):
        eng.on_enter("buyers", max_per=(2,))(lambda f: None)


def test_duplicate_names(make_engine):
    eng = make_engine()
    eng.add_segment("s", "did(x)")
    eng.on_enter("s", lambda f: None, name="t")
    with pytest.raises(RuleError):
        eng.add_trigger("t", "s")
    with pytest.raises(RuleError):
        eng.on_exit("s", lambda f: None, name="t")
    eng.on_enter("s", lambda f: None)               # default name s:enter:1
    with pytest.raises(RuleError):
        eng.add_trigger("s:enter:1", "s")
    eng.journey("jr", entry="s")
    with pytest.raises(RuleError):
        eng.journey("jr", entry="s")
    with pytest.raises(RuleError):                  # one namespace for triggers and journeys
        eng.add_trigger("jr", "s")
    with pytest.raises(RuleError):
        eng.journey("t", entry="s")


def test_segments_used_by_triggers_or_journeys_cannot_be_removed(make_engine):
    eng = make_engine()
    eng.add_segments({"a": "did(x)", "b": "did(y)", "c": "did(z)", "d": "did(w)",
                      "free": "did(v)"})
    eng.add_trigger("t", "a", on="exit")
    eng.journey("jr", entry="b", exit_on=["c"]).step(after="1h", only_if="in(d)")
    for name in ("a", "b", "c", "d"):
        with pytest.raises(RuleError):
            eng.remove_segment(name)
        assert name in eng.segments
    eng.remove_segment("free")
    assert list(eng.segments) == ["a", "b", "c", "d"]


# ------------------------------------------------------------------ differential
SEGMENTS = {
    "a": "did(x, 20ms)",
    "b": "count(x, 30ms) >= 2",
    "c": "abandoned(cart, buy, 15ms)",
    "buyers": "did(buy, 25ms)",
    "t": "trait.on == 1",
    "ab": "in(a) and not in(b)",
}
USERS = [0, 0, 1, 2, "ann", "ann"]
EVENTS = ["x", "x", "x", "cart", "cart", "buy", "y"]

#: Triggers that may be registered (the differential test picks some, some while events flow).
POOL = [
    ("on_enter", "a", {}),
    ("on_exit", "a", {"after": 5}),
    ("on_enter", "b", {"after": 10, "cooldown": 40, "channel": "email"}),
    ("on_enter", "a", {"max_per": (1, 60), "channel": "email"}),
    ("on_exit", "b", {"once": True}),
    ("add_trigger", "c", {"after": 7, "channel": "sms"}),
    ("on_enter", "a", {"cooldown": 25}),
    ("on_enter", "ab", {"after": 3, "max_per": (1, 20)}),
    ("on_exit", "buyers", {"channel": "email", "once": True}),
    ("on_enter", "t", {"cooldown": 10, "channel": "sms"}),
    ("journey", None, {}),
]


def _register(eng, k, sink):
    kind, seg, opts = POOL[k]
    if kind == "journey":
        j = eng.journey("jr", entry="c", exit_on=["buyers"])
        j.step(after=5, do=sink.append, channel="email")
        j.step(after=0, do=sink.append, only_if="trait.on == 1", channel="sms")
        j.step(after=10, do=sink.append, only_if="in(a)")
    elif kind == "add_trigger":
        eng.add_trigger(f"trig{k}", seg, on="enter", fn=None, **opts)
    else:
        getattr(eng, kind)(seg, sink.append, **opts)


@st.composite
def _events(draw):
    return (draw(st.sampled_from(USERS)), draw(st.sampled_from(EVENTS)),
            draw(st.one_of(st.integers(0, 8), st.integers(-20, 20))))


_ops = st.one_of(
    st.tuples(st.just("track"), _events()),
    st.tuples(st.just("batch"), st.lists(_events(), min_size=1, max_size=8)),
    st.tuples(st.just("advance"), st.integers(0, 40)),
    st.tuples(st.just("traits"), st.sampled_from(USERS), st.sampled_from([0, 1, None])),
    st.tuples(st.just("register"), st.integers(0, len(POOL) - 1)),
)


def _step(eng, op, now):
    kind = op[0]
    if kind == "track":
        user, ev, dt = op[1]
        return list(eng.track(user, ev, ts=max(0, now + dt)))
    if kind == "batch":
        rows = op[1]
        users = np.empty(len(rows), dtype=object)
        users[:] = [r[0] for r in rows]
        return list(eng.track_many(user=users, event=np.array([r[1] for r in rows]),
                                   ts=np.array([max(0, now + r[2]) for r in rows],
                                               dtype=np.int64)))
    if kind == "advance":
        return list(eng.advance(now + op[1]))
    if kind == "traits":
        return list(eng.set_traits(op[1], {"on": op[2]}))
    raise AssertionError(kind)


def _same(a, b, ta, tb, sa, sb, what):
    assert ta == tb, f"transitions differ after {what}"
    fa, fb = a.drain_firings(), b.drain_firings()
    assert tup(fa) == tup(fb), f"firings differ after {what}"
    assert tup(sa) == tup(sb), f"callbacks differ after {what}"
    for u in ("ann", 0, 1, 2):
        assert a.journey_state(u) == b.journey_state(u), f"journey_state({u}) after {what}"
    for k in ("firings", "suppressed", "callback_errors", "transitions"):
        assert a.stats()[k] == b.stats()[k], f"stats[{k}] after {what}"
    assert a.now == b.now


#: The two engines compared (the reference engine is the oracle).
DIFF_ENGINES = (segcore.Engine, segcore_ref.RefEngine)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(POOL) - 1), max_size=len(POOL), unique=True),
       st.lists(_ops, min_size=1, max_size=40), st.booleans())
def test_triggers_kernel_matches_reference(initial, script, cap):
    a, b = DIFF_ENGINES[0](), DIFF_ENGINES[1]()
    sa, sb = [], []
    ta, tb = list(a.add_segments(SEGMENTS)), list(b.add_segments(SEGMENTS))
    assert ta == tb
    if cap:
        for eng in (a, b):
            eng.cap("email", max_per=(2, 40))
            eng.cap("sms", max_per=(1, 30))
    registered = set()
    for k in initial:
        _register(a, k, sa), _register(b, k, sb)
        registered.add(k)
    a.advance(100), b.advance(100)
    for i, op in enumerate(script):
        if op[0] == "register":
            if op[1] not in registered:
                registered.add(op[1])
                _register(a, op[1], sa), _register(b, op[1], sb)
            continue
        now = a.now
        ta, tb = _step(a, op, now), _step(b, op, now)
        _same(a, b, ta, tb, sa, sb, f"step {i}: {op}")
    t = a.now + 1_000
    _same(a, b, list(a.advance(t)), list(b.advance(t)), sa, sb, "final advance")
