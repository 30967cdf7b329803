"""Scale-out: users hashed to slots, slots to shards, one :class:`~segcore.Engine` per shard.

``ShardedEngine(n_shards, rules, backend="local" | "ray")`` has the API of an Engine. Every user
id hashes to one of ``slots`` slots (:func:`segcore.hashing.slot_of`, 4096 by default) and each
slot belongs to one shard, so all of a user's state lives in one shard's engine: ``members`` is
the union of the shards' bitmaps, ``size`` the sum, and every membership is the one a single
Engine given the same calls would have (docs/scale-out.md lists the few differences).

The driver (this object) keeps what must be global, on a *schema engine* that holds the rules
and no users: validation (a bad batch is rejected whole before any shard sees it), event codes
and interned property values (the same on every shard, so that users can move between shards),
message-id deduplication (global, as in one Engine), the numbering of string user ids, and
time. A batch is split by shard; every row carries the batch's running time (the time a single
engine would be at when applying it), so late events, windows and timers come out exactly as in
one engine; then every shard moves to the batch's end time.

Every call to a shard is numbered and goes through ``Engine._shard_call``, which the shard's
write-ahead log records whole. The driver keeps the calls since each shard's last checkpoint; a
shard whose process died is reopened from its data directory (snapshot + log) and sent again
what it lacks; a call it had already applied is recognised by its number and not applied twice.

>>> import segcore
>>> eng = segcore.ShardedEngine(2, {"buyers": "count(purchase, 30d) >= 2"})
>>> _ = eng.track_many(user=[1, 2, 1], event=["purchase"] * 3, ts=[0, 1, 2])
>>> sorted(eng.members("buyers")), eng.size("buyers")
([1], 1)
>>> eng.advance(30 * 86_400_000).to_list()
[Transition(user=1, segment='buyers', entered=False, ts=2592000000)]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pyroaring import BitMap, FrozenBitMap

from . import rules as R
from .engine import (Engine, Firing, Transition, Transitions, _batch_columns,
                     _check_props, _int_users, _json_columns, _trait_columns, _U32, _to_ms)
from .errors import EventError, SegcoreError, ShardGap, SnapshotError
from .hashing import slot_of, slots_of_ints

__all__ = ["ShardedEngine", "DEFAULT_SLOTS"]

log = logging.getLogger("segcore")

DEFAULT_SLOTS = 4096
_LAYOUT = "sharded.json"
_FORMAT = 1


# ---------------------------------------------------------------- one shard
class ShardHost:
    """One shard's engine, in this process or inside a Ray actor.

    With ``directory`` the engine logs every call there and a new host on the same directory
    (a restarted actor) reopens it: snapshot + log. ``restore`` starts from a snapshot file.
    """

    def __init__(self, directory: str | None, fsync: str, options: dict,
                 restore: str | None = None):
        from . import wal
        if restore is not None:
            eng = Engine.restore(restore)
            if directory is not None:
                os.makedirs(directory, exist_ok=True)
                eng._fsync = fsync
                eng._start_wal(directory)
        elif directory is not None and wal.latest(directory) is not None:
            eng = Engine.open(directory, fsync=fsync)
        elif directory is not None:
            eng = Engine(wal=directory, fsync=fsync, **options)
        else:
            eng = Engine(**options)
        self.eng = eng

    def call(self, seq: int, method: str, args: list, kwargs: dict):
        return self.eng._shard_call(seq, method, args, kwargs)

    def read(self, method: str, args: list):
        eng = self.eng
        if method in ("members", "query"):
            bm = getattr(eng, method)(*args)
            return BitMap(bm).serialize()
        if method in ("size", "sizes", "segments_of", "stats"):
            return getattr(eng, method)(*args)
        if method == "_shard_info":
            return eng._shard_info()
        if method == "_shard_export":
            return eng._shard_export(*args)
        if method == "snapshot":
            eng.snapshot(*args)
            return None
        if method == "checkpoint":
            eng.checkpoint()
            return None
        if method == "close":
            eng.close()
            return None
        if method == "pid":
            return os.getpid()
        raise SegcoreError(f"`{method}` is not a shard read")


class _Local:
    """The local backend: every shard a ShardHost in this process (same code path as Ray)."""

    name = "local"

    def __init__(self, spec: list[tuple]):
        self.spec = spec
        self.hosts: list[ShardHost | None] = [ShardHost(*s) for s in spec]

    def submit(self, k: int, method: str, *args):
        host = self.hosts[k]
        if host is None:
            return ("lost", None)
        try:
            return ("ok", getattr(host, method)(*args))
        except Exception as e:  # noqa: BLE001 - re-raised by get()
            return ("err", e)

    @staticmethod
    def get(handle):
        kind, val = handle
        if kind == "lost":
            raise _Lost()
        if kind == "err":
            raise val
        return val

    def restart(self, k: int) -> None:
        self.hosts[k] = ShardHost(*self.spec[k])

    def kill(self, k: int) -> None:
        """Lose shard ``k``'s process state (tests: what a crashed actor leaves behind)."""
        host = self.hosts[k]
        if host is not None and host.eng._log is not None:
            host.eng._log._f.close()        # the file stays as written; nothing is flushed
        self.hosts[k] = None

    def shutdown(self) -> None:
        self.hosts = [None] * len(self.hosts)


class _Lost(Exception):
    """A shard's process is gone (a local shard killed by a test, an actor that died)."""


class _Ray:
    """The Ray backend: each shard a Ray actor (restarted by Ray from its data directory)."""

    name = "ray"

    def __init__(self, spec: list[tuple], actor_options: dict | None):
        if "ray" not in sys.modules:
            # a Ray this engine starts is a one-machine Ray: its servers listen on the
            # loopback interface only (Ray's own switch; a cluster is joined with ray.init
            # before creating the engine)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:                              # pragma: no cover - extra missing
            raise SegcoreError("backend=\"ray\" needs Ray: pip install 'segcore[ray]'") \
                from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
            self.started = True
        opts = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": 0}
        opts.update(actor_options or {})
        self.cls = ray.remote(ShardHost).options(**opts)
        self.spec = spec
        self.actors = [self.cls.remote(*s) for s in spec]

    def submit(self, k: int, method: str, *args):
        return getattr(self.actors[k], method).remote(*args)

    def get(self, handle):
        try:
            return self.ray.get(handle)
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
            raise _Lost() from None

    def restart(self, k: int) -> None:
        """Wait until Ray has brought the actor back (its constructor reopens the data); an
        actor that is dead for good (``ray.kill``, restarts used up) is started anew on the
        same directory."""
        exc = self.ray.exceptions
        deadline = time.monotonic() + 120
        while True:
            try:
                self.ray.get(self.actors[k].read.remote("pid", []), timeout=30)
                return
            except (exc.ActorUnavailableError, exc.GetTimeoutError):
                pass                                  # Ray is restarting it
            except exc.RayActorError:
                self.actors[k] = self.cls.remote(*self.spec[k])
            if time.monotonic() > deadline:
                raise SegcoreError(f"shard {k} did not come back within 120 s")
            time.sleep(0.2)

    def kill(self, k: int) -> None:
        import signal
        pid = self.ray.get(self.actors[k].read.remote("pid", []))
        os.kill(pid, signal.SIGKILL)

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self.started:
            self.ray.shutdown()


# ---------------------------------------------------------------- the driver
class ShardedEngine:
    """An Engine's API over ``n_shards`` engines (``backend="local"`` in this process,
    ``"ray"`` as Ray actors). See docs/scale-out.md.

    ``rules`` is a mapping of segment name -> rule (or None). With ``data_dir`` every shard
    keeps a snapshot and write-ahead log in ``data_dir/shard-<k>`` (needed to survive a
    shard's death; reopen with :meth:`open`). ``clock``, ``max_future``, ``seed``,
    ``dedup_horizon``, ``session_timeout``, ``seq_max_events`` and ``compact_rows`` mean what
    they mean for :class:`~segcore.Engine`.
    """

    def __init__(self, n_shards: int, rules: Mapping[str, Any] | None = None,
                 backend: str = "local", *, slots: int = DEFAULT_SLOTS, data_dir=None,
                 fsync: str = "always", clock: Callable[[], float] | None = None,
                 max_future="5m", seed: int = 0, dedup_horizon="1d",
                 max_queued_firings: int = 1_000_000, checkpoint_rows: int = 1_000_000,
                 actor_options: dict | None = None, session_timeout="30m",
                 seq_max_events: int = 1024, compact_rows: bool = False,
                 _layout: dict | None = None):
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or not \
                1 <= n_shards <= 4096:
            raise SegcoreError("n_shards must be an int in 1..4096")
        if isinstance(slots, bool) or not isinstance(slots, int) or not \
                n_shards <= slots <= 1 << 20:
            raise SegcoreError(f"slots must be an int in {n_shards}..{1 << 20} (at least one "
                               "per shard)")
        if backend not in ("local", "ray"):
            raise SegcoreError(f"backend must be \"local\" or \"ray\", got {backend!r}")
        if clock is not None and not callable(clock):
            raise SegcoreError("clock must be a callable returning seconds (like time.time)")
        if isinstance(checkpoint_rows, bool) or not isinstance(checkpoint_rows, int) or \
                checkpoint_rows < 1:
            raise SegcoreError("checkpoint_rows must be an int >= 1")
        self.n_shards = n_shards
        self.n_slots = slots
        self._clock = clock
        self._options = {"max_future": R.parse_duration(max_future), "seed": seed,
                         "dedup_horizon": R.parse_duration(dedup_horizon),
                         "session_timeout": R.parse_duration(session_timeout),
                         "seq_max_events": seq_max_events, "compact_rows": compact_rows}
        # the schema engine: rules, triggers, event codes, values, dedup ids; no users
        self._schema = Engine(**self._options)
        self._schema._no_local = True
        self._max_future_ms = self._schema._max_future_ms
        self._dir = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
        self._fsync = fsync
        self._checkpoint_rows = checkpoint_rows
        if _layout is not None:
            owner = np.asarray(_layout["slot_owner"], dtype=np.int32)
        else:
            owner = np.arange(slots, dtype=np.int32) % n_shards
        self._owner = owner
        self._now = 0
        self._held: list[Transitions] = []
        self._fns: dict[str, Callable | None] = {}
        self._queue: deque = deque()
        self._max_queue = max_queued_firings
        self._stats = {"callback_errors": 0, "firings": 0, "recoveries": 0, "resent": 0}
        # users: public numbers as in one Engine
        self._all = BitMap()                      # every live user's number
        self._str_num: dict[int, str] = {}        # number -> string id
        self._num_of: dict[str, int] = {}         # string id -> number
        self._next_str = _U32 - 1
        # per shard: calls sent and not yet checkpointed, what it has of the tables
        self._seq = [0] * n_shards
        self._pending: list[list[tuple]] = [[] for _ in range(n_shards)]
        self._pending_rows = 0
        self._sent_names = [0] * n_shards
        self._sent_values = [0] * n_shards
        restore = None if _layout is None else _layout.get("restore")
        spec = []
        for k in range(n_shards):
            d = None if self._dir is None else os.path.join(self._dir, f"shard-{k}")
            spec.append((d, fsync, dict(self._options),
                         None if restore is None else os.path.join(restore, f"shard-{k}.snap")))
        if _layout is None and self._dir is not None:
            if os.path.exists(os.path.join(self._dir, _LAYOUT)):
                raise SegcoreError(f"`{self._dir}` already holds a sharded engine: use "
                                   "ShardedEngine.open()")
            os.makedirs(self._dir, exist_ok=True)
        self._backend = _Local(spec) if backend == "local" else _Ray(spec, actor_options)
        if _layout is not None:
            self._recover_driver()
        if self._dir is not None:
            self._write_layout()
        if rules:
            self.add_segments(rules)

    # ------------------------------------------------------------------ plumbing
    def _write_layout(self) -> None:
        from .wal import fsync_dir
        path = os.path.join(self._dir, _LAYOUT)
        tmp = path + f".tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self._layout(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self._dir)

    def _layout(self) -> dict:
        return {"format": _FORMAT, "n_shards": self.n_shards, "slots": self.n_slots,
                "slot_owner": self._owner.tolist(), "options": self._options}

    def _deltas(self, k: int) -> tuple[tuple, tuple]:
        """The event names and values shard ``k`` has not been sent yet."""
        sch = self._schema
        n0, v0 = self._sent_names[k], self._sent_values[k]
        return ((n0, sch._event_names[n0:]), (v0, sch._value_keys[v0:]))

    def _run(self, calls: dict[int, tuple[str, list, dict]], rows: int = 0) -> dict:
        """Send numbered calls to shards (all at once), wait for all; ``{k: result}``.
        A shard that died is reopened and sent what it lacks."""
        handles = {}
        for k, (method, args, kwargs) in calls.items():
            self._seq[k] += 1
            rec = (self._seq[k], method, args, kwargs)
            self._pending[k].append(rec)
            handles[k] = self._backend.submit(k, "call", *rec)
        out, error = {}, None
        for k, h in handles.items():
            try:
                try:
                    out[k] = self._backend.get(h)
                except (_Lost, ShardGap):
                    out[k] = self._recover(k)
            except Exception as e:  # noqa: BLE001 - first error re-raised after all returned
                self._seq[k] -= 1
                self._pending[k].pop()
                if error is None:
                    error = e
                continue
            self._sent_names[k] = len(self._schema._event_names)
            self._sent_values[k] = len(self._schema._value_keys)
        if error is not None:
            raise error
        if self._dir is None:
            self._pending = [[] for _ in range(self.n_shards)]
        else:
            self._pending_rows += rows
            if self._pending_rows >= self._checkpoint_rows:
                self.checkpoint()
        return out

    def _recover(self, k: int):
        """Reopen shard ``k`` and re-send the calls it lacks; the last call's result."""
        if self._dir is None:
            raise SegcoreError(f"shard {k} was lost and has no data directory to recover "
                               "from (pass data_dir= to ShardedEngine)")
        self._stats["recoveries"] += 1
        log.warning("segcore: shard %d was lost; reopening it from %s", k, self._dir)
        self._backend.restart(k)
        applied = self._backend.get(self._backend.submit(k, "read", "_shard_info", []))["seq"]
        res = None
        for rec in self._pending[k]:
            if rec[0] > applied:
                self._stats["resent"] += 1
            res = self._backend.get(self._backend.submit(k, "call", *rec))
        return res

    def _read(self, method: str, args: list, shards=None) -> list:
        ks = range(self.n_shards) if shards is None else shards
        handles = [(k, self._backend.submit(k, "read", method, args)) for k in ks]
        out = []
        for k, h in handles:
            try:
                out.append(self._backend.get(h))
            except _Lost:
                self._recover(k)
                out.append(self._backend.get(self._backend.submit(k, "read", method, args)))
        return out

    def _collect(self, results, firings_only=False) -> Transitions:
        """Merge the shards' results: transitions in time order (each user's in the order
        its shard produced them), firings delivered in time order."""
        parts, fired = [], []
        names = tuple(self._schema._plan.names)
        for res in results:
            if res is None:
                continue
            out, firings = res
            fired.extend(firings)
            if isinstance(out, tuple) and len(out) == 5:
                u, s, e, t, nm = out
                parts.append(Transitions(np.asarray(u, np.uint32), np.asarray(s, np.int32),
                                         np.asarray(e, bool), np.asarray(t, np.int64),
                                         tuple(nm), self._str_num))
            elif isinstance(out, list) and out and isinstance(out[0], Transition):
                parts.append(_from_list(out, names, self))
        if fired:
            self._deliver(fired)
        batch = Transitions.concat(self._held + parts, names)
        self._held = []
        batch._strs = self._str_num
        if len(batch) > 1 and (np.diff(batch.ts) < 0).any():
            order = np.argsort(batch.ts, kind="stable")
            batch = Transitions(batch.user[order], batch.segment[order], batch.entered[order],
                                batch.ts[order], batch.segment_names, self._str_num)
        return batch

    def _deliver(self, fired: list[Firing]) -> None:
        fired.sort(key=lambda f: f.ts)
        q = self._queue
        for f in fired:
            if len(q) >= self._max_queue:
                if not self._max_queue:
                    continue
                q.popleft()
            q.append(f)
        for f in fired:
            fn = self._fns.get(f.trigger)
            if fn is None or not f.delivered:
                continue
            self._stats["firings"] += 1
            try:
                fn(f)
            except Exception:  # noqa: BLE001 - a callback must never stop ingestion
                self._stats["callback_errors"] += 1
                log.exception("segcore: callback %r for %s failed", fn, f)

    def kill_shard(self, k: int) -> None:
        """Kill shard ``k``'s process, for fault-injection tests: SIGKILL of its Ray actor's
        process (Ray restarts it); on the local backend its in-memory engine is dropped. The
        next call reopens it from ``data_dir`` and re-sends what it lacks."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.n_shards:
            raise SegcoreError(f"k must be a shard index in 0..{self.n_shards - 1}")
        self._backend.kill(k)

    @property
    def actors(self) -> list:
        """The shards' Ray actor handles (``backend="ray"``; empty for ``"local"``)."""
        return list(getattr(self._backend, "actors", []))

    # ------------------------------------------------------------------ time
    def _read_clock(self) -> int | None:
        """The clock in ms (read once per call), or None in event-time mode."""
        if self._clock is None:
            return None
        t = self._clock()
        try:
            ms = int(float(t) * 1000)
        except (TypeError, ValueError):
            raise SegcoreError(f"clock() must return seconds as a number, got {t!r}") from None
        return min(max(ms, 0), (1 << 48) - 1)

    def _catch_up(self, clock_ms: int | None) -> None:
        """Move every shard to the clock (its transitions are held for the next call)."""
        if clock_ms is not None and clock_ms > self._now:
            self._advance_all(clock_ms, hold=True)

    def _advance_all(self, t: int, hold: bool = False) -> Transitions:
        calls = {k: self._move_to(k, t) for k in range(self.n_shards)}
        res = self._run(calls)
        self._set_now(t)
        batch = self._collect([res[k] for k in sorted(res)])
        if hold:
            self._held = [batch]
            return Transitions.empty(self._schema._plan.names)
        return batch

    def _move_to(self, k: int, t: int) -> tuple:
        """The call that moves shard ``k`` to time ``t`` (a batch of no rows)."""
        return ("_shard_batch", [[], [], [], [], [[], [], []], None, *self._deltas(k), {}, t], {})

    def _set_now(self, t: int) -> None:
        if t > self._now:
            self._now = t
            self._schema._kernel.advance(t)

    @property
    def now(self) -> int:
        """Engine time in ms (the latest event time, or the clock)."""
        self._catch_up(self._read_clock())
        return self._now

    def advance(self, ts) -> Transitions:
        """Move every shard to ``ts``; the transitions time caused, in time order."""
        t = _to_ms(ts)
        self._catch_up(self._read_clock())
        if t <= self._now:
            return self._collect([])
        return self._advance_all(t)

    # ------------------------------------------------------------------ users
    def _slot_of_user(self, user) -> int:
        return slot_of(user, self.n_slots)

    def _shard_of(self, user) -> int:
        return int(self._owner[self._slot_of_user(user)])

    def _check_user(self, user, index=None):
        u = self._schema._check_user(user, index)
        if not isinstance(u, str) and u in self._str_num:
            raise EventError(f"user number {u} is already given to string id "
                             f"{self._str_num[u]!r}", index=index, field="user")
        return u

    def _alloc(self, strings: list[str], taken=()) -> dict[str, int]:
        """Numbers for new string ids, in order, as one Engine would give them."""
        pins = {}
        for s in strings:
            while self._next_str in self._all or self._next_str in self._str_num or \
                    self._next_str in taken:
                self._next_str -= 1
            pins[s] = self._next_str
            self._next_str -= 1
        return pins

    def _number_new(self, users: np.ndarray, nums: np.ndarray, new: list) -> tuple[dict, list]:
        """Number the new string ids of a user column (``new``, in order of appearance) and
        fill their rows of ``nums``; ``(numbers of the new strings, the new int ids)``."""
        new_ints = [u for u in new if not isinstance(u, str)]
        pins = self._alloc([u for u in new if isinstance(u, str)], set(new_ints))
        if pins:
            for i in np.flatnonzero(nums < 0).tolist():
                u = users[i]
                if u in pins:
                    nums[i] = pins[u]
        return pins, new_ints

    def _commit_users(self, obj: bool, pins: dict[str, int], new_ints: list,
                      nums: np.ndarray) -> None:
        """Once every shard accepted the call: its users exist (``nums`` are the numbers of
        an int column's rows; a column of ids one by one brings ``pins`` and ``new_ints``)."""
        if obj:
            self._adopt_users(pins, new_ints)
        elif len(nums):
            self._all |= BitMap(np.ascontiguousarray(nums, dtype=np.uint32))

    def _adopt_users(self, pins: dict[str, int], ints) -> None:
        for s, num in pins.items():
            self._str_num[num] = s
            self._num_of[s] = num
            self._all.add(num)
        if len(ints):
            self._all |= BitMap(np.asarray(ints, dtype=np.uint32))

    def _resolve(self, users: np.ndarray):
        """Validate a user column; ``(numbers or -1 for new strings, new ids in order)``,
        the errors those of one Engine."""
        n = len(users)
        ints = _int_users(users)
        if ints is not None:
            nums = ints.astype(np.int64)
            if self._str_num and n:
                hit = np.isin(nums, np.fromiter(self._str_num, np.int64, len(self._str_num)))
                if hit.any():
                    bad = int(np.flatnonzero(hit)[0])
                    raise EventError(f"user number {int(nums[bad])} is already given to "
                                     f"string id {self._str_num[int(nums[bad])]!r}",
                                     index=bad, field="user")
            return nums, None
        nums = np.empty(n, dtype=np.int64)
        new: dict = {}
        for i, u in enumerate(users.tolist()):
            u = self._check_user(u, i)
            if isinstance(u, str):
                num = self._num_of.get(u)
                if num is None:
                    new.setdefault(u, i)
                    num = -1
                nums[i] = num
            else:
                nums[i] = u
                if u not in self._all:
                    new.setdefault(u, i)
        return nums, list(new)

    def _slots(self, nums: np.ndarray, users: np.ndarray | None) -> np.ndarray:
        """Slot of each row: int ids by their value, string ids by the string."""
        if users is None or users.dtype.kind in "iu":
            return slots_of_ints(nums, self.n_slots)
        out = np.empty(len(nums), dtype=np.int64)
        for i, u in enumerate(users.tolist()):
            out[i] = slot_of(u if isinstance(u, str) else int(u), self.n_slots)
        return out

    def user_number(self, user) -> int:
        """The public number of a user (its id for ints; the number given to a string)."""
        if isinstance(user, str) and user in self._num_of:
            return self._num_of[user]
        if isinstance(user, int) and not isinstance(user, bool) and 0 <= user < _U32 and \
                user in self._all and user not in self._str_num:
            return user
        raise KeyError(f"unknown user {user!r}")

    def user_id(self, number: int):
        """The user id behind a public number (inverse of :meth:`user_number`)."""
        number = int(number)
        if number in self._str_num:
            return self._str_num[number]
        if 0 <= number < _U32 and number in self._all:
            return number
        raise KeyError(f"unknown user number {number}")

    # ------------------------------------------------------------------ events
    def track(self, user, event: str, ts=None, props: Mapping[str, Any] | None = None,
              id=None) -> list[Transition]:
        """Track one event (see :meth:`Engine.track`)."""
        if props is not None and not isinstance(props, Mapping):
            raise EventError("props must be a mapping of name -> value", field="props")
        user = self._check_user(user)
        if not isinstance(event, str) or not event:
            raise EventError("event must be a non-empty string", field="event")
        props = props or {}
        _check_props(props)
        clock_ms = self._read_clock()
        if ts is None:
            ts = clock_ms if clock_ms is not None else self._now
        try:
            out = self._ingest(_one(user), _one(event), _one(ts),
                               {k: _one(v) for k, v in props.items()},
                               None if id is None else _one(id), single=True,
                               clock_ms=clock_ms)
        except EventError as e:
            raise EventError(e.reason, field=e.field) from None
        return list(out)

    def track_many(self, user, event, ts, props: Mapping[str, Any] | None = None,
                   id=None) -> Transitions:
        """Track a batch given as columns (see :meth:`Engine.track_many`)."""
        return self._ingest(*_batch_columns(user, event, ts, props, id))

    def track_json(self, data: bytes | str) -> Transitions:
        """Track a JSON array of events (see :meth:`Engine.track_json`)."""
        return self._ingest(*_json_columns(data))

    def _ingest(self, users, events, tss, cols, ids, single=False, clock_ms=None):
        if clock_ms is None:
            clock_ms = self._read_clock()
        sch = self._schema
        got: dict = {}

        def resolve(col):
            got["nums"], got["new"] = self._resolve(col)
            return np.full(len(col), -1, np.int64), []

        # ---- validate whole, deduplicate against every id ever seen (the schema engine)
        col, names, inv, tss, _, _, fpass, vals, keys, keep = sch._check_batch(
            users, events, tss, cols, ids, single, clock_ms, resolve)
        n = len(users)
        if names is not None:
            codes = np.array([sch._event_code(nm) for nm in names], dtype=np.int32)
            ecodes = codes[inv] if len(names) else np.zeros(n, np.int32)
        else:
            ecodes = col
        if keep is not None:
            sch._stats["duplicates"] += int(n - keep.sum())
        nums, new = got["nums"], got["new"]
        obj = new is not None                   # ids given one by one (strings among them)
        kept = np.ones(n, bool) if keep is None else keep
        # ---- number new string ids (first appearance among kept rows' users)
        if new and keep is not None and not keep.all():
            live = set(users[keep].tolist())
            new = [u for u in new if u in live]
        pins, new_ints = self._number_new(users, nums, new or [])
        shard = self._owner[self._slots(nums, users if obj else None)]
        # ---- time: each row at the running time a single engine would be at
        g0 = max(self._now, clock_ms or 0)
        running = np.maximum.accumulate(np.where(kept, np.maximum(tss, g0), g0)) \
            if n else np.zeros(0, np.int64)
        end = int(running[-1]) if n else g0
        calls = {}
        ucol = users if obj else nums.astype(np.uint32)
        for k in range(self.n_shards):
            rows = np.flatnonzero((shard == k) & kept) if n else np.zeros(0, np.int64)
            calls[k] = ("_shard_batch", [
                ucol[rows], ecodes[rows], tss[rows], running[rows],
                [a.reshape(n, len(a) // n)[rows].reshape(-1) if n else a
                 for a in (fpass, vals, keys)],
                None if ids is None else ids[rows].tolist(),
                *self._deltas(k), _pins_of(pins, users, rows), end], {})
        res = self._run(calls, rows=int(kept.sum()))
        # ---- accepted everywhere
        self._commit_users(obj, pins, new_ints, nums[kept])
        sch._count_events(ecodes[kept])     # a new segment needing history is checked here
        self._set_now(end)
        out = self._collect([res[k] for k in sorted(res)])
        if keep is not None and not keep.all():
            out.duplicates = np.flatnonzero(~keep)
        return out

    # ------------------------------------------------------------------ profiles
    def _per_user(self, user, method: str, args: list) -> list[Transition]:
        clock_ms = self._read_clock()
        user = self._check_user(user)
        self._catch_up(clock_ms)
        pins, saved = {}, self._next_str
        if isinstance(user, str) and user not in self._num_of:
            pins = self._alloc([user])
        k = self._shard_of(user)
        try:
            res = self._run({k: ("_shard_op", [*self._deltas(k), pins, method, [user, *args],
                                               {}], {})})
        except Exception:
            self._next_str = saved              # the number was not used
            raise
        self._adopt_users(pins, [] if isinstance(user, str) or user in self._all else [user])
        return list(self._collect([res[k]]))

    def set_traits(self, user, traits: Mapping[str, Any]) -> list[Transition]:
        """Set (or with ``None``, delete) a user's traits (see :meth:`Engine.set_traits`)."""
        return self._per_user(user, "set_traits", [traits])

    def set_scores(self, user, scores: Mapping[str, Any]) -> list[Transition]:
        """Set (or with ``None``, delete) a user's scores (see :meth:`Engine.set_scores`)."""
        return self._per_user(user, "set_scores", [scores])

    def set_traits_many(self, user, **traits) -> Transitions:
        """Set traits for many users (see :meth:`Engine.set_traits_many`)."""
        clock_ms = self._read_clock()
        users, cols = _trait_columns(user, traits)
        nums, new = self._resolve(users)
        obj = new is not None                   # ids given one by one (strings among them)
        pins, new_ints = self._number_new(users, nums, new or [])
        shard = self._owner[self._slots(nums, users if obj else None)]
        self._catch_up(clock_ms)
        calls = {}
        for k in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == k)
            sub = users[rows] if obj else nums[rows].astype(np.uint32)
            calls[k] = ("_shard_op", [*self._deltas(k), _pins_of(pins, users, rows),
                                      "set_traits_many", [sub],
                                      {c: v[rows] for c, v in cols.items()}], {})
        res = self._run(calls)
        self._commit_users(obj, pins, new_ints, nums)
        return self._collect([res[k] for k in sorted(res)])

    def forget(self, user) -> bool:
        """Erase a user everywhere (see :meth:`Engine.forget`); whether it was known."""
        clock_ms = self._read_clock()
        user = self._schema._check_user(user)
        self._catch_up(clock_ms)
        num = self._num_of.get(user) if isinstance(user, str) else \
            (user if user in self._all and user not in self._str_num else None)
        if num is None:
            return False
        k = self._shard_of(user)
        res = self._run({k: ("_shard_op", [*self._deltas(k), {}, "forget", [user], {}], {})})
        self._held.append(self._collect([res[k]]))
        self._drop_user(user, num)
        # the shard checkpointed (no file keeps the user): so must the driver's buffer
        self._pending[k] = []
        self._held = [self._without(b, num) for b in self._held]
        self._queue = deque(f for f in self._queue if f.user != user)
        return bool(res[k][0]) if res[k] is not None else True

    def _without(self, b: Transitions, num: int) -> Transitions:
        keep = b.user != num
        return Transitions(b.user[keep], b.segment[keep], b.entered[keep], b.ts[keep],
                           b.segment_names, self._str_num)

    def _drop_user(self, user, num: int) -> None:
        self._all.discard(num)
        if isinstance(user, str):
            del self._num_of[user]
            del self._str_num[num]

    def alias(self, new, old) -> list[Transition]:
        """Merge ``old`` into ``new`` (see :meth:`Engine.alias`); across shards, ``old``'s
        state first moves to ``new``'s shard."""
        clock_ms = self._read_clock()
        new, old = self._check_user(new), self._check_user(old)
        if type(new) is type(old) and new == old:
            raise EventError("alias needs two different users", field="user")
        self._catch_up(clock_ms)
        num_old = self._num_of.get(old) if isinstance(old, str) else \
            (old if old in self._all else None)
        if num_old is None:
            return list(self._collect([]))
        ko, kn = self._shard_of(old), self._shard_of(new)
        if ko != kn:
            self._move_users(ko, kn, [num_old])
        pins = {}
        if isinstance(new, str) and new not in self._num_of:
            pins = self._alloc([new])
        res = self._run({kn: ("_shard_op", [*self._deltas(kn), pins, "alias", [new, old], {}],
                              {})})
        self._adopt_users(pins, [] if isinstance(new, str) or new in self._all else [new])
        self._drop_user(old, num_old)
        return list(self._collect([res[kn]]))

    # ------------------------------------------------------------------ segments
    def _broadcast(self, method: str, args: list, kwargs: dict | None = None) -> Transitions:
        calls = {k: ("_shard_op", [*self._deltas(k), {}, method, args, kwargs or {}], {})
                 for k in range(self.n_shards)}
        res = self._run(calls)
        return self._collect([res[k] for k in sorted(res)])

    def add_segment(self, name: str, rule) -> Transitions:
        """Define a segment on every shard; the entries it causes at once."""
        return self.add_segments({name: rule})

    def add_segments(self, segments: Mapping[str, Any]) -> Transitions:
        """Define several segments (validated on the driver first: a bad rule changes
        nothing anywhere)."""
        self._catch_up(self._read_clock())
        if not isinstance(segments, Mapping):
            return self._schema.add_segments(segments)      # its error
        self._schema.add_segments(segments)
        texts = {name: self._schema._texts[name] for name in segments}
        return self._broadcast("add_segments", [texts])

    def replace_segment(self, name: str, rule) -> Transitions:
        """Change a segment's rule everywhere; every flip it causes."""
        self._catch_up(self._read_clock())
        self._schema.replace_segment(name, rule)
        return self._broadcast("replace_segment", [name, self._schema._texts[name]])

    def remove_segment(self, name: str) -> None:
        """Remove a segment everywhere."""
        self._catch_up(self._read_clock())
        self._schema.remove_segment(name)
        self._held.append(self._broadcast("remove_segment", [name]))

    @property
    def segments(self) -> dict[str, str]:
        """Segment name -> rule text, in definition order."""
        return self._schema.segments

    def event_code(self, name: str) -> int:
        """The int code of an event type (the same on every shard)."""
        return self._schema.event_code(name)

    # ------------------------------------------------------------------ triggers
    def on_enter(self, segment: str, fn: Callable[[Firing], Any] | None = None, **opts):
        """Call ``fn(firing)`` in this process when a user enters ``segment`` (decorator
        too); ``after``, ``cooldown``, ``max_per``, ``once``, ``channel``, ``name`` as in
        :meth:`Engine.on_enter`. Firings of all shards are delivered in time order."""
        return self._on(segment, "enter", fn, **opts)

    def on_exit(self, segment: str, fn: Callable[[Firing], Any] | None = None, **opts):
        """:meth:`on_enter` for exits."""
        return self._on(segment, "exit", fn, **opts)

    def _on(self, segment, on, fn, *, after=None, cooldown=None, max_per=None, once=False,
            channel=None, name=None):
        if fn is None:
            def deco(f):
                self._on(segment, on, f, after=after, cooldown=cooldown, max_per=max_per,
                         once=once, channel=channel, name=name)
                return f
            self._schema._require_segment(segment)
            return deco
        self.add_trigger(name, segment, on, after=after, cooldown=cooldown, max_per=max_per,
                         once=once, channel=channel, fn=fn)
        return fn

    def add_trigger(self, name: str | None, segment: str, on: str = "enter", *, after=None,
                    cooldown=None, max_per=None, once: bool = False, channel: str | None = None,
                    fn: Callable[[Firing], Any] | None = None) -> None:
        """Register a trigger on every shard; its callback runs here, in this process."""
        self._catch_up(self._read_clock())
        sch = self._schema
        if on not in ("enter", "exit"):
            raise SegcoreError(f"`on` must be \"enter\" or \"exit\", got {on!r}")
        if fn is not None and not callable(fn):
            raise SegcoreError("a callback must be callable")
        from .triggers import check_name
        sch._register(segment, on == "enter", None, after, cooldown, max_per, once, channel,
                      None if name is None else check_name(name, "trigger name"),
                      decorator=False)
        spec = sch._items[-1]
        self._fns[spec.name] = fn
        self._held.append(self._broadcast("add_trigger", [spec.name, segment, on], {
            "after": spec.after_ms, "cooldown": spec.cooldown_ms,
            "max_per": None if spec.max_per is None else list(spec.max_per), "once": once,
            "channel": channel}))

    def cap(self, channel: str, max_per) -> None:
        """Cap firings per user on a channel (see :meth:`Engine.cap`), on every shard."""
        self._schema.cap(channel, max_per)
        self._held.append(self._broadcast("cap", [channel, list(self._schema._policies.caps[
            channel])]))

    def drain_firings(self) -> list[Firing]:
        """Every firing since the last drain (delivered and suppressed), in time order."""
        self._catch_up(self._read_clock())
        out = list(self._queue)
        self._queue.clear()
        return out

    # ------------------------------------------------------------------ reads
    def members(self, segment: str) -> FrozenBitMap:
        """The union of the shards' member bitmaps (user numbers)."""
        self._schema._require_segment(segment)
        self._catch_up(self._read_clock())
        return FrozenBitMap(BitMap.union(*[BitMap.deserialize(b) for b in
                                           self._read("members", [segment])]))

    def size(self, segment: str) -> int:
        """The sum of the shards' sizes."""
        self._schema._require_segment(segment)
        self._catch_up(self._read_clock())
        return sum(self._read("size", [segment]))

    def sizes(self) -> dict[str, int]:
        """Every segment's size, in definition order."""
        self._catch_up(self._read_clock())
        out = dict.fromkeys(self._schema.segments, 0)
        for part in self._read("sizes", []):
            for k, v in part.items():
                out[k] += v
        return out

    def segments_of(self, user) -> list[str]:
        """The segments a user is in now (its shard answers)."""
        if isinstance(user, bool) or not isinstance(user, (int, str, np.integer)):
            raise EventError("a user id must be an int or a string", field="user")
        self._catch_up(self._read_clock())
        if isinstance(user, (int, np.integer)) and not 0 <= int(user) < _U32:
            return []
        user = str(user) if isinstance(user, str) else int(user)
        return self._read("segments_of", [user], [self._shard_of(user)])[0]

    def query(self, expr: str):
        """Bitmap algebra over segment names (each shard answers for its users)."""
        self._schema.query(expr)                            # errors, before any shard
        self._catch_up(self._read_clock())
        return BitMap.union(*[BitMap.deserialize(b) for b in self._read("query", [expr])])

    def stats(self) -> dict:
        """Counters summed over the shards, plus ``shards`` (each one's) and the driver's."""
        self._catch_up(self._read_clock())
        parts = self._read("stats", [])
        out: dict[str, Any] = {}
        for p in parts:
            for k, v in p.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "now":
                    out[k] = out.get(k, 0) + v
        out["duplicates"] = self._schema._stats["duplicates"]
        out["now"] = self._now
        out["users"] = len(self._all)
        out["segments"] = len(self._schema.segments)
        out["queued_firings"] = len(self._queue)
        out.update({f"driver_{k}": v for k, v in self._stats.items()})
        out["n_shards"], out["slots"] = self.n_shards, self.n_slots
        out["shards"] = [{"users": p.get("users", 0), "events": p.get("events", 0)}
                         for p in parts]
        out["backend"] = self._backend.name
        return out

    # ------------------------------------------------------------------ rebalancing
    def slot_owner(self) -> np.ndarray:
        """A copy of the slot -> shard table."""
        return self._owner.copy()

    def _slots_of_numbers(self, nums: np.ndarray) -> np.ndarray:
        """Slot of each user number (a string's slot is its string's)."""
        sl = slots_of_ints(nums, self.n_slots)
        for i, x in enumerate(nums.tolist()):
            sid = self._str_num.get(x)
            if sid is not None:
                sl[i] = slot_of(sid, self.n_slots)
        return sl

    def _users_of_slots(self, k: int, slots: set[int]) -> list[int]:
        nums = np.asarray(self._all.to_array(), dtype=np.int64)
        sl = self._slots_of_numbers(nums)
        return nums[np.isin(sl, list(slots)) & (self._owner[sl] == k)].tolist()

    def move_slots(self, slots, to_shard: int) -> int:
        """Move slots (and every user in them) to shard ``to_shard``: their state is exported
        from the shard that has them (a snapshot of those users) and imported whole, so
        memberships, timers and trigger histories are unchanged. Returns the users moved."""
        if isinstance(to_shard, bool) or not isinstance(to_shard, int) or \
                not 0 <= to_shard < self.n_shards:
            raise SegcoreError(f"to_shard must be a shard index in 0..{self.n_shards - 1}")
        slots = [int(s) for s in slots]
        if any(not 0 <= s < self.n_slots for s in slots):
            raise SegcoreError(f"slots must be in 0..{self.n_slots - 1}")
        self._catch_up(self._read_clock())
        moved = 0
        for k in sorted(set(self._owner[slots].tolist()) - {to_shard}):
            mine = {s for s in slots if self._owner[s] == k}
            nums = self._users_of_slots(k, mine)
            self._move_users(k, to_shard, nums, slots=mine)
            moved += len(nums)
        return moved

    def _move_users(self, src: int, dst: int, nums: list[int], slots=()) -> None:
        """Export users from ``src``, import them into ``dst``, record the new owner of
        ``slots``, then drop them from ``src`` (a crash between leaves a copy that
        :meth:`open` removes: the layout file says which shard owns a slot)."""
        if nums:
            blob = self._read("_shard_export", [nums], [src])[0]
            self._held.append(self._collect([self._run(
                {dst: ("_shard_import", [blob], {})})[dst]]))
        for s in slots:
            self._owner[s] = dst
        if self._dir is not None and slots:
            self._write_layout()
        if nums:
            self._held.append(self._collect([self._run(
                {src: ("_shard_drop", [nums], {})})[src]]))

    # ------------------------------------------------------------------ durability
    def checkpoint(self) -> None:
        """Snapshot every shard and start its new log (the driver then forgets the calls it
        kept for re-sending)."""
        if self._dir is None:
            raise SegcoreError("checkpoint() needs a ShardedEngine with a data_dir")
        self._read("checkpoint", [])
        self._pending = [[] for _ in range(self.n_shards)]
        self._pending_rows = 0

    def snapshot(self, directory) -> None:
        """Write the whole state to a directory: ``sharded.json`` (the layout) and one
        snapshot file per shard (on a cluster, a directory every actor can write)."""
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        self._catch_up(self._read_clock())
        for k in range(self.n_shards):
            self._read("snapshot", [os.path.join(directory, f"shard-{k}.snap")], [k])
        with open(os.path.join(directory, _LAYOUT), "w") as f:
            json.dump(self._layout(), f)

    @classmethod
    def restore(cls, directory, backend: str = "local", *, callbacks=None,
                **kwargs) -> "ShardedEngine":
        """A ShardedEngine from :meth:`snapshot`'s directory (``data_dir=`` to log anew);
        ``callbacks`` maps trigger names to their functions, as for :meth:`open`."""
        directory = os.path.abspath(os.fspath(directory))
        layout = _read_layout(directory)
        layout["restore"] = directory
        return cls._from_layout(layout, backend, kwargs, callbacks)

    @classmethod
    def open(cls, data_dir, backend: str = "local", *, callbacks=None,
             **kwargs) -> "ShardedEngine":
        """Reopen a ShardedEngine from its data directory (each shard: snapshot + log).
        ``callbacks`` maps trigger names to the functions to call again (triggers without
        one keep queueing their firings for :meth:`drain_firings`)."""
        data_dir = os.path.abspath(os.fspath(data_dir))
        layout = _read_layout(data_dir)
        return cls._from_layout(layout, backend, {**kwargs, "data_dir": data_dir}, callbacks)

    @classmethod
    def _from_layout(cls, layout: dict, backend: str, kwargs: dict,
                     callbacks=None) -> "ShardedEngine":
        opts = layout["options"]
        eng = cls(layout["n_shards"], None, backend, slots=layout["slots"],
                  max_future=opts["max_future"], seed=opts["seed"],
                  dedup_horizon=opts["dedup_horizon"],
                  session_timeout=opts.get("session_timeout", "30m"),
                  seq_max_events=opts.get("seq_max_events", 1024),
                  compact_rows=opts.get("compact_rows", False), _layout=layout, **kwargs)
        unknown = sorted(set(callbacks or {}) - set(eng._fns))
        if unknown:
            eng.close()
            raise SegcoreError("callbacks for unknown triggers: "
                               + ", ".join(f"`{k}`" for k in unknown))
        for name, fn in (callbacks or {}).items():
            if not callable(fn):
                eng.close()
                raise SegcoreError("a callback must be callable")
            eng._fns[name] = fn
        return eng

    def _recover_driver(self) -> None:
        """Rebuild the driver's state from the shards: rules, triggers, event codes, values,
        dedup ids, string numbering and time; drop users a shard holds for a slot it does
        not own (a move cut short)."""
        infos = self._read("_shard_info", [])
        first = infos[0]
        sch = self._schema
        sch._adopt((0, first["event_names"]), (0, [tuple(v) for v in first["values"]]))
        if first["segments"]:
            sch.add_segments(first["segments"])
        for name, segment, entered, after, cooldown, max_per, once, channel in first["triggers"]:
            sch._register(segment, entered, None, after, cooldown, max_per, once, channel,
                          name, decorator=False)
            self._fns[name] = None
        for ch, mp in first["caps"].items():
            sch._policies.caps[ch] = None if mp is None else tuple(mp)
        for k, info in enumerate(infos):
            if info["segments"] != first["segments"] or \
                    info["event_names"] != first["event_names"]:
                raise SnapshotError(f"shard {k} disagrees with shard 0 on rules or event types")
            self._seq[k] = info["seq"]
            self._now = max(self._now, info["now"])
            self._next_str = min(self._next_str, info["next_str"])
            for num, s in info["str_users"].items():
                self._str_num[int(num)] = s
                self._num_of[s] = int(num)
            sch._seen_ids.update(info["seen_ids"])
            sch._count_events(np.repeat(np.arange(len(info["event_counts"])),
                                        info["event_counts"]).astype(np.int32))
        self._sent_names = [len(sch._event_names)] * self.n_shards
        self._sent_values = [len(sch._value_keys)] * self.n_shards
        sch._kernel.advance(self._now)
        for k, info in enumerate(infos):
            users = np.asarray(info["users"], dtype=np.int64)
            if not len(users):
                continue
            sl = self._slots_of_numbers(users)
            stray = users[self._owner[sl] != k].tolist()
            if stray:
                log.warning("segcore: shard %d held %d users of slots it does not own (a "
                            "move cut short); dropping them", k, len(stray))
                self._run({k: ("_shard_drop", [stray], {})})
                keep = np.setdiff1d(users, stray)
            else:
                keep = users
            self._all |= BitMap(keep.astype(np.uint32))
        for k in range(self.n_shards):
            if self._now > infos[k]["now"]:
                self._run({k: self._move_to(k, self._now)})

    def close(self) -> None:
        """Close every shard's log (and, for Ray, stop the actors; and Ray itself if this
        engine started it)."""
        if self._backend is None:
            return
        try:
            self._read("close", [])
        finally:
            self._backend.shutdown()
            self._backend = None

    def __enter__(self) -> "ShardedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pins_of(pins: dict[str, int], users: np.ndarray, rows: np.ndarray) -> dict[str, int]:
    """The numbers of the new string ids among ``users[rows]``."""
    if not pins or not len(rows):
        return {}
    return {u: pins[u] for u in set(users[rows].tolist()) & pins.keys()}


def _one(x) -> np.ndarray:
    """A column of one value (kept as the object it is)."""
    col = np.empty(1, dtype=object)
    col[0] = x
    return col


def _read_layout(directory: str) -> dict:
    path = os.path.join(directory, _LAYOUT)
    try:
        with open(path) as f:
            layout = json.load(f)
    except FileNotFoundError:
        raise SnapshotError(f"`{directory}` holds no sharded engine (no {_LAYOUT})") from None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"cannot read {path}: {e}") from None
    try:
        n, slots, owner = layout["n_shards"], layout["slots"], layout["slot_owner"]
        ok = layout.get("format") == _FORMAT and isinstance(n, int) and isinstance(slots, int) \
            and 1 <= n <= 4096 and n <= slots <= 1 << 20 and isinstance(owner, list) and \
            len(owner) == slots and all(isinstance(x, int) and 0 <= x < n for x in owner) \
            and isinstance(layout.get("options"), dict)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise SnapshotError(f"{path} is not a valid sharded layout")
    return layout


def _from_list(items: list[Transition], names: tuple, eng: ShardedEngine) -> Transitions:
    names = tuple(names)
    seg_names = names + tuple(dict.fromkeys(t.segment for t in items if t.segment not in names))
    return Transitions(
        np.array([eng._num_of[t.user] if isinstance(t.user, str) else t.user for t in items],
                 dtype=np.uint32),
        np.array([seg_names.index(t.segment) for t in items], dtype=np.int32),
        np.array([t.entered for t in items], dtype=bool),
        np.array([t.ts for t in items], dtype=np.int64), seg_names, eng._str_num)
