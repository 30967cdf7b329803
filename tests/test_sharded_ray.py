"""ShardedEngine on Ray: a real local Ray instance (loopback only, no dashboard) started by the
test, shards as actors, one of them killed mid-stream; the result must be one Engine's."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback-only Ray

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402

import segcore  # noqa: E402
from test_sharded import per_user, same, setup  # noqa: E402
from test_differential import _bulk_stream  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    yield
    ray.shutdown()


def test_ray_shards_match_one_engine_through_a_killed_actor_and_a_move(ray_local, tmp_path):
    rng = np.random.default_rng(2)
    fired = {"single": [], "sharded": []}
    single = segcore.Engine(seed=3)
    sharded = segcore.ShardedEngine(2, backend="ray", slots=16, seed=3,
                                    data_dir=tmp_path / "d", fsync="never")
    assert sharded.stats()["backend"] == "ray"
    setup(single, sharded)
    for name, eng in (("single", single), ("sharded", sharded)):
        eng.on_enter("c3", fired[name].append, after="20ms", name="hot")
    pids = [ray.get(a.read.remote("pid", [])) for a in sharded.actors]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    u, e, ts, props = _bulk_stream(rng, 900)
    for n, start in enumerate(range(0, len(u), 60)):
        sl = slice(start, start + 60)
        cols = {p: c[sl] for p, c in props.items()}
        ta = single.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        tb = sharded.track_many(user=u[sl], event=e[sl], ts=ts[sl], props=cols)
        same(single, sharded, ta, tb, f"batch {n}")
        if n == 4:
            sharded.kill_shard(0)              # SIGKILL the actor's process: Ray restarts it
        if n == 6:
            ray.kill(sharded.actors[1])        # dead for good: the driver starts a new one
        if n == 8:
            before = sharded.sizes()
            assert sharded.move_slots(range(8), 1) > 0
            assert sharded.sizes() == before
        if n == 10:
            t = single.now + 25
            same(single, sharded, single.advance(t), sharded.advance(t))
    same(single, sharded, single.advance(single.now + 1000), sharded.advance(sharded.now + 1000))
    assert sharded.stats()["driver_recoveries"] == 2
    assert sharded.stats()["events"] == single.stats()["events"]
    key = lambda f: (f.ts, str(f.user))  # noqa: E731
    assert sorted(fired["sharded"], key=key) == sorted(fired["single"], key=key)
    assert per_user(sharded.drain_firings()) == per_user(single.drain_firings())
    sharded.close()
    # the data outlives the actors: reopen on the local backend
    again = segcore.ShardedEngine.open(tmp_path / "d")
    same(single, again, [], [])
    again.close()
