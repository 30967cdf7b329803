"""Ingestion: track_many end to end, track one event at a time, track_json, with the ratios to
the reference engine and to a numpy recompute measured in the same run."""

import time

import msgspec
import numpy as np
import pytest

from workloads import (REF_EVENTS, columns, new_engine, on_fresh_engines, pass_rounds, record,
                       stream, timed, vs_reference)
from segcore.synth import recompute


@pytest.mark.parametrize("batch", [1_000, 10_000, 100_000])
def test_track_many(benchmark, workload, batch):
    """A whole pass of the workload (transitions and time expiry included), fresh engine."""
    on_fresh_engines(benchmark, lambda: new_engine(workload),
                     lambda eng: stream(eng, workload, batch), pass_rounds(workload))
    if benchmark.stats:
        record(benchmark, events=len(workload),
               events_per_s=len(workload) / benchmark.stats.stats.median)


def test_track_many_vs_reference(benchmark, workload):
    """The same slice through the kernel and through the reference engine (which keeps every
    event and re-evaluates from scratch): the incremental speed-up, measured side by side."""
    vs_reference(benchmark, workload[:REF_EVENTS],
                 lambda part, cls: new_engine(part, cls, only_active=True),
                 lambda eng, part: stream(eng, part, 1_000))


def test_track_many_vs_numpy_recompute(benchmark, workload):
    """A whole incremental pass (live membership and every transition) against one numpy
    recompute of the same segments from scratch (end state only)."""
    now = int(workload.ts.max())
    np_s = timed(lambda: recompute(workload, now))
    on_fresh_engines(benchmark, lambda: new_engine(workload),
                     lambda eng: stream(eng, workload, 100_000), pass_rounds(workload))
    if benchmark.stats:
        k = benchmark.stats.stats.median
        record(benchmark, numpy_recompute_s=np_s, pass_s=k, ratio_pass_to_recompute=k / np_s)


def test_track_single(benchmark, workload):
    """One event at a time from Python: per-event latency percentiles (not just the mean)."""
    part = workload[: min(len(workload), 50_000)]
    rows = list(zip(part.user.tolist(), part.event.tolist(), part.ts.tolist(),
                    part.props["amount"].tolist(), part.props["category"].tolist(),
                    part.props["cart_id"].tolist()))
    props = []
    for _, _, _, amount, cat, cart in rows:
        p = {}
        if amount == amount:
            p["amount"] = amount
        if cat is not None:
            p["category"] = cat
        if cart is not None:
            p["cart_id"] = cart
        props.append(p)
    lat = np.empty(len(rows), dtype=np.int64)

    def run():
        eng = new_engine(part)
        track = eng.track
        clock = time.perf_counter_ns
        for i, (u, e, t, _, _, _) in enumerate(rows):
            t0 = clock()
            track(u, e, ts=t, props=props[i])
            lat[i] = clock() - t0

    benchmark.pedantic(run, rounds=1)
    record(benchmark, events=len(rows), p50_us=float(np.percentile(lat, 50)) / 1e3,
           p99_us=float(np.percentile(lat, 99)) / 1e3, mean_us=float(lat.mean()) / 1e3)


def test_track_json(benchmark, workload):
    """Bytes of a JSON array of events -> transitions."""
    part = workload[: min(len(workload), 200_000)]
    amount = part.props["amount"]
    cat = part.props["category"]
    docs = []
    for i, (u, e, t) in enumerate(zip(part.user.tolist(), part.event.tolist(),
                                      part.ts.tolist())):
        p = {}
        if amount[i] == amount[i]:
            p["amount"] = float(amount[i])
        if cat[i] is not None:
            p["category"] = cat[i]
        docs.append({"user": u, "event": e, "ts": t, "props": p})
    chunks = [msgspec.json.encode(docs[i:i + 10_000]) for i in range(0, len(docs), 10_000)]
    on_fresh_engines(benchmark, lambda: new_engine(part),
                     lambda eng: [eng.track_json(c) for c in chunks], 3)
    if benchmark.stats:
        record(benchmark, events=len(part),
               events_per_s=len(part) / benchmark.stats.stats.median,
               bytes=sum(len(c) for c in chunks))
