"""ShardedEngine: the same memberships as one Engine (and the reference engine), through
random streams, shard deaths, restarts, slot moves and bad input. The Ray backend has its own
module (test_sharded_ray.py)."""

import os
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import segcore
import segcore_ref
from segcore.sharded import ShardHost, _Local
from test_differential import RULES, _bulk_stream, _rules, _run, ops


def per_user(transitions):
    """Each user's transitions in order (the sharded engine orders by time across users)."""
    out = defaultdict(list)
    for t in transitions:
        out[t.user].append((t.segment, t.entered, t.ts))
    return dict(out)


def same(single, sharded, ta, tb, what=""):
    assert per_user(ta) == per_user(tb), f"transitions differ {what}"
    assert sorted(ta, key=_key) == sorted(tb, key=_key), f"transitions differ {what}"
    tss = [t.ts for t in tb]
    assert tss == sorted(tss), f"sharded transitions out of time order {what}"
    for name in single.segments:
        assert single.members(name) == sharded.members(name), f"members of {name} {what}"
        assert single.size(name) == sharded.size(name)
    assert single.now == sharded.now


def _key(t):
    return (t.ts, str(t.user), t.segment, t.entered)


def feed(rng, engines, n_events=500, seed=0, on_batch=None):
    """The differential tests' dense stream (12 users, ~10 % late events) in random batches,
    with advances and scores; every engine gets the same calls; checks after each."""
    single, sharded = engines
    u, e, ts, props = _bulk_stream(rng, n_events)
    i = 0
    while i < len(u):
        k = int(rng.integers(1, 80))
        sl = slice(i, i + k)
        cols = {p: c[sl] for p, c in props.items()}
        ta = single.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        tb = sharded.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        same(single, sharded, ta, tb, f"after batch at row {i}")
        if on_batch is not None:
            on_batch(i)
        if rng.random() < 0.3:
            t = single.now + int(rng.integers(0, 50))
            same(single, sharded, single.advance(t), sharded.advance(t), f"advance to {t}")
        if rng.random() < 0.15:
            user = u[int(rng.integers(0, len(u)))]
            sc = {"churn": float(rng.choice([0.1, 0.6, 3.0]))}
            same(single, sharded, single.set_scores(user, sc), sharded.set_scores(user, sc))
        i += k
    t = single.now + 1_000
    same(single, sharded, single.advance(t), sharded.advance(t), "final advance")


def setup(single, sharded):
    same(single, sharded, single.add_segments(RULES), sharded.add_segments(RULES))
    for user, country in [(0, "SE"), (1, "SE"), ("ann", "NO"), (3, "US")]:
        tr = {"country": country, "age": 20}
        same(single, sharded, single.set_traits(user, tr), sharded.set_traits(user, tr))


# ---------------------------------------------------------------- equivalence
@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_bulk_stream_matches_one_engine_and_the_reference(seed, n_shards):
    rng = np.random.default_rng(seed)
    single = segcore.Engine(seed=seed % 5)
    ref = segcore_ref.RefEngine(seed=seed % 5)
    sharded = segcore.ShardedEngine(n_shards, slots=16, seed=seed % 5)
    setup(single, sharded)
    ref.add_segments(RULES)
    for user, country in [(0, "SE"), (1, "SE"), ("ann", "NO"), (3, "US")]:
        ref.set_traits(user, {"country": country, "age": 20})
    u, e, ts, props = _bulk_stream(rng, 400)
    for start in range(0, len(u), 37):
        sl = slice(start, start + 37)
        cols = {p: c[sl] for p, c in props.items()}
        ta = single.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        tr = ref.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        tb = sharded.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        same(single, sharded, ta, tb)
        assert per_user(tr) == per_user(tb)
        for name in RULES:
            assert ref.members(name) == sharded.members(name)
    same(single, sharded, single.advance(single.now + 1000), sharded.advance(sharded.now + 1000))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(RULES)), min_size=1, max_size=8, unique=True),
       st.lists(ops, min_size=1, max_size=30), st.integers(0, 3), st.integers(1, 3))
def test_random_calls_match_one_engine(names, script, seed, n_shards):
    """The differential tests' random calls (events, batches, late events, advances, traits,
    scores, alias across shards, forget) give the same transitions and members."""
    rules = _rules(names)
    single = segcore.Engine(seed=seed)
    sharded = segcore.ShardedEngine(n_shards, slots=8, seed=seed)
    same(single, sharded, single.add_segments(rules), sharded.add_segments(rules))
    state = {"now": 100}
    single.advance(100), sharded.advance(100)
    for i, op in enumerate(script):
        ta, tb = _run((single, sharded), op, state)
        same(single, sharded, ta, tb, f"step {i}: {op}")
        for u in (0, 1, 2, 7, "ann", "bob", "cy"):
            assert single.segments_of(u) == sharded.segments_of(u)
        state["now"] = single.now
    same(single, sharded, single.advance(single.now + 10_000),
         sharded.advance(sharded.now + 10_000), "final advance")


def test_users_are_spread_and_numbered_as_in_one_engine():
    single, sharded = segcore.Engine(), segcore.ShardedEngine(4, {"x": "did(e)"})
    single.add_segment("x", "did(e)")
    users = np.empty(200, dtype=object)
    users[:] = [f"u{i}" if i % 3 else i for i in range(200)]
    # an int at the top of the range, created in the same call as strings: no collision
    users[5] = 2**32 - 1
    for eng in (single, sharded):
        eng.track_many(user=users, event=["e"] * 200, ts=np.arange(200))
    assert [single.user_number(u) for u in users] == [sharded.user_number(u) for u in users]
    assert sharded.members("x") == single.members("x")
    assert len(set(users.tolist())) == len(single.members("x"))
    counts = [s["users"] for s in sharded.stats()["shards"]]
    assert sum(counts) == 200 and min(counts) > 20        # every shard has a share
    assert sharded.user_id(sharded.user_number("u7")) == "u7"
    # forget, then the same string id is a new user with a new number, as in one engine
    for eng in (single, sharded):
        assert eng.forget("u7") is True
        assert eng.forget("u7") is False
        eng.track("u7", "e", ts=300)
    assert single.user_number("u7") == sharded.user_number("u7")
    assert single.members("x") == sharded.members("x")
    with pytest.raises(segcore.EventError, match="already given to string id"):
        sharded.track(single.user_number("u1"), "e", ts=301)
    # a rejected call for a new string id uses no number
    for eng in (single, sharded):
        with pytest.raises(segcore.EventError, match="finite number"):
            eng.set_scores("zed", {"churn": float("nan")})
        with pytest.raises(segcore.EventError, match="mapping"):
            eng.set_traits("zed", ["not", "a", "mapping"])
        eng.set_traits("zed", {"country": "SE"})
    assert single.user_number("zed") == sharded.user_number("zed")


def test_set_traits_many_with_a_column_of_int_objects_creates_the_users():
    single, sharded = segcore.Engine(), segcore.ShardedEngine(2, slots=4)
    users = np.empty(3, dtype=object)
    users[:] = [1, 2, 3]                       # as a JSON body decodes them
    for eng in (single, sharded):
        eng.add_segment("se", 'trait.country == "SE"')
    same(single, sharded, single.set_traits_many(user=users, country=["SE", "NO", "SE"]),
         sharded.set_traits_many(user=users, country=["SE", "NO", "SE"]))
    assert [sharded.user_number(u) for u in (1, 2, 3)] == [1, 2, 3]
    assert sharded.forget(2) is True and sharded.stats()["users"] == 2


def test_message_ids_are_deduplicated_globally():
    """A repeated id is a duplicate whichever user (and shard) it comes with, as in one
    engine; the horizon is engine time."""
    single = segcore.Engine(dedup_horizon="100ms")
    sharded = segcore.ShardedEngine(3, slots=12, dedup_horizon="100ms")
    for eng in (single, sharded):
        eng.add_segment("two", "count(e) >= 2")
    users = [1, 2, 8, 13, 3, 16]
    assert len({sharded._shard_of(u) for u in users}) == 3
    calls = [
        dict(user=users, event=["e"] * 6, ts=[10, 11, 12, 13, 14, 15],
             id=["a", "b", "a", None, "c", "b"]),
        dict(user=users[::-1], event=["e"] * 6, ts=[20, 21, 22, 23, 24, 25],
             id=["a", "c", "d", "d", None, "z"]),
        dict(user=users[:2], event=["e"] * 2, ts=[200, 201], id=["a", "b"]),  # past horizon
    ]
    for kw in calls:
        ta, tb = single.track_many(**kw), sharded.track_many(**kw)
        same(single, sharded, ta, tb)
        assert tb.duplicates.tolist() == ta.duplicates.tolist()
    assert sharded.track(3, "e", ts=202, id="a") == single.track(3, "e", ts=202, id="a") == []
    assert sharded.stats()["duplicates"] == single.stats()["duplicates"] == 8


def test_a_bad_batch_is_rejected_whole_with_the_engines_error():
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(3, slots=9)
    for eng in (single, sharded):
        eng.add_segments({"big": "sum(buy.amount) >= 10", "k": "distinct(view.cat) >= 2"})
        eng.track_many(user=[1, 2, 3], event=["buy"] * 3, ts=[1, 2, 3],
                       props={"amount": [1, 2, 3]})
    before = (sharded.sizes(), sharded.stats()["events"], sharded.now, sharded._seq[:])
    bad = [
        dict(user=[1, 2, 3], event=["buy"] * 3, ts=[5, 6, 7], props={"amount": [1, "x", 2]}),
        dict(user=[1, -2, 3], event=["buy"] * 3, ts=[5, 6, 7]),
        dict(user=[1, 2, 3], event=["buy", "", "buy"], ts=[5, 6, 7]),
        dict(user=[1, 2, 3], event=["buy"] * 3, ts=[5, -6, 7]),
        dict(user=[1, 2.5, 3], event=["buy"] * 3, ts=[5, 6, 7]),
        dict(user=[1, 2], event=["buy"] * 3, ts=[5, 6, 7]),
        dict(user=[1, 2, 3], event=["view"] * 3, ts=[5, 6, 7], props={"cat": ["a", ["b"], "c"]}),
    ]
    for kw in bad:
        with pytest.raises(segcore.EventError) as want:
            single.track_many(**kw)
        with pytest.raises(segcore.EventError) as got:
            sharded.track_many(**kw)
        assert str(got.value) == str(want.value)
        assert (got.value.index, got.value.field) == (want.value.index, want.value.field)
        assert (sharded.sizes(), sharded.stats()["events"], sharded.now,
                sharded._seq) == before
    with pytest.raises(segcore.EventError, match="must be a number"):
        sharded.track(1, "buy", ts=9, props={"amount": "lots"})
    with pytest.raises(segcore.RuleError):
        sharded.add_segment("broken", "count(buy, 3d) >=")
    with pytest.raises(segcore.RuleError):
        sharded.members("nope")
    with pytest.raises(segcore.RuleError):
        sharded.query("big & ~")
    assert sharded.segments == single.segments
    assert (sharded.sizes(), sharded.stats()["events"], sharded.now) == before[:3]


@pytest.mark.parametrize("logged", [False, True])
def test_a_segment_needing_untracked_history_is_refused_everywhere(tmp_path, logged):
    """One engine without a log refuses a segment whose history it did not keep; so does a
    sharded engine (its shards cannot back-fill by replay), before any shard changes, even
    when some shards never saw those events; and after a reopen."""
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(3, slots=9,
                                    data_dir=tmp_path / "d" if logged else None)
    for eng in (single, sharded):
        eng.add_segment("a", "count(buy) >= 1")
        eng.track_many(user=[1, 2], event=["buy", "buy"], ts=[1, 2])
    with pytest.raises(segcore.RuleError) as want:
        single.add_segment("b", "sum(buy.amount, 1d) >= 1")
    with pytest.raises(segcore.RuleError) as got:
        sharded.add_segment("b", "sum(buy.amount, 1d) >= 1")
    assert str(got.value) == str(want.value)
    assert sharded.segments == single.segments and sharded.sizes() == {"a": 2}
    same(single, sharded, single.add_segment("c", "count(view) >= 1"),
         sharded.add_segment("c", "count(view) >= 1"))
    if logged:
        sharded.close()
        again = segcore.ShardedEngine.open(tmp_path / "d")
        with pytest.raises(segcore.RuleError, match="2 already tracked"):
            again.add_segment("b", "sum(buy.amount, 1d) >= 1")


def test_constructor_arguments_are_checked(tmp_path):
    for kwargs, msg in [(dict(n_shards=0), "n_shards"), (dict(n_shards=True), "n_shards"),
                        (dict(n_shards=4, slots=2), "slots"),
                        (dict(n_shards=2, backend="spark"), "backend"),
                        (dict(n_shards=2, clock=5), "clock"),
                        (dict(n_shards=2, checkpoint_rows=0), "checkpoint_rows"),
                        (dict(n_shards=2, compact_rows=1), "compact_rows must be True or False")]:
        with pytest.raises(segcore.SegcoreError, match=msg):
            segcore.ShardedEngine(**kwargs)
    segcore.ShardedEngine(2, data_dir=tmp_path / "d").close()
    with pytest.raises(segcore.SegcoreError, match="already holds a sharded engine"):
        segcore.ShardedEngine(2, data_dir=tmp_path / "d")
    with pytest.raises(segcore.SnapshotError, match="no sharded engine"):
        segcore.ShardedEngine.open(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sharded.json").write_text('{"format": 1, "n_shards": 2}')
    with pytest.raises(segcore.SnapshotError, match="not a valid sharded layout"):
        segcore.ShardedEngine.open(tmp_path / "bad")


def test_compact_rows_reach_every_shard_and_survive_a_reopen(tmp_path):
    many = segcore.ShardedEngine(2, {"two": "count(x) >= 2"}, compact_rows=True,
                                 data_dir=tmp_path / "d")
    many.track_many(user=[1, 2, 1], event=["x", "x", "x"], ts=[1, 2, 3])
    assert [h.eng._kernel.packed for h in many._backend.hosts] == [True, True]
    many.close()
    back = segcore.ShardedEngine.open(tmp_path / "d")
    assert [h.eng._kernel.packed for h in back._backend.hosts] == [True, True]
    assert list(back.members("two")) == [1]
    back.close()


def test_wall_clock_moves_every_shard():
    t = [1000.0]
    single = segcore.Engine(clock=lambda: t[0])
    sharded = segcore.ShardedEngine(2, slots=4, clock=lambda: t[0])
    for eng in (single, sharded):
        eng.add_segment("recent", "did(visit, 10s)")
    users = [1, 2, 3, 4, 5]
    for u in users:
        same(single, sharded, single.track(u, "visit"), sharded.track(u, "visit"))
    t[0] += 5
    same(single, sharded, single.track(1, "visit"), sharded.track(1, "visit"))
    t[0] += 6                    # a read catches up; the exits come with the next call
    assert single.size("recent") == sharded.size("recent") == 1
    same(single, sharded, single.advance(0), sharded.advance(0))
    with pytest.raises(segcore.EventError, match="max_future"):
        sharded.track(1, "visit", ts=int(t[0] * 1000) + 10 * 60_000)
    t[0] += 20
    assert single.members("recent") == sharded.members("recent")
    same(single, sharded, single.track(9, "visit"), sharded.track(9, "visit"))


def test_triggers_fire_in_the_driver_in_time_order():
    got = {"single": [], "sharded": []}
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(3, slots=9)
    for name, eng in (("single", single), ("sharded", sharded)):
        eng.add_segment("cart", "abandoned(add_to_cart, purchase, 1h)")
        eng.on_enter("cart", got[name].append, after="30m", cooldown="1d", name="nudge")
        eng.add_trigger("left", "cart", on="exit")
        eng.cap("email", max_per=(1, "1d"))
    hour = 3_600_000
    users = list(range(12))
    for eng in (single, sharded):
        eng.track_many(user=users, event=["add_to_cart"] * 12, ts=[u * 1000 for u in users])
        eng.track_many(user=users[:4], event=["purchase"] * 4, ts=[hour + 2 * hour] * 4)
        eng.advance(4 * hour)
        eng.track_many(user=users[4:8], event=["purchase"] * 4, ts=[5 * hour] * 4)
        eng.track_many(user=users, event=["add_to_cart"] * 12, ts=[6 * hour] * 12)
        eng.advance(9 * hour)
    key = lambda f: (f.ts, str(f.user), f.trigger)  # noqa: E731
    assert sorted(got["sharded"], key=key) == sorted(got["single"], key=key)
    assert len(got["sharded"]) == 12      # everyone, 30 min after entering; once a day
    assert [f.ts for f in got["sharded"]] == sorted(f.ts for f in got["sharded"])
    fs, fd = single.drain_firings(), sharded.drain_firings()
    assert sorted(fd, key=key) == sorted(fs, key=key)
    assert [f.ts for f in fd] == sorted(f.ts for f in fd)
    assert any(f.trigger == "left" for f in fd)
    assert any(f.suppressed_by == "cooldown" for f in fd)


# ---------------------------------------------------------------- durability
def test_a_shard_killed_mid_stream_loses_nothing_and_counts_nothing_twice(tmp_path):
    rng = np.random.default_rng(7)
    single = segcore.Engine(seed=1)
    sharded = segcore.ShardedEngine(3, slots=12, seed=1, data_dir=tmp_path / "d",
                                    fsync="never", checkpoint_rows=150)
    setup(single, sharded)
    kills, batches = [], [0]

    def kill(i):
        batches[0] += 1
        if batches[0] % 3 == 0 and len(kills) < 6:
            k = len(kills) % 3
            sharded.kill_shard(k)
            if len(kills) % 2:
                # and its machine: the log's tail since the last checkpoint never hit the
                # disk; the driver re-sends those calls
                d = tmp_path / "d" / f"shard-{k}"
                for f in d.iterdir():
                    if f.name.startswith("wal-"):
                        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
            kills.append(k)

    feed(rng, (single, sharded), 600, on_batch=kill)
    assert len(kills) >= 3
    st_ = sharded.stats()
    assert st_["driver_recoveries"] == len(kills)
    assert st_["driver_resent"] > 0
    assert st_["events"] == single.stats()["events"]


def test_a_call_applied_but_not_acknowledged_is_not_applied_twice(tmp_path):
    """The shard applies a call, then its process dies before the answer reaches the
    driver: the driver reopens it and re-sends; the call number says it is done."""
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(2, slots=4, data_dir=tmp_path / "d")
    for eng in (single, sharded):
        eng.add_segment("three", "count(buy) >= 3")
    backend = sharded._backend
    real = _Local.submit

    def applied_then_lost(self, k, method, *args):
        res = real(self, k, method, *args)
        if method == "call" and k == victim[0]:
            victim[0] = None
            self.kill(k)
            return ("lost", None)
        return res

    victim = [sharded._shard_of(1)]
    backend.submit = applied_then_lost.__get__(backend)
    for ts in (1, 2, 3):
        same(single, sharded, single.track(1, "buy", ts=ts), sharded.track(1, "buy", ts=ts))
    assert sharded.stats()["driver_recoveries"] == 1
    assert sharded.stats()["events"] == 3
    assert sorted(sharded.members("three")) == [1]


def test_reopen_restores_every_shard_and_the_driver(tmp_path):
    rng = np.random.default_rng(3)
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(3, slots=12, data_dir=tmp_path / "d", fsync="batch")
    setup(single, sharded)
    sharded.add_trigger("hot", "c3")
    u, e, ts, props = _bulk_stream(rng, 300)
    for eng in (single, sharded):
        eng.track_many(user=u[:150], event=e[:150], ts=ts[:150],
                       props={p: c[:150] for p, c in props.items()}, id=np.arange(150))
    sharded.checkpoint()
    for eng in (single, sharded):
        eng.track_many(user=u[150:], event=e[150:], ts=ts[150:],
                       props={p: c[150:] for p, c in props.items()})
    numbers = {x: sharded.user_number(x) for x in ("ann", "bob", "cy", "di")}
    sharded.close()
    again = segcore.ShardedEngine.open(tmp_path / "d")
    same(single, again, [], [])
    assert {x: again.user_number(x) for x in numbers} == numbers
    # dedup ids, triggers and the event codes survived
    assert again.track_many(user=[1], event=["buy"], ts=[again.now], id=[5]).duplicates \
        .tolist() == [0]
    assert again.event_code("buy") == sharded._schema.event_code("buy")
    assert "hot" in [it.name for it in again._schema._items]
    single.track(1, "buy", ts=single.now, id=5)
    feed(rng, (single, again), 200)
    again.close()


def test_snapshot_and_restore_a_directory(tmp_path):
    rng = np.random.default_rng(11)
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(2, slots=8)
    setup(single, sharded)
    feed(rng, (single, sharded), 200)
    sharded.snapshot(tmp_path / "snap")
    assert sorted(os.listdir(tmp_path / "snap")) == ["shard-0.snap", "shard-1.snap",
                                                    "sharded.json"]
    twin = segcore.ShardedEngine.restore(tmp_path / "snap", data_dir=tmp_path / "live")
    same(single, twin, [], [])
    feed(rng, (single, twin), 200)
    twin.close()
    reopened = segcore.ShardedEngine.open(tmp_path / "live")
    same(single, reopened, [], [])


def test_forget_leaves_no_trace_in_any_file(tmp_path):
    sharded = segcore.ShardedEngine(2, {"x": "did(e)"}, slots=4, data_dir=tmp_path / "d")
    sharded.track_many(user=["secret-ann", "bob", 3], event=["e"] * 3, ts=[1, 2, 3],
                       props={"note": ["secret-note", "x", "y"]})
    sharded.set_traits("secret-ann", {"email": "secret-mail"})
    assert sharded.forget("secret-ann") is True
    for root, _, files in os.walk(tmp_path / "d"):
        for f in files:
            assert b"secret" not in open(os.path.join(root, f), "rb").read(), f
    assert sharded.segments_of("secret-ann") == []
    assert sorted(sharded.members("x")) == sorted(
        [sharded.user_number("bob"), 3])


# ---------------------------------------------------------------- rebalancing
def test_moving_slots_keeps_memberships_timers_and_triggers(tmp_path):
    rng = np.random.default_rng(5)
    fired = {"single": [], "sharded": []}
    single = segcore.Engine()
    sharded = segcore.ShardedEngine(3, slots=12, data_dir=tmp_path / "d")
    setup(single, sharded)
    for name, eng in (("single", single), ("sharded", sharded)):
        eng.on_enter("c3", fired[name].append, after="20ms", cooldown="40ms", name="t")
    moves = []

    def move(i):
        if rng.random() < 0.4:
            slots = rng.choice(12, size=int(rng.integers(1, 6)), replace=False).tolist()
            to = int(rng.integers(0, 3))
            before = sharded.sizes()
            moves.append(sharded.move_slots(slots, to))
            assert sharded.sizes() == before
            assert all(sharded.slot_owner()[s] == to for s in slots)
            for name in single.segments:
                assert single.members(name) == sharded.members(name)

    feed(rng, (single, sharded), 600, on_batch=move)
    assert sum(moves) > 10
    key = lambda f: (f.ts, str(f.user))  # noqa: E731
    assert sorted(fired["sharded"], key=key) == sorted(fired["single"], key=key)
    counts = [s["users"] for s in sharded.stats()["shards"]]
    assert sum(counts) == len(single._all)
    sharded.close()
    with pytest.raises(segcore.SegcoreError, match="unknown triggers: `nope`"):
        segcore.ShardedEngine.open(tmp_path / "d", callbacks={"nope": print})
    again = segcore.ShardedEngine.open(tmp_path / "d", callbacks={"t": fired["sharded"].append})
    assert (again.slot_owner() == sharded.slot_owner()).all()
    same(single, again, [], [])
    n = len(fired["sharded"])
    for eng in (single, again):               # the callback is called again after open
        eng.track_many(user=[0, 0, 0], event=["buy"] * 3, ts=[eng.now + 100] * 3)
        eng.advance(eng.now + 50)
    assert len(fired["sharded"]) == n + 1
    assert fired["sharded"][-1] == fired["single"][-1]


def test_a_move_cut_short_is_completed_on_open(tmp_path):
    """The users were imported by the new owner and the layout written, but the old shard
    still has them (the driver died before dropping them): open() drops the stale copy."""
    sharded = segcore.ShardedEngine(2, {"x": "count(e) >= 1"}, slots=4,
                                    data_dir=tmp_path / "d")
    sharded.track_many(user=list(range(40)), event=["e"] * 40, ts=list(range(40)))
    want = sharded.members("x")
    slot = 0
    src = int(sharded.slot_owner()[slot])
    nums = sharded._users_of_slots(src, {slot})
    assert nums
    blob = sharded._read("_shard_export", [nums], [src])[0]
    sharded._run({1 - src: ("_shard_import", [blob], {})})
    sharded._owner[slot] = 1 - src
    sharded._write_layout()
    sharded.close()                              # ... and the drop never happened
    again = segcore.ShardedEngine.open(tmp_path / "d")
    assert again.members("x") == want
    assert sum(s["users"] for s in again.stats()["shards"]) == 40
    assert again.size("x") == 40


def test_move_slots_arguments_are_checked():
    sharded = segcore.ShardedEngine(2, slots=4)
    with pytest.raises(segcore.SegcoreError, match="to_shard"):
        sharded.move_slots([0], 2)
    with pytest.raises(segcore.SegcoreError, match="slots must be in"):
        sharded.move_slots([4], 0)
    with pytest.raises(segcore.SegcoreError, match="shard index"):
        sharded.kill_shard(2)
    assert sharded.actors == []
    sharded.track(1, "e", ts=1)
    sharded.kill_shard(sharded._shard_of(1))      # no data_dir: nothing to recover from
    with pytest.raises(segcore.SegcoreError, match="no data directory"):
        sharded.track(1, "e", ts=2)
    assert sharded.move_slots([0, 1], 0) == 0


def test_a_shard_host_reopens_its_directory(tmp_path):
    host = ShardHost(str(tmp_path / "s"), "always", {})
    host.call(1, "_shard_op", [(0, []), (0, []), {}, "add_segments", [{"x": "did(e)"}], {}], {})
    host.call(2, "_shard_batch", [[5], [0], [10], [10], [[], [], []], None, (0, ["e"]),
                                  (0, []), {}, 10], {})
    with pytest.raises(segcore.SegcoreError, match="applied calls up to 2"):
        host.call(4, "_shard_batch", [[], [], [], [], [[], [], []], None, (1, []), (0, []), {},
                                      11], {})
    with pytest.raises(segcore.SegcoreError, match="not a shard call"):
        host.call(3, "snapshot", [], {})
    again = ShardHost(str(tmp_path / "s"), "always", {})
    assert again.eng._shard_seq == 2
    assert sorted(again.eng.members("x")) == [5]
    out, firings = again.call(2, "_shard_batch", [], {})     # already applied: its result
    assert list(out[0]) == [5] and firings == []
