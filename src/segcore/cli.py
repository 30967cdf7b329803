"""Command line: ``segcore demo`` (or ``python -m segcore demo``), built with click.

``segcore demo`` streams a synthetic shop workload (:mod:`segcore.synth`) through an
:class:`Engine` holding the twelve segments of the design, shows the engine time, the throughput,
every segment's size and a sample of the transitions as they happen, then moves time 30 days past
the last event to show the exits that time alone causes, and prints a summary. ``segcore bench``
times the engine's calls on the same workload; ``rules check``, ``replay`` and ``inspect`` work
with rules files, event logs, snapshots and data directories.

>>> main(["demo", "--users", "500", "--events", "5000", "--batch", "1000", "--once"])
segcore demo: 5,000 events from 500 users (seed 0), batches of 1,000
...
total ...
0
"""

from __future__ import annotations

import collections
import datetime as _dt
import itertools
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import click
import numpy as np

DAY_MS = 86_400_000
_RECENT = 10            # transitions kept in the scrolling sample
_PER_BATCH = 3          # transitions sampled from each batch (distinct segments first)
_REFRESH_S = 0.1        # minimum wall time between two screen refreshes
_AFTER_DAYS = 30
_BENCH_SINGLE = 20_000  # events tracked one at a time by `segcore bench`
_BENCH_JSON = 100_000   # events tracked as JSON by `segcore bench`
_BENCH_REPEAT = 10      # rounds of members() over every segment, and of sizes(), in the bench


def _iso(ts_ms: int) -> str:
    return _dt.datetime.fromtimestamp(ts_ms / 1000, tz=_dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def _rate(n: float, seconds: float) -> str:
    if seconds <= 0:
        return "-"
    r = n / seconds
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.0f}k" if r >= 1e3 else f"{r:.0f}"


class _Tally:
    """Entries and exits per segment, plus a small sample of recent transitions."""

    def __init__(self, names: Sequence[str]):
        self.entered = dict.fromkeys(names, 0)
        self.exited = dict.fromkeys(names, 0)
        self.recent: collections.deque = collections.deque(maxlen=_RECENT)
        self.total = 0

    def add(self, trans) -> None:
        n = len(trans)
        if not n:
            return
        self.total += n
        names = getattr(trans, "segment_names", None)
        if names is not None and hasattr(trans, "segment"):
            # numpy columns: count without building a Transition per row
            seg = np.asarray(trans.segment)
            ent = np.asarray(trans.entered, dtype=bool)
            e = np.bincount(seg[ent], minlength=len(names))
            x = np.bincount(seg[~ent], minlength=len(names))
            for i, name in enumerate(names):
                self.entered[name] = self.entered.get(name, 0) + int(e[i])
                self.exited[name] = self.exited.get(name, 0) + int(x[i])
            # the latest transition of each segment present, the latest ones first
            _, rev = np.unique(seg[::-1], return_index=True)
            picks = np.sort(n - 1 - rev)[-_PER_BATCH:]
            self.recent.extend(trans[int(i)] for i in picks)
            return
        tail: collections.deque = collections.deque(maxlen=_PER_BATCH)
        for t in trans:
            d = self.entered if t.entered else self.exited
            d[t.segment] = d.get(t.segment, 0) + 1
            tail.append(t)
        self.recent.extend(tail)

    @property
    def n_entered(self) -> int:
        return sum(self.entered.values())

    @property
    def n_exited(self) -> int:
        return sum(self.exited.values())


class _Screen:
    """The live view: redrawn in place with ANSI escapes on a terminal, else plain lines."""

    def __init__(self, live: bool, plain: bool, stream=None):
        self.out = stream or sys.stdout
        self.live = live            # redraw in place
        self.plain = plain          # periodic progress lines
        self.last = 0.0
        self.started = False
        enc = getattr(self.out, "encoding", None) or "ascii"
        try:
            "█▏▎▍▌▋▊▉·—".encode(enc)
            self.blocks, self.dot, self.dash = " ▏▎▍▌▋▊▉█", "·", "—"
        except (UnicodeEncodeError, LookupError):
            self.blocks, self.dot, self.dash = " ....::::#", "-", "-"

    def bar(self, value: int, top: int, width: int) -> str:
        if top <= 0 or width <= 0:
            return " " * max(width, 0)
        eighths = int(round(value / top * width * 8))
        full, part = divmod(min(eighths, width * 8), 8)
        s = self.blocks[-1] * full + (self.blocks[part] if part else "")
        return s.ljust(width)

    def start(self) -> None:
        if self.live:
            self.out.write("\x1b[?25l\x1b[H\x1b[2J")    # hide cursor, clear screen
            self.started = True

    def stop(self) -> None:
        if self.started:
            self.out.write("\x1b[?25h")                 # show the cursor again
            self.out.flush()
            self.started = False

    def due(self, force: bool) -> bool:
        now = time.perf_counter()
        if force or now - self.last >= _REFRESH_S:
            self.last = now
            return True
        return False

    def draw(self, lines: list[str]) -> None:
        cols = shutil.get_terminal_size((100, 40)).columns
        body = "".join(line[:cols] + "\x1b[K\n" for line in lines)
        self.out.write("\x1b[H" + body + "\x1b[J")
        self.out.flush()


def _view(scr: _Screen, eng, tally: _Tally, head: str, done: int, total: int,
          engine_s: float, wall_s: float, phase: str) -> list[str]:
    sizes = eng.sizes()
    top = max(sizes.values(), default=0)
    width = max(10, min(40, shutil.get_terminal_size((100, 40)).columns - 62))
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    lines = [
        head,
        "",
        f"engine time  {_iso(eng.now)} UTC   {phase}",
        f"events       {done:,} / {total:,}{pct}   {_rate(done, engine_s)} ev/s in the engine, "
        f"{_rate(done, wall_s)} ev/s wall",
        f"transitions  {tally.n_entered:,} entered, {tally.n_exited:,} exited",
        "",
        f"{'segment':<24} {'size':>9}  {'':<{width}} {'entered':>9} {'exited':>9}",
    ]
    for name, size in sizes.items():
        lines.append(f"{name:<24} {size:>9,}  {scr.bar(size, top, width)} "
                     f"{tally.entered.get(name, 0):>9,} {tally.exited.get(name, 0):>9,}")
    lines += ["", "recent transitions"]
    for t in reversed(tally.recent):
        sign = "+" if t.entered else "-"
        lines.append(f"  {_iso(t.ts)}  {sign} {t.segment:<24} user {t.user}")
    lines += [""] * (_RECENT - len(tally.recent))
    return lines


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        print(f"segcore {_version()}")
        ctx.exit()


def _check_days(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 2 / 24 <= value <= 100_000:
        raise click.BadParameter(f"must be between 0.084 (2 hours) and 100000, got {value:g}")
    return value


def _check_seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not value >= 0:
        raise click.BadParameter(f"must be >= 0, got {value:g}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and exit.")
def cli() -> None:
    """segcore: real-time, exact, incremental behavioural segmentation."""


@cli.command("demo",
             short_help="stream a synthetic shop workload through the 12 design segments")
@click.option("--users", type=click.IntRange(min=1), default=100_000, metavar="N",
              help="number of users (default: 100000)")
@click.option("--events", type=click.IntRange(min=0), default=1_000_000, metavar="N",
              help="number of events (default: 1000000)")
@click.option("--batch", type=click.IntRange(min=1), default=10_000, metavar="N",
              help="events per track_many call (default: 10000)")
@click.option("--days", type=float, default=120, metavar="D", callback=_check_days,
              help="period the events cover (default: 120)")
@click.option("--seed", type=int, default=0, metavar="S", help="workload seed (default: 0)")
@click.option("--delay", type=float, default=0.0, metavar="SECONDS", callback=_check_seconds,
              help="pause after each batch, to watch slowly (default: 0)")
@click.option("--once", is_flag=True,
              help="no live view: print only the summary (for CI and pipes)")
def demo(users: int, events: int, batch: int, days: float, seed: int, delay: float,
         once: bool) -> int:
    """Stream a seeded synthetic shop workload through an Engine with the 12 segments of the
    design, showing engine time, throughput, segment sizes and recent transitions live; then
    advance 30 days past the last event and print a summary."""
    import segcore
    from segcore.synth import DEFAULT_SEGMENTS, generate

    tty = sys.stdout.isatty()
    scr = _Screen(live=tty and not once, plain=not tty and not once)
    head = (f"segcore demo: {events:,} events from {users:,} users (seed {seed}), "
            f"batches of {batch:,}")
    print(head, flush=True)

    t0 = time.perf_counter()
    w = generate(n_users=users, n_events=events, days=days, seed=seed)
    t_gen = time.perf_counter() - t0
    print(f"generated {len(w):,} events over {days:g} days in {t_gen:.2f} s "
          f"({w.n_late:,} arrived late)", flush=True)

    t0 = time.perf_counter()
    eng = segcore.Engine()
    tally = _Tally(list(DEFAULT_SEGMENTS))
    tally.add(eng.add_segments(DEFAULT_SEGMENTS))
    tally.add(eng.set_traits_many(user=w.trait_user, **w.traits))
    t_setup = time.perf_counter() - t0
    print(f"engine ready: {len(DEFAULT_SEGMENTS)} segments, traits of {w.n_users:,} users "
          f"in {t_setup:.2f} s", flush=True)

    # Event codes from the engine avoid a string column per batch.
    remap = (np.array([eng.event_code(name) for name in w.event_types], dtype=np.int32)
             if hasattr(eng, "event_code") else None)

    total = len(w)
    done = 0
    engine_s = 0.0
    n_batches = 0
    step = max(1, total // 10)
    next_line = step
    scr.start()
    wall0 = time.perf_counter()
    try:
        for b in w.batches(batch):
            ev = b.event if remap is None else remap[b.event_code]
            props = dict(b.props)
            t = time.perf_counter()
            trans = eng.track_many(user=b.user, event=ev, ts=b.ts, props=props)
            engine_s += time.perf_counter() - t
            tally.add(trans)
            done += len(b)
            n_batches += 1
            wall_s = time.perf_counter() - wall0
            if scr.live and scr.due(done == total):
                scr.draw(_view(scr, eng, tally, head, done, total, engine_s, wall_s,
                               "streaming"))
            elif scr.plain and (done >= next_line or done == total):
                next_line += step
                print(f"[{100 * done / total:3.0f}%] {_iso(eng.now)}  {done:,} events  "
                      f"{_rate(done, engine_s)} ev/s  +{tally.n_entered:,} "
                      f"-{tally.n_exited:,} transitions", flush=True)
            if delay:
                time.sleep(delay)
        wall_s = time.perf_counter() - wall0
        stream_end = eng.now
        sizes_stream = eng.sizes()

        # Time alone: a day at a time, 30 days past the last event.
        t0 = time.perf_counter()
        after = _Tally(list(DEFAULT_SEGMENTS))
        for day in range(1, _AFTER_DAYS + 1):
            trans = eng.advance(stream_end + day * DAY_MS)
            tally.add(trans)
            after.add(trans)
            if scr.live and scr.due(day == _AFTER_DAYS):
                scr.draw(_view(scr, eng, tally, head, done, total, engine_s, wall_s,
                               f"advancing: +{day} d after the last event"))
            if delay:
                time.sleep(min(delay, 0.05))
        t_adv = time.perf_counter() - t0
    except KeyboardInterrupt:
        scr.stop()
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        scr.stop()

    # ---- summary
    print(f"\nstreamed {done:,} events in {n_batches:,} batches: {wall_s:.2f} s wall, "
          f"{engine_s:.2f} s in track_many -> {_rate(done, engine_s)} ev/s "
          f"(wall {_rate(done, wall_s)} ev/s)")
    print(f"advanced {_AFTER_DAYS} days to {_iso(eng.now)} UTC in {t_adv:.3f} s: "
          f"{after.n_entered:,} entered, {after.n_exited:,} exited")
    print()
    print(f"{'segment':<24} {'size@end':>9} {'size+30d':>9} {'entered':>9} {'exited':>9}")
    sizes = eng.sizes()
    for name in sizes:
        print(f"{name:<24} {sizes_stream.get(name, 0):>9,} {sizes[name]:>9,} "
              f"{tally.entered.get(name, 0):>9,} {tally.exited.get(name, 0):>9,}")
    print(f"{'total':<24} {'':>9} {'':>9} {tally.n_entered:>9,} {tally.n_exited:>9,}")
    stats = eng.stats() if hasattr(eng, "stats") else {}
    shown = {k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)}
    if shown:
        print("\nstats: " + ", ".join(f"{k}={v:,}" for k, v in
                                      itertools.islice(shown.items(), 12)))
    return 0


def _read_rules(path: str) -> dict[str, str]:
    from .rules import load_rules_file
    with open(path, encoding="utf-8") as f:
        return load_rules_file(f.read())


def _load_rules(path: str) -> tuple[dict[str, str] | None, int]:
    """The rules of a file, or None and the exit status after reporting why not."""
    from .errors import RuleError
    try:
        return _read_rules(path), 0
    except OSError as e:
        print(f"segcore: cannot read {path}: {e.strerror}", file=sys.stderr)
        return None, 2
    except RuleError as e:
        print(f"{path}:{e.line or 1}:{e.column or 1}: {e}", file=sys.stderr)
        return None, 1


@cli.group("rules", short_help="work with rules files")
def rules() -> None:
    """Work with rules files."""


@rules.command("check", short_help="validate a rules file")
@click.argument("file", metavar="FILE")
def rules_check(file: str) -> int:
    """Parse every rule of FILE (`name: rule` per line, `#` comments; or a JSON object) and
    report the first error as FILE:LINE:COLUMN."""
    loaded, status = _load_rules(file)
    if loaded is None:
        return status
    print(f"{file}: {len(loaded)} segment{'s' if len(loaded) != 1 else ''}, all valid")
    return 0


def _progress(total: int, unit: str, desc: str | None = None):
    """A tqdm progress bar when tqdm is installed (``pip install 'segcore[cli]'``), else a
    line every 10 %."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr, desc=desc)
    except ImportError:
        class _Lines:
            def __init__(self):
                self.n = 0
                self.next = total / 10

            def update(self, k):
                self.n += k
                if self.n >= self.next or self.n == total:
                    print(f"  {desc + ': ' if desc else ''}{self.n:,} / {total:,} {unit}",
                          file=sys.stderr)
                    self.next += total / 10

            def close(self):
                pass
        return _Lines()


@cli.command("replay", short_help="rebuild state from a JSONL file of events")
@click.argument("events", metavar="EVENTS.jsonl")
@click.option("--rules", "rules_path", required=True, metavar="RULES", help="rules file")
@click.option("--snapshot", metavar="OUT", help="write the final state there")
@click.option("--batch", type=click.IntRange(min=1), default=10_000, metavar="N",
              help="events per batch (default: 10000)")
@click.option("--until", type=int, metavar="TS_MS",
              help="advance engine time to TS_MS after the last event")
def replay(events: str, rules_path: str, snapshot: str | None, batch: int,
           until: int | None) -> int:
    """Track every event of EVENTS (JSON Lines: one {user, event, ts, props?, id?} object per
    line) through an engine with the segments of RULES, with a progress bar; print the segment
    sizes and optionally write a snapshot."""
    import segcore
    from .errors import EventError
    loaded, status = _load_rules(rules_path)
    if loaded is None:
        return status
    eng = segcore.Engine()
    eng.add_segments(loaded)
    try:
        size = os.path.getsize(events)
        f = open(events, "rb")
    except OSError as e:
        print(f"segcore: cannot read {events}: {e.strerror}", file=sys.stderr)
        return 2
    bar = _progress(size, "B")
    t0 = time.perf_counter()
    n_events = n_trans = 0
    lineno = 0
    with f:
        while True:
            lines, first = [], lineno + 1
            for raw in f:
                lineno += 1
                bar.update(len(raw))
                if raw.strip():
                    lines.append(raw.strip())
                    if len(lines) >= batch:
                        break
            if not lines:
                break
            try:
                out = eng.track_json(b"[" + b",".join(lines) + b"]")
            except EventError as e:
                bar.close()
                print(f"{events}: in the batch starting at line {first}: {e}",
                      file=sys.stderr)
                return 1
            n_events += len(lines)
            n_trans += len(out)
    bar.close()
    if until is not None:
        n_trans += len(eng.advance(until))
    dt = time.perf_counter() - t0
    print(f"replayed {n_events:,} events in {dt:.2f} s ({_rate(n_events, dt)}), "
          f"{n_trans:,} transitions; engine time {_iso(eng.now)}")
    for name, size in eng.sizes().items():
        print(f"  {name:<32} {size:>12,}")
    if snapshot:
        eng.snapshot(snapshot)
        print(f"wrote {snapshot}")
    return 0


def _is_log(path: str) -> bool:
    from .snapshot import MAGIC
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError:
        return False
    return head != MAGIC and path.endswith(".log")


@cli.command("inspect", short_help="check and summarise a snapshot, log or data directory")
@click.argument("path", metavar="SNAPSHOT_OR_WAL")
def inspect(path: str) -> int:
    """Verify a snapshot file (or a data directory: its latest snapshot and the log after it)
    and print the engine time, users, rules and segment sizes; or count the intact records of
    a write-ahead log (wal-N.log)."""
    import segcore
    from . import wal
    from .errors import SnapshotError
    try:
        if os.path.isdir(path):
            n = wal.latest(path)
            if n is None:
                raise SnapshotError(f"`{path}` holds no segcore data")
            snap, log = wal.paths(path, n)
            records, end, torn = wal.read_records(log)
            eng = segcore.Engine.open(path)
            eng.close()
            print(f"data directory {path}: snapshot-{n}.snap + wal-{n}.log "
                  f"({len(records):,} records{', torn tail dropped' if torn else ''})")
        elif _is_log(path):
            records, end, torn = wal.read_records(path)
            kinds = collections.Counter(r.method.lstrip("_") for r in records)
            print(f"write-ahead log {path}: {len(records):,} intact records, {end:,} bytes"
                  + (f"; a torn or corrupt tail after byte {end:,} would be dropped"
                     if torn else ""))
            for method, count in kinds.most_common():
                print(f"  {method:<28} {count:>10,}")
            return 0
        else:
            eng = segcore.Engine.restore(path)
            print(f"snapshot {path}: {os.path.getsize(path):,} bytes, checksum ok")
    except SnapshotError as e:
        print(f"segcore: {e}", file=sys.stderr)
        return 1
    st = eng.stats()
    print(f"engine time {_iso(st['now'])} ({st['now']} ms); {st['users']:,} users, "
          f"{st['events']:,} events, {st['transitions']:,} transitions")
    print(f"{st['segments']} segments:")
    sizes = eng.sizes()
    for name, rule in eng.segments.items():
        print(f"  {name:<28} {sizes[name]:>10,}  {rule}")
    if eng._items:
        print(f"{len(eng._items)} triggers and journeys: "
              + ", ".join(it.name for it in eng._items))
    return 0


def _rows(w) -> list[tuple[int, str, int, dict[str, Any]]]:
    """The events of a workload as ``(user, event, ts, props)`` rows, absent properties left
    out (what :meth:`Engine.track` and ``track_json`` take)."""
    cols = {name: col.tolist() for name, col in w.props.items()}
    names = w.event_types
    rows = []
    for i, (u, c, t) in enumerate(zip(w.user.tolist(), w.event_code.tolist(), w.ts.tolist())):
        props = {k: col[i] for k, col in cols.items() if col[i] is not None and col[i] == col[i]}
        rows.append((u, names[c], t, props))
    return rows


def _micro() -> str:
    """The unit of microseconds, ``µs``, or ``us`` where standard output cannot encode µ."""
    try:
        "µ".encode(getattr(sys.stdout, "encoding", None) or "ascii")
        return "µs"
    except (UnicodeEncodeError, LookupError):
        return "us"


@cli.command("bench", short_help="time the engine's calls on a synthetic shop workload")
@click.option("--users", type=click.IntRange(min=1), default=100_000, metavar="N",
              help="number of users (default: 100000)")
@click.option("--events", type=click.IntRange(min=1), default=1_000_000, metavar="N",
              help="number of events (default: 1000000)")
@click.option("--batch", type=click.IntRange(min=1), default=10_000, metavar="N",
              help="events per track_many call and per JSON array (default: 10000)")
@click.option("--seed", type=int, default=0, metavar="S", help="workload seed (default: 0)")
def bench(users: int, events: int, batch: int, seed: int) -> int:
    """A quick local benchmark on a seeded synthetic shop workload and the 12 segments of the
    design: track_many over every event (with a progress bar), track one event at a time from
    Python (p50 and p99 latency, fresh engine, first 20k events), track_json (fresh engine,
    first 100k events), advance one day past the last event, members and sizes. For careful
    measurements use the suites in bench/."""
    import msgspec

    import segcore
    from segcore.synth import DEFAULT_SEGMENTS, generate

    print(f"segcore bench: {events:,} events from {users:,} users (seed {seed}), "
          f"batches of {batch:,}", flush=True)
    t0 = time.perf_counter()
    w = generate(n_users=users, n_events=events, seed=seed)
    print(f"generated {len(w):,} events in {time.perf_counter() - t0:.2f} s", flush=True)

    def engine() -> segcore.Engine:
        eng = segcore.Engine()
        eng.add_segments(DEFAULT_SEGMENTS)
        eng.set_traits_many(user=w.trait_user, **w.traits)
        return eng

    # track_many: every event, event types as the engine's codes
    eng = engine()
    remap = np.array([eng.event_code(name) for name in w.event_types], dtype=np.int32)
    bar = _progress(len(w), "ev", "track_many")
    many_s = 0.0
    n_batches = n_trans = 0
    for b in w.batches(batch):
        ev, props = remap[b.event_code], dict(b.props)
        t = time.perf_counter()
        n_trans += len(eng.track_many(user=b.user, event=ev, ts=b.ts, props=props))
        many_s += time.perf_counter() - t
        n_batches += 1
        bar.update(len(b))
    bar.close()

    # track: one event at a time from Python, on a fresh engine
    rows = _rows(w[:_BENCH_SINGLE])
    single = engine()
    track, clock = single.track, time.perf_counter_ns
    lat = np.empty(len(rows), dtype=np.int64)
    for i, (u, e, t_ms, p) in enumerate(rows):
        t = clock()
        track(u, e, ts=t_ms, props=p)
        lat[i] = clock() - t
    p50, p99 = np.percentile(lat, [50, 99]) / 1e3

    # track_json: JSON arrays of `batch` events, on a fresh engine
    docs = [{"user": u, "event": e, "ts": t_ms, "props": p}
            for u, e, t_ms, p in _rows(w[:_BENCH_JSON])]
    chunks = [msgspec.json.encode(docs[i:i + batch]) for i in range(0, len(docs), batch)]
    js = engine()
    t = time.perf_counter()
    for chunk in chunks:
        js.track_json(chunk)
    json_s = time.perf_counter() - t

    # advance: one day past the last event
    t = time.perf_counter()
    n_adv = len(eng.advance(eng.now + DAY_MS))
    adv_s = time.perf_counter() - t

    # reads: members of every segment, sizes
    t = time.perf_counter()
    for _ in range(_BENCH_REPEAT):
        for name in DEFAULT_SEGMENTS:
            eng.members(name)
    members_s = time.perf_counter() - t
    n_members = _BENCH_REPEAT * len(DEFAULT_SEGMENTS)
    t = time.perf_counter()
    for _ in range(n_members):
        sizes = eng.sizes()
    sizes_s = time.perf_counter() - t

    us = _micro()
    print()
    print(f"{'call':<22} {'events':>10} {'ms':>9}  result")
    print(f"{'track_many':<22} {len(w):>10,} {many_s * 1e3:>9,.1f}  "
          f"{_rate(len(w), many_s)} ev/s, {n_batches:,} batches, {n_trans:,} transitions")
    print(f"{'track, one at a time':<22} {len(rows):>10,} {lat.sum() / 1e6:>9,.1f}  "
          f"p50 {p50:.1f} {us}, p99 {p99:.1f} {us}")
    print(f"{'track_json':<22} {len(docs):>10,} {json_s * 1e3:>9,.1f}  "
          f"{_rate(len(docs), json_s)} ev/s, {sum(map(len, chunks)) / 1e6:.1f} MB in "
          f"{len(chunks):,} arrays")
    print(f"{'advance one day':<22} {'':>10} {adv_s * 1e3:>9,.1f}  {n_adv:,} transitions")
    print(f"{'members':<22} {'':>10} {members_s * 1e3:>9,.1f}  "
          f"{members_s / n_members * 1e6:.1f} {us} a call ({n_members:,} calls, largest "
          f"{max(sizes.values(), default=0):,} members)")
    print(f"{'sizes':<22} {'':>10} {sizes_s * 1e3:>9,.1f}  "
          f"{sizes_s / n_members * 1e6:.1f} {us} a call ({n_members:,} calls)")
    return 0


@cli.command("serve", short_help="run the HTTP server (pip install 'segcore[server]')")
@click.option("--rules", "rules_path", metavar="RULES_FILE",
              help="segments: one `name: rule` per line (`#` comments), or JSON; optional "
                   "when --data-dir already holds an engine")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; anything but loopback needs SEGCORE_TOKEN")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--data-dir", metavar="DIR",
              help="write-ahead log and snapshots: recover on start, checkpoint on SIGTERM")
@click.option("--fsync", type=click.Choice(["always", "batch", "never"]), default="always",
              show_default=True, help="when the log is flushed to disk (with --data-dir)")
@click.option("--clock", type=click.Choice(["event", "wall"]), default="event",
              show_default=True,
              help="event: time moves with events and POST /v1/advance; wall: with the clock")
@click.option("--tick", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              metavar="SECONDS", help="with --clock wall: how often time is moved")
@click.option("--max-body", type=click.IntRange(min=1), default=10_000_000,
              show_default=True, metavar="BYTES", help="largest request body (413 above)")
@click.option("--stream-buffer", type=click.IntRange(min=1), default=100_000,
              show_default=True, metavar="N",
              help="transitions and firings kept for /v1/stream resume (Last-Event-ID)")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info",
                                                "debug"]), default="info", show_default=True)
@click.option("--access-log", is_flag=True, help="log every request")
def serve(rules_path: str | None, host: str, port: int, data_dir: str | None, fsync: str,
          clock: str, tick: float, max_body: int, stream_buffer: int, log_level: str,
          access_log: bool) -> int:
    """Serve an engine over HTTP: events in, transitions out, segments, users, a live
    event stream, Prometheus metrics and an OpenAPI document (see docs/server.md).

    When SEGCORE_TOKEN is set, every endpoint but /healthz needs `Authorization: Bearer
    <token>`. SIGTERM (or Ctrl-C) checkpoints the data directory and exits with status 0.
    """
    import logging
    try:
        from . import server
    except ImportError as e:
        print(f"segcore: {e}", file=sys.stderr)
        return 2
    from .errors import RuleError, SegcoreError
    rules_map = None
    if rules_path is not None:
        rules_map, status = _load_rules(rules_path)
        if rules_map is None:
            return status
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    try:
        return server.serve(rules_map, host=host, port=port, data_dir=data_dir, fsync=fsync,
                     clock=clock, tick=tick, max_body=max_body, stream_buffer=stream_buffer,
                     log_level=log_level, access_log=access_log)
    except server.ServeError as e:
        print(f"segcore serve: {e}", file=sys.stderr)
        return 2
    except RuleError as e:
        print(f"segcore serve: {rules_path or data_dir}: {e}", file=sys.stderr)
        return 1
    except SegcoreError as e:
        print(f"segcore serve: {e}", file=sys.stderr)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("segcore")
    except PackageNotFoundError:    # pragma: no cover - running from a source tree
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``segcore`` command line on ``argv`` (default: ``sys.argv[1:]``) and return the
    exit status instead of exiting.

    ``--help`` and ``--version`` return 0 (click returns the status of their
    :class:`click.exceptions.Exit` itself outside standalone mode); a usage error prints its
    message and returns 2; an interrupt returns 130.
    """
    try:
        return cli.main(args=None if argv is None else list(argv), prog_name="segcore",
                        standalone_mode=False)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.Abort:
        print("Aborted!", file=sys.stderr)
        return 130
