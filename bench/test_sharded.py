"""Scale-out: the workload through ShardedEngine with 1 and 2 shards, on the local backend and
on Ray (a loopback-only local Ray started here), with one plain Engine timed in the same run.

On a 2-core machine the local backend runs the shards one after the other in this process (it
measures the driver's cost: validation, routing, merging); Ray runs each shard in its own
process, so 2 shards can use both cores, minus what moving the columns between processes costs.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # loopback-only Ray

import pytest  # noqa: E402

import segcore  # noqa: E402
from segcore.synth import DEFAULT_SEGMENTS  # noqa: E402
from workloads import new_engine, record, stream, timed  # noqa: E402

BATCH = 10_000


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _sharded(w, n, backend):
    eng = segcore.ShardedEngine(n, DEFAULT_SEGMENTS, backend)
    eng.set_traits_many(user=w.trait_user, **w.traits)
    return eng


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_sharded_track_many(benchmark, workload, request, backend, n_shards):
    if backend == "ray":
        request.getfixturevalue("ray_local")
    single_s = timed(lambda: stream(new_engine(workload), workload, BATCH), 1)
    box = {}

    def setup():
        if "eng" in box:
            box["eng"].close()
        box["eng"] = _sharded(workload, n_shards, backend)
        return (), {}

    benchmark.pedantic(lambda: stream(box["eng"], workload, BATCH), setup=setup, rounds=3)
    box["eng"].close()
    if benchmark.stats:
        s = benchmark.stats.stats.median
        record(benchmark, events=len(workload), events_per_s=len(workload) / s,
               single_engine_events_per_s=len(workload) / single_s,
               ratio_vs_single_engine=single_s / s)
