"""Bytes per active user for the canonical segments, measured (not estimated).

Each measurement runs in a fresh process: generate the workload, note the RSS, build the engine
and stream every event, note the RSS again. The delta is divided by the users who sent at least
one event. Beside it:

* the RSS delta once the C allocator has handed freed memory back to the OS (glibc's
  ``malloc_trim(0)``, called by this script only): glibc keeps up to 64 MiB of freed batch
  temporaries in the process (its trim threshold grows with the largest block freed), a fixed
  amount that the plain delta counts as if it were per user;
* the kernel's own accounting (``stats()["memory_bytes"]``: state arrays, window pools, timer
  heap).

    python bench/memory.py --size small [--repeat 3] [--compact-rows]
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import ctypes, json, resource, sys
import numpy as np
import segcore
from segcore.synth import DEFAULT_SEGMENTS, SIZES, generate

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

w = generate(*SIZES[sys.argv[1]], seed=0)
codes = None
cols = [(b.user, b.event_code, b.ts, b.props["amount"], b.props["category"])
        for b in w.batches(100_000)]
before = rss()
eng = segcore.Engine(compact_rows=sys.argv[2] == "compact")
eng.add_segments(DEFAULT_SEGMENTS)
codes = np.array([eng.event_code(n) for n in w.event_types], dtype=np.int32)
eng.set_traits_many(user=w.trait_user, **w.traits)
for user, code, ts, amount, category in cols:
    eng.track_many(user=user, event=codes[code], ts=ts,
                   props={"amount": amount, "category": category})
eng.sizes()                 # (a read: the bitmaps take in the batches' last transitions)
after = rss()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss()
except (OSError, AttributeError):            # not glibc
    trimmed = None
active = int(np.count_nonzero(np.bincount(w.user, minlength=w.n_users)))
st = eng.stats()
print(json.dumps({"users": st["users"], "active_users": active, "events": st["events"],
                  "rss_delta": after - before, "kernel_bytes": st["memory_bytes"],
                  "rss_trimmed": None if trimmed is None else trimmed - before}))
"""


def measure(size: str, compact: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, size, "compact" if compact else "wide"],
                         check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "medium"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compact-rows", action="store_true",
                    help="measure Engine(compact_rows=True)")
    args = ap.parse_args(argv)
    runs = [measure(args.size, args.compact_rows) for _ in range(args.repeat)]
    r0 = runs[0]
    rss = sorted(r["rss_delta"] for r in runs)[len(runs) // 2]
    print(f"size={args.size} compact_rows={args.compact_rows} users={r0['users']:,} "
          f"active={r0['active_users']:,} "
          f"events={r0['events']:,}")
    print(f"RSS delta (median of {len(runs)}): {rss / r0['active_users']:.0f} bytes/active user "
          f"({rss / 2**20:.1f} MiB)")
    if r0["rss_trimmed"] is not None:
        trim = sorted(r["rss_trimmed"] for r in runs)[len(runs) // 2]
        print(f"RSS delta after malloc_trim (median): {trim / r0['active_users']:.0f} "
              f"bytes/active user ({trim / 2**20:.1f} MiB)")
    print(f"kernel accounting: {r0['kernel_bytes'] / r0['active_users']:.0f} bytes/active user "
          f"({r0['kernel_bytes'] / 2**20:.1f} MiB)")
    return runs


if __name__ == "__main__":
    main()
