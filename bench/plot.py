"""Plots for docs/performance.md: events/s against the number of users, and the latency
distribution of single-event ``track``. Needs matplotlib (``pip install '.[bench]'``).

    python bench/plot.py docs/perf.png
"""

import sys
import time

import numpy as np

import segcore
from segcore.synth import DEFAULT_SEGMENTS, generate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from workloads import columns, new_engine  # noqa: E402


def throughput(n_users: int, n_events: int, repeat: int = 3) -> float:
    w = generate(n_users, n_events, seed=0)
    rates = []
    for _ in range(repeat):
        eng = new_engine(w)
        batches = [columns(b, eng) for b in w.batches(100_000)]
        t0 = time.perf_counter()
        for b in batches:
            eng.track_many(**b)
        rates.append(n_events / (time.perf_counter() - t0))
    return float(np.median(rates))


def latencies(n: int = 30_000) -> np.ndarray:
    w = generate(2_000, n, seed=1)
    eng = segcore.Engine()
    eng.add_segments(DEFAULT_SEGMENTS)
    rows = list(zip(w.user.tolist(), w.event.tolist(), w.ts.tolist(),
                    w.props["amount"].tolist()))
    lat = np.empty(len(rows), dtype=np.int64)
    clock = time.perf_counter_ns
    for i, (u, e, t, a) in enumerate(rows):
        props = {"amount": a} if a == a else None
        t0 = clock()
        eng.track(u, e, ts=t, props=props)
        lat[i] = clock() - t0
    return lat


def main(out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [(2_000, 30_000), (20_000, 300_000), (100_000, 1_000_000), (1_000_000, 10_000_000)]
    rates = []
    for u, e in sizes:
        rates.append(throughput(u, e, repeat=3 if e <= 1_000_000 else 1))
        print(f"{u:>9,} users {e:>11,} events: {rates[-1] / 1e6:.2f} M events/s", flush=True)
    lat = latencies() / 1e3
    p50, p99 = np.percentile(lat, [50, 99])
    print(f"track: p50 {p50:.1f} us, p99 {p99:.1f} us")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([u for u, _ in sizes], np.array(rates) / 1e6, "o-")
    a.set_xscale("log")
    a.set_xlabel("users (10 events per user)")
    a.set_ylabel("track_many, M events/s (end to end)")
    a.set_title("Throughput, 12 segments, batches of 100k")
    a.set_ylim(bottom=0)
    a.grid(alpha=0.3)
    b.hist(np.clip(lat, 0, 100), bins=100)
    b.axvline(p50, color="k", ls="--", label=f"p50 {p50:.1f} µs")
    b.axvline(p99, color="r", ls="--", label=f"p99 {p99:.1f} µs")
    b.set_yscale("log")
    b.set_xlabel("track(), µs per event (clipped at 100)")
    b.set_title("Single-event latency (2k users, 30k events)")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/perf.png")
