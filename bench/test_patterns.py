"""Behaviour patterns (docs/patterns.md) on the synthetic shop: ingestion with the default
segments plus sequences, sessions, hour/weekday, share and mode, against the default segments
alone and against the reference engine, measured in the same run."""

import numpy as np
import pytest

import segcore
from workloads import REF_EVENTS, new_engine, on_fresh_engines, pass_rounds, record, vs_reference

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
    on_fresh_engines(benchmark, lambda: pattern_engine(workload, patterns=patterns),
                     lambda eng: pattern_stream(eng, workload, 10_000), pass_rounds(workload))
    if benchmark.stats:
        record(benchmark, events=len(workload),
               events_per_s=len(workload) / benchmark.stats.stats.median)


def test_patterns_vs_reference(benchmark, workload):
    """The same slice with the pattern segments through the kernel and the reference."""
    vs_reference(benchmark, workload[:REF_EVENTS],
                 lambda part, cls: pattern_engine(part, cls, only_active=True),
                 lambda eng, part: pattern_stream(eng, part, 1_000))
