"""The write-ahead log: reopening restores exactly, torn tails are dropped, and a process killed
with SIGKILL at any moment loses no acknowledged event (fsync="always")."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import segcore
from segcore import SegcoreError, SnapshotError
from segcore import wal as W

H = 3_600_000


def _script(eng):
    """A little of everything, through the logged API."""
    eng.add_segments({"recent": "did(x, 1h)", "big": "sum(purchase.amount) >= 100",
                      "se": 'trait.country == "SE" and seen',
                      "churny": "score.churn >= 0.5", "carts": "abandoned(cart, purchase, 1h)"})
    eng.add_trigger("later", "recent", after="30m", cooldown="2h")
    eng.cap("email", max_per=(1, "1d"))
    eng.journey("rec", entry="carts").step(after="1h", channel="email") \
        .step(after="2h", only_if="did(x, 3h)")
    eng.track(1, "x", ts=0, id="a")
    eng.track(1, "x", ts=10, id="a")                                   # duplicate
    eng.track_many(user=np.array([2, 3, 2]), event=np.array(["purchase", "cart", "x"]),
                   ts=np.array([5, 6, 7]), props={"amount": np.array([120.0, np.nan, np.nan])})
    eng.track_json(b'[{"user": "ann", "event": "cart", "ts": 8}]')
    eng.set_traits("ann", {"country": "SE"})
    eng.set_traits_many(user=np.array([1, 2]), country=np.array(["SE", "NO"]))
    eng.set_scores(3, {"churn": 0.8})
    eng.advance(2 * H)
    eng.track("ann", "x", ts=2 * H + 5)
    eng.advance(6 * H)


def _state(eng):
    return ({n: sorted(eng.members(n)) for n in eng.segments}, eng.now,
            {k: v for k, v in eng.stats().items() if k not in ("memory_bytes",)},
            {u: eng.journey_state(u) for u in (1, 2, 3, "ann")})


def test_reopen_restores_exactly(tmp_path):
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d)
    _script(eng)
    eng.close()
    again = segcore.Engine.open(d)
    plain = segcore.Engine()
    _script(plain)
    assert _state(again) == _state(eng) == _state(plain)
    # and it goes on logging: reopen once more after more calls
    for e in (again, plain):
        e.track(4, "purchase", ts=7 * H, props={"amount": 500})
        e.advance(9 * H)
    again.close()
    third = segcore.Engine.open(d)
    assert _state(third) == _state(plain)


def test_checkpoint_rotates_files_and_keeps_state(tmp_path):
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d)
    _script(eng)
    eng.checkpoint()
    assert sorted(os.listdir(d)) == ["snapshot-1.snap", "wal-1.log"]
    assert os.path.getsize(d / "wal-1.log") == 0
    eng.track(9, "x", ts=7 * H)
    eng.close()
    back = segcore.Engine.open(d)
    assert _state(back) == _state(eng)


def test_callbacks_come_back_by_name(tmp_path):
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d)
    eng.add_segment("recent", "did(x, 1h)")
    eng.on_enter("recent", lambda f: None, after="30m", name="later")
    eng.track(1, "x", ts=0)
    eng.close()
    got = []
    back = segcore.Engine.open(d, callbacks={"later": got.append})
    back.advance(H)
    assert [(f.user, f.ts) for f in got] == [(1, 30 * 60_000)]
    back.close()
    with pytest.raises(SegcoreError, match="unknown triggers"):
        segcore.Engine.open(d, callbacks={"nope": print})


def test_torn_tail_is_dropped(tmp_path):
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d)
    eng.add_segment("n", "count(x) >= 1")
    for i in range(20):
        eng.track(i, "x", ts=i)
    eng.close()
    log = d / "wal-0.log"
    data = log.read_bytes()
    records, end, torn = W.read_records(str(log))
    assert len(records) == 21 and end == len(data) and not torn
    for cut in (len(data) - 1, len(data) - 7, len(data) // 2, 9):
        log.write_bytes(data[:cut])
        back = segcore.Engine.open(d)
        n_ok = len(W.read_records(str(log))[0])
        assert back.stats()["events"] == max(0, n_ok - 1)
        back.close()
        assert os.path.getsize(log) == W.read_records(str(log))[1]   # the tail was cut off
    # a flipped byte in the middle: that record and everything after it are dropped
    log.write_bytes(data)
    broken = bytearray(data)
    broken[len(data) // 2] ^= 0xFF
    log.write_bytes(bytes(broken))
    back = segcore.Engine.open(d)
    assert 0 < back.stats()["events"] < 20


def test_directory_errors(tmp_path):
    with pytest.raises(SnapshotError, match="holds no segcore data"):
        segcore.Engine.open(tmp_path / "nothing")
    eng = segcore.Engine(wal=tmp_path / "d")
    eng.close()
    with pytest.raises(SegcoreError, match="already holds an engine"):
        segcore.Engine(wal=tmp_path / "d")
    with pytest.raises(SegcoreError, match="fsync"):
        segcore.Engine(fsync="sometimes")
    with pytest.raises(SegcoreError, match="needs an engine with a write-ahead log"):
        segcore.Engine().checkpoint()


def test_clock_readings_replay_exactly(tmp_path):
    now = [100.0]
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d, clock=lambda: now[0])
    eng.add_segment("recent", "did(x, 1s)")
    eng.track(1, "x")
    now[0] = 100.5
    eng.track(2, "x")
    now[0] = 101.2
    eng.set_traits(3, {"a": 1})
    eng.close()
    back = segcore.Engine.open(d, clock=lambda: 101.2)
    assert sorted(back.members("recent")) == sorted(eng.members("recent")) == [2]
    assert back.now == eng.now == 101_200


CHILD = textwrap.dedent("""
    import sys, segcore
    eng = segcore.Engine.open(sys.argv[1]) if sys.argv[2] == "open" else \\
        segcore.Engine(wal=sys.argv[1], fsync="always")
    if sys.argv[2] != "open":
        eng.add_segment("seen", "seen")
    i = int(sys.argv[3])
    while True:
        if i % 7 == 0:
            eng.track_many(user=[i, i + 1_000_000], event=["x", "x"], ts=[i, i])
        else:
            eng.track(i, "x", ts=i)
        print(i, flush=True)        # acknowledged: the call returned
        i += 1
""")


def test_sigkill_at_random_moments_loses_no_acknowledged_event(tmp_path):
    d = str(tmp_path / "data")
    rng = np.random.default_rng(7)
    acked: list[int] = []
    start = 0
    for round_ in range(6):
        mode = "new" if round_ == 0 else "open"
        p = subprocess.Popen([sys.executable, "-c", CHILD, d, mode, str(start)],
                             stdout=subprocess.PIPE, text=True)
        first = p.stdout.readline()          # the child has reopened and acknowledged once
        assert first, "the child died before acknowledging anything"
        got = [int(first)]
        deadline = time.monotonic() + float(rng.uniform(0.2, 1.2))
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            got.append(int(line))
        os.kill(p.pid, signal.SIGKILL)
        rest = p.stdout.read()
        p.wait()
        got += [int(x) for x in rest.split()]
        acked += got
        start = got[-1] + 1
        eng = segcore.Engine.open(d)
        members = set(eng.members("seen"))
        missing = [i for i in acked if i not in members or
                   (i % 7 == 0 and i + 1_000_000 not in members)]
        assert not missing, f"round {round_}: acknowledged events lost: {missing[:5]}"
        eng.close()


def test_forgotten_user_leaves_no_trace_in_files_written_afterwards(tmp_path):
    d = tmp_path / "data"
    eng = segcore.Engine(wal=d)
    eng.add_segments({"buyers": "did(purchase)", "se": 'trait.country == "SE"'})
    secret = "zoe.private@example.com"
    eng.track(secret, "purchase", ts=1, props={"note": "secret-prop-value"})
    eng.set_traits(secret, {"country": "SE", "nickname": "secret-trait-value"})
    eng.track(2, "purchase", ts=2)
    assert eng.forget(secret)
    eng.track(3, "purchase", ts=3)
    eng.checkpoint()
    eng.track(4, "purchase", ts=4)
    eng.close()
    for name in os.listdir(d):
        data = (d / name).read_bytes()
        assert secret.encode() not in data, name
        assert b"secret-trait-value" not in data, name
    back = segcore.Engine.open(d)
    assert sorted(back.members("buyers")) == [2, 3, 4]
    assert back.segments_of(secret) == []


def test_preview_is_a_dry_run_over_the_log(tmp_path):
    eng = segcore.Engine(wal=tmp_path / "d")
    eng.add_segment("buyers", "count(purchase, 1h) >= 2")
    for i, u in enumerate([1, 1, 2, 2, 2, 3]):
        eng.track(u, "purchase", ts=i * 60_000)
    eng.advance(3 * H)
    before = (eng.sizes(), eng.stats()["transitions"], eng.now)
    # a looser threshold: users 1, 2 and 3 would have entered, and all left after an hour
    got = eng.preview("buyers", "count(purchase, 1h) >= 1")
    assert got == {"size": 0, "entered": 3, "exited": 3, "from": 0, "now": 3 * H}
    # a new segment, counting only what happened from 4 minutes on: user 3 enters at 5 min;
    # users 1, 2 and 3 leave an hour after their last purchases
    got = eng.preview("late", "count(purchase, 1h) >= 1", since=4 * 60_000)
    assert (got["entered"], got["exited"]) == (1, 3)
    assert (eng.sizes(), eng.stats()["transitions"], eng.now) == before
    assert list(eng.segments) == ["buyers"]
    with pytest.raises(SegcoreError, match="data directory"):
        segcore.Engine().preview("x", "seen")


def test_new_rules_are_back_filled_by_replaying_the_log(tmp_path):
    live = segcore.Engine(wal=tmp_path / "d")
    plain = segcore.Engine()
    for e in (live, plain):
        e.add_segment("fb", "count(purchase, 90d) >= 3")
        e.journey("j", entry="fb").step(after="1h")
    rows = [(u, ev, t) for t, (u, ev) in enumerate(
        [(1, "purchase"), (1, "purchase"), (2, "purchase"), (1, "cart"), (2, "purchase"),
         (3, "page"), (1, "purchase"), (2, "cart")])]
    for u, ev, t in rows:
        live.track(u, ev, ts=t * 60_000, props={"amount": 10 * (t + 1)})
    # needs the purchases' amounts and a window the kernel does not keep: replayed from the log
    got = live.add_segment("spend", "sum(purchase.amount, 30d) >= 50")
    for e in (plain,):
        e.add_segment("spend", "sum(purchase.amount, 30d) >= 50")
        for u, ev, t in rows:
            e.track(u, ev, ts=t * 60_000, props={"amount": 10 * (t + 1)})
    assert sorted(live.members("spend")) == sorted(plain.members("spend")) == [1, 2]
    assert [(t.user, t.entered) for t in got] == [(1, True), (2, True)]
    # replace a rule with one needing history: the same
    live.replace_segment("fb", "count(purchase, 90d) >= 5 or did(cart, 1d)")
    assert sorted(live.members("fb")) == [1, 2]
    # ...and both stay exact from here on
    live.advance(2 * 86_400_000)
    assert sorted(live.members("fb")) == []
    # after a checkpoint, history from before it is gone: refused with a clear error
    live.checkpoint()
    with pytest.raises(segcore.RuleError, match="before the last checkpoint"):
        live.add_segment("views", "did(page, 30d)")
    # without a log: refused, pointing at the write-ahead log
    with pytest.raises(segcore.RuleError, match="keep a write-ahead log"):
        plain.add_segment("views", "did(page, 30d)")
