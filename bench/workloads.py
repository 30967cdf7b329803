"""Helpers shared by the benchmark suites (and the memory script)."""

import time

import numpy as np

import segcore
from segcore.synth import DEFAULT_SEGMENTS

#: The reference engine is naive: it runs on a slice of the workload this long at most.
REF_EVENTS = 3_000


def new_engine(w, engine_cls=segcore.Engine):
    eng = engine_cls()
    eng.add_segments(DEFAULT_SEGMENTS)
    eng.set_traits_many(user=w.trait_user, **w.traits)
    return eng


def columns(w):
    """The columns of a workload slice as track_many takes them (props decoded once)."""
    return dict(user=w.user, event=w.event, ts=w.ts,
                props={k: w.props[k] for k in ("amount", "category", "cart_id")})


def stream(eng, w, batch):
    n = 0
    for b in w.batches(batch):
        n += len(eng.track_many(**columns(b)))
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
