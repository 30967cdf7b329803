"""Helpers shared by the benchmark suites (and the memory script)."""

import time

import numpy as np

import segcore
from segcore.synth import DEFAULT_SEGMENTS

#: The reference engine is naive: it runs on a slice of the workload this long at most.
REF_EVENTS = 3_000


def new_engine(w, engine_cls=segcore.Engine, only_active=False, **options):
    """An engine (``options`` for its constructor) with the default segments and the
    workload's traits (for every user, or with ``only_active`` just for the users who appear
    in ``w``)."""
    eng = engine_cls(**options)
    eng.add_segments(DEFAULT_SEGMENTS)
    users, traits = w.trait_user, w.traits
    if only_active:
        keep = np.isin(users, np.unique(w.user))
        users, traits = users[keep], {k: v[keep] for k, v in traits.items()}
    eng.set_traits_many(user=users, **traits)
    return eng


def columns(w, eng=None):
    """The columns of a workload slice as track_many takes them: event types as the engine's
    integer codes (the fast path; names work too) and the properties the segments read."""
    event = w.event if eng is None or not hasattr(eng, "event_code") else \
        np.array([eng.event_code(n) for n in w.event_types], dtype=np.int32)[w.event_code]
    return dict(user=w.user, event=event, ts=w.ts,
                props={k: w.props[k] for k in ("amount", "category", "cart_id")})


def stream(eng, w, batch):
    """Track every event of ``w`` in batches, then read every segment's size (so the pass
    includes bringing the member bitmaps up to date, which the kernel engine does on the
    first read after a batch); returns the number of transitions."""
    n = 0
    for b in w.batches(batch):
        n += len(eng.track_many(**columns(b, eng)))
    eng.sizes()
    return n


def timed(fn, repeat=3):
    """Median wall time of ``fn()`` over ``repeat`` runs (for side-by-side ratios)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def record(benchmark, **info):
    for k, v in info.items():
        benchmark.extra_info[k] = round(v, 4) if isinstance(v, float) else v


def on_fresh_engines(benchmark, make, run, rounds):
    """Benchmark ``run(engine)`` for ``rounds`` rounds, each on a fresh ``make()`` built
    outside the timing; returns the last engine."""
    box = {}

    def setup():
        box["eng"] = make()
        return (), {}

    benchmark.pedantic(lambda: run(box["eng"]), setup=setup, rounds=rounds)
    return box.get("eng")


def pass_rounds(w) -> int:
    """Rounds of a whole pass over ``w``: 3, or 1 past a million events."""
    return 3 if len(w) <= 1_000_000 else 1


def vs_reference(benchmark, part, make, run, rounds=5):
    """Time ``run(engine, part)`` on engines ``make(part, cls)`` of the kernel (benchmarked,
    fresh engine per round) and of the reference engine (once), side by side; records the
    ratio."""
    import segcore_ref
    ref_s = timed(lambda: run(make(part, segcore_ref.RefEngine), part), 1)
    on_fresh_engines(benchmark, lambda: make(part, segcore.Engine), lambda eng: run(eng, part),
                     rounds)
    if benchmark.stats:
        k = benchmark.stats.stats.median
        record(benchmark, events=len(part), kernel_events_per_s=len(part) / k,
               reference_events_per_s=len(part) / ref_s, ratio_vs_reference=ref_s / k)
