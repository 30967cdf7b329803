"""Behaviour patterns (docs/patterns.md) on the synthetic shop: ingestion with the default
segments plus sequences, sessions, hour/weekday, share and mode, against the default segments
alone and against the reference engine, measured in the same run."""

import numpy as np
import pytest

import segcore
import segcore_ref
from workloads import REF_EVENTS, new_engine, record, timed

PATTERN_SEGMENTS = {
    "funnel": "seq(product_view, add_to_cart, purchase within 1d, 30d)",
    "cart_left": "seq(add_to_cart, not purchase by cart_id within 1h, 7d)",
    "regulars": "count(session, 7d) >= 3",
    "long_sessions": "avg(session.duration, 30d) >= 10m",
    "browsing_now": "in_session",
    "weekend_buyers": 'count(purchase where weekday in ["sat", "sun"], 90d) >= 2',
    "evening_buyers": "share(purchase where hour between 18 and 22, 90d) >= 0.5",
    "shoe_lovers": 'mode(product_view.category, 30d) == "shoes"',
}
ZONES = np.array(["Europe/Stockholm", "America/New_York", "UTC", None], dtype=object)


def pattern_engine(w, engine_cls=segcore.Engine, only_active=False, patterns=True):
    eng = new_engine(w, engine_cls, only_active)
    if patterns:
        eng.add_segments(PATTERN_SEGMENTS)
        users = np.unique(w.user) if only_active else w.trait_user
        eng.set_traits_many(user=users, tz=ZONES[np.asarray(users, dtype=np.int64) % 4])
    return eng


def pattern_stream(eng, w, batch):
    n = 0
    for b in w.batches(batch):
        n += len(eng.track_many(user=b.user, event=b.event, ts=b.ts,
                                props={k: b.props[k] for k in ("amount", "category",
                                                               "cart_id")}))
    return n


@pytest.mark.parametrize("patterns", [False, True], ids=["default", "with_patterns"])
def test_track_many_patterns(benchmark, workload, patterns):
    """A whole pass in batches of 10k: the default segments, then with the eight pattern
    segments added (the cost of sessions, sequences, local time and mode)."""
    box = {}

    def setup():
        box["eng"] = pattern_engine(workload, patterns=patterns)
        return (), {}

    benchmark.pedantic(lambda: pattern_stream(box["eng"], workload, 10_000), setup=setup,
                       rounds=3 if len(workload) <= 1_000_000 else 1)
    if benchmark.stats:
        record(benchmark, events=len(workload),
               events_per_s=len(workload) / benchmark.stats.stats.median)


def test_patterns_vs_reference(benchmark, workload):
    """The same slice with the pattern segments through the kernel and the reference."""
    part = workload[:REF_EVENTS]
    ref_s = timed(lambda: pattern_stream(
        pattern_engine(part, segcore_ref.RefEngine, only_active=True), part, 1_000), 1)
    box = {}

    def setup():
        box["eng"] = pattern_engine(part, only_active=True)
        return (), {}

    benchmark.pedantic(lambda: pattern_stream(box["eng"], part, 1_000), setup=setup, rounds=5)
    if benchmark.stats:
        k = benchmark.stats.stats.median
        record(benchmark, events=len(part), kernel_events_per_s=len(part) / k,
               reference_events_per_s=len(part) / ref_s, ratio_vs_reference=ref_s / k)
