"""Snapshots: a restored engine is indistinguishable from the original, and no truncated,
corrupted or hostile file can crash the process (it raises SnapshotError)."""

import hashlib
import io
import struct

import msgspec
import numpy as np
import pytest

import segcore
from segcore import SnapshotError
from segcore import snapshot as S
from segcore.synth import DEFAULT_SEGMENTS, generate

H = 3_600_000
D = 24 * H


def _rich_engine():
    """An engine using every kind of state: windows, sums, keyed carts, traits, scores, string
    ids, message ids, triggers with policies, a journey with only_if, caps, queued firings."""
    eng = segcore.Engine(seed=3)
    eng.add_segments({**DEFAULT_SEGMENTS,
                      "carts_by_id": "abandoned(add_to_cart, purchase, 1h) by cart_id",
                      "spend_30d": "sum(purchase.amount, 30d) > 50",
                      "categories": "distinct(product_view.category, 7d) >= 2",
                      "churny": "score.churn >= 0.5 and seen"})
    eng.add_trigger("fb_1d", "frequent_buyers", after="1d", cooldown="2d")
    eng.add_trigger("lapsed", "inactive_30d", max_per=(1, "7d"), channel="email")
    eng.add_trigger("bye", "buying_intent", on="exit", once=True)
    eng.cap("email", max_per=(1, "1d"))
    j = eng.journey("recovery", entry="cart_abandoners", exit_on="frequent_buyers")
    j.step(after="1h", channel="email").step(after="1d", only_if="did(email_open, 7d)")
    return eng


def _feed(eng, w, upto=None, with_ids=False):
    out = []
    for i, b in enumerate(w.batches(2_000)):
        ids = None
        if with_ids:
            ids = np.array([f"m{i}-{k % 1_500}" for k in range(len(b))], dtype=object)
        out += list(eng.track_many(user=b.user, event=b.event, ts=b.ts, props=b.props, id=ids))
        out += list(eng.advance(eng.now + 5 * H))
    return out


def _state(eng):
    return ({n: sorted(eng.members(n)) for n in eng.segments}, eng.now,
            {k: v for k, v in eng.stats().items() if k != "memory_bytes"})


def test_restored_engine_continues_identically():
    w = generate(800, 12_000, days=40, seed=4)
    first, second = w[:6_000], w[6_000:]
    eng = _rich_engine()
    eng.set_traits_many(user=w.trait_user, **w.traits)
    eng.set_scores(5, {"churn": 0.9})
    eng.set_traits("zoe", {"country": "SE"})
    eng.track("zoe", "purchase", ts=int(w.ts[0]), props={"amount": 12.5}, id="zoe-1")
    _feed(eng, first, with_ids=True)
    buf = io.BytesIO()
    eng.snapshot(buf)
    twin = segcore.Engine.restore(io.BytesIO(buf.getvalue()))
    assert _state(twin) == _state(eng)
    assert twin.drain_firings() == eng.drain_firings()
    assert twin.user_number("zoe") == eng.user_number("zoe")
    # the same input from here on gives the same transitions, firings and journeys
    a = _feed(eng, second, with_ids=True) + list(eng.advance(eng.now + 60 * D))
    b = _feed(twin, second, with_ids=True) + list(twin.advance(twin.now + 60 * D))
    assert a == b and len(a) > 1_000
    fa, fb = eng.drain_firings(), twin.drain_firings()
    assert fa == fb and len(fa) > 100
    assert {f.suppressed_by for f in fa} >= {None, "cap:email", "only_if"}
    assert _state(twin) == _state(eng)
    for u in range(0, 800, 37):
        assert twin.journey_state(u) == eng.journey_state(u)
        assert twin.segments_of(u) == eng.segments_of(u)


def test_snapshot_to_a_path_is_atomic_and_restores(tmp_path):
    eng = _rich_engine()
    eng.track(1, "purchase", ts=5, props={"amount": 600})
    path = tmp_path / "state.snap"
    eng.snapshot(path)
    eng.snapshot(path)                 # overwriting goes through a temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.snap"]
    twin = segcore.Engine.restore(str(path))
    assert twin.segments_of(1) == eng.segments_of(1)
    assert "high_ltv" in twin.segments_of(1)


def test_callbacks_are_given_back_by_name():
    eng = segcore.Engine()
    eng.add_segment("recent", "did(x, 1h)")
    eng.add_trigger("later", "recent", after="30m")
    eng.track(1, "x", ts=0)
    blob = S.to_bytes(eng)
    got = []
    twin = segcore.Engine.restore(blob, callbacks={"later": got.append})
    twin.advance(H)
    assert [(f.user, f.ts, f.trigger) for f in got] == [(1, 30 * 60_000, "later")]
    with pytest.raises(segcore.SegcoreError, match="unknown triggers: `nope`"):
        segcore.Engine.restore(blob, callbacks={"nope": print})


# ------------------------------------------------------------------ hostile files
@pytest.fixture(scope="module")
def blob():
    eng = _rich_engine()
    w = generate(200, 3_000, days=20, seed=9)
    eng.set_traits_many(user=w.trait_user, **w.traits)
    _feed(eng, w)
    return S.to_bytes(eng)


def _resign(body: bytes) -> bytes:
    return body + hashlib.blake2b(body, digest_size=32).digest()


def _split(blob):
    magic, version, meta_len = struct.unpack_from("<16sIQ", blob, 0)
    head = struct.calcsize("<16sIQ")
    meta = msgspec.msgpack.decode(blob[head:head + meta_len])
    return meta, blob[head + meta_len:-32]


def _join(meta: dict, payload: bytes, version=1) -> bytes:
    mb = msgspec.msgpack.encode(meta)
    return _resign(struct.pack("<16sIQ", S.MAGIC, version, len(mb)) + mb + payload)


def test_truncated_files_raise(blob):
    for n in sorted(set(np.linspace(0, len(blob) - 1, 300).astype(int).tolist())):
        with pytest.raises(SnapshotError):
            segcore.Engine.restore(blob[:n])


def test_random_corruption_raises(blob):
    rng = np.random.default_rng(0)
    for _ in range(2_000):
        b = bytearray(blob)
        for pos in rng.integers(0, len(b), rng.integers(1, 4)):
            b[pos] ^= int(rng.integers(1, 256))
        with pytest.raises(SnapshotError):
            segcore.Engine.restore(bytes(b))


def test_hostile_but_well_signed_files_raise(blob):
    """Checksums recomputed after the tampering: only validation stands between the file and
    the kernel's memory."""
    meta, payload = _split(blob)
    secs = {s["name"]: s for s in meta["sections"]}

    def with_section(name, data: bytes, dtype=None):
        m = msgspec.msgpack.decode(msgspec.msgpack.encode(meta))
        extra = len(payload)
        for s in m["sections"]:
            if s["name"] == name:
                s["offset"] = extra
                s["length"] = len(data) // np.dtype(S._DTYPES[dtype or s["dtype"]]).itemsize
                if dtype:
                    s["dtype"] = dtype
        return _join(m, payload + data)

    def with_meta(**changes):
        m = msgspec.msgpack.decode(msgspec.msgpack.encode(meta))
        m.update(changes)
        return _join(m, payload)

    n = meta["n_users"]
    jpos = np.frombuffer(payload[secs["k:jpos"]["offset"]:][: secs["k:jpos"]["length"] * 4],
                         dtype="<i4").copy()
    jpos[0] = 99
    bad_counts = np.full(secs["k:pool_count"]["length"], 10**12, dtype="<i8")
    cases = [
        with_meta(n_users=n + 1),
        with_meta(n_users=-1),
        with_meta(now=-5),
        with_meta(segments=[["a", "count(purchase, 90d >= 3"]]),
        with_meta(segments=meta["segments"][1:]),
        with_meta(str_users=[[5, "x"], [5, "y"]]),
        with_meta(event_names=meta["event_names"][:1]),
        with_meta(event_counts=[]),
        with_meta(event_counts=[-1] * len(meta["event_counts"])),
        with_meta(sections=meta["sections"] + [{"name": "k:istate", "dtype": "i8",
                                               "offset": 0, "length": 1}]),
        with_meta(sections=[dict(s, offset=10**15) if s["name"] == "k:wake" else s
                            for s in meta["sections"]]),
        with_meta(sections=[dict(s, dtype="zz") if s["name"] == "k:wake" else s
                            for s in meta["sections"]]),
        with_meta(items="not a list"),
        with_meta(traits={"country": ["SE"]}),
        with_meta(scores=[[10**9, {"churn": 1.0}]]),
        with_section("k:jpos", jpos.tobytes()),
        with_section("k:pool_count", bad_counts.tobytes()),
        with_section("k:istate", b"\0" * 8),
        with_section("k:members", b"\1" * (secs["k:members"]["length"])),
        with_section("bitmap:frequent_buyers", b"\xff" * 64),
        with_section("pub", np.zeros(n, dtype="<u4").tobytes()),
        _join(meta, payload, version=2),
        b"SEGCORE-SNAP" + b"\0" * 100,
        b"",
    ]
    for i, data in enumerate(cases):
        with pytest.raises(SnapshotError):
            segcore.Engine.restore(data)
    # and the untampered blob still restores
    assert segcore.Engine.restore(blob).stats()["users"] == n


def test_restoring_garbage_inputs():
    for bad in (None, 5, "no/such/file.snap"):
        with pytest.raises((SnapshotError, TypeError)):
            segcore.Engine.restore(bad)


def test_numpy_strings_in_a_keyed_batch_are_interned_as_plain_strings():
    eng = segcore.Engine()
    eng.add_segment("carts", "abandoned(cart, buy, 1h) by cid")
    eng.track_many(user=[1, 2], event=["cart", "cart"], ts=[1, 2],
                   props={"cid": np.array([np.str_("x"), np.str_("y")], dtype=object)})
    buf = io.BytesIO()
    eng.snapshot(buf)
    twin = segcore.Engine.restore(io.BytesIO(buf.getvalue()))
    assert twin.advance(3_600_002).to_list() == eng.advance(3_600_002).to_list()
    assert list(twin.members("carts")) == [1, 2]


def test_single_events_are_counted_through_snapshot_and_restore():
    eng = segcore.Engine()
    eng.add_segment("s", 'count(view where cat == "x") >= 2')
    for t in range(5):
        eng.track(t % 2, "view", ts=t, props={"cat": "x"})
    eng.track_many(user=[1, 2], event=["view", "view"], ts=[6, 7])
    buf = io.BytesIO()
    eng.snapshot(buf)
    back = segcore.Engine.restore(io.BytesIO(buf.getvalue()))
    assert (back.stats()["events"], back.stats()["batches"]) == (7, 6)
    back.track(3, "view", ts=8)
    assert (back.stats()["events"], back.stats()["batches"]) == (8, 7)
    assert (eng.stats()["events"], eng.stats()["batches"]) == (7, 6)


def test_forgotten_users_stay_out_of_re_evaluations_after_restore():
    eng = segcore.Engine()
    eng.add_segments({"seen": "seen", "quiet": "not did(x, 10ms)"})
    for u in (5, 6, 7):
        eng.track(u, "x", ts=u)
    eng.forget(5)
    eng.forget(6)
    buf = io.BytesIO()
    eng.snapshot(buf)
    meta, arrays = S.state(eng)
    d5 = int(np.flatnonzero(arrays["pub"] == 0)[0])
    assert int(arrays["k:bucket"][d5]) == -1             # the kernel marks the slot erased
    arrays["k:bucket"][sorted(meta.erased)] = 0          # as snapshots written before the mark
    for blob in (buf.getvalue(), b"".join(S.encode(meta, arrays))):
        back = segcore.Engine.restore(io.BytesIO(blob))
        assert list(back.add_segment("never", "not seen")) == []
        assert list(back.add_segment("all", "bucket(0, 9999)")) == \
            [segcore.Transition(7, "all", True, 7)]
        assert list(back.advance(30)) == [segcore.Transition(7, "quiet", True, 17)]
        assert back.stats()["users"] == 1 and list(back.members("quiet")) == [7]


@pytest.mark.parametrize("value", [-1, -7, 10_000, 2 ** 31 - 1])
def test_a_live_users_bucket_out_of_range_is_refused(value):
    """A bucket outside 0..9999 on a live user (-1 marks a forgotten user's slot) would make
    re-evaluations skip the user or no bucket range hold it: the snapshot is refused."""
    eng = segcore.Engine()
    eng.add_segment("hold", "bucket(0, 4999)")
    for u in (1, 2, 3):
        eng.track(u, "x", ts=u)
    eng.forget(2)
    meta, arrays = S.state(eng)
    arrays["k:bucket"] = arrays["k:bucket"].copy()
    arrays["k:bucket"][2] = value                  # user 3's slot (user 2's is erased)
    with pytest.raises(SnapshotError, match="bucket is out of range"):
        segcore.Engine.restore(io.BytesIO(b"".join(S.encode(meta, arrays))))
    arrays["k:bucket"][2] = 17
    arrays["k:bucket"][1] = value                  # an erased slot's value is not read
    back = segcore.Engine.restore(io.BytesIO(b"".join(S.encode(meta, arrays))))
    b1 = int(arrays["k:bucket"][0])
    want = [u for u, b in ((1, b1), (3, 17)) if b <= 99]
    out = back.add_segment("low", "bucket(0, 99)")
    assert [t.user for t in out if t.segment == "low"] == want
    assert list(back.members("hold")) == sorted(u for u, b in ((1, b1), (3, 17)) if b <= 4999)


def test_a_snapshot_after_unread_batches_has_their_members():
    eng = segcore.Engine()
    eng.add_segments({"a": "count(x) >= 2", "b": "did(x, 10ms)"})
    for t in range(1, 6):
        eng.track_many(user=list(range(t * 100)), event=["x"] * (t * 100), ts=[t] * (t * 100))
    buf = io.BytesIO()
    eng.snapshot(buf)
    twin = segcore.Engine.restore(io.BytesIO(buf.getvalue()))
    assert list(twin.members("a")) == list(range(400))
    assert list(twin.members("b")) == list(range(500))
    assert twin.sizes() == eng.sizes() == {"a": 400, "b": 500}


def test_batches_past_the_pending_limits_update_the_bitmaps_themselves(monkeypatch):
    from segcore import engine as engine_mod
    monkeypatch.setattr(engine_mod, "_PENDING_MAX", 50)
    eng = segcore.Engine()
    eng.add_segments({"a": "did(x, 10ms)"})
    eng.track_many(user=list(range(40)), event=["x"] * 40, ts=[1] * 40)
    assert eng._pend                            # waiting for a read
    eng.track_many(user=list(range(40, 80)), event=["x"] * 40, ts=[2] * 40)
    assert not eng._pend                        # 80 > 50: applied by the batch
    assert list(eng._bm["a"]) == list(range(80))
    eng.advance(11)
    assert list(eng.members("a")) == list(range(40, 80))
    monkeypatch.setattr(engine_mod, "_PENDING_BATCHES", 3)
    for u in range(4):                          # four small batches: past 3 they apply
        eng.track_many(user=[100 + u], event=["x"], ts=[20])
        assert bool(eng._pend) == (u < 3)
    assert list(eng._bm["a"]) == [100, 101, 102, 103]
