"""Time and reads: advance over one simulated day, members and bitmap queries."""

import pytest

from workloads import new_engine, record, stream

DAY = 86_400_000


@pytest.fixture(scope="module")
def loaded(workload):
    eng = new_engine(workload)
    stream(eng, workload, 100_000)
    return eng


def test_advance_one_day(benchmark, workload):
    """Advance a loaded engine by one simulated day: cost follows the transitions it causes
    (recorded alongside), not the number of users."""
    box = {}

    def setup():
        eng = new_engine(workload)
        stream(eng, workload, 100_000)
        box["eng"] = eng
        return (), {}

    def run():
        eng = box["eng"]
        box["n"] = len(eng.advance(eng.now + DAY))

    benchmark.pedantic(run, setup=setup, rounds=2 if len(workload) <= 1_000_000 else 1)
    record(benchmark, users=workload.n_users, transitions=box["n"])
    if benchmark.stats:
        record(benchmark, us_per_transition=benchmark.stats.stats.median * 1e6
               / max(box["n"], 1))


def test_members(benchmark, loaded):
    bm = benchmark(loaded.members, "inactive_30d")
    record(benchmark, size=len(bm))


def test_query(benchmark, loaded):
    bm = benchmark(loaded.query, "(frequent_buyers | high_ltv) & ~holdout_10pct - inactive_30d")
    record(benchmark, size=len(bm))


def test_snapshot(benchmark, loaded):
    import io
    blob = benchmark(lambda: (lambda b: (loaded.snapshot(b), b.getvalue())[1])(io.BytesIO()))
    record(benchmark, bytes=len(blob), users=loaded.stats()["users"])


def test_restore(benchmark, loaded):
    import io

    import segcore
    buf = io.BytesIO()
    loaded.snapshot(buf)
    blob = buf.getvalue()
    twin = benchmark(segcore.Engine.restore, blob)
    record(benchmark, bytes=len(blob), users=twin.stats()["users"])
