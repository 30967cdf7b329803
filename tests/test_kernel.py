"""Kernel-level guarantees: it never crashes the process on bad input, and the engine-specific
behaviour of the compiled engine (what the reference engine, which keeps raw events, need not do).
"""

import numpy as np
import pytest

import segcore
from segcore import RuleError
from segcore._kernel import Kernel
from segcore.compile import compile_segments as _compile
from segcore.rules import parse


def compile_segments(rules, event_code):
    return _compile({name: parse(text) for name, text in rules.items()}, event_code)


def _kernel(rules=None):
    codes = {}
    plan = compile_segments(rules or {"a": "count(x, 10ms) >= 2", "b": "sum(y.v) > 1"},
                            lambda n: codes.setdefault(n, len(codes)))
    k = Kernel(plan.arrays)
    k.add_users(3, np.zeros(3, dtype=np.int32))
    return k, plan


def _cols(n, plan):
    return (np.zeros(n, np.uint32), np.zeros(n, np.int32), np.arange(n, dtype=np.int64),
            np.zeros(n * len(plan.filters), np.uint8),
            np.zeros(n * len(plan.val_props), np.float64),
            np.zeros(n * len(plan.key_props), np.int64))


@pytest.mark.parametrize("mutate", [
    lambda c: (None,) + c[1:],
    lambda c: (c[0].astype(np.int64),) + c[1:],
    lambda c: (c[0], c[1].astype(np.float64)) + c[2:],
    lambda c: (c[0], c[1], c[2][:-1]) + c[3:],
    lambda c: (np.array([7, 0, 0], np.uint32),) + c[1:],
    lambda c: (np.array([2**32 - 1, 0, 0], np.uint32),) + c[1:],
    lambda c: (c[0], np.array([-1, 0, 0], np.int32)) + c[2:],
    lambda c: (c[0], c[1], np.array([-5, 0, 1], np.int64)) + c[3:],
    lambda c: (c[0], c[1], np.array([2**62, 0, 1], np.int64)) + c[3:],
    lambda c: c[:4] + (np.zeros(1, np.float64),) + c[5:],
    lambda c: c[:4] + (np.zeros(99, np.float64),) + c[5:],
    lambda c: (np.zeros((3, 2), np.uint32),) + c[1:],
    lambda c: ("abc",) + c[1:],
])
def test_kernel_rejects_bad_columns_without_crashing(mutate):
    k, plan = _kernel()
    before = k.stats()
    with pytest.raises((ValueError, TypeError)):
        k.track(*mutate(_cols(3, plan)))
    assert k.stats() == before and k.now == 0


def test_kernel_accepts_empty_batches_and_survives_huge_codes():
    k, plan = _kernel()
    assert k.track(*_cols(0, plan)) == 0
    cols = list(_cols(2, plan))
    cols[1] = np.array([10**6, 2**31 - 1], np.int32)     # codes no rule listens to
    k.track(*cols)
    assert k.now == 1


@pytest.mark.parametrize("call", [
    lambda k: k.advance(2**60),
    lambda k: k.eval_users(np.array([5], np.uint32)),
    lambda k: k.set_trait_bits(np.array([0], np.uint32), np.zeros(9, np.uint8)),
    lambda k: k.set_scores(np.array([9], np.uint32), np.zeros(0, np.float64)),
    lambda k: k.member_row(10),
    lambda k: k.add_users(2, np.zeros(1, np.int32)),
    lambda k: k.add_users(-1, np.zeros(0, np.int32)),
    lambda k: k.set_now(-1),
    lambda k: Kernel({}),
    lambda k: Kernel(None),
])
def test_kernel_methods_validate(call):
    k, _ = _kernel()
    with pytest.raises((ValueError, TypeError, KeyError)):
        call(k)


def test_kernel_rejects_a_corrupt_plan():
    codes = {}
    plan = compile_segments({"a": "count(x, 10ms) >= 2"},
                            lambda n: codes.setdefault(n, len(codes)))
    shifted = [x + 5 for x in plan.arrays["es_start"]]     # the index must start at 0
    for key, bad in [("f_ioff", [999]), ("p_arg", [42]), ("lst_feat", [-3]),
                     ("f_kind", [77]), ("p_op", [9]), ("a_f", [5]), ("es_start", shifted)]:
        arrays = dict(plan.arrays)
        arrays[key] = bad
        with pytest.raises(ValueError, match="plan"):
            Kernel(arrays)


def test_kernel_rejects_a_windowed_count_read_other_than_by_its_count_atoms():
    # its wake-ups are only the drops its count atoms can see, so nothing else may read it
    codes = {}
    plan = compile_segments({"a": "count(x, 10ms) >= 2", "b": "abandoned(c, d, 1h)",
                             "s": "sum(x.v) > 1"}, lambda n: codes.setdefault(n, len(codes)))
    arr = plan.arrays
    topk = list(arr["f_kind"]).index(1)                     # K_TOPK
    abandon_atom = list(arr["a_kind"]).index(7)             # A_ABANDON
    feat_term = list(arr["t_kind"]).index(1)                # T_FEAT
    for key, i, msg in [("a_f", abandon_atom, "abandoned atom"),
                        ("t_a", feat_term, "windowed count read as a value")]:
        arrays = dict(arr)
        arrays[key] = list(arr[key])
        arrays[key][i] = topk
        with pytest.raises(ValueError, match=msg):
            Kernel(arrays)


def test_kernel_rejects_an_age_test_on_a_feature_without_a_time():
    codes = {}
    plan = compile_segments({"a": "last_seen < now - 1d", "b": "count(x) >= 2"},
                            lambda n: codes.setdefault(n, len(codes)))
    arrays = dict(plan.arrays)
    count_f = arrays["f_kind"].index(2)                 # K_COUNT: no timestamp to read
    arrays["t_a"] = [count_f if k == 1 else a for k, a in zip(arrays["t_kind"], arrays["t_a"])]
    with pytest.raises(ValueError, match="plan: age test term is not a first/last time"):
        Kernel(arrays)


def _counting_kernel(rules, compact=False):
    codes = {}
    plan = compile_segments(rules, lambda n: codes.setdefault(n, len(codes)))
    k = Kernel(plan.arrays, compact)
    k.add_users(1, np.zeros(1, dtype=np.int32))
    return k, plan, codes


def _one(k, plan, code, ts):
    k.track(np.zeros(1, np.uint32), np.array([code], np.int32), np.array([ts], np.int64),
            np.zeros(len(plan.filters), np.uint8), np.full(len(plan.val_props), np.nan),
            np.full(len(plan.key_props), -1, np.int64))


def test_a_timer_re_evaluates_only_the_segments_whose_inputs_change_then():
    rules = {"a": "did(x, 1h)", "b": "count(y, 1d) >= 1", "c": "in(a) and count(z) >= 0",
             "d": "count(z) >= 1", "e": "last_seen < now - 2h"}
    k, plan, codes = _counting_kernel(rules)
    for name in ("x", "y"):
        _one(k, plan, codes[name], 0)
    assert [k.member_row(0)[i] for i in range(5)] == [1, 1, 1, 0, 0]
    before = k.stats()["segment_evaluations"]
    k.advance(3_600_000)                    # x leaves its 1h window: a, and c through in(a)
    assert k.stats()["segment_evaluations"] - before == 2
    assert k.stats()["timers_fired"] == 1
    assert list(k.member_row(0)) == [0, 1, 0, 0, 0]
    before = k.stats()["segment_evaluations"]
    k.advance(7_200_001)                    # the age test flips: e alone
    assert k.stats()["segment_evaluations"] - before == 1
    assert list(k.member_row(0)) == [0, 1, 0, 0, 1]
    before = k.stats()["segment_evaluations"]
    k.advance(86_400_000)                   # y leaves its day: b alone
    assert k.stats()["segment_evaluations"] - before == 1
    assert list(k.member_row(0)) == [0, 0, 0, 0, 1]
    assert k.stats()["timers"] == 0


def test_an_event_re_evaluates_only_the_segments_reading_what_it_updates():
    k, plan, codes = _counting_kernel({"a": "did(x, 1h)", "b": "count(y, 1d) >= 1",
                                       "c": "count(z) >= 1"})
    for name in ("x", "y", "z"):
        _one(k, plan, codes[name], 0)       # the first evaluation covers every segment
    before = k.stats()["segment_evaluations"]
    _one(k, plan, codes["z"], 10)
    assert k.stats()["segment_evaluations"] - before == 1
    # a z event leaves the wake-up of x's window alone: it still fires at 1h
    k.advance(3_599_999)
    assert list(k.member_row(0)) == [1, 1, 1]
    k.advance(3_600_000)
    assert list(k.member_row(0)) == [0, 1, 1]


def test_an_event_that_changes_no_input_of_a_segment_leaves_it_alone():
    k, plan, codes = _counting_kernel({"a": 'count(v where c == "x") >= 1',
                                       "b": "first_seen >= now - 1d", "c": "count(v) >= 2",
                                       "d": "in(a) or in(b)", "e": "seen and inactive(1h)"})
    _one(k, plan, codes["v"], 10)           # fresh: every segment
    assert list(k.member_row(0)) == [0, 1, 0, 1, 0]
    before = k.stats()["segment_evaluations"]
    _one(k, plan, codes["v"], 20)           # the where-clause fails, first_seen stays
    assert k.stats()["segment_evaluations"] - before == 2      # c, and e (last_seen moved)
    assert list(k.member_row(0)) == [0, 1, 1, 1, 0]
    before = k.stats()["segment_evaluations"]
    _one(k, plan, codes["v"], 5)            # late: first_seen moves back, last_seen stays
    # b, c, d through in(b), and e (`seen` is first_seen exists)
    assert k.stats()["segment_evaluations"] - before == 4
    k.advance(86_400_006)                   # past first_seen + 1d: b leaves, and d with it
    assert list(k.member_row(0)) == [0, 0, 1, 0, 1]


def test_a_windowed_count_wakes_its_user_only_when_it_crosses_a_threshold():
    k, plan, codes = _counting_kernel({"a": "count(x, 1d) >= 3", "b": "count(y, 1d) == 1"})
    for ts in (5, 15):                      # two x: a stays out, and no x expiry matters
        _one(k, plan, codes["x"], ts)
    for ts in (0, 10):                      # two y: b out until one of them expires
        _one(k, plan, codes["y"], ts)
    assert list(k.member_row(0)) == [0, 0]
    k.advance(86_399_999)
    assert list(k.member_row(0)) == [0, 0]
    assert k.stats()["timers_fired"] == 0
    k.advance(86_400_000)                   # y: 2 -> 1, b enters at that instant
    assert list(k.member_row(0)) == [0, 1]
    k.advance(86_400_009)                   # (x: 2 -> 1 at 86_400_005 wakes no one)
    assert list(k.member_row(0)) == [0, 1]
    k.advance(86_400_010)                   # y: 1 -> 0, b leaves
    assert list(k.member_row(0)) == [0, 0]
    k.advance(2 * 86_400_000)
    assert k.stats()["timers_fired"] == 2
    assert k.stats()["timers"] == 0


def test_segment_needing_history_that_is_not_kept_is_refused():
    eng = segcore.Engine()
    eng.add_segment("fb", "count(purchase, 90d) >= 3")
    eng.track(1, "purchase", ts=5)
    with pytest.raises(RuleError, match="needs the history of `purchase` events") as e:
        eng.add_segment("fb5", "count(purchase, 90d) >= 5")   # needs 5 timestamps, 3 are kept
    assert e.value.segment == "fb5"
    assert list(eng.segments) == ["fb"]
    # new event types are fine: nothing to back-fill
    assert list(eng.add_segment("carts", "did(add_to_cart, 1h)")) == []


def test_transitions_replayed_from_empty_reproduce_members():
    from segcore.synth import DEFAULT_SEGMENTS, generate
    w = generate(500, 8000, days=60, seed=11)
    eng = segcore.Engine(seed=2)
    log = list(eng.add_segments(DEFAULT_SEGMENTS))
    log += list(eng.set_traits_many(user=w.trait_user, **w.traits))
    for b in w.batches(700):
        log += list(eng.track_many(user=b.user, event=b.event, ts=b.ts, props=b.props))
        log += list(eng.advance(eng.now + 3_600_000))
    log += list(eng.advance(eng.now + 40 * 86_400_000))
    replay = {name: set() for name in DEFAULT_SEGMENTS}
    last = {}
    for t in log:
        key = (t.user, t.segment)
        assert last.get(key) != t.entered, f"{t} repeats the previous state"
        last[key] = t.entered
        (replay[t.segment].add if t.entered else replay[t.segment].discard)(
            eng.user_number(t.user))
    for name in DEFAULT_SEGMENTS:
        assert replay[name] == set(eng.members(name)), name
    assert sum(len(v) for v in replay.values()) > 0
    ts = [t.ts for t in log]
    assert ts == sorted(ts)


@pytest.mark.parametrize("seed", [0, 5])
def test_engine_matches_an_independent_numpy_recompute(seed):
    """The default segments at many instants, against a from-scratch numpy computation."""
    from segcore.synth import DEFAULT_SEGMENTS, generate, recompute
    w = generate(3_000, 40_000, days=60, seed=seed)
    eng = segcore.Engine(seed=seed)
    eng.add_segments(DEFAULT_SEGMENTS)
    eng.set_traits_many(user=w.trait_user, **w.traits)
    checked = 0
    for i, b in enumerate(w.batches(4_000)):
        eng.track_many(user=b.user, event=b.event, ts=b.ts, props=b.props)
        if i % 3 == 2:
            eng.advance(eng.now + 17 * 3_600_000)    # time alone moves users
        upto = w[: (i + 1) * 4_000]
        want = recompute(upto, eng.now, seed=seed)
        for name in DEFAULT_SEGMENTS:
            assert sorted(eng.members(name)) == want[name].tolist(), (name, i)
            checked += len(want[name])
    assert checked > 10_000


def test_membership_flags_span_bytes_and_survive_export_and_import():
    rules = {f"s{i}": f"count(e{i}) >= 1" for i in range(20)}
    rules["r"] = "in(s9) and in(s17)"
    k, plan, codes = _counting_kernel(rules)
    k.add_users(1, np.zeros(1, dtype=np.int32))
    for i in (3, 9, 17):
        _one(k, plan, codes[f"e{i}"], i)
    want = [i in (3, 9, 17, 20) for i in range(21)]
    assert list(k.member_row(0)) == want and not k.member_row(1).any()
    st = k.export_state()
    assert st["members"].dtype == np.uint8 and len(st["members"]) == 2 * 21
    assert list(np.flatnonzero(st["members"])) == [3, 9, 17, 20]
    twin = Kernel(plan.arrays)
    twin.import_state(st)
    assert list(twin.member_row(0)) == want
    got = twin.member_bits(np.array([0, 0, 0, 1], np.uint32), np.array([9, 10, 20, 20], np.int32))
    assert list(got) == [True, False, True, False]
    twin.forget(0)
    assert not twin.member_row(0).any()


def test_packed_counter_rows_keep_every_value_and_widen_for_those_that_do_not_fit():
    rules = {"a": "count(x, 1d) >= 2", "b": "first_seen >= now - 1d", "c": "count(y) >= 1",
             "d": "abandoned(x, y, 1h)"}
    k, plan, codes = _counting_kernel(rules, compact=True)
    k.add_users(2, np.zeros(2, dtype=np.int32))
    assert k.packed and k.istride == 6
    assert not _counting_kernel(rules)[0].packed              # (int64 rows by default)
    init = plan.arrays["irow_init"]
    st = k.export_state()
    assert list(st["istate"]) == list(init) * 3          # fresh rows read as the sentinels
    for ts in (0, 5, 2**48 - 2):
        _one(k, plan, codes["x"], ts)
    _one(k, plan, codes["y"], 2**48 - 2)
    row = k.export_state()["istate"][:6]
    assert list(row) == [2**48 - 2, 5, 0, 1, 2**48 - 2, 2**48 - 2] and k.packed
    # a restored snapshot is read back as written, whatever its values
    st = k.export_state()
    odd = st["istate"].copy()
    odd[6:12] = [-5, 2**62, init[2], 7, np.iinfo(np.int64).max, 3]     # user 1: not packable
    twin = Kernel(plan.arrays, compact=True)
    twin.import_state(dict(st, istate=odd))
    assert not twin.packed and list(twin.export_state()["istate"]) == list(odd)
    same = Kernel(plan.arrays, compact=True)
    same.import_state(st)
    assert same.packed and list(same.export_state()["istate"]) == list(st["istate"])
    # forgetting resets the row; the user's neighbours keep theirs
    same.forget(0)
    assert list(same.export_state()["istate"]) == list(init) + list(st["istate"][6:])
    # the one timestamp a packed slot cannot hold turns the rows to int64, values kept
    _one(k, plan, codes["x"], 2**48 - 1)
    assert not k.packed
    assert list(k.export_state()["istate"][:6]) == [2**48 - 1, 2**48 - 2, 0, 1, 2**48 - 1,
                                                    2**48 - 2]
    assert list(k.export_state()["istate"][6:]) == list(init) * 2


def test_id_map_finds_every_id_and_grows_to_half_load():
    from segcore._kernel import IdMap
    m = IdMap(16)
    ids = np.random.default_rng(3).choice(2**32, size=5000, replace=False).astype(np.uint32)
    for lo in range(0, len(ids), 700):
        part = ids[lo: lo + 700]
        m.insert(part, np.arange(lo, lo + len(part), dtype=np.int64))
        assert m.size <= m.capacity // 2
    assert m.capacity == 16384            # the smallest power of two at load <= 1/2
    assert list(m.lookup(ids)) == list(range(len(ids)))
    m.remove(int(ids[7]))
    assert m.get(int(ids[7])) == -1 and m.get(int(ids[8])) == 8 and m.size == len(ids) - 1
    missing = np.setdiff1d(np.arange(10_000, dtype=np.uint32), ids)[:50]
    assert (m.lookup(missing) == -1).all()


def test_id_map_edges_of_keys_and_indices():
    from segcore._kernel import IdMap
    m = IdMap(16)
    m.put(0, 0)
    m.put(2**32 - 1, 2**32 - 3)             # the largest key and the largest index it holds
    assert m.get(0) == 0 and m.get(2**32 - 1) == 2**32 - 3 and m.get(1) == -1
    for bad in (-1, 2**32 - 2, 2**40):
        with pytest.raises(ValueError, match="dense indices must be >= 0 and < 2\\*\\*32 - 2"):
            m.put(5, bad)
        with pytest.raises(ValueError, match="dense indices"):
            m.insert(np.array([5, 6], np.uint32), np.array([1, bad], np.int64))
    assert m.size == 2 and m.get(5) == -1 and m.get(6) == -1     # nothing half-inserted
    m.remove(0)
    m.put(0, 7)                             # a removed key comes back with a new index
    assert m.get(0) == 7 and m.size == 2
    assert list(m.lookup(np.array([2**32 - 1, 0, 3], np.uint32))) == [2**32 - 3, 7, -1]


def test_an_engine_subclass_keeps_its_own_track():
    calls = []

    class Counting(segcore.Engine):
        def track(self, *args, **kwargs):
            calls.append(args)
            return super().track(*args, **kwargs)

    eng = Counting()
    eng.add_segment("recent", "did(x, 1h)")
    assert [t.segment for t in eng.track(1, "x", ts=1)] == ["recent"]
    assert calls == [(1, "x")] and eng.size("recent") == 1
    plain = segcore.Engine()                # its track is the compiled entry, bound to it
    assert plain.track.__self__ is plain and plain.track(1, "x", ts=1) == []


def test_id_map_reuses_room_after_removals():
    from segcore._kernel import IdMap
    m = IdMap(16)
    for i in range(5000):                   # put/remove churn: tombstones force rehashes
        m.put(100 + i, i)
        m.remove(100 + i)
    assert m.size == 0 and m.capacity <= 64
    m.put(7, 3)
    assert m.get(7) == 3 and m.get(100) == -1


def test_engine_churn_of_new_and_forgotten_users_keeps_working():
    eng = segcore.Engine()
    eng.add_segment("buyers", "count(purchase) >= 1")
    for i in range(3000):
        eng.track(10_000 + i, "purchase", ts=i)
        eng.forget(10_000 + i)
    assert eng.stats()["users"] == 0 and eng.size("buyers") == 0


def test_json_row_columns_survives_rows_that_change_while_read():
    from segcore._json import json_row_columns

    class Row:
        event, ts, props, id = "x", 1, None, None

        def __init__(self, rows):
            self.rows = rows

        @property
        def user(self):
            self.rows.clear()               # (decoded rows never do this; a caller might)
            return 1

    rows: list = []
    rows += [Row(rows), Row(rows)]
    with pytest.raises(RuntimeError, match="changed while being read"):
        json_row_columns(rows)
    with pytest.raises(TypeError):
        json_row_columns(("not", "a list"))
