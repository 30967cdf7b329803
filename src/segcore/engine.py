"""The public engine: validation, ids, interning, callbacks and bitmaps around the kernel.

A story in four calls:

>>> import segcore
>>> eng = segcore.Engine()
>>> _ = eng.add_segment("frequent_buyers", "count(purchase, 90d) >= 3")
>>> day = 86_400_000
>>> for d in (1, 2, 3):
...     t = eng.track(42, "purchase", ts=d * day, props={"amount": 20.0})
>>> t
[Transition(user=42, segment='frequent_buyers', entered=True, ts=259200000)]
>>> list(eng.advance(100 * day))   # 90 days after the first of the three, one is gone
[Transition(user=42, segment='frequent_buyers', entered=False, ts=7862400000)]
"""

from __future__ import annotations

import array
import contextlib
import datetime as _dt
import functools
import logging
import os
import math
import operator
import re
import types
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Union

import msgspec
import numpy as np
from pyroaring import BitMap, FrozenBitMap

from . import rules as R
from . import wal as _wal
from ._json import json_row_columns as _json_row_columns
from ._json import scan_events as _scan_events
from ._kernel import FastState, IdMap, Kernel
from ._kernel import track_entry as _track_entry
from .compile import (DAY_MS, MAX_CONVERT_EVENTS, OPS, Plan, PredictSpec, compile_segments,
                      feature_map)
from . import predict as _predict
from .errors import EventError, RuleError, SegcoreError, ShardGap, SnapshotError
from .hashing import bucket_of, buckets_of_ints
from .localtime import TZ_TRAIT, check_tz, hours_weekdays
from .triggers import (Firing, Journey, JourneySpec, Policies, StepSpec, TriggerSpec,
                       check_name, parse_max_per)

__all__ = ["Engine", "Transition", "Transitions", "Firing"]

log = logging.getLogger("segcore")

UserId = Union[int, str]
_U32 = 1 << 32
_MAX_TS = R.MAX_TIME_MS
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


def _plain(x):
    """Arguments as MessagePack can carry them (numpy arrays and scalars to lists and ints)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _logged(method):
    """Append a successful top-level call to the write-ahead log before it returns.

    Installed per instance, and only on engines with a log (:meth:`Engine._install_log`),
    so that an engine without one pays nothing on its hot paths."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._log is None or self._replaying or self._wal_depth:
            return method(self, *args, **kwargs)
        self._wal_depth += 1
        self._clock_seen = None
        checkpoints = self._wal_seq
        try:
            out = method(self, *args, **kwargs)
        finally:
            self._wal_depth -= 1
        if self._wal_seq != checkpoints:
            # the call ended with a checkpoint (forget() does, so that no file keeps the
            # user): the snapshot holds its effect, and a record would repeat the user's id
            return out
        self._log.append(_wal.Call(name, _plain(list(args)), _plain(kwargs), self._clock_seen))
        return out
    return wrapper


# (gc=False: a transition holds an id, a name, a bool and an int, never a cycle, so the
# collector need not walk the many that single events and batches hand out)
class Transition(msgspec.Struct, frozen=True, gc=False):
    """One change of membership: ``user`` entered (or left) ``segment`` at ``ts`` (ms)."""
    user: Union[int, str]
    segment: str
    entered: bool
    ts: int


class Transitions:
    """A batch of transitions as numpy columns, iterable as :class:`Transition`.

    Columns: ``user`` (uint32 public user numbers), ``segment`` (int32 index into
    ``segment_names``), ``entered`` (bool), ``ts`` (int64 ms). ``duplicates`` holds the row
    indices of the input that were ignored as repeated message ids.
    """

    __slots__ = ("user", "segment", "entered", "ts", "segment_names", "duplicates",
                 "_strs")

    def __init__(self, user, segment, entered, ts, segment_names, strs, duplicates=None):
        self.user = user
        self.segment = segment
        self.entered = entered
        self.ts = ts
        self.segment_names = segment_names
        self._strs = strs
        self.duplicates = (np.zeros(0, dtype=np.int64) if duplicates is None
                           else duplicates)

    @classmethod
    def empty(cls, names=()) -> "Transitions":
        return cls(np.zeros(0, np.uint32), np.zeros(0, np.int32), np.zeros(0, bool),
                   np.zeros(0, np.int64), tuple(names), {})

    def __len__(self) -> int:
        return len(self.user)

    def _item(self, i: int) -> Transition:
        num = int(self.user[i])
        return Transition(self._strs.get(num, num), self.segment_names[self.segment[i]],
                          bool(self.entered[i]), int(self.ts[i]))

    def __getitem__(self, i: int) -> Transition:
        n = len(self)
        if not -n <= i < n:
            raise IndexError("transition index out of range")
        return self._item(i % n)

    def __iter__(self):
        for i in range(len(self)):
            yield self._item(i)

    def to_list(self) -> list[Transition]:
        return list(self)

    def __eq__(self, other) -> bool:
        if isinstance(other, (Transitions, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in list(self)[:3])
        more = f", … {len(self) - 3} more" if len(self) > 3 else ""
        return f"Transitions([{head}{more}])"

    @staticmethod
    def concat(parts: list["Transitions"], names) -> "Transitions":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Transitions.empty(names)
        if len(parts) == 1:
            return parts[0]
        # Re-index segments by name: parts may come from different plans (a segment that was
        # just removed keeps its name at the end).
        names = tuple(names)
        for p in parts:
            names += tuple(n for n in p.segment_names if n not in names)
        seg = []
        for p in parts:
            remap = np.array([names.index(n) for n in p.segment_names], dtype=np.int32)
            seg.append(remap[p.segment])
        return Transitions(np.concatenate([p.user for p in parts]), np.concatenate(seg),
                           np.concatenate([p.entered for p in parts]),
                           np.concatenate([p.ts for p in parts]), names, parts[0]._strs)


#: Up to this many pending transitions, the bitmaps are updated one member at a time
#: (cheaper than sorting them into per-segment groups).
_PER_ELEMENT = 1024
#: Pending transitions past which a batch brings the bitmaps up to date at once (bounds the
#: memory they hold: 8 bytes each, 2 MiB in all).
_PENDING_MAX = 1 << 18
#: ... or past this many batches (small ones carry ~300 bytes of arrays each).
_PENDING_BATCHES = 1024


def _rows_of(col: np.ndarray, wanted: list, size: int) -> np.ndarray:
    """``np.isin(col, wanted)`` for a column of small codes (``-1 <= code < size``), by one
    table lookup instead of a sort."""
    table = np.zeros(size + 1, dtype=bool)      # (the spare last entry answers -1)
    table[wanted] = True
    return table[col]


def _bitmap(numbers: np.ndarray) -> BitMap:
    """A BitMap from a uint32 array, through the buffer protocol (no per-element Python)."""
    return BitMap(array.array("I", np.ascontiguousarray(numbers, dtype=np.uint32).tobytes()))


def _to_ms(value, field: str = "ts", index: int | None = None) -> int:
    if isinstance(value, bool):
        raise EventError(f"`{field}` must be an int of ms or a datetime, got bool",
                         index=index, field=field)
    if isinstance(value, (int, np.integer)):
        v = int(value)
    elif isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        delta = value - _EPOCH
        v = (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000
    elif isinstance(value, str):
        try:
            d = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise EventError(f"`{field}` is not an ISO 8601 time: {value!r}", index=index,
                             field=field) from None
        return _to_ms(d, field, index)
    else:
        raise EventError(f"`{field}` must be an int of ms or a datetime, got "
                         f"{type(value).__name__}", index=index, field=field)
    if not 0 <= v < _MAX_TS:
        raise EventError(f"`{field}` {v} is out of range (0 <= ts < 2**48 ms)", index=index,
                         field=field)
    return v


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _as_float(v) -> float | None:
    """A number as a float, or None for an int too large for one."""
    try:
        return float(v)
    except OverflowError:
        return None


def _too_large(prop: str, event: str, v, index: int | None = None) -> EventError:
    return EventError(f"`{prop}` of `{event}` events must fit in a float (it is aggregated), "
                      f"got an int of {int(v).bit_length()} bits", index=index,
                      field=f"props.{prop}")


def _is_num(v) -> bool:
    """Numbers are ints and floats; bools count as numbers (true is 1, false is 0)."""
    return isinstance(v, (int, float, np.integer, np.floating, np.bool_)) and not isinstance(
        v, str)


# ------------------------------------------------------------------ scalar tests
def _const(v):
    if isinstance(v, R.Num):
        return v.value
    if isinstance(v, R.Dur):
        return v.ms
    if isinstance(v, R.Str):
        return v.value
    raise TypeError(v)


def _cmp(op: str, a, b) -> bool:
    """``a op b`` with segcore's typing: numbers with numbers, strings with strings."""
    a_num = isinstance(a, (int, float)) and not isinstance(a, str)
    b_num = isinstance(b, (int, float)) and not isinstance(b, str)
    if a_num != b_num:
        return False
    if not a_num and not (isinstance(a, str) and isinstance(b, str)):
        return False
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


def _norm(v):
    """A property or trait value as tests see it: bool and numpy scalars become numbers."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.str_):
        return str(v)
    return v


def test_value(node, v) -> bool:
    """Evaluate a test on one property/trait value (the other sides are constants)."""
    if _is_missing(v):
        return False
    v = _norm(v)
    if isinstance(node, R.Exists):
        return True
    if isinstance(node, R.Compare):
        if isinstance(node.left, (R.Prop, R.Trait, R.Local)):
            return _cmp(node.op, v, _const(node.right))
        return _cmp(node.op, _const(node.left), v)
    if isinstance(node, R.InList):
        hit = any(_cmp("==", v, x) for x in node.items)
        return not hit if node.negated else hit
    if isinstance(node, R.Between):
        return _cmp("<=", _const(node.low), v) and _cmp("<=", v, _const(node.high))
    if isinstance(node, R.StrTest):
        if not isinstance(v, str):
            return False
        if node.op == "contains":
            return node.pattern in v
        if node.op == "startswith":
            return v.startswith(node.pattern)
        return re.search(node.pattern, v) is not None
    raise TypeError(node)  # pragma: no cover


def _leaf_name(node) -> tuple[str, str]:
    for n in R._walk(node, into_where=False):
        if isinstance(n, R.Prop):
            return "prop", n.name
        if isinstance(n, R.Trait):
            return "trait", n.name
        if isinstance(n, R.Local):
            return "local", "@" + n.field
    raise TypeError(node)  # pragma: no cover


def eval_cond_scalar(cond, get) -> bool:
    """Evaluate a where-clause (or trait test tree) with ``get(name)`` giving values."""
    if isinstance(cond, R.And):
        return all(eval_cond_scalar(c, get) for c in cond.items)
    if isinstance(cond, R.Or):
        return any(eval_cond_scalar(c, get) for c in cond.items)
    if isinstance(cond, R.Not):
        return not eval_cond_scalar(cond.item, get)
    return test_value(cond, get(_leaf_name(cond)[1]))


_NUM_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}


def compile_cond_scalar(cond) -> Callable[[Callable[[str], Any]], bool]:
    """``eval_cond_scalar(cond, get)`` as a closure ``f(get)``, built once per rule: no tree
    walk per event, and the common leaves (a property against a string or number constant)
    decided without the general test, which still judges every other value."""
    if isinstance(cond, (R.And, R.Or)):
        parts = tuple(compile_cond_scalar(c) for c in cond.items)
        want = isinstance(cond, R.Or)

        def junction(get):
            for f in parts:
                if f(get) == want:
                    return want
            return not want
        return junction
    if isinstance(cond, R.Not):
        inner = compile_cond_scalar(cond.item)
        return lambda get: not inner(get)
    name = _leaf_name(cond)[1]
    if isinstance(cond, R.Compare) and isinstance(cond.left, (R.Prop, R.Trait, R.Local)):
        if isinstance(cond.right, R.Str) and cond.op in ("==", "!="):
            const, eq = cond.right.value, cond.op == "=="

            def str_leaf(get):
                v = get(name)
                if v.__class__ is str:
                    return (v == const) == eq
                return test_value(cond, v)
            return str_leaf
        if isinstance(cond.right, (R.Num, R.Dur)):
            const, op = _const(cond.right), _NUM_OPS[cond.op]

            def num_leaf(get):
                v = get(name)
                if v.__class__ is int or (v.__class__ is float and v == v):
                    return op(v, const)
                return test_value(cond, v)
            return num_leaf
    return lambda get: test_value(cond, get(name))


def fast_test(cond):
    """A where-clause as ``_kernel.track_entry`` runs it: a property compared with a string
    (``==``/``!=``) or with a number exactly representable as a double becomes a tuple
    ``(prop, op, const, closure)`` (``op`` a code of :data:`segcore.compile.OPS`) that the
    compiled path decides in C for a str (resp. int or non-NaN float) value, calling the
    closure (:func:`compile_cond_scalar`) for anything else; other clauses are the closure
    itself."""
    f = compile_cond_scalar(cond)
    if not (isinstance(cond, R.Compare) and isinstance(cond.left, R.Prop)):
        return f
    name = _leaf_name(cond)[1]
    if isinstance(cond.right, R.Str) and cond.op in ("==", "!="):
        return (name, OPS[cond.op], cond.right.value, f)
    if isinstance(cond.right, (R.Num, R.Dur)) and cond.op in _NUM_OPS:
        const = _const(cond.right)
        if type(const) in (int, float) and abs(const) <= 1 << 53 and float(const) == const:
            return (name, OPS[cond.op], float(const), f)
    return f


def _fast_slot(name: str) -> property:
    """An engine attribute kept in its :class:`~segcore._kernel.FastState`, where the
    compiled single-event path reads it."""
    def fset(self, value):
        setattr(self._fs, name, value)
    return property(operator.attrgetter("_fs." + name), fset)


# ------------------------------------------------------------------ columns
def _factorize(col: np.ndarray) -> tuple[list, np.ndarray]:
    """(unique values, inverse) for any 1-d column; None/NaN become None."""
    if col.dtype.kind in "US":
        uniq, inv = np.unique(col, return_inverse=True)
        return [str(u) for u in uniq], inv.reshape(-1)
    if col.dtype.kind in "iub":
        uniq, inv = np.unique(col, return_inverse=True)
        return [_norm(u) for u in uniq], inv.reshape(-1)
    if col.dtype.kind == "f":
        nan = np.isnan(col)
        filled = np.where(nan, 0.0, col)
        uniq, inv = np.unique(filled, return_inverse=True)
        vals: list = [float(u) for u in uniq] + [None]
        inv = np.where(nan, len(uniq), inv.reshape(-1))
        return vals, inv
    items = col.tolist()
    # dict.fromkeys dedupes at C speed; equal numbers (1, 1.0, True) share one entry, which
    # is what the semantics say (bools are numbers), and "1" stays apart from 1.
    uniq = list(dict.fromkeys(items))
    index = {v: i for i, v in enumerate(uniq)}
    inv = np.fromiter(map(index.__getitem__, items), dtype=np.int64, count=len(items))
    return [None if _is_missing(v) else v for v in uniq], inv


def _factorize_checked(col: np.ndarray, field: str, rows=None) -> tuple[list, np.ndarray]:
    """:func:`_factorize` of a property column, rejecting values that are not str, number,
    bool or None (``rows`` maps positions back to batch rows for the error)."""
    try:
        vals, inv = _factorize(col)
    except TypeError:
        vals, inv = None, None
    bad = None
    if vals is not None:
        for j, v in enumerate(vals):
            if not (v is None or isinstance(v, (str, int, float, np.generic))):
                bad = j
                break
        if bad is None:
            return vals, inv
        pos = int(np.flatnonzero(inv == bad)[0])
    else:
        pos = next(i for i, v in enumerate(col.tolist())
                   if not (v is None or isinstance(v, (str, int, float, np.generic))))
    row = pos if rows is None else int(rows[pos])
    v = col[pos]
    raise EventError(f"a property value must be a string, number, bool or None, got "
                     f"{type(v).__name__}", index=row, field=field)


def _where_mask(cond, cols: dict, n: int, cache: dict, rows=None) -> np.ndarray:
    """A where-clause over a batch's property columns (``rows`` maps positions back to batch
    rows for errors); each property is factorised once (``cache``) and tested per value."""
    if isinstance(cond, (R.And, R.Or)):
        m = _where_mask(cond.items[0], cols, n, cache, rows)
        for c in cond.items[1:]:
            other = _where_mask(c, cols, n, cache, rows)
            m = m & other if isinstance(cond, R.And) else m | other
        return m
    if isinstance(cond, R.Not):
        return ~_where_mask(cond.item, cols, n, cache, rows)
    name = _leaf_name(cond)[1]
    col = cols.get(name)
    if col is None:
        return np.zeros(n, dtype=bool)
    if name not in cache:
        cache[name] = _factorize_checked(col, f"props.{name}", rows)
    vals, inv = cache[name]
    res = np.fromiter((test_value(cond, v) for v in vals), dtype=bool, count=len(vals))
    return res[inv] if len(vals) else np.zeros(n, dtype=bool)


def _plain_ints(items: list) -> np.ndarray | None:
    """``items`` as int64 when every one is a plain int that fits, else None."""
    if not items or set(map(type, items)) != {int}:
        return None
    try:
        return np.array(items, dtype=np.int64)
    except OverflowError:
        return None


def _as_column(x, n: int, field: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x
    else:
        # Python sequences become object columns, validated value by value: numpy's own
        # conversion would silently turn True into 1 or 2.5 into a float column.
        try:
            items = list(x)
        except TypeError:
            raise EventError(f"must be a column (array or list), got {type(x).__name__}",
                             field=field) from None
        arr = np.fromiter(items, dtype=object, count=len(items))
    if arr.ndim != 1:
        raise EventError(f"must be a 1-d column, got shape {arr.shape}", field=field)
    if len(arr) != n:
        raise EventError(f"has {len(arr)} rows, expected {n}", field=field)
    return arr


# ------------------------------------------------------------------ engine
class Engine:
    """A real-time segmentation engine: exact membership of every user in every segment.

    Parameters
    ----------
    clock : callable, optional
        Returns wall time in **seconds** (like :func:`time.time`). When given, every call first
        advances the engine to the clock, and events more than ``max_future`` ahead of it are
        rejected. Without it the engine runs on event time (``now`` = the latest ts seen).
    max_future : str or int
        With a clock, how far ahead of it an event may be (default ``"5m"``).
    seed : int
        Salt of ``bucket(lo, hi)``'s user hash.
    dedup_horizon : str or int
        How long (engine time) a message id is remembered for deduplication (default ``"1d"``).
    event_types : iterable of str, optional
        When given, rules may only use these event types (typos are caught with a "did you
        mean"); events of other types are still accepted.
    session_timeout : str or int
        Sessions (``count(session, 7d)``, ``in_session``, docs/patterns.md) are runs of a
        user's events with gaps under this (default ``"30m"``).
    seq_max_events : int
        The most events one ``seq(...)`` keeps per user (default 1024); past it the oldest is
        evicted and counted in ``stats()["seq_evicted"]``.
    predictive : bool or dict, optional
        Keep the per-user statistics of the built-in predictive scores (``score.churn``,
        ``score.p_alive``, ``score.expected_purchases_90d``, ``score.ltv_90d``,
        ``score.convert``; docs/predictive.md) from the first event on. ``True`` for the
        defaults, or a dict with ``purchase`` (event type, ``"purchase"``), ``amount``
        (its numeric property, ``"amount"``), ``convert_events`` (the event types
        ``score.convert`` counts, ``["product_view", "add_to_cart", "email_click"]``) and
        ``horizon`` (of the expected purchases and value, ``"90d"``). Off by default: it
        costs about 180 bytes per user. Without it, ``score.churn`` & co. are ordinary
        caller-set scores.
    compact_rows : bool
        Store each user's counters in 6 bytes instead of 8 (default ``False``): a fifth less
        memory per user (193 instead of 247 bytes on the canonical workload) for a quarter
        less ``track_many`` throughput (docs/performance.md). Exact either way: a timestamp or
        count that 6 bytes cannot hold (from the year 10889 on) turns the engine back to
        8-byte counters. Ignored with ``predictive``.

    Examples
    --------
    >>> eng = Engine()
    >>> _ = eng.add_segment("cart_abandoners", "abandoned(add_to_cart, purchase, 1h)")
    >>> eng.track("ann", "add_to_cart", ts=1_000)
    []
    >>> eng.advance(1_000 + 3_600_000).to_list()
    [Transition(user='ann', segment='cart_abandoners', entered=True, ts=3601000)]
    >>> eng.segments_of("ann")
    ['cart_abandoners']
    """

    def __init__(self, clock: Callable[[], float] | None = None, max_future="5m", seed: int = 0,
                 dedup_horizon="1d", event_types: Iterable[str] | None = None,
                 max_queued_firings: int = 1_000_000, wal: str | os.PathLike | None = None,
                 fsync: str = "always", session_timeout="30m", seq_max_events: int = 1024,
                 predictive: bool | Mapping[str, Any] | None = None,
                 compact_rows: bool = False):
        if clock is not None and not callable(clock):
            raise SegcoreError("clock must be a callable returning seconds (like time.time)")
        self._fs = FastState()
        if type(self).track is Engine.track:     # (a subclass's own track stays in charge)
            self.track = types.MethodType(_track_entry, self)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SegcoreError("seed must be an int")
        self._clock = clock
        self._max_future_ms = R.parse_duration(max_future)
        self._seed = seed
        self._dedup_ms = R.parse_duration(dedup_horizon)
        self._session_ms = R.parse_duration(session_timeout)
        if self._session_ms <= 0:
            raise SegcoreError("session_timeout must be longer than 0")
        if isinstance(seq_max_events, bool) or not isinstance(seq_max_events, int) \
                or seq_max_events < 1:
            raise SegcoreError("seq_max_events must be an int >= 1")
        self._seq_cap = seq_max_events
        if not isinstance(compact_rows, bool):
            raise SegcoreError("compact_rows must be True or False")
        self._compact = compact_rows
        self._pred = _predict_spec(predictive)
        self._pred_model = _predict.PredictiveModel()
        self._event_types = None if event_types is None else set(event_types)
        # ids
        self._int_dense = IdMap()                  # int user id -> dense index
        self._str_dense: dict[str, int] = {}       # string user id -> dense index
        self._pub = np.zeros(16, dtype=np.uint32)
        self._n_users = 0
        self._erased: set[int] = set()              # dense slots of forgotten users
        self._held: Transitions | None = None       # caught up by reads, not yet returned
        self._str_num: dict[int, str] = {}
        self._next_str = _U32 - 1
        self._pins: dict[str, int] = {}             # string id -> number a driver gave it
        # events
        self._codes: dict[str, int] = {}
        self._event_names: list[str] = []
        self._event_counts: list[int] = [0] * 16     # accepted events per event code
        self._values: dict = {}
        self._value_keys: list = []                 # the keys of _values, in code order
        self._seen_ids: dict = {}
        self._ids_pruned_at = 0
        # profiles
        self._traits = _TraitStore()
        self._scores: dict[int, dict] = {}
        # segments
        self._asts: dict[str, R.Cond] = {}
        self._texts: dict[str, str] = {}
        self._set_plan(self._compile({}, []))
        self._kernel = self._new_kernel(self._plan)
        self._bitmaps = {}                          # (see the property: lazily brought up)
        self._all = BitMap()
        # triggers and journeys (docs/triggers.md), in registration order
        self._items: list = []
        self._hidden: dict[str, R.Cond] = {}      # only_if conditions, as hidden segments
        self._policies = Policies()
        if isinstance(max_queued_firings, bool) or not isinstance(max_queued_firings, int) \
                or max_queued_firings < 0:
            raise SegcoreError("max_queued_firings must be an int >= 0")
        self._queue: deque = deque()
        self._max_queue = max_queued_firings
        self._stats = {"events": 0, "duplicates": 0, "transitions": 0, "callback_errors": 0,
                       "batches": 0, "firings": 0, "suppressed": 0, "firings_dropped": 0,
                       "seq_evicted": 0}
        # write-ahead log (segcore.wal)
        self._log = None
        self._replaying = False
        self._wal_depth = 0
        self._clock_seen = None
        self._replay_clock = None
        self._wal_dir = None
        self._wal_seq = 0
        # calls from a ShardedEngine driver (segcore.sharded): the last applied number and
        # the results of the latest calls, for a driver that re-sends one
        self._shard_seq = 0
        self._shard_results: dict[int, Any] = {}
        self._no_local = False          # a ShardedEngine's schema engine refuses hour/weekday
        if fsync not in _wal.FSYNC_POLICIES:
            raise SegcoreError(f"fsync must be one of {', '.join(_wal.FSYNC_POLICIES)}, got "
                               f"{fsync!r}")
        self._fsync = fsync
        if wal is not None:
            self._start_wal(os.fspath(wal))

    def _compile(self, asts: dict, items: list) -> Plan:
        return compile_segments(asts, self._event_code, items, value_code=self._value_code,
                                session_ms=self._session_ms, seq_cap=self._seq_cap,
                                predict=self._pred)

    def _new_kernel(self, plan: Plan) -> Kernel:
        kernel = Kernel(plan.arrays, self._compact)
        kernel.set_pred_params(self._pred_model.vector(self._pred))
        return kernel

    def _set_plan(self, plan: Plan) -> None:
        self._plan = plan
        self._inputs_cache: dict = {}
        self._fast: dict = {}       # event type -> its inputs for _kernel.track_entry

    # the state _kernel.track_entry reads on every call, kept in self._fs
    _kernel = _fast_slot("kernel")
    _int_dense = _fast_slot("ids")
    _str_num = _fast_slot("str_num")
    _fast = _fast_slot("specs")
    _event_counts = _fast_slot("counts")
    _stats = _fast_slot("stats")
    _values = _fast_slot("values")
    _clock = _fast_slot("clock")
    _replaying = _fast_slot("replaying")

    # ------------------------------------------------------------------ properties
    @property
    def now(self) -> int:
        """The engine's time in ms: the event-time watermark (and the clock, with one)."""
        self._read_sync()
        return int(self._kernel.now)

    def _read_sync(self) -> None:
        """With a clock, reads first catch up with it, so they see every expiry up to the
        current wall time; the transitions that causes go to the bitmaps and callbacks."""
        if self._clock is not None:
            self._catch_up(self._read_clock())
            self._hold(self._drain([]))

    def _hold(self, batch: Transitions) -> None:
        """Keep transitions that a read (or forget) caused by catching up with the clock: the
        next call that returns transitions returns them first, so none is ever lost."""
        if len(batch):
            self._held = batch

    @property
    def segments(self) -> dict[str, str]:
        """The segments, name -> rule text, in definition order."""
        return dict(self._texts)

    # ------------------------------------------------------------------ interning
    def _event_code(self, name: str) -> int:
        c = self._codes.get(name)
        if c is None:
            c = self._codes[name] = len(self._event_names)
            self._event_names.append(name)
            if c >= len(self._event_counts):
                self._event_counts += [0] * len(self._event_counts)
        return c

    def event_code(self, name: str) -> int:
        """The integer code of an event type (for ``track_many(event=codes)``)."""
        if not isinstance(name, str) or not name:
            raise EventError("an event type must be a non-empty string", field="event")
        return self._event_code(name)

    def _value_code(self, v) -> int:
        key = (isinstance(v, str), v)
        c = self._values.get(key)
        if c is None:
            c = self._values[key] = len(self._values)
            self._value_keys.append(key)
        return c

    def _dense_of(self, user) -> int | None:
        """Dense index of a (validated) user id, or None for a user never seen."""
        if isinstance(user, str):
            return self._str_dense.get(user)
        d = self._int_dense.get(int(user)) if 0 <= user < _U32 else -1
        return None if d < 0 else int(d)

    def user_number(self, user: UserId) -> int:
        """The public number of a user (its id for ints; the number given to a string)."""
        u = self._dense_of(user) if isinstance(user, (int, str)) and not isinstance(
            user, bool) else None
        if u is None:
            raise KeyError(f"unknown user {user!r}")
        return int(self._pub[u])

    def user_id(self, number: int) -> UserId:
        """The user id behind a public number (inverse of :meth:`user_number`)."""
        number = int(number)
        if number in self._str_num:
            return self._str_num[number]
        if 0 <= number < _U32 and self._int_dense.get(number) >= 0:
            return number
        raise KeyError(f"unknown user number {number}")

    # ------------------------------------------------------------------ users
    def _check_user(self, user, index=None) -> UserId:
        if isinstance(user, (bool, np.bool_)):
            raise EventError("a user id must be an int in [0, 2**32) or a string, got bool",
                             index=index, field="user")
        if isinstance(user, (int, np.integer)):
            user = int(user)
            if not 0 <= user < _U32:
                raise EventError(f"user id {user} is out of range [0, 2**32)", index=index,
                                 field="user")
            if user in self._str_num:
                raise EventError(f"user number {user} is already given to string id "
                                 f"{self._str_num[user]!r}", index=index, field="user")
            return user
        if isinstance(user, (str, np.str_)):
            user = str(user)
            if not user:
                raise EventError("a user id must not be empty", index=index, field="user")
            return user
        raise EventError(f"a user id must be an int in [0, 2**32) or a string, got "
                         f"{type(user).__name__}", index=index, field="user")

    def _resolve_users(self, users: np.ndarray) -> tuple[np.ndarray, list]:
        """Dense indices for a validated user column; returns (dense or -1, new ids in order)."""
        n = len(users)
        ints = _int_users(users)
        if ints is not None:
            users = ints
            dense = self._int_dense.lookup(np.ascontiguousarray(users, dtype=np.uint32))
            missing = np.flatnonzero(dense < 0)
            if not len(missing):
                return dense, []
            # new users, in order of first appearance
            uniq, first = np.unique(users[missing], return_index=True)
            order = np.argsort(first, kind="stable")
            new = uniq[order].tolist()
            for u, fi in zip(new, missing[first[order]].tolist()):
                if u in self._str_num:
                    raise EventError(f"user number {u} is already given to string id "
                                     f"{self._str_num[u]!r}", index=fi, field="user")
            return dense, new
        out = np.empty(n, dtype=np.int64)
        seen_new: dict = {}
        for i, u in enumerate(users.tolist()):
            u = self._check_user(u, i)
            d = self._dense_of(u)
            if d is None:
                seen_new.setdefault(u, i)
                d = -1
            out[i] = d
        return out, list(seen_new)

    def _create_users(self, new: list) -> None:
        if not new:
            return
        n0 = self._n_users
        need = n0 + len(new)
        self._reserve_users(need)
        nums = np.empty(len(new), dtype=np.int64)
        batch_ints = None
        for i, u in enumerate(new):
            if isinstance(u, str):
                pin = self._pins.get(u)
                if pin is not None:         # numbered by a ShardedEngine driver
                    nums[i] = pin
                    self._str_num[pin] = u
                    self._next_str = min(self._next_str, pin - 1)
                    self._str_dense[u] = n0 + i
                    continue
                if batch_ints is None:      # ints created by this same call are taken too
                    batch_ints = {v for v in new if not isinstance(v, str)}
                while self._int_dense.get(self._next_str) >= 0 or \
                        self._next_str in self._str_num or self._next_str in batch_ints:
                    self._next_str -= 1
                nums[i] = self._next_str
                self._str_num[self._next_str] = u
                self._next_str -= 1
                self._str_dense[u] = n0 + i
            else:
                nums[i] = u
        self._n_users = need
        self._pub[n0:need] = nums
        is_int = np.fromiter((not isinstance(u, str) for u in new), dtype=bool, count=len(new))
        if is_int.any():
            self._int_dense.insert(nums[is_int].astype(np.uint32),
                                   np.flatnonzero(is_int).astype(np.int64) + n0)
        buckets = np.empty(len(new), dtype=np.int32)
        if len(new) < 16:
            for i, u in enumerate(new):
                buckets[i] = bucket_of(u, self._seed)
        else:
            if is_int.any():
                buckets[is_int] = buckets_of_ints(nums[is_int], self._seed)
            for i in np.flatnonzero(~is_int):
                buckets[i] = bucket_of(new[i], self._seed)
        self._kernel.add_users(len(new), buckets)
        self._all.update(nums.astype(np.uint32))

    def _reserve_users(self, need: int) -> None:
        """Room for ``need`` users in the public-number column and the trait store."""
        if need > len(self._pub):
            grown = np.zeros(max(need, 2 * len(self._pub)), dtype=np.uint32)
            grown[: self._n_users] = self._pub[: self._n_users]
            self._pub = grown
        self._traits.reserve(need)

    def _create_int_user(self, u: int) -> int:
        """:meth:`_create_users` for one int id (a new visitor's first event); returns its
        dense index."""
        n0 = self._n_users
        self._reserve_users(n0 + 1)
        self._n_users = n0 + 1
        self._pub[n0] = u
        self._int_dense.put(u, n0)
        self._kernel.add_users(1, np.array([bucket_of(u, self._seed)], dtype=np.int32))
        self._all.add(u)
        return n0

    # ------------------------------------------------------------------ segments
    def add_segment(self, name: str, rule) -> Transitions:
        """Define a segment. ``rule`` is rule text, an AST node or a :mod:`segcore.build`
        expression. Returns the transitions of users who are in it at once (``ts = now``).

        A segment added after events were tracked is exact at once when the state it needs is
        already kept (shared counters, traits, scores, references, buckets) or when no event
        of the types it reads has been accepted yet; otherwise a :class:`RuleError` says which
        history is missing (the kernel does not keep raw events).
        """
        return self.add_segments({name: rule})

    def add_segments(self, segments: Mapping[str, Any]) -> Transitions:
        """Define several segments at once; they may reference each other in any order."""
        if not isinstance(segments, Mapping):
            raise RuleError("add_segments takes a mapping of name -> rule")
        clock_ms = self._read_clock()
        new_names = list(segments)
        for name in new_names:
            if not isinstance(name, str) or not _NAME_RE.match(name) or name.startswith("__"):
                raise RuleError(f"bad segment name {name!r} (letters, digits and _, not "
                                "starting with a digit or with `__`)")
            if name in self._asts:
                raise RuleError(f"segment `{name}` already exists", segment=name)
        known = set(self._asts) | set(new_names)
        asts = dict(self._asts)
        texts = dict(self._texts)
        for name in new_names:
            ast, text = self._to_ast(name, segments[name], known)
            asts[name] = ast
            texts[name] = text
        return self._replan(asts, texts, new_names, clock_ms)

    def _to_ast(self, name: str, rule, known) -> tuple:
        if isinstance(rule, str):
            parsed = R.parse_full(rule, segment=name, segments=known,
                                  event_types=self._event_types)
            return parsed.ast, rule
        node = getattr(rule, "node", rule)
        if not isinstance(node, R.Cond.__args__):
            raise RuleError(f"a rule must be text, an AST node or a builder expression, got "
                            f"{type(rule).__name__}", segment=name)
        R.validate(node, segment=name)
        if self._event_types is not None:
            for ev in R.event_types_of(node):
                if ev not in self._event_types:
                    raise RuleError(f"unknown event type `{ev}`"
                                    f"{R._suggest(ev, self._event_types)}", segment=name)
        for ref in R.references(node):
            if ref not in known:
                raise RuleError(f"unknown segment `{ref}`{R._suggest(ref, known)}",
                                segment=name)
        return node, R.to_text(node)

    def replace_segment(self, name: str, rule) -> Transitions:
        """Give a segment a new rule while events flow; returns the transitions of the users
        whose membership changes (``ts = now``; segments referencing it may flip too).
        Triggers and journeys on the segment stay registered. Back-filled like
        :meth:`add_segment`: a rule needing history that is not kept raises RuleError.

        >>> eng = Engine()
        >>> _ = eng.add_segment("big", "sum(purchase.amount) >= 100")
        >>> _ = eng.track(1, "purchase", ts=5, props={"amount": 60})
        >>> eng.replace_segment("big", "sum(purchase.amount) >= 50").to_list()
        [Transition(user=1, segment='big', entered=True, ts=5)]
        """
        clock_ms = self._read_clock()
        self._require_segment(name)
        ast, text = self._to_ast(name, rule, set(self._asts))
        asts = dict(self._asts)
        texts = dict(self._texts)
        asts[name] = ast
        texts[name] = text
        return self._replan(asts, texts, [name], clock_ms, replaced=name)

    def remove_segment(self, name: str) -> None:
        """Remove a segment (its members, bitmap and callbacks go with it)."""
        self._require_segment(name)
        users = [s for s, ast in self._asts.items() if s != name and name in R.references(ast)]
        users += [it.name for it in self._items
                  if (isinstance(it, TriggerSpec) and it.segment == name) or
                  (isinstance(it, JourneySpec) and (it.entry == name or name in it.exits or any(
                      name in R.references(self._hidden[st.only_if])
                      for st in it.steps if st.only_if)))]
        if users:
            raise RuleError(f"segment `{name}` is referenced by "
                            + ", ".join(f"`{u}`" for u in users), segment=name)
        asts = {k: v for k, v in self._asts.items() if k != name}
        texts = {k: v for k, v in self._texts.items() if k != name}
        self._replan(asts, texts, [], self._read_clock())
        self._bitmaps.pop(name, None)

    def _replan(self, asts: dict, texts: dict, new_names: list, clock_ms, items=None,
                hidden=None, replaced: str | None = None) -> Transitions:
        items = self._items if items is None else items
        hidden = self._hidden if hidden is None else hidden
        try:
            plan = self._compile({**asts, **hidden}, [it.item() for it in items])
        except RuleError as e:
            if e.segment is None and len(new_names) == 1:
                raise e.with_segment(new_names[0]) from None
            raise
        if plan.local_events and self._no_local:
            raise RuleError("`hour` and `weekday` need the user's timezone when the event "
                            "arrives, which a ShardedEngine driver does not hold; they are "
                            "not supported on a ShardedEngine",
                            segment=new_names[0] if len(new_names) == 1 else None)
        old = self._plan
        fmap = feature_map(plan, old)
        # Features that start empty are exact only if no event they read was accepted yet;
        # otherwise they are back-filled by replaying the write-ahead log, where there is one.
        missing = []
        for f, spec in enumerate(plan.features):
            if fmap[f] >= 0:
                continue
            for ev in spec.events:
                seen = (self._stats["events"] if ev is None
                        else (int(self._event_counts[self._codes[ev]])))
                if seen:
                    missing.append((f, spec, ev, seen))
                    break
        history = None
        if missing:
            history = self._history_engine(asts, texts, items, hidden, missing, new_names)
        self._catch_up(clock_ms)
        before = self._collect(self._kernel, tuple(old.names))
        self._flush_bitmaps()           # (while rows still name this kernel's segments)
        fired = self._take_firings()
        self._evicted()
        kernel = self._new_kernel(plan)
        smap = np.array([old.names.index(n) if n in old.names else -1 for n in plan.names],
                        dtype=np.int32)
        old_keys = [it.key() for it in self._items]
        imap = np.array([old_keys.index(it.key()) if it.key() in old_keys else -1
                         for it in items], dtype=np.int32)
        kernel.migrate_from(self._kernel, fmap, smap, imap)
        if history is not None:
            kernel.copy_features_from(
                history._kernel, np.array([f for f, *_ in missing], dtype=np.int32),
                np.array([history._plan.feature_index(spec) for _, spec, *_ in missing],
                         dtype=np.int32))
        self._kernel = kernel
        self._set_plan(plan)
        self._asts = asts
        self._texts = texts
        self._items = list(items)
        self._hidden = dict(hidden)
        self._push_all_profiles()
        for n in new_names:
            if n != replaced:
                self._bitmaps[n] = BitMap()
        kernel.eval_all()
        return self._drain([before] if len(before) else [], fired)

    def _history_engine(self, asts, texts, items, hidden, missing, new_names) -> "Engine":
        """A scratch engine with the new rules that has seen everything since the last
        checkpoint, for back-filling ``missing`` features; RuleError when the history is not
        there (no log, or events from before the last checkpoint)."""
        owner = (f"segment `{new_names[0]}` needs" if len(new_names) == 1 else
                 "segments " + ", ".join(f"`{n}`" for n in new_names) + " need"
                 if new_names else "the change needs")
        seg = new_names[0] if len(new_names) == 1 else None
        _, spec, ev, seen = missing[0]
        if self._wal_dir is None or self._replaying:
            what = "events" if ev is None else f"`{ev}` events"
            raise RuleError(f"{owner} the history of {what}, which is not kept ({seen} already "
                            "tracked); define it before tracking them, or keep a write-ahead "
                            "log (Engine(wal=dir)) to back-fill it by replay", segment=seg)
        scratch, _, _ = self._replay_since_checkpoint(asts, texts, items, hidden, owner, seg)
        n = self._n_users
        if scratch._n_users != n or not np.array_equal(scratch._pub[:n], self._pub[:n]):
            raise RuleError(f"{owner} a back-fill by replay, but the log does not reproduce "
                            "the engine's users", segment=seg)
        return scratch

    def _replay_since_checkpoint(self, asts, texts, items, hidden, owner, seg):
        """The latest snapshot, given these rules (no callbacks), then every data call of the
        log after it: ``(scratch engine, transitions it produced, snapshot time)``. Its state
        is exact for any rule whose events all came after that checkpoint; a rule needing
        older history raises RuleError."""
        from . import snapshot
        snap, log = _wal.paths(self._wal_dir, self._wal_seq)
        self._log.flush()
        scratch = snapshot.read(snap)
        start = scratch.now
        bare = [msgspec.structs.replace(it, fn=None) if isinstance(it, TriggerSpec) else
                JourneySpec(it.name, it.entry, list(it.exits),
                            [msgspec.structs.replace(st, fn=None) for st in it.steps])
                for it in items]
        try:
            seen = list(scratch._replan(asts, texts, [n for n in asts if n not in scratch._asts],
                                        None, items=bare, hidden=hidden))
        except RuleError:
            raise RuleError(f"{owner} history from before the last checkpoint, which is not "
                            "kept; define it before tracking those events", segment=seg) \
                from None
        scratch._replaying = True
        try:
            for call in _wal.read_records(log)[0]:
                if call.method in _DATA_CALLS:
                    scratch._replay_clock = call.clock_ms
                    out = getattr(scratch, call.method)(*call.args, **call.kwargs)
                    if isinstance(out, (Transitions, list)):
                        seen.extend(out)
        finally:
            scratch._replaying = False
        return scratch, seen, start

    def _require_segment(self, name: str) -> None:
        if name not in self._asts:
            raise RuleError(f"unknown segment `{name}`{R._suggest(str(name), self._asts)}")

    # ------------------------------------------------------------------ profiles

    def _score_row(self, dense: int) -> np.ndarray:
        sc = self._scores.get(dense, {})
        return np.array([sc.get(n, np.nan) for n in self._plan.score_names], dtype=np.float64)

    def _push_profiles(self, dense: list[int]) -> None:
        if not dense:
            return
        idx = np.array(dense, dtype=np.uint32)
        if self._plan.trait_tests:
            bits = self._traits.test_bits(self._plan.trait_tests, idx)
            self._kernel.set_trait_bits(idx, bits.reshape(-1))
        if self._plan.score_names:
            vals = np.concatenate([self._score_row(d) for d in dense])
            self._kernel.set_scores(idx, vals)

    def _push_all_profiles(self) -> None:
        users = set(self._traits.users().tolist()) | set(self._scores)
        self._push_profiles(sorted(users))

    @staticmethod
    def _check_profile_value(v, what: str, key: str, index=None):
        if isinstance(v, int) and not isinstance(v, bool) and not -2 ** 63 <= v < 2 ** 63:
            raise EventError(f"{what} `{key}` must fit in 64 bits, got {v}", index=index,
                             field=f"{what}s.{key}")
        if v is None or isinstance(v, (str, int, float, bool)):
            return _norm(v) if not isinstance(v, bool) else v
        if isinstance(v, (np.generic,)):
            return _norm(v)
        raise EventError(f"{what} `{key}` must be a string, number, bool or None, got "
                         f"{type(v).__name__}", index=index, field=f"{what}s.{key}")

    def set_traits(self, user: UserId, traits: Mapping[str, Any]) -> list[Transition]:
        """Set (or with ``None``, delete) traits of a user; returns the transitions caused.

        >>> eng = Engine()
        >>> _ = eng.add_segment("swedes", 'trait.country == "SE"')
        >>> eng.set_traits(7, {"country": "SE"})
        [Transition(user=7, segment='swedes', entered=True, ts=0)]
        """
        clock_ms = self._read_clock()
        user = self._check_user(user)
        if not isinstance(traits, Mapping):
            raise EventError("traits must be a mapping of name -> value", field="traits")
        clean = {}
        for k, v in traits.items():
            if not isinstance(k, str) or not k:
                raise EventError("trait names must be non-empty strings", field="traits")
            clean[k] = self._check_profile_value(v, "trait", k)
            if k == TZ_TRAIT:
                check_tz(clean[k])
        self._catch_up(clock_ms)
        self._create_users([user] if self._dense_of(user) is None else [])
        d = self._dense_of(user)
        idx = np.array([d], dtype=np.int64)
        for k, v in clean.items():
            col = np.empty(1, dtype=object)
            col[0] = v
            self._traits.set(k, idx, col)
        self._push_profiles([d])
        self._kernel.eval_users(np.array([d], dtype=np.uint32))
        return list(self._drain([]))

    def set_traits_many(self, user, **traits) -> Transitions:
        """Set traits for many users: ``set_traits_many(user=ids, country=codes, ...)``.

        Each keyword is a column as long as ``user``; ``None`` entries delete that trait.
        """
        clock_ms = self._read_clock()
        users, cols = _trait_columns(user, traits)
        n = len(users)
        dense, new = self._resolve_users(users)
        self._catch_up(clock_ms)
        self._create_users(new)
        if new:
            dense = self._resolve_users(users)[0]
        # rows apply in order: for a user named twice, the last row wins
        rev_u, rev_first = np.unique(dense[::-1], return_index=True)
        last = n - 1 - rev_first
        for k, col in cols.items():
            self._traits.set(k, rev_u, col[last])
        _, first = np.unique(dense, return_index=True)
        order = dense[np.sort(first)]
        self._push_profiles(order.tolist())
        self._kernel.eval_users(order.astype(np.uint32))
        return self._drain([])

    def set_scores(self, user: UserId, scores: Mapping[str, Any]) -> list[Transition]:
        """Set (or with ``None``, delete) numeric scores used as ``score.NAME`` in rules."""
        clock_ms = self._read_clock()
        user = self._check_user(user)
        if not isinstance(scores, Mapping):
            raise EventError("scores must be a mapping of name -> number", field="scores")
        clean = {}
        for k, v in scores.items():
            if not isinstance(k, str) or not k:
                raise EventError("score names must be non-empty strings", field="scores")
            if v is not None and (not _is_num(v) or not math.isfinite(float(v))):
                raise EventError(f"score `{k}` must be a finite number or None, got {v!r}",
                                 field=f"scores.{k}")
            clean[k] = None if v is None else float(v)
        self._catch_up(clock_ms)
        self._create_users([user] if self._dense_of(user) is None else [])
        d = self._dense_of(user)
        cur = self._scores.setdefault(d, {})
        for k, v in clean.items():
            if v is None:
                cur.pop(k, None)
            else:
                cur[k] = v
        if not cur:
            del self._scores[d]
        self._push_profiles([d])
        self._kernel.eval_users(np.array([d], dtype=np.uint32))
        return list(self._drain([]))

    # ------------------------------------------------------------------ predictive scores
    def _require_predictive(self, what: str) -> PredictSpec:
        return _require_predictive(self._pred, what)

    @property
    def predictive_model(self) -> "_predict.PredictiveModel":
        """The fitted parameters of the built-in scores (a model is ``None`` until fitted)."""
        return self._pred_model

    def fit_predictive(self, *, l2: float = 1.0) -> Transitions:
        """Fit the built-in scores' population parameters by maximum likelihood from the
        current state, store them (snapshots and the log keep them) and re-score everyone.

        * BG/NBD (``p_alive``, ``churn``, ``expected_purchases_*``) from every buyer's
          repeat purchases ``x``, days from first to last purchase ``t_x`` and from first
          purchase to now ``T``;
        * Gamma-Gamma (``ltv_*``) from the buyers with a repeat purchase carrying an amount;
        * the logistic ``convert`` model from the engine's own outcomes: the users active in
          the 7 days up to 8 days ago who had not bought by then, labelled by whether they
          made their first purchase in the 7 complete days after (``l2`` is its ridge).

        A model that cannot be fitted (too few buyers, one outcome only) keeps its previous
        parameters; :attr:`predictive_model` ``.skipped`` says why. Needs scipy
        (``pip install 'segcore[predict]'``). Returns the transitions the new scores cause
        now (later ones arrive on time, as always).
        """
        spec = self._require_predictive("fit_predictive()")
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
            raise SegcoreError(f"l2 must be a number >= 0, got {l2!r}")
        clock_ms = self._read_clock()
        self._catch_up(clock_ms)
        model = _predict.fit_model(self._kernel, spec, int(self._kernel.now),
                                   self._pred_model, l2=float(l2))
        return self.set_predictive_model(msgspec.to_builtins(model))

    def set_predictive_model(self, model) -> Transitions:
        """Use these parameters for the built-in scores (a :class:`segcore.predict.
        PredictiveModel` or its ``msgspec.to_builtins`` form, e.g. fitted on another engine)
        and re-score everyone."""
        spec = self._require_predictive("set_predictive_model()")
        m = _predict.PredictiveModel.coerce(model, spec)
        clock_ms = self._read_clock()
        self._catch_up(clock_ms)
        self._pred_model = m
        self._kernel.set_pred_params(m.vector(spec))
        self._kernel.eval_all()
        return self._drain([])

    def scores_of(self, user: UserId) -> dict[str, float]:
        """A user's scores now: the caller's (:meth:`set_scores`) and, on a predictive
        engine, the built-in ones (a caller's value of the same name wins; a score that is
        missing, e.g. ``churn`` of a user who never bought, is left out)."""
        self._read_sync()
        d = self._dense_of(self._check_user(user))
        if d is None:
            return {}
        out: dict[str, float] = {}
        if self._pred is not None:
            vals = self._kernel.pred_scores_of(np.array([d], dtype=np.uint32),
                                               int(self._kernel.now))[0]
            for name, sid in self._pred.score_ids.items():
                if not math.isnan(vals[sid]):
                    out[name] = float(vals[sid])
        out.update(self._scores.get(d, {}))
        return out

    def predictive_scores(self) -> dict[str, np.ndarray]:
        """Every user's built-in scores now, as columns: ``user`` (public numbers, as in
        :meth:`members`) and one float64 column per score (NaN where missing). Callers'
        :meth:`set_scores` values are not applied."""
        spec = self._require_predictive("predictive_scores()")
        self._read_sync()
        n = self._n_users
        keep = np.ones(n, dtype=bool)
        if self._erased:
            keep[list(self._erased)] = False
        vals = self._kernel.pred_scores(int(self._kernel.now))[:n][keep]
        out = {"user": self._pub[:n][keep].copy()}
        for name, sid in spec.score_ids.items():
            out[name] = np.ascontiguousarray(vals[:, sid])
        return out

    # ------------------------------------------------------------------ time
    def _read_clock(self) -> int | None:
        """The clock in ms (read once per call), or None in event-time mode. The write-ahead
        log records the reading so that a replay sees the same time."""
        if self._replaying:
            return self._replay_clock
        ms = None if self._clock is None else self._clock_ms()
        if self._clock_seen is None:
            self._clock_seen = ms
        return ms

    def _catch_up(self, clock_ms: int | None) -> None:
        """Move time to the clock; called once a call's input has been accepted, so that a
        rejected call changes nothing. The transitions go out with the call's own."""
        if clock_ms is not None and clock_ms > self._kernel.now:
            self._kernel.advance(clock_ms)

    def _clock_ms(self) -> int:
        t = self._clock()
        try:
            ms = int(float(t) * 1000)
        except (TypeError, ValueError):
            raise SegcoreError(f"clock() must return seconds as a number, got {t!r}") from None
        return min(max(ms, 0), _MAX_TS - 1)

    def advance(self, ts) -> Transitions:
        """Move time forward to ``ts`` (ms or datetime); returns the transitions time caused,
        each at the exact instant its rule flipped. Earlier times are a no-op."""
        t = _to_ms(ts)
        self._catch_up(self._read_clock())
        self._kernel.advance(t)
        return self._drain([])

    # ------------------------------------------------------------------ events
    def track(self, user: UserId, event: str, ts=None, props: Mapping[str, Any] | None = None,
              id=None) -> list[Transition]:
        """Track one event; returns the transitions it (and the time it moved) caused.

        ``ts`` is ms since the epoch or a datetime (default: now). ``props`` are the event's
        properties (str, number, bool or None). ``id`` is an optional message id: a repeated
        id within the dedup horizon is ignored (and counted in ``stats()["duplicates"]``).

        The common case (an int user, a known event type, plain property values, no clock,
        no id) runs compiled (``_kernel.track_entry``, which an engine also installs as its
        own ``track`` attribute, saving this Python frame); everything else comes here.
        """
        return _track_entry(self, user, event, ts, props, id)

    def _track_general(self, user, event, ts, props, id) -> list[Transition]:
        """:meth:`track` for what the compiled short path does not take."""
        if props is None:
            props = {}
        elif not isinstance(props, Mapping):
            raise EventError("props must be a mapping of name -> value", field="props")
        if not (type(user) is int and 0 <= user < _U32 and user not in self._str_num):
            user = self._check_user(user)
        if not isinstance(event, str) or not event:
            raise EventError("event must be a non-empty string", field="event")
        clock_ms = self._read_clock()
        if ts is None:
            ts = clock_ms if clock_ms is not None else self._kernel.now
        t = ts if type(ts) is int and 0 <= ts < _MAX_TS else _to_ms(ts)
        if clock_ms is not None and t > clock_ms + self._max_future_ms:
            raise EventError(f"`ts` {t} is more than max_future ahead of the clock "
                             f"({clock_ms})", field="ts")
        _check_props(props)
        filters, vals, keys = self._event_inputs(event)
        for j, p in vals:
            v = props.get(p)
            if v is not None and not _is_num(v):
                raise EventError(f"`{p}` of `{event}` events must be a number (it is "
                                 f"aggregated), got {type(v).__name__}", field=f"props.{p}")
            if v is not None and _as_float(v) is None:
                raise _too_large(p, event, v)
        if id is not None:
            if not isinstance(id, (str, int)) or isinstance(id, bool):
                raise EventError(f"a message id must be a string or int, got "
                                 f"{type(id).__name__}", field="id")
            now = self._kernel.now
            t0 = self._seen_ids.get(id)
            if t0 is not None and now - t0 <= self._dedup_ms:
                self._stats["duplicates"] += 1
                self._catch_up(clock_ms)
                return list(self._drain([]))
            self._remember_id(id, max(now, t))
        # ---- accepted: apply
        self._catch_up(clock_ms)
        code = self._codes.get(event)
        if code is None:
            code = self._event_code(event)
        d = self._dense_of(user)
        if d is None:
            self._create_users([user])
            d = self._dense_of(user)
        k = self._kernel
        fbuf, vbuf, kbuf = k.row_f, k.row_v, k.row_k
        get = props.get
        if filters and event in self._plan.local_events:
            (hour,), (day,) = hours_weekdays([t], [self._traits.get(d, TZ_TRAIT)])
            local = {"@hour": hour, "@weekday": day}
            get = lambda k: local[k] if k in local else props.get(k)  # noqa: E731
        for j, test in filters:
            fbuf[j] = test(get)
        for j, p in vals:
            v = props.get(p)
            vbuf[j] = np.nan if v is None else float(v)
        for j, p in keys:
            v = props.get(p)
            kbuf[j] = -1 if _is_missing(v) else self._value_code(_norm(v))
        pending = k.track_one(d, code, t, fbuf, vbuf, kbuf)
        self._stats["events"] += 1
        self._stats["batches"] += 1
        self._event_counts[code] += 1
        return self._drain_list() if pending or self._kernel.pending_firings else []

    def _fast_spec(self, event: str):
        """(code, filters, values, keys) of an event type for ``_kernel.track_entry``, or False
        when its events take the general path (where-clauses reading local time); None
        (uncached) for a type not interned yet."""
        code = self._codes.get(event)
        if code is None:
            return None
        if event in self._plan.local_events:
            spec = False
        else:
            filters, vals, keys = self._event_inputs(event)
            spec = (code, [(j, fast_test(self._plan.filters[j])) for j, _ in filters], vals,
                    keys)
        self._fast[event] = spec
        return spec

    def _event_inputs(self, event: str) -> tuple:
        """What the kernel needs from one event of this type: (filter column, compiled
        where-clause), (value column, prop) and (key column, prop) pairs. Cached per plan."""
        got = self._inputs_cache.get(event)
        if got is None:
            plan = self._plan
            filters = [(j, compile_cond_scalar(w)) for j, w in enumerate(plan.filters)
                       if event in plan.filter_events[j]]
            vals = [(j, p) for j, p in enumerate(plan.val_props) if (event, p) in plan.numeric]
            keys = [(j, p) for j, p in enumerate(plan.key_props)
                    if event in plan.key_events.get(p, ())]
            got = self._inputs_cache[event] = (filters, vals, keys)
        return got

    def _remember_id(self, mid, t: int) -> None:
        seen = self._seen_ids
        seen[mid] = t
        if len(seen) > 2 * self._ids_pruned_at + 1024:
            cut = self._kernel.now - self._dedup_ms
            self._seen_ids = {k: v for k, v in seen.items() if v >= cut}
            self._ids_pruned_at = len(self._seen_ids)

    def track_many(self, user, event, ts, props: Mapping[str, Any] | None = None,
                   id=None) -> Transitions:
        """Track a batch of events given as columns; exactly like tracking them one by one.

        Parameters
        ----------
        user : array of int or str
        event : array of str, or int codes from :meth:`event_code`
        ts : array of int ms (or datetime64)
        props : dict of name -> array (None / NaN = absent in that row)
        id : array of message ids (None = no id), optional

        The batch is validated whole first: a bad row raises :class:`EventError` with its
        ``index`` and ``field`` and nothing is applied.
        """
        return self._ingest(*_batch_columns(user, event, ts, props, id))

    def track_json(self, data: bytes | str) -> Transitions:
        """Track a JSON array of ``{"user", "event", "ts", "props"?, "id"?}`` objects
        (``ts`` in ms or ISO 8601); same contract as :meth:`track_many`."""
        return self._ingest(*_json_columns(data))

    def _event_column(self, events) -> tuple[np.ndarray, list[str] | None]:
        """Validated event column: ``(codes, None)`` for int codes, ``(inverse, names)`` for
        names (codes for new names are assigned only once the whole batch is valid); an
        :class:`_EventNames` is a names column already factorized."""
        if isinstance(events, _EventNames):
            names, inv = events.names, events.inv
        elif events.dtype.kind in "iu":
            if len(events) and (events.min() < 0 or events.max() >= len(self._event_names)):
                bad = int(np.flatnonzero((events < 0) |
                                         (events >= len(self._event_names)))[0])
                raise EventError(f"unknown event code {int(events[bad])} (use "
                                 "eng.event_code(name))", index=bad, field="event")
            return events.astype(np.int32), None
        elif events.dtype.kind == "U":
            names, inv = np.unique(events, return_inverse=True)
            names = names.tolist()
        elif events.dtype.kind == "O":
            names, inv = _factorize(events)
        else:
            raise EventError(f"event must be strings or int codes, got dtype {events.dtype}",
                             field="event")
        for j, nm in enumerate(names):
            if not isinstance(nm, str) or not nm:
                bad = int(np.flatnonzero(inv.reshape(-1) == j)[0])
                raise EventError(f"event must be a non-empty string, got {nm!r}", index=bad,
                                 field="event")
        return inv.reshape(-1), names

    def _ts_column(self, tss: np.ndarray) -> np.ndarray:
        if tss.dtype.kind == "M":
            tss = tss.astype("datetime64[ms]").astype(np.int64)
        elif tss.dtype.kind == "O":
            items = tss.tolist()
            typed = _plain_ints(items)                      # JSON / lists of plain ints
            tss = typed if typed is not None else np.array(
                [_to_ms(v, "ts", i) for i, v in enumerate(items)], dtype=np.int64)
        elif tss.dtype.kind not in "iu":
            raise EventError(f"ts must be int ms or datetime64, got dtype {tss.dtype}",
                             field="ts")
        if len(tss) and (tss.min() < 0 or tss.max() >= _MAX_TS):
            bad = int(np.flatnonzero((tss < 0) | (tss >= _MAX_TS))[0])
            raise EventError(f"`ts` {int(tss[bad])} is out of range (0 <= ts < 2**48 ms)",
                             index=bad, field="ts")
        return tss.astype(np.int64)

    def _ingest(self, users, events, tss, cols, ids, single: bool = False,
                clock_ms: int | None = None, clock_col: np.ndarray | None = None
                ) -> Transitions:
        if clock_ms is None:
            clock_ms = self._read_clock()
        (col, names, inv, tss, dense, new_users, fpass, vals, keys,
         keep) = self._check_batch(users, events, tss, cols, ids, single, clock_ms,
                                   self._resolve_users)
        return self._apply_batch(users, col, names, inv, tss, dense, new_users, fpass, vals,
                                 keys, keep, clock_ms, clock_col)

    def _check_batch(self, users, events, tss, cols, ids, single, clock_ms, resolve):
        """Validate a batch whole (raising EventError) without changing any state but the
        dedup table (and interned values); ``resolve`` maps the user column to
        ``(dense or -1, new ids in order)``."""
        n = len(users)
        col, names = self._event_column(events)
        ecodes, inv = (col, None) if names is None else (None, col)
        tss = self._ts_column(tss)
        if clock_ms is not None and n:
            lim = clock_ms + self._max_future_ms
            if tss.max() > lim:
                bad = int(np.flatnonzero(tss > lim)[0])
                raise EventError(f"`ts` {int(tss[bad])} is more than max_future ahead of the "
                                 f"clock ({clock_ms})", index=None if single else bad,
                                 field="ts")
        dense, new_users = resolve(users)
        if names is not None:
            known = np.array([self._codes.get(nm, -1) for nm in names], dtype=np.int32)
            ecodes_tmp = known[inv] if len(names) else np.zeros(n, np.int32)
        else:
            ecodes_tmp = ecodes
        if self._plan.local_events and n:
            cols = {**cols, **self._local_columns(tss, dense, ecodes_tmp, names, inv)}
        fpass, vals, keys = self._prop_columns(cols, n, ecodes_tmp, names, inv, single)
        keep = self._dedup(ids, tss) if ids is not None else None
        if keep is not None and not keep.all() and new_users:
            kept = set(users[keep].tolist())
            new_users = [u for u in new_users if u in kept]
        return col, names, inv, tss, dense, new_users, fpass, vals, keys, keep

    def _apply_batch(self, users, col, names, inv, tss, dense, new_users, fpass, vals, keys,
                     keep, clock_ms, clock_col) -> Transitions:
        n = len(users)
        ecodes = col if names is None else None
        # ---- apply
        self._catch_up(clock_ms)
        if names is not None:
            codes = np.array([self._event_code(nm) for nm in names], dtype=np.int32)
            ecodes = codes[inv] if len(names) else np.zeros(n, np.int32)
        self._create_users(new_users)
        if new_users:
            fresh = dense < 0           # rows of users created just now (or of dropped rows)
            dense[fresh] = self._resolve_users(users[fresh])[0]
        dups = None
        if keep is not None and not keep.all():
            dups = np.flatnonzero(~keep)
            dense, ecodes, tss = dense[keep], ecodes[keep], tss[keep]
            nf, nv, nk = self._kernel.n_filter, self._kernel.n_val, self._kernel.n_key
            fpass = fpass.reshape(n, nf)[keep].reshape(-1) if nf else fpass
            vals = vals.reshape(n, nv)[keep].reshape(-1) if nv else vals
            keys = keys.reshape(n, nk)[keep].reshape(-1) if nk else keys
            self._stats["duplicates"] += len(dups)
        if clock_col is not None and dups is not None:
            clock_col = clock_col[keep]
        self._kernel.track(dense.astype(np.uint32), np.ascontiguousarray(ecodes, np.int32),
                           np.ascontiguousarray(tss), np.ascontiguousarray(fpass),
                           np.ascontiguousarray(vals), np.ascontiguousarray(keys),
                           None if clock_col is None else
                           np.ascontiguousarray(clock_col, np.int64))
        self._count_events(ecodes)
        self._stats["batches"] += 1
        out = self._drain([])
        if dups is not None:
            out.duplicates = dups
        return out

    def _count_events(self, ecodes: np.ndarray) -> None:
        """Count accepted events (what a new segment's back-fill check reads)."""
        m = len(ecodes)
        self._stats["events"] += m
        if m:
            k = len(self._event_names)
            counts = self._event_counts
            for c, x in enumerate(np.bincount(ecodes, minlength=k)[:k].tolist()):
                counts[c] += x

    def _local_columns(self, tss, dense, ecodes, names, inv) -> dict:
        """``hour`` and ``weekday`` (docs/patterns.md) of the rows whose event type has a
        where-clause reading them, in each user's timezone (new users: UTC)."""
        local = self._plan.local_events
        if names is not None:
            rows = np.flatnonzero(_rows_of(inv, [i for i, nm in enumerate(names) if nm in local],
                                           len(names)))
        else:
            rows = np.flatnonzero(_rows_of(ecodes, [self._codes[e] for e in local
                                                    if e in self._codes], len(self._event_names)))
        tzcol = self._traits.cols.get(TZ_TRAIT)
        tzs = [None] * len(rows) if tzcol is None else \
            [None if x < 0 else tzcol[x] for x in dense[rows].tolist()]
        hours, days = hours_weekdays(tss[rows], tzs)
        hour = np.full(len(tss), -1, dtype=np.int64)          # rows no filter reads
        day = np.full(len(tss), None, dtype=object)
        hour[rows] = hours
        day[rows] = days
        return {"@hour": hour, "@weekday": day}

    def _prop_columns(self, cols, n, ecodes, names, inv, single):
        plan = self._plan
        nf, nv, nk = len(plan.filters), len(plan.val_props), len(plan.key_props)
        fpass = np.zeros((n, nf), dtype=np.uint8)
        vals = np.full((n, nv), np.nan, dtype=np.float64)
        keys = np.full((n, nk), -1, dtype=np.int64)
        for j, w in enumerate(plan.filters):
            # only rows of the event types that use this filter need it
            codes = [self._codes[e] for e in plan.filter_events[j] if e in self._codes]
            if names is not None:
                rows = np.flatnonzero(_rows_of(inv, [i for i, nm in enumerate(names)
                                                     if nm in plan.filter_events[j]], len(names)))
            else:
                rows = np.flatnonzero(_rows_of(ecodes, codes, len(self._event_names)))
            if not len(rows):
                continue
            sub = {k: c[rows] for k, c in cols.items()} if len(rows) < n else cols
            fpass[rows, j] = _where_mask(w, sub, len(rows), {}, rows)
        cache: dict = {}
        # which rows must carry a number in each numeric prop
        for j, p in enumerate(plan.val_props):
            col = cols.get(p)
            if col is None:
                continue
            if col.dtype.kind in "iufb":
                vals[:, j] = col.astype(np.float64)
                continue
            need_codes = {self._codes[e] for (e, q) in plan.numeric
                          if q == p and e in self._codes}
            need_names = {e for (e, q) in plan.numeric if q == p}
            if names is not None:
                need = _rows_of(inv, [i for i, nm in enumerate(names) if nm in need_names],
                                len(names))
            else:
                need = _rows_of(ecodes, list(need_codes), len(self._event_names))
            lst = col.tolist()
            for i, v in enumerate(lst):
                if _is_missing(v):
                    continue
                if _is_num(v):
                    x = _as_float(v)
                    if x is not None:
                        vals[i, j] = x
                    elif need[i]:
                        ev = names[inv[i]] if names is not None else \
                            self._event_names[ecodes[i]]
                        raise _too_large(p, ev, v, None if single else i)
                elif need[i]:
                    ev = names[inv[i]] if names is not None else self._event_names[ecodes[i]]
                    raise EventError(f"`{p}` of `{ev}` events must be a number (it is "
                                     f"aggregated), got {type(v).__name__}",
                                     index=None if single else i, field=f"props.{p}")
        for j, p in enumerate(plan.key_props):
            col = cols.get(p)
            if col is None:
                continue
            uvals, uinv = _factorize_checked(col, f"props.{p}")
            codes = np.array([-1 if v is None else self._value_code(_norm(v)) for v in uvals],
                             dtype=np.int64)
            keys[:, j] = codes[uinv] if len(uvals) else -1
        return fpass.reshape(-1), vals.reshape(-1), keys.reshape(-1)

    def _dedup(self, ids: np.ndarray, tss: np.ndarray) -> np.ndarray:
        """Rows to keep (False for an id seen within the horizon); remembers the new ids, so
        the ids are all checked before the first is remembered."""
        for i, mid in enumerate(ids.tolist()):
            if mid is None or type(mid) is str:
                continue
            if isinstance(mid, (bool, np.bool_)) or not isinstance(mid, (int, np.integer)):
                raise EventError(f"a message id must be a string or int, got "
                                 f"{type(mid).__name__}", index=i, field="id")
            if not -2 ** 63 <= mid < 2 ** 63:
                raise EventError(f"an int message id must fit in 64 bits, got {mid}",
                                 index=i, field="id")
        keep = np.ones(len(ids), dtype=bool)
        now = self._kernel.now
        seen = self._seen_ids
        horizon = self._dedup_ms
        for i, mid in enumerate(ids.tolist()):
            if mid is None:
                if tss[i] > now:
                    now = int(tss[i])
                continue
            t0 = seen.get(mid)
            if t0 is not None and now - t0 <= horizon:
                keep[i] = False
                continue
            if tss[i] > now:
                now = int(tss[i])
            self._remember_id(mid, now)
            seen = self._seen_ids
        return keep

    # ------------------------------------------------------------------ transitions
    def _collect(self, kernel, names: tuple) -> Transitions:
        """Drain a kernel's transitions into a batch; the bitmaps learn of them when next read
        (:attr:`_bitmaps`)."""
        u, s, e, t = kernel.take_transitions()
        if self._hidden and len(u):
            public = np.fromiter((not n.startswith("__") for n in names), dtype=bool,
                                 count=len(names))
            keep = public[s]
            if not keep.all():
                u, s, e, t = u[keep], s[keep], e[keep], t[keep]
        batch = Transitions(self._pub[u] if len(u) else np.zeros(0, np.uint32), s, e, t,
                            names, self._str_num)
        if len(u):
            # (a copy of the segment column: the batch's own is the caller's to change)
            self._pend.append((u, s.copy()))
            self._pend_n += len(u)
            if self._pend_n > _PENDING_MAX or len(self._pend) > _PENDING_BATCHES:
                self._flush_bitmaps()
        return batch

    @property
    def _bitmaps(self) -> dict[str, BitMap]:
        """Segment name -> bitmap of its members' user numbers, up to date.

        Batches do not touch the bitmaps: their transitions wait in ``_pend`` (dense user,
        segment) and are applied on the next read, all at once, from the kernel's member
        bits, which are the truth whatever happened in between. Whatever renumbers users or
        segments (a new plan, forgetting a user) reads this first, so pending rows always
        name the current kernel's users and segments."""
        if self._pend:
            self._flush_bitmaps()
        return self._bm

    @_bitmaps.setter
    def _bitmaps(self, value: dict) -> None:
        self._bm = value
        self._pend = []
        self._pend_n = 0

    def _flush_bitmaps(self) -> None:
        # Pending rows name the current plan's segments: whatever changes the plan flushes
        # first. (The rows are dropped only once applied: applying them again is harmless,
        # since they only say where to look.)
        pend = self._pend
        if not pend:
            return
        names, bms = self._plan.names, self._bm
        u = np.concatenate([p[0] for p in pend]) if len(pend) > 1 else pend[0][0]
        s = np.concatenate([p[1] for p in pend]) if len(pend) > 1 else pend[0][1]
        on = self._kernel.member_bits(u, s)
        if len(u) <= _PER_ELEMENT:
            for num, seg, inside in zip(self._pub[u].tolist(), s.tolist(), on.tolist()):
                bm = bms.get(names[seg])
                if bm is not None:
                    (bm.add if inside else bm.discard)(num)
        else:
            # A user's state in a segment is the kernel's member bit, whatever happened in
            # between: add those in, take those out. One stable sort groups the rows by
            # (segment, state): a radix sort, when the keys fit in 16 bits.
            key = s.astype(np.int16 if len(names) < 16_000 else np.int64) * 2 + on
            order = np.argsort(key, kind="stable")
            key, users = key[order], self._pub[u[order]]
            cut = np.flatnonzero(key[1:] != key[:-1]) + 1
            for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(key)]):
                bm = bms.get(names[int(key[lo]) >> 1])
                if bm is None:
                    continue
                if key[lo] & 1:
                    bm.update(array.array("I", np.ascontiguousarray(
                        users[lo:hi], dtype=np.uint32).tobytes()))     # (no BitMap built)
                else:
                    bm -= _bitmap(users[lo:hi])
        self._pend, self._pend_n = [], 0

    def _drain_list(self) -> list[Transition]:
        """:meth:`_drain` for the handful of transitions one event causes, without arrays."""
        names = self._plan.names
        # (straight into the bitmaps: pending batch rows, applied later from the kernel's
        # member bits, agree with these whatever the order)
        pub, strs, bitmaps, hidden = self._pub.item, self._str_num, self._bm, self._hidden
        out = []
        for d, seg, ent, ts in self._kernel.take_transitions_list():
            num = pub(d)
            name = names[seg]
            if hidden and name.startswith("__"):
                continue
            bm = bitmaps.get(name)
            if bm is not None:
                (bm.add if ent else bm.discard)(num)
            out.append(Transition(strs.get(num, num), name, ent, ts))
        self._stats["transitions"] += len(out)
        if self._items:
            self._deliver(self._take_firings())
        if self._held is not None:
            out, self._held = list(self._held) + out, None
        return out

    def _drain(self, prefix: list, fired: list = ()) -> Transitions:
        names = tuple(self._plan.names)
        batch = self._collect(self._kernel, names)
        if prefix:
            batch = Transitions.concat(prefix + [batch], names)
        self._stats["transitions"] += len(batch)
        fired = list(fired)
        if self._items:
            fired += self._take_firings()
        if fired:
            self._deliver(fired)
        if self._held is not None:
            batch, self._held = Transitions.concat([self._held, batch], names), None
        return batch

    def _take_firings(self) -> list:
        """The kernel's candidate firings, through the policies, in order: [(Firing, fn)]."""
        k = self._kernel
        if not self._items or not k.pending_firings:
            return []
        it, u, t, st, ok = k.take_firings()
        out = []
        pub, strs, check = self._pub, self._str_num, self._policies.check
        for i, d, ts, step, held in zip(it.tolist(), u.tolist(), t.tolist(), st.tolist(),
                                        ok.tolist()):
            spec = self._items[i]
            num = int(pub[d])
            user = strs.get(num, num)
            if isinstance(spec, TriggerSpec):
                sup = check(spec.name, d, ts, spec.once, spec.cooldown_ms, spec.max_per,
                            spec.channel)
                f = Firing(user, spec.segment, spec.entered, ts, spec.name, spec.reason(),
                           sup is None, sup, spec.channel)
                out.append((f, spec.fn))
            else:
                sspec = spec.steps[step]
                name = f"{spec.name}:{step}"
                sup = "only_if" if not held else check(name, d, ts, False, None, None,
                                                       sspec.channel)
                f = Firing(user, spec.entry, True, ts, name,
                           f"journey {spec.name} step {step + 1}", sup is None, sup,
                           sspec.channel, spec.name, step)
                out.append((f, sspec.fn))
        return out

    def _deliver(self, fired: list) -> None:
        """Queue every firing; call the callbacks of delivered ones (after the call's work)."""
        q = self._queue
        for f, _ in fired:
            if f.delivered:
                self._stats["firings"] += 1
            else:
                self._stats["suppressed"] += 1
            if len(q) >= self._max_queue:
                if not self._max_queue:
                    self._stats["firings_dropped"] += 1
                    continue
                q.popleft()
                self._stats["firings_dropped"] += 1
            q.append(f)
        for f, fn in fired:
            if fn is None or not f.delivered:
                continue
            try:
                fn(f)
            except Exception:  # noqa: BLE001 - a callback must never stop ingestion
                self._stats["callback_errors"] += 1
                log.exception("segcore: callback %r for %s failed", fn, f)

    def on_enter(self, segment: str, fn: Callable[[Firing], Any] | None = None, *, after=None,
                 cooldown=None, max_per=None, once: bool = False, channel: str | None = None,
                 name: str | None = None):
        """Call ``fn(firing)`` when a user enters ``segment`` (usable as a decorator).

        ``after="1h"`` fires one hour after the entry, only if the user stayed in throughout;
        ``cooldown``, ``max_per=(n, "7d")``, ``once`` and the ``channel``'s cap limit how often
        it fires per user (docs/triggers.md). Callbacks run after the engine call has updated
        all state; an exception in one is logged and counted in ``stats()["callback_errors"]``
        and never stops ingestion. Returns ``fn``.

        >>> eng = Engine()
        >>> _ = eng.add_segment("vip", "sum(purchase.amount) >= 100")
        >>> @eng.on_enter("vip", after="1d")
        ... def welcome(f):
        ...     print(f.user, f.ts, f.reason)
        >>> _ = eng.track(1, "purchase", ts=0, props={"amount": 150})
        >>> _ = eng.advance(2 * 86_400_000)
        1 86400000 in vip for 1d
        """
        return self._register(segment, True, fn, after, cooldown, max_per, once, channel, name)

    def on_exit(self, segment: str, fn: Callable[[Firing], Any] | None = None, *, after=None,
                cooldown=None, max_per=None, once: bool = False, channel: str | None = None,
                name: str | None = None):
        """Call ``fn(firing)`` when a user leaves ``segment``; options as :meth:`on_enter`."""
        return self._register(segment, False, fn, after, cooldown, max_per, once, channel, name)

    def add_trigger(self, name: str, segment: str, on: str = "enter", *, after=None,
                    cooldown=None, max_per=None, once: bool = False, channel: str | None = None,
                    fn: Callable[[Firing], Any] | None = None) -> None:
        """Register a trigger by name; without ``fn`` its firings are only drained as data
        (:meth:`drain_firings`)."""
        if on not in ("enter", "exit"):
            raise SegcoreError(f"`on` must be \"enter\" or \"exit\", got {on!r}")
        self._register(segment, on == "enter", fn, after, cooldown, max_per, once, channel,
                       check_name(name, "trigger name"), decorator=False)

    def _register(self, segment, entered, fn, after, cooldown, max_per, once, channel, name,
                  decorator=True):
        self._require_segment(segment)
        if fn is None and decorator:
            def deco(f):
                self._register(segment, entered, f, after, cooldown, max_per, once, channel,
                               name)
                return f
            return deco
        if fn is not None and not callable(fn):
            raise SegcoreError("a callback must be callable")
        if channel is not None:
            check_name(channel, "channel")
        if not isinstance(once, bool):
            raise SegcoreError("once must be a bool")
        if name is None:
            n = sum(isinstance(it, TriggerSpec) for it in self._items)
            name = f"{segment}:{'enter' if entered else 'exit'}:{n}"
        if any(it.name == name for it in self._items):
            raise RuleError(f"a trigger or journey named `{name}` already exists")
        spec = TriggerSpec(name, segment, entered,
                           0 if after is None else R.parse_duration(after),
                           None if cooldown is None else R.parse_duration(cooldown),
                           parse_max_per(max_per), once, channel, fn)
        self._clock_seen = None
        self._hold(self._replan(self._asts, self._texts, [], self._read_clock(),
                                items=self._items + [spec]))
        self._log_internal("_replay_trigger", [segment, entered, spec.after_ms,
                                               spec.cooldown_ms, spec.max_per, once, channel,
                                               name])
        return fn

    def _log_internal(self, method: str, args: list) -> None:
        if self._log is not None and not self._replaying and not self._wal_depth:
            self._log.append(_wal.Call(method, _plain(args), {}, self._clock_seen))

    def _replay_trigger(self, segment, entered, after_ms, cooldown_ms, max_per, once, channel,
                        name) -> None:
        self._register(segment, entered, None, after_ms, cooldown_ms,
                       None if max_per is None else tuple(max_per), once, channel, name,
                       decorator=False)

    def _replay_step(self, journey: str, after_ms: int, only_if, channel) -> None:
        spec = next((it for it in self._items
                     if isinstance(it, JourneySpec) and it.name == journey), None)
        if spec is None:
            raise SegcoreError(f"log names an unknown journey `{journey}`")
        Journey(self, spec).step(after_ms, only_if=only_if, channel=channel)

    def cap(self, channel: str, max_per) -> None:
        """Cap firings per user on a channel across all triggers and journey steps, e.g.
        ``eng.cap("email", max_per=(2, "1d"))``; firings over it are reported suppressed
        (``suppressed_by="cap:email"``). The cap counts firings delivered after it was set."""
        self._policies.caps[check_name(channel, "channel")] = parse_max_per(max_per)

    def journey(self, name: str, entry: str, exit_on=None) -> Journey:
        """Start a journey: users enter it when they enter ``entry`` and leave it when they
        leave ``entry`` or enter a segment of ``exit_on``; add steps with ``.step(...)``."""
        check_name(name, "journey name")
        if any(it.name == name for it in self._items):
            raise RuleError(f"a trigger or journey named `{name}` already exists")
        self._require_segment(entry)
        exits = [] if exit_on is None else [exit_on] if isinstance(exit_on, str) else \
            list(exit_on)
        for x in exits:
            self._require_segment(x)
        spec = JourneySpec(name, entry, exits)
        self._hold(self._replan(self._asts, self._texts, [], self._read_clock(),
                                items=self._items + [spec]))
        return Journey(self, spec)

    def _add_journey_step(self, spec: JourneySpec, step: StepSpec, only_if) -> None:
        if spec not in self._items:
            raise SegcoreError(f"journey `{spec.name}` is no longer registered")
        hidden = dict(self._hidden)
        if only_if is not None:
            hname = f"__{spec.name}__step{len(spec.steps)}"
            ast, _ = self._to_ast(hname, only_if, set(self._asts))
            hidden[hname] = ast
            step.only_if = hname
        new = JourneySpec(spec.name, spec.entry, spec.exits, spec.steps + [step])
        items = [new if it is spec else it for it in self._items]
        self._clock_seen = None
        self._hold(self._replan(self._asts, self._texts, [], self._read_clock(), items=items,
                                hidden=hidden))
        self._log_internal("_replay_step", [spec.name, step.after_ms,
                                            None if only_if is None else
                                            (only_if if isinstance(only_if, str)
                                             else R.to_text(getattr(only_if, "node", only_if))),
                                            step.channel])
        spec.steps = new.steps           # the Journey handle follows the registered spec
        self._items = [spec if it is new else it for it in self._items]

    def journey_state(self, user: UserId) -> dict:
        """Where a user is in each journey: ``{name: {"step", "due", "since"}}``."""
        self._read_sync()
        d = self._dense_of(user) if isinstance(user, (int, str)) and not isinstance(
            user, bool) else None
        if d is None or not self._items:
            return {}
        dead, pos = self._kernel.item_state(d)
        out = {}
        for i, spec in enumerate(self._items):
            if isinstance(spec, JourneySpec) and pos[i] >= 0:
                due = int(dead[i])
                since = due - sum(s.after_ms for s in spec.steps[: pos[i] + 1])
                out[spec.name] = {"step": int(pos[i]), "due": due, "since": since}
        return out

    def drain_firings(self) -> list[Firing]:
        """Every firing since the last drain (delivered and suppressed), in order."""
        self._read_sync()
        out = list(self._queue)
        self._queue.clear()
        return out

    # ------------------------------------------------------------------ reads
    def members(self, segment: str) -> FrozenBitMap:
        """The segment's members as a (frozen copy of a) roaring bitmap of user numbers."""
        self._require_segment(segment)
        self._read_sync()
        return FrozenBitMap(self._bitmaps[segment])

    def size(self, segment: str) -> int:
        """Number of members of a segment."""
        self._require_segment(segment)
        self._read_sync()
        return len(self._bitmaps[segment])

    def sizes(self) -> dict[str, int]:
        """Every segment's size, in definition order."""
        self._read_sync()
        return {name: len(self._bitmaps[name]) for name in self._asts}

    def segments_of(self, user: UserId) -> list[str]:
        """The segments a user is in now, in definition order ([] for an unknown user)."""
        if isinstance(user, bool) or not isinstance(user, (int, str, np.integer)):
            raise EventError("a user id must be an int or a string", field="user")
        self._read_sync()
        d = self._dense_of(int(user) if isinstance(user, np.integer) else user)
        if d is None:
            return []
        row = self._kernel.member_row(d)
        inside = {self._plan.names[i] for i in np.flatnonzero(row)}
        return [n for n in self._asts if n in inside]

    def query(self, expr: str) -> BitMap:
        """Bitmap algebra over segment names: ``&`` (and), ``|`` (or), ``-`` (minus),
        ``~`` (not: every known user outside), parentheses.

        >>> eng = Engine()
        >>> _ = eng.add_segments({"a": "seen", "b": 'trait.vip == 1'})
        >>> _ = eng.track(1, "x", ts=1); _ = eng.track(2, "x", ts=2)
        >>> _ = eng.set_traits(2, {"vip": 1})
        >>> list(eng.query("a & ~b"))
        [1]
        """
        self._read_sync()
        return _BitmapQuery(expr, self).parse()

    def stats(self) -> dict:
        """Counters and sizes: users, events, duplicates, transitions, segments, timers,
        callback errors, kernel memory."""
        self._read_sync()
        k = self._kernel.stats()
        return {
            "now": self.now, "users": self._n_users - len(self._erased), "events": self._stats["events"],
            "batches": self._stats["batches"], "duplicates": self._stats["duplicates"],
            "transitions": self._stats["transitions"], "segments": len(self._asts),
            "features": len(self._plan.features), "timers": k["timers"],
            "callback_errors": self._stats["callback_errors"],
            "firings": self._stats["firings"], "suppressed": self._stats["suppressed"],
            "firings_dropped": self._stats["firings_dropped"],
            "queued_firings": len(self._queue),
            "event_types": len(self._event_names), "memory_bytes": k["memory_bytes"],
            "seq_evicted": self._evicted(),
        }

    def _evicted(self) -> int:
        """seq events evicted so far (docs/patterns.md), kept across plan changes."""
        self._stats["seq_evicted"] = self._stats.get("seq_evicted", 0) + \
            self._kernel.take_evicted()
        return self._stats["seq_evicted"]

    def forget(self, user: UserId) -> bool:
        """Erase a user from every structure: per-user state in the kernel, memberships and
        bitmaps, pending timers and firings, traits, scores, trigger histories and id maps.
        Returns whether the engine knew the user. The id may come back later as a new user
        (a string id then gets a new number).

        With a write-ahead log, this checkpoints at once: the new snapshot holds no trace of
        the user and the log that held their events is deleted, so no file the engine writes
        from now on contains them.

        >>> eng = Engine()
        >>> _ = eng.add_segment("buyers", "did(purchase)")
        >>> _ = eng.track("ann@example.com", "purchase", ts=1)
        >>> eng.forget("ann@example.com"), eng.size("buyers"), eng.segments_of("ann@example.com")
        (True, 0, [])
        """
        clock_ms = self._read_clock()
        user = self._check_user(user) if not isinstance(user, int) or isinstance(user, bool) \
            or not 0 <= user < _U32 else user
        d = self._dense_of(user)
        self._catch_up(clock_ms)
        self._hold(self._drain([]))
        if d is None:
            return False
        self._erase(user, d)
        if self._log is not None and not self._replaying:
            self.checkpoint()
        return True

    def alias(self, new: UserId, old: UserId) -> list[Transition]:
        """Merge profile ``old`` into ``new`` (identity resolution): ``new`` gets ``old``'s
        counters, windows, timestamps, carts and distinct values as if it had sent all of
        ``old``'s events, and ``old``'s traits and scores where it has none of its own;
        ``old`` is then forgotten and ``new`` re-evaluated at now. Returns the transitions:
        those that catching up with the clock caused first (``old``'s under its own id), then
        ``new``'s. An all-time float sum becomes the sum of the two sums (exact for integer
        amounts; otherwise its rounding may differ from summing in arrival order).

        >>> eng = Engine()
        >>> _ = eng.add_segment("frequent", "count(purchase, 30d) >= 2")
        >>> _ = eng.track("device-9f", "purchase", ts=1)
        >>> _ = eng.track(42, "purchase", ts=2)
        >>> eng.alias(42, "device-9f")
        [Transition(user=42, segment='frequent', entered=True, ts=2)]
        """
        clock_ms = self._read_clock()
        new, old = self._check_user(new), self._check_user(old)
        if type(new) is type(old) and new == old:
            raise EventError("alias needs two different users", field="user")
        do = self._dense_of(old)
        self._catch_up(clock_ms)
        before = self._drain([])        # (while ``old`` still has its number)
        if do is None:
            return list(before)
        if self._dense_of(new) is None:
            self._create_users([new])
        dn = self._dense_of(new)
        self._kernel.merge_into(dn, do)
        for col in self._traits.cols.values():
            if col[dn] is None:
                col[dn] = col[do]
        if do in self._scores:
            self._scores[dn] = {**self._scores[do], **self._scores.get(dn, {})}
        self._erase(old, do)
        self._push_profiles([dn])
        self._kernel.eval_users(np.array([dn], dtype=np.uint32))
        return list(self._drain([before] if len(before) else []))

    def _erase(self, user: UserId, d: int) -> None:
        """Remove user ``user`` (dense slot ``d``) from every structure."""
        num = int(self._pub[d])
        self._flush_bitmaps()           # (pending rows may name slot d)
        self._kernel.forget(d)
        if isinstance(user, str):
            del self._str_dense[user]
            del self._str_num[num]
        else:
            self._int_dense.remove(num)
        self._pub[d] = 0
        self._erased.add(d)
        self._all.discard(num)
        for bm in self._bitmaps.values():
            bm.discard(num)
        for col in self._traits.cols.values():
            col[d] = None
        self._scores.pop(d, None)
        pol = self._policies
        pol.once = {k for k in pol.once if k[1] != d}
        pol.last = {k: v for k, v in pol.last.items() if k[1] != d}
        pol.hist = {k: v for k, v in pol.hist.items() if k[1] != d}
        pol.chan = {k: v for k, v in pol.chan.items() if k[1] != d}
        self._queue = deque(f for f in self._queue if f.user != user)
        b = self._held
        if b is not None:
            keep = b.user != num
            self._held = Transitions(b.user[keep], b.segment[keep], b.entered[keep], b.ts[keep],
                                     b.segment_names, b._strs)

    # ------------------------------------------------------------------ durability
    def _install_log(self) -> None:
        for name in _LOGGED:
            setattr(self, name, types.MethodType(_logged(getattr(type(self), name)), self))

    def _start_wal(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _wal.check_dir_empty_of_state(directory)
        self._wal_dir = directory
        self._wal_seq = 0
        snap, log = _wal.paths(directory, 0)
        from . import snapshot
        snapshot.write(self, snap)
        self._log = _wal.Log(log, self._fsync, truncate_at=0)
        self._install_log()
        _wal.fsync_dir(directory)

    @classmethod
    def open(cls, directory, *, clock=None, callbacks=None, fsync: str = "always") -> "Engine":
        """Reopen an engine from its data directory: restore the latest snapshot, replay the
        log after it (a torn last record is dropped), and keep logging there. ``callbacks``
        maps trigger names (and ``"<journey>:<step>"``) to their functions.

        Firings that the replay re-produces were delivered before the restart: they are queued
        again (``drain_firings``) but their callbacks are not called a second time.
        """
        from . import snapshot
        directory = os.fspath(directory)
        n = _wal.latest(directory)
        if n is None:
            raise SnapshotError(f"`{directory}` holds no segcore data (no snapshot-N.snap)")
        snap, log = _wal.paths(directory, n)
        eng = snapshot.read(snap, clock=clock)
        records, end, torn = _wal.read_records(log)
        eng._replaying = True
        try:
            for call in records:
                eng._replay_clock = call.clock_ms
                if not (call.method in _LOGGED or call.method in ("_replay_trigger",
                                                                  "_replay_step")):
                    raise SnapshotError(f"log record calls unknown method `{call.method}`")
                getattr(eng, call.method)(*call.args, **call.kwargs)
        except SnapshotError:
            raise
        except Exception as e:  # noqa: BLE001 - a log that does not replay is a corrupt log
            raise SnapshotError(f"cannot replay `{log}`: {type(e).__name__}: {e}") from None
        finally:
            eng._replaying = False
            eng._replay_clock = None
        eng._attach_callbacks(callbacks or {})
        if torn:
            log_warn = f"segcore: dropped a torn or corrupt tail of {log} after byte {end}"
            logging.getLogger("segcore").warning(log_warn)
        eng._fsync = fsync
        eng._wal_dir = directory
        eng._wal_seq = n
        eng._log = _wal.Log(log, fsync, truncate_at=end)
        eng._install_log()
        return eng

    def _attach_callbacks(self, callbacks: Mapping[str, Callable]) -> None:
        left = dict(callbacks)
        for it in self._items:
            if isinstance(it, TriggerSpec):
                if it.name in left:
                    it.fn = left.pop(it.name)
            else:
                for k, st in enumerate(it.steps):
                    if f"{it.name}:{k}" in left:
                        st.fn = left.pop(f"{it.name}:{k}")
        if left:
            raise SegcoreError("callbacks for unknown triggers: "
                               + ", ".join(f"`{k}`" for k in sorted(left)))

    def preview(self, name: str, rule, since=None) -> dict:
        """Dry run of a rule change: what segment ``name`` would have done with ``rule``.

        Restores the latest snapshot of the data directory into a scratch engine, gives it the
        candidate rule, replays the write-ahead log after the snapshot, and reports
        ``{"size", "entered", "exited", "from", "now"}``: the members it would have now, and
        the entries and exits with ``ts >= since`` (default: everything replayed). Nothing
        changes in this engine. The replay starts at the last checkpoint (``"from"``, its
        time): history before it is not kept, and a rule needing raw history the snapshot does
        not keep raises RuleError, as :meth:`add_segment` does.
        """
        if self._wal_dir is None:
            raise SegcoreError("preview() replays the write-ahead log: use an engine with a "
                               "data directory (Engine(wal=dir) or Engine.open(dir))")
        ast, text = self._to_ast(name, rule, set(self._asts) | {name})
        asts = {**self._asts, name: ast}
        texts = {**self._texts, name: text}
        scratch, seen, start = self._replay_since_checkpoint(
            asts, texts, self._items, {**self._hidden}, f"rule `{name}` needs", name)
        since_ms = start if since is None else _to_ms(since, "since")
        seen = [t for t in seen if t.segment == name and t.ts >= since_ms]
        return {"size": scratch.size(name),
                "entered": sum(1 for t in seen if t.entered),
                "exited": sum(1 for t in seen if not t.entered),
                "from": start, "now": scratch.now}

    def checkpoint(self) -> None:
        """Write a snapshot of the current state and start a new, empty log (the older
        snapshot and log are deleted once the new ones are durable)."""
        if self._wal_dir is None:
            raise SegcoreError("checkpoint() needs an engine with a write-ahead log "
                               "(Engine(wal=dir) or Engine.open(dir))")
        from . import snapshot
        n = self._wal_seq + 1
        snap, log = _wal.paths(self._wal_dir, n)
        snapshot.write(self, snap)
        new_log = _wal.Log(log, self._fsync, truncate_at=0)
        _wal.fsync_dir(self._wal_dir)
        old_snap, old_log = _wal.paths(self._wal_dir, self._wal_seq)
        if self._log is not None:
            self._log.close()
        self._log = new_log
        self._wal_seq = n
        for path in (old_snap, old_log):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        _wal.fsync_dir(self._wal_dir)

    def close(self) -> None:
        """Flush and close the write-ahead log (the engine stays usable in memory, unlogged)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    # ------------------------------------------------------------------ shard side
    # The methods a ShardedEngine driver (segcore.sharded) calls on each shard's engine. Every
    # change goes through _shard_call, numbered, so that the write-ahead log records it whole
    # and a re-sent call is recognised.
    def _shard_call(self, seq: int, method: str, args: list, kwargs: dict):
        """Apply call number ``seq`` from the driver: ``(result, firings)``. A number already
        applied is not applied again: it returns the kept result of one of the latest calls,
        or None. A number past the next raises :class:`ShardGap`."""
        seq = int(seq)
        if seq <= self._shard_seq:
            return self._shard_results.get(seq)
        if seq != self._shard_seq + 1:
            raise ShardGap(self._shard_seq)
        if method not in _SHARD_METHODS:
            raise SegcoreError(f"`{method}` is not a shard call")
        prev = self._shard_seq
        self._shard_seq = seq           # before the call: a forget() checkpoints inside it
        try:
            out = getattr(self, method)(*args, **kwargs)
        except BaseException:
            self._shard_seq = prev
            raise
        if isinstance(out, Transitions):
            out = (out.user, out.segment, out.entered, out.ts, out.segment_names)
        res = (out, list(self._queue))
        self._queue.clear()
        self._shard_results[seq] = res
        self._shard_results.pop(seq - 8, None)
        return res

    def _adopt(self, names, values) -> None:
        """Take the driver's event codes and interned values, so that codes mean the same on
        every shard: ``names = (first code, [new names])``, ``values`` likewise."""
        c0, new_names = names
        for i, nm in enumerate(new_names):
            code = self._event_code(nm)
            if code != c0 + i:
                raise SegcoreError(f"event code of `{nm}` is {code} here, {c0 + i} in the driver")
        v0, new_values = values
        for i, (_, v) in enumerate(new_values):
            code = self._value_code(v)
            if code != v0 + i:
                raise SegcoreError(f"value code of {v!r} is {code} here, {v0 + i} in the driver")

    def _shard_batch(self, users, codes, tss, clock, inputs, ids, names, values, pins,
                     end: int) -> Transitions:
        """This shard's rows of a driver's batch, each applied at the batch's running time
        ``clock[i]``, then time moved to ``end``. The driver has validated and deduplicated
        the rows and computed what the kernel reads of their properties: ``inputs`` are the
        rows' filter bits, values and key codes (the shard's plan is the driver's); ``ids``
        are only remembered."""
        self._adopt(names, values)
        n = len(users)
        out = Transitions.empty(self._plan.names)
        if n:
            users = _as_column(users, n, "user")
            fpass, vals, keys = (np.asarray(a, dtype=dt) for a, dt in
                                 zip(inputs, (np.uint8, np.float64, np.int64)))
            with self._pinned(pins):
                dense, new = self._resolve_users(users)
                out = self._apply_batch(users, np.asarray(codes, dtype=np.int32), None, None,
                                        np.asarray(tss, dtype=np.int64), dense, new, fpass,
                                        vals, keys, None, None,
                                        np.asarray(clock, dtype=np.int64))
            if ids is not None:
                for mid, t in zip(ids, clock):
                    if mid is not None:
                        self._remember_id(mid, int(t))
        if end > self._kernel.now:
            self._kernel.advance(int(end))
            out = self._drain([out])
        return out

    def _shard_op(self, names, values, pins: dict, method: str, args: list, kwargs: dict):
        """Any other call, after taking the driver's new event codes and values; ``pins`` are
        the numbers the driver gave string ids this call may create."""
        if method not in _SHARD_OPS:
            raise SegcoreError(f"`{method}` is not a shard call")
        self._adopt(names, values)
        with self._pinned(pins):
            return getattr(self, method)(*args, **kwargs)

    @contextlib.contextmanager
    def _pinned(self, pins: dict):
        """String ids created inside get the numbers the driver gave them."""
        self._pins = dict(pins)
        try:
            yield
        finally:
            self._pins = {}

    def _shard_export(self, numbers) -> bytes:
        """The state of the users with these numbers, as snapshot bytes (nothing changes)."""
        from . import snapshot
        dense = [self._dense_of(self._str_num.get(int(x), int(x))) for x in numbers]
        meta, arrays = snapshot.state(self)
        meta, arrays = snapshot.select(meta, arrays, [d for d in dense if d is not None])
        return b"".join(snapshot.encode(meta, arrays))

    def _shard_import(self, data: bytes) -> None:
        """Add the users of :meth:`_shard_export` bytes to this engine (their memberships,
        timers, traits and trigger histories come with them; nothing is re-evaluated)."""
        from . import snapshot
        meta, arrays = snapshot.state(self)
        mine = (meta, {k: v for k, v in arrays.items() if not k.startswith("bitmap:")})
        meta, arrays = snapshot.merge(mine, snapshot.parse(bytes(data)))
        new = snapshot.rebuild(meta, arrays, derive_bitmaps=True)
        keep = {k: v for k, v in self.__dict__.items() if k in _OWN_ATTRS or k in _LOGGED}
        slots = {k: getattr(self, k) for k in _OWN_ATTRS if isinstance(
            getattr(Engine, k, None), property)}        # (kept in self._fs, which is replaced)
        fns = {it.name: it.fn for it in self._items if isinstance(it, TriggerSpec)}
        self.__dict__.update(new.__dict__)
        self.__dict__.update(keep)
        for k, v in slots.items():
            setattr(self, k, v)
        for it in self._items:
            if isinstance(it, TriggerSpec):
                it.fn = fns.get(it.name)

    def _shard_drop(self, numbers) -> None:
        """Remove these users (moved to another shard): like forget, without a checkpoint."""
        for x in numbers:
            user = self._str_num.get(int(x), int(x))
            d = self._dense_of(user)
            if d is not None:
                self._erase(user, d)

    def _shard_info(self) -> dict:
        """What a driver recovers from: applied call number, time, numbering and dedup ids."""
        return {"seq": self._shard_seq, "now": self._kernel.now, "next_str": self._next_str,
                "str_users": dict(self._str_num),
                "users": np.asarray(self._all.to_array(), dtype=np.int64),
                "seen_ids": dict(self._seen_ids), "event_names": list(self._event_names),
                "values": list(self._value_keys), "segments": dict(self._texts),
                "stats": dict(self._stats), "caps": dict(self._policies.caps),
                "event_counts": self._event_counts[: len(self._event_names)],
                "triggers": [(it.name, it.segment, it.entered, it.after_ms, it.cooldown_ms,
                              it.max_per, it.once, it.channel)
                             for it in self._items if isinstance(it, TriggerSpec)]}

    # ------------------------------------------------------------------ snapshots
    def snapshot(self, path_or_file) -> None:
        """Write the engine's whole state (rules, triggers, ids, per-user state, bitmaps,
        policies) to a path (atomically) or a binary file object; see :mod:`segcore.snapshot`.

        Callbacks are code, not state: pass them again to :meth:`restore` by trigger name.
        """
        from . import snapshot
        self._read_sync()
        snapshot.write(self, path_or_file)

    @classmethod
    def restore(cls, path_or_file, *, clock=None, callbacks=None) -> "Engine":
        """An engine restored from :meth:`snapshot`: the same members, and the same future
        transitions and firings on the same input. ``callbacks`` maps trigger names (and
        ``"<journey>:<step>"``) to the functions to call again. A truncated, corrupted or
        hostile file raises :class:`~segcore.SnapshotError`."""
        from . import snapshot
        return snapshot.read(path_or_file, clock=clock, callbacks=callbacks)

    def __repr__(self) -> str:
        return (f"<segcore.Engine: {len(self._asts)} segments, {self._n_users} users, "
                f"now={self.now}>")


_DATA_CALLS = {"track", "track_many", "track_json", "advance", "set_traits", "set_traits_many",
               "set_scores", "alias", "set_predictive_model"}
_SHARD_METHODS = {"_shard_batch", "_shard_op", "_shard_import", "_shard_drop"}
_SHARD_OPS = {"add_segments", "replace_segment", "remove_segment", "forget", "alias",
              "set_traits", "set_traits_many", "set_scores", "add_trigger", "cap"}
_OWN_ATTRS = {"_log", "_replaying", "_wal_depth", "_clock_seen", "_replay_clock", "_wal_dir",
              "_wal_seq", "_fsync", "_shard_seq", "_shard_results", "_clock"}
_LOGGED = {"add_segments", "replace_segment", "alias", "remove_segment", "set_traits",
           "set_traits_many", "set_scores", "set_predictive_model",
           "advance", "track", "track_many", "track_json", "cap", "journey",
           "_shard_call"}


def _require_predictive(spec: PredictSpec | None, what: str) -> PredictSpec:
    """``spec``, or the error of calling ``what`` on an engine without predictive statistics
    (shared with the reference engine)."""
    if spec is None:
        raise SegcoreError(f"{what} needs the predictive statistics: create the engine with "
                           "Engine(predictive=True) (they are kept from its first event on; "
                           "docs/predictive.md)")
    return spec


def _predict_spec(v) -> PredictSpec | None:
    """Validate ``Engine(predictive=...)``."""
    if v is None or v is False:
        return None
    if v is True:
        return PredictSpec()
    if not isinstance(v, Mapping):
        raise SegcoreError(f"predictive must be True, None or a dict of options, got "
                           f"{type(v).__name__}")
    unknown = set(v) - {"purchase", "amount", "convert_events", "horizon"}
    if unknown:
        raise SegcoreError(f"unknown predictive option(s): {', '.join(sorted(map(str, unknown)))}"
                           " (expected purchase, amount, convert_events, horizon)")
    d = PredictSpec()
    purchase, amount = v.get("purchase", d.purchase), v.get("amount", d.amount)
    for name, x in (("purchase", purchase), ("amount", amount)):
        if not isinstance(x, str) or not x:
            raise SegcoreError(f"predictive {name} must be a non-empty string, got {x!r}")
    conv = v.get("convert_events", d.convert_events)
    if isinstance(conv, str) or not all(isinstance(e, str) and e for e in conv):
        raise SegcoreError("predictive convert_events must be a list of event type names")
    conv = tuple(conv)
    if len(set(conv)) != len(conv) or purchase in conv or len(conv) > MAX_CONVERT_EVENTS:
        raise SegcoreError(f"predictive convert_events must be at most {MAX_CONVERT_EVENTS} "
                           f"distinct event types other than `{purchase}`, got {list(conv)}")
    try:
        horizon = R.parse_duration(v.get("horizon", "90d"))
    except RuleError as e:
        raise SegcoreError(f"predictive horizon: {e}") from None
    if horizon <= 0:
        raise SegcoreError("predictive horizon must be longer than 0")
    return PredictSpec(purchase, amount, conv, horizon)


class _TraitStore:
    """Users' traits as columns: one object array per trait name, indexed by dense user,
    ``None`` where absent; equal values share one object (countries cost 8 bytes a user)."""

    def __init__(self):
        self.cols: dict[str, np.ndarray] = {}
        self.cap = 0
        self._intern: dict = {}

    def reserve(self, n: int) -> None:
        if n <= self.cap:
            return
        cap = max(n, 2 * self.cap, 16)
        for k, col in self.cols.items():
            grown = np.full(cap, None, dtype=object)
            grown[: self.cap] = col
            self.cols[k] = grown
        self.cap = cap

    @staticmethod
    def check_column(arr: np.ndarray, name: str) -> np.ndarray:
        """Validated object column of trait values (None/NaN = delete)."""
        vals, inv = _factorize(arr) if len(arr) else ([], np.zeros(0, np.int64))
        for j, v in enumerate(vals):
            if not (v is None or isinstance(v, (str, int, float, np.generic))):
                i = int(np.flatnonzero(inv == j)[0])
                raise EventError(f"trait `{name}` must be a string, number, bool or None, got "
                                 f"{type(v).__name__}", index=i, field=f"traits.{name}")
        uniq = np.empty(len(vals), dtype=object)
        for j, v in enumerate(vals):
            uniq[j] = None if v is None else _norm(v)
        return uniq[inv] if len(vals) else np.empty(0, dtype=object)

    def set(self, name: str, dense: np.ndarray, values: np.ndarray) -> None:
        col = self.cols.get(name)
        if col is None:
            col = self.cols[name] = np.full(self.cap, None, dtype=object)
        interned = np.empty(len(values), dtype=object)
        for i, v in enumerate(values.tolist()):
            interned[i] = v if v is None else self._intern.setdefault((type(v), v), v)
        col[dense] = interned

    def get(self, dense: int, name: str):
        col = self.cols.get(name)
        return None if col is None else col[dense]

    def users(self) -> np.ndarray:
        """Dense indices of users with at least one trait."""
        if not self.cols:
            return np.zeros(0, dtype=np.int64)
        has = np.zeros(self.cap, dtype=bool)
        for col in self.cols.values():
            has |= col != None  # noqa: E711 - elementwise comparison on an object array
        return np.flatnonzero(has)

    def test_bits(self, tests: list, dense: np.ndarray) -> np.ndarray:
        """(len(dense), len(tests)) uint8: each trait test on each user, vectorised over the
        distinct values of the trait."""
        out = np.zeros((len(dense), len(tests)), dtype=np.uint8)
        for j, node in enumerate(tests):
            col = self.cols.get(_leaf_name(node)[1])
            if col is None or not len(dense):
                continue
            vals, inv = _factorize(col[dense])
            res = np.fromiter((test_value(node, v) for v in vals), dtype=np.uint8,
                              count=len(vals))
            out[:, j] = res[inv]
        return out


_Int64 = Annotated[int, msgspec.Meta(ge=-2 ** 63, le=2 ** 63 - 1)]


# (gc=False: decoded rows cannot form cycles; tracked, the collections that a 10k-event
# body's allocations trigger walked every row, ~0.5 µs per event)
class _EventRow(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    user: Union[int, str]
    event: str
    ts: Union[int, str]
    # (a property may be any int, as in track and track_many; ids must fit in 64 bits)
    props: Union[dict[str, Union[str, int, float, bool, None, list, dict]], None] = None
    id: Union[str, _Int64, None] = None


_rows_decoder = msgspec.json.Decoder(list[_EventRow])


def _batch_columns(user, event, ts, props, id) -> tuple:
    """The columns of a ``track_many`` call as numpy arrays: ``(users, events, tss, props,
    ids)``, shapes and property names checked (the values are checked by the engine)."""
    if user is None or event is None or ts is None:
        raise EventError("user, event and ts columns are required",
                         field="user" if user is None else "event" if event is None
                         else "ts")
    try:
        n = len(user)
    except TypeError:
        raise EventError("`user` must be a column (array or list)", field="user") from None
    users = _as_column(user, n, "user")
    events = _as_column(event, n, "event")
    tss = _as_column(ts, n, "ts")
    if props is not None and not isinstance(props, Mapping):
        raise EventError("props must be a mapping of name -> column", field="props")
    cols = {}
    for k, v in (props or {}).items():
        if not isinstance(k, str):
            raise EventError("property names must be strings", field="props")
        cols[k] = _as_column(v, n, f"props.{k}")
    ids = None if id is None else _as_column(id, n, "id")
    return users, events, tss, cols, ids


class _EventNames:
    """An event column given as its distinct names and each row's index into them."""
    __slots__ = ("names", "inv")

    def __init__(self, names: list[str], inv: np.ndarray):
        self.names, self.inv = names, inv


def _json_columns(data) -> tuple:
    """:func:`_batch_columns` of a ``track_json`` body (a JSON array of event objects): read
    by the compiled scanner when the body has the common shape, else decoded by msgspec (the
    scanner takes only bodies msgspec accepts, and builds the same columns from them)."""
    data = _utf8(data)
    if isinstance(data, (bytes, bytearray)):
        fast = _scan_events(data)
        if fast is not None:
            users, names, inv, tss, id_list, cols = fast
            users, tss, ids = _id_time_columns(users, tss, id_list, len(inv))
            return users, _EventNames(names, inv), tss, cols, ids
    return _decoded_columns(data)


def _id_time_columns(users, tss, id_list, n: int) -> tuple:
    """The user, ts and id columns of a body (arrays as they are, lists as object columns;
    no ids: None)."""
    return (users if isinstance(users, np.ndarray) else _as_column(users, n, "user"),
            tss if isinstance(tss, np.ndarray) else _as_column(tss, n, "ts"),
            _as_column(id_list, n, "id") if id_list is not None else None)


def _decoded_columns(data) -> tuple:
    """:func:`_json_columns` by the general path: msgspec decodes the rows, one compiled pass
    makes columns of them."""
    rows = _decode_events(data)
    n = len(rows)
    # one pass over the rows, in C: users and ts as int64 when they are all plain ints
    users, events, tss, id_list, props = _json_row_columns(rows)
    users, tss, ids = _id_time_columns(users, tss, id_list, n)
    events = _as_column(events, n, "event")
    cols: dict[str, np.ndarray] = {}
    bad: tuple[int, int, str, str] | None = None
    for k, vals in props.items():
        kinds = set(map(type, vals))
        if dict in kinds or list in kinds:
            i = next(i for i, v in enumerate(vals) if isinstance(v, (dict, list)))
            order = list(rows[i].props).index(k)
            if bad is None or (i, order) < bad[:2]:
                bad = (i, order, k, type(vals[i]).__name__)
            continue
        cols[k] = _json_props_column(vals, kinds, f"props.{k}")
    if bad is not None:
        raise EventError(f"property `{bad[2]}` must be a string, number, bool or null, "
                         f"got {bad[3]}", index=bad[0], field=f"props.{bad[2]}")
    return users, events, tss, cols, ids


def _int_users(users: np.ndarray) -> np.ndarray | None:
    """A user column of ints (an object column of plain ints too: JSON, lists), each checked
    to be in ``[0, 2**32)``; None for a column with strings (checked one by one)."""
    n = len(users)
    if users.dtype.kind == "O" and n:
        typed = _plain_ints(users.tolist())
        users = users if typed is None else typed
    if users.dtype.kind not in "iu":
        return None
    if n and (users.min() < 0 or users.max() >= _U32):
        bad = int(np.flatnonzero((users < 0) | (users >= _U32))[0])
        raise EventError(f"user id {int(users[bad])} is out of range [0, 2**32)",
                         index=bad, field="user")
    return users


def _trait_columns(user, traits: Mapping) -> tuple[np.ndarray, dict]:
    """The user column and the checked trait columns of a ``set_traits_many`` call."""
    if user is None:
        raise EventError("`user` column is required", field="user")
    try:
        n = len(user)
    except TypeError:
        raise EventError("`user` must be a column (array or list)", field="user") from None
    users = _as_column(user, n, "user")
    cols = {}
    for k, col in traits.items():
        if not isinstance(k, str) or not k:
            raise EventError("trait names must be non-empty strings", field="traits")
        cols[k] = _TraitStore.check_column(_as_column(col, n, f"traits.{k}"), k)
        if k == TZ_TRAIT:
            for i, v in enumerate(cols[k].tolist()):
                check_tz(v, i)
    return users, cols


def _check_props(props: Mapping) -> None:
    """The properties of one event: string names, scalar values."""
    for k, v in props.items():
        if not isinstance(k, str):
            raise EventError("property names must be strings", field="props")
        if not (v is None or isinstance(v, (str, int, float, np.generic))):
            raise EventError(f"property `{k}` must be a string, number, bool or None, got "
                             f"{type(v).__name__}", field=f"props.{k}")


def _utf8(data):
    """A ``str`` body as UTF-8 bytes (one with a lone surrogate is invalid JSON)."""
    if not isinstance(data, str):
        return data
    try:
        return data.encode()
    except UnicodeEncodeError as e:
        raise EventError(f"invalid JSON: {e}") from None


def _decode_events(data) -> list:
    """The rows of a body (bytes or a buffer: :func:`_json_columns` encodes a str)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EventError("track_json takes bytes or str of a JSON array")
    try:
        return _rows_decoder.decode(data)
    except msgspec.ValidationError as e:
        msg = str(e)
        m = re.search(r" - at `\$\[(\d+)\](?:\.(\w+))?([^`]*)`$", msg)
        if m:
            field = m.group(2) or None
            if field and m.group(3):
                field += m.group(3).replace("['", ".").replace("']", "")
            raise EventError(msg[: m.start()], index=int(m.group(1)), field=field) from None
        raise EventError(msg) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise EventError(f"invalid JSON: {e}") from None
    except RecursionError:
        raise EventError("the JSON is nested too deeply") from None


_EXACT_FLOAT = 2.0 ** 53


def _json_props_column(vals: list, kinds: set, field: str) -> np.ndarray:
    """A property column from JSON values: float64 with NaN for absent when every value is a
    number exactly representable as a float (the fast path of ``track_many``), else object."""
    num = kinds - {type(None)}
    if num and num <= {float, int}:
        try:
            arr = np.array([np.nan if v is None else v for v in vals] if len(num) < len(kinds)
                           else vals, dtype=np.float64)
        except OverflowError:
            return _as_column(vals, len(vals), field)
        if int not in num or not (np.abs(arr[~np.isnan(arr)]) > _EXACT_FLOAT).any():
            return arr
    return _as_column(vals, len(vals), field)


class _BitmapQuery:
    _TOK = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|([&|\-~()]))")

    def __init__(self, text: str, eng: Engine):
        if not isinstance(text, str):
            raise RuleError("a query must be a string")
        self.text = text
        self.eng = eng
        self.toks: list[tuple[str, int]] = []
        pos = 0
        while pos < len(text):
            m = self._TOK.match(text, pos)
            if m is None or m.end() == pos:
                if text[pos:].strip() == "":
                    break
                raise self.err(f"unexpected `{text[pos:].strip()[0]}`", pos)
            tok = m.group(1) or m.group(2)
            self.toks.append((tok, m.start(1) if m.group(1) else m.start(2)))
            pos = m.end()
        self.i = 0

    def err(self, reason: str, pos: int) -> RuleError:
        return RuleError(reason, line=1, column=pos + 1, segment=None)

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, len(self.text))

    def parse(self) -> BitMap:
        if not self.toks:
            raise self.err("empty query", 0)
        try:
            bm = self.expr()
        except RecursionError:
            raise RuleError("the query is nested too deeply") from None
        tok, pos = self.peek()
        if tok is not None:
            raise self.err(f"unexpected `{tok}`", pos)
        return bm

    def expr(self) -> BitMap:
        bm = self.term()
        while self.peek()[0] in ("|", "-"):
            op = self.peek()[0]
            self.i += 1
            rhs = self.term()
            bm = bm | rhs if op == "|" else bm - rhs
        return bm

    def term(self) -> BitMap:
        bm = self.unary()
        while self.peek()[0] == "&":
            self.i += 1
            bm = bm & self.unary()
        return bm

    def unary(self) -> BitMap:
        tok, pos = self.peek()
        if tok == "~":
            self.i += 1
            return BitMap(self.eng._all) - self.unary()
        if tok == "(":
            self.i += 1
            bm = self.expr()
            t2, p2 = self.peek()
            if t2 != ")":
                raise self.err("expected `)`", p2)
            self.i += 1
            return bm
        if tok is None or not _NAME_RE.match(tok):
            raise self.err("expected a segment name" + (f", found `{tok}`" if tok else ""),
                           pos)
        self.i += 1
        if tok not in self.eng._asts:
            raise self.err(f"unknown segment `{tok}`{R._suggest(tok, self.eng._asts)}", pos)
        return BitMap(self.eng._bitmaps[tok])
