"""segcore_ref: the naive pure-Python reference engine (the oracle of the differential tests).

It keeps every accepted event of every user and evaluates each rule **from scratch** at a given
instant; there is no incremental state besides the current membership of each user, which is
only used to detect changes. It implements ``docs/semantics.md`` literally and has the same
public API as the compiled :class:`segcore.Engine`, so one test suite runs on both.

How time-driven transitions are found (the crux): between two consecutive instants at which
some atom of some rule can change value, every rule is constant. Since every event has
``ts <= now``, an atom can only change at

* ``e.ts + W`` for an event ``e`` of type ``E`` and a window ``W`` of an aggregate over ``E``
  (the event leaves that window: it was in for ``[ts, ts + W)``);
* ``e.ts + W`` for any event and ``inactive(W)`` (true from ``last_seen + W``);
* ``e.ts + T`` for an ``A`` event and ``abandoned(A, B, T)`` (true from ``latest A + T``);
* ``e.ts + W`` for any event and a session aggregate over the window ``W`` (a session leaves
  it at ``start + W``, and every start is an event's ts); ``e.ts + T`` for any event and
  ``in_session`` (false from ``last_seen + T``, ``T`` the session timeout);
* ``e.ts + W`` for an event of the first step of ``seq(..., W)`` (a match leaves the window at
  ``t1 + W``); for ``seq(A, not B within D[, W])``, ``e.ts + D`` (an ``A`` counts from
  ``tA + D``) and ``e.ts + W`` for an ``A`` event;
* ``X - 1, X, X + 1`` for every comparison with ``now``, where ``X`` is the instant at which the
  comparison, a linear function of ``now`` with slope +-1, crosses zero (computed exactly by
  evaluating both sides at ``now = 0`` and ``now = 1``).

These are a user's *candidate instants*. When time moves from ``n0`` to ``n1``, each user is
evaluated from scratch at each of its candidates in ``(n0, n1]`` in ascending order (all
segments, in evaluation order, so ``in()`` sees the same instant), and a transition is emitted
wherever a membership differs from the previous one.

Triggers and journeys (``docs/triggers.md``) run as a plain state machine per user on top of
this: after every evaluation of a user at an instant (time-driven, event, traits/scores), its
transitions update each trigger's pending firing and each journey's position, in registration
order, and the firings due at that instant are produced (policies applied in firing order).
Pending deadlines are candidate instants too: a firing due at ``t + D`` is found even when no
rule can flip then.

Paranoid mode (environment ``SEGCORE_REF_PARANOID=1``, or the module globals ``PARANOID`` /
``PLUS_ONE``) also evaluates at ``e.ts + D + 1``, re-evaluates every user at ``n1`` and asserts
that the candidates missed nothing. Advancing 1 ms at a time in paranoid mode is therefore a
brute-force check of the candidate logic, and gives exactly the transitions of one jump.
"""

from __future__ import annotations

import bisect
import collections
import datetime as _dt
import difflib
import logging
import math
import os
import re
from typing import Any, Callable

import msgspec
import numpy as np
from pyroaring import BitMap

from segcore import rules as R
from segcore.errors import EventError, RuleError, SegcoreError
from segcore.hashing import bucket_of

from segcore import predict as _pred_fit
from segcore.engine import _predict_spec, _require_predictive

from . import _predict, _query
from ._eval import MISSING, Event, Evaluator, has_now, is_num, local_time, walk, zone

try:                                    # the lead unifies the type later
    from segcore.engine import Transition  # type: ignore[attr-defined]
except Exception:                       # pragma: no cover - depends on the other work stream
    class Transition(msgspec.Struct, frozen=True):
        """One change of membership: ``user`` (the id as given) entered or left ``segment`` at
        instant ``ts`` (ms)."""
        user: int | str
        segment: str
        entered: bool
        ts: int

from segcore.engine import Firing  # noqa: E402 - the same type as the compiled engine's

__all__ = ["RefEngine", "Transition", "TransitionList", "Firing", "Journey"]

log = logging.getLogger("segcore_ref")

PARANOID = os.environ.get("SEGCORE_REF_PARANOID", "") not in ("", "0")
#: Also evaluate at ``ts + D + 1`` (never needed: every flip is at ``ts + D`` or at a ``now``
#: comparison's own instant; on by default in paranoid mode only).
PLUS_ONE = PARANOID

_MAX_USER = 2 ** 32
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
_ONE_MS = _dt.timedelta(milliseconds=1)
_NUMERIC_FNS = ("sum", "avg", "min", "max")
_JSON_KEYS = ("user", "event", "ts", "props", "id")


class TransitionList(list):
    """A list of :class:`Transition` with ``duplicates``: the row indices of a batch that were
    ignored as duplicate ids (always empty for calls without ids)."""

    def __init__(self, items=(), duplicates=()):
        super().__init__(items)
        self.duplicates = list(duplicates)


class _User:
    """Everything known about one user: every accepted event, traits, scores, and the current
    membership (segment name -> bool) used to detect changes."""

    __slots__ = ("uid", "number", "order", "events", "by_type", "traits", "scores", "memb",
                 "bucket", "cand_key", "cand_ev", "cand_now", "due", "due_key", "pending",
                 "jstate", "hist", "chist", "mtop")

    def __init__(self, uid, number: int, order: int, seed: int):
        self.uid = uid                  # the id as given (int or str)
        self.number = number            # public uint32 number (bitmaps hold it)
        self.order = order              # first appearance to the engine
        self.events: list[Event] = []   # arrival order
        self.by_type: dict[str, list[Event]] = {}
        self.traits: dict[str, Any] = {}
        self.scores: dict[str, Any] = {}
        self.memb: dict[str, bool] = {}
        self.bucket = bucket_of(uid, seed)
        self.cand_key = None                 # (events covered, rules version)
        self.cand_ev: list[int] = []
        self.cand_now: list[int] = []
        self.due = 0                         # first candidate instant after now ...
        self.due_key = None                  # ... valid for (events, rules version)
        # triggers and journeys (docs/triggers.md)
        self.pending: dict[str, int] = {}        # delayed trigger name -> due instant
        self.jstate: dict[str, list[int]] = {}   # journey name -> [step, due, since]
        self.hist: dict[str, list[int]] = {}     # trigger name -> delivered instants
        self.chist: dict[str, list[int]] = {}    # channel -> delivered instants
        self.mtop = 0                        # the largest mrank of its events (mode ties)


class _Row(msgspec.Struct):
    """One validated event row (ts None means "now" at the time the row is applied)."""
    user: Any
    event: str
    ts: Any
    props: dict
    id: Any


class _Trigger:
    """A registered trigger: fires on entries (``entered``) or exits of ``segment``, at the
    transition (``after`` 0) or ``after`` ms later if the user stayed in (out)."""

    __slots__ = ("name", "segment", "entered", "after", "cooldown", "max_per", "once",
                 "channel", "fn", "reason")

    def __init__(self, name, segment, entered, after, cooldown, max_per, once, channel, fn):
        self.name = name
        self.segment = segment
        self.entered = entered
        self.after = after
        self.cooldown = cooldown
        self.max_per = max_per
        self.once = once
        self.channel = channel
        self.fn = fn
        if not after:
            self.reason = f"entered {segment}" if entered else f"left {segment}"
        elif entered:
            self.reason = f"in {segment} for {R._fmt_dur(after)}"
        else:
            self.reason = f"out of {segment} for {R._fmt_dur(after)}"


class _Step:
    __slots__ = ("after", "do", "only_if", "refs", "channel")

    def __init__(self, after, do, only_if, refs, channel):
        self.after = after
        self.do = do
        self.only_if = only_if
        self.refs = refs
        self.channel = channel


class Journey:
    """A journey (docs/triggers.md): users enter it by entering ``entry`` and go through its
    steps; ``step()`` adds one and returns the journey (chainable)."""

    def __init__(self, engine: "RefEngine", name: str, entry: str, exit_on: list[str]):
        self._engine = engine
        self.name = name
        self.entry = entry
        self.exit_on = exit_on
        self.steps: list[_Step] = []

    def step(self, after, do: Callable | None = None, *, only_if=None,
             channel: str | None = None) -> "Journey":
        """Add a step due ``after`` the previous one (after the entry for the first); ``do``
        is called with each delivered firing; ``only_if`` is a rule (text or AST) that must
        hold for the user at the due instant. Users in the journey leave it."""
        self._engine._add_step(self, after, do, only_if, channel)
        return self

    def __repr__(self) -> str:
        return f"Journey({self.name!r}, entry={self.entry!r}, steps={len(self.steps)})"


# --------------------------------------------------------------------------- input checks
def _fits_float(v: int) -> bool:
    try:
        float(v)
    except OverflowError:
        return False
    return True


def _scalar(v):
    """numpy scalars -> Python objects (datetime64 is handled by :func:`_ts`)."""
    if isinstance(v, np.generic) and not isinstance(v, np.datetime64):
        return v.item()
    return v


def _check_user(u, index):
    u = _scalar(u)
    if isinstance(u, bool) or not isinstance(u, (int, str)):
        raise EventError(f"a user id must be an int in [0, 2**32) or a non-empty string, got "
                         f"{type(u).__name__}", index=index, field="user")
    if isinstance(u, int) and not 0 <= u < _MAX_USER:
        raise EventError(f"user id {u} is out of range (ints must be in [0, 2**32))",
                         index=index, field="user")
    if isinstance(u, str) and not u:
        raise EventError("a user id must not be an empty string", index=index, field="user")
    return u


def _ts(ts, index, field="ts", iso: bool = False) -> int:
    """An instant in ms: an int in [0, 2**48), a datetime (naive = UTC), a numpy datetime64, or
    (only from JSON, ``iso=True``) an ISO 8601 string."""
    if isinstance(ts, np.datetime64):
        if np.isnat(ts):
            raise EventError("the timestamp is NaT", index=index, field=field)
        ts = int(ts.astype("datetime64[ms]").astype(np.int64))
    ts = _scalar(ts)
    if iso and isinstance(ts, str):
        try:
            ts = _dt.datetime.fromisoformat(ts)
        except ValueError:
            raise EventError(f"`{ts}` is not an ISO 8601 timestamp", index=index,
                             field=field) from None
    if isinstance(ts, _dt.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=_dt.timezone.utc)
        ts = (ts - _EPOCH) // _ONE_MS
    elif isinstance(ts, bool) or not isinstance(ts, int):
        raise EventError(f"a timestamp must be an int of ms since the epoch or a datetime, got "
                         f"{type(ts).__name__}", index=index, field=field)
    if not 0 <= ts < R.MAX_TIME_MS:
        raise EventError(f"timestamp {ts} is out of range [0, 2**48)", index=index, field=field)
    return ts


def _prop_value(v):
    """Normalise a property / trait value; None and NaN mean missing. Raises TypeError."""
    v = _scalar(v)
    if v is None:
        return MISSING
    if isinstance(v, float) and math.isnan(v):
        return MISSING
    # Plain types only from here on (the evaluator tests `type(v) is int` etc.).
    if isinstance(v, bool):
        return int(v)          # bools are numbers: true is 1, false is 0
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, str):
        return str(v)
    raise TypeError(type(v).__name__)


def _check_tz(v, index) -> None:
    """Trait ``tz`` (unless None/NaN, which delete it) must name a zone zoneinfo can load."""
    v = _scalar(v)
    if v is None or isinstance(v, float) and math.isnan(v):
        return
    if isinstance(v, str):
        try:
            zone(v)
            return
        except Exception:               # an unknown zone, or a key like "../x"
            pass
    raise EventError(f"trait `tz` must be an IANA timezone name such as \"Europe/Stockholm\", "
                     f"got {v!r}", index=index, field="traits.tz")


def _column(col, name: str) -> list:
    """A batch column as a list of Python objects."""
    if isinstance(col, (str, bytes)) or not hasattr(col, "__len__"):
        raise EventError(f"column `{name}` must be a sequence or an array, got "
                         f"{type(col).__name__}", field=name)
    if isinstance(col, np.ndarray):
        if col.ndim != 1:
            raise EventError(f"column `{name}` must be one-dimensional", field=name)
        if col.dtype.kind == "M":
            return list(col)            # keep datetime64 scalars (NaT detectable)
        return col.tolist()
    return list(col)


class RefEngine:
    """The naive reference engine: every event kept, every rule evaluated from scratch.

    Same public API and semantics (``docs/semantics.md``) as :class:`segcore.Engine`; use it as
    the oracle of differential tests, never in production.

    Parameters
    ----------
    clock : callable, optional
        Returns wall time in **seconds** (like :func:`time.time`). When given, every public call
        first advances the engine to ``int(clock() * 1000)``, and events with
        ``ts > clock_ms + max_future`` are rejected with :class:`~segcore.EventError`.
    max_future : str or int, default "5m"
        How far ahead of the clock an event may be (only with ``clock``).
    seed : int, default 0
        Salt of ``bucket(lo, hi)`` (see :func:`segcore.hashing.bucket_of`).
    dedup_horizon : str or int, default "1d"
        A repeated message id whose first sighting was at most this long ago (engine time) is
        a duplicate.
    event_types : collection of str, optional
        When given, the only event types rules may use and events may have.
    max_queued_firings : int, default 1_000_000
        Firings kept for :meth:`drain_firings` (the oldest are dropped past it).
    session_timeout : str or int, default "30m"
        The session timeout ``T`` (docs/patterns.md): consecutive events less than ``T``
        apart are one session. Must be longer than 0.
    seq_max_events : int, default 1024
        Accepted for compatibility with :class:`segcore.Engine` (the cap of the events kept
        per user and ``seq``); the reference keeps every event and never evicts, so
        ``stats()["seq_evicted"]`` is always 0.
    compact_rows : bool, default False
        Accepted for compatibility with :class:`segcore.Engine` (its counters' storage; the
        semantics are the same either way).

    Attributes
    ----------
    now : int
        The event-time watermark (ms); never moves backwards.
    segments : dict
        Segment name -> rule text, in definition order.

    Notes
    -----
    Decisions taken where ``docs/semantics.md`` is silent:

    * A message id's first sighting is recorded at the engine time *after* the event moved
      time (``max(now, ts)``); a repeat is a duplicate iff ``now - first_sighting <=
      dedup_horizon`` with ``now`` taken before the repeat is applied. An expired id counts as
      new and its sighting time is reset. A duplicate row mentions no user (no number given).
    * Bools are not numbers: they never compare with numbers, are skipped by sum/avg/min/max,
      and in ``distinct`` / ``by KEY`` are a kind of their own.
    * ``x not in [..]`` is true iff ``x`` is present and equals none of the items (so a string
      is ``not in [1, 2]``).
    * Transitions carry the user id as given (int or str). Callbacks fire after the whole call.

    Triggers and journeys (``docs/triggers.md``), where the page leaves room:

    * A firing due at ``t`` is produced by the time-driven evaluation of the user at ``t``,
      after that evaluation's transitions (so a time-driven exit at ``t`` cancels it) and
      before any event applied at ``t`` (an event-driven exit at ``t`` comes after it). The
      same holds for journey steps.
    * A delayed trigger's wait is cancelled by any exit processed after the entry, an exit at
      the entry's own instant (a later evaluation at the same ``t``) included. ``after=0`` is
      the same as ``after=None`` (immediate, reason ``"entered S"``).
    * Journey leave conditions are per evaluation: an entry into ``entry`` and a leave
      condition in the same evaluation leave the user out (a step due then is cancelled); only
      a *transition into* an ``exit_on`` segment is a leave (being in it already is not).
    * A journey with no steps is completed at once by an entering user.
    * Default trigger names count triggers only (journeys do not count); trigger and journey
      names share one namespace. Channel caps count the deliveries made on the channel since
      it was first capped. With a clock, registering a trigger, journey or step first
      catches up with the clock (what is registered sees only what happens after it).
    * ``add_segments`` orders its transitions by user, then segment evaluation order.
    * With a clock, the clock is read once per call; the call is validated before time moves.

    Examples
    --------
    >>> eng = RefEngine()
    >>> eng.add_segment("fb", "count(purchase, 90d) >= 2")
    []
    >>> eng.track(1, "purchase", ts=1000)
    []
    >>> eng.track(1, "purchase", ts=2000)
    [Transition(user=1, segment='fb', entered=True, ts=2000)]
    >>> eng.advance(1000 + 90 * 86_400_000)
    [Transition(user=1, segment='fb', entered=False, ts=7776001000)]
    """

    def __init__(self, clock: Callable[[], float] | None = None, max_future="5m", seed: int = 0,
                 dedup_horizon="1d", event_types=None, max_queued_firings: int = 1_000_000,
                 session_timeout="30m", seq_max_events: int = 1024, predictive=None,
                 compact_rows: bool = False):
        if not isinstance(compact_rows, bool):
            raise SegcoreError("compact_rows must be True or False")
        self._pred = _predict_spec(predictive)
        self._pred_model = _pred_fit.PredictiveModel()
        self._pred_cmps: list[tuple[str, float]] = []
        self._session_ms = R.parse_duration(session_timeout)
        if self._session_ms <= 0:
            raise SegcoreError("session_timeout must be longer than 0")
        if isinstance(seq_max_events, bool) or not isinstance(seq_max_events, int) \
                or seq_max_events < 1:
            raise SegcoreError("seq_max_events must be an int >= 1")
        self._seq_max = seq_max_events       # accepted only: the reference never evicts
        self._clock = clock
        self._max_future = R.parse_duration(max_future)
        self._seed = int(seed)
        self._horizon = R.parse_duration(dedup_horizon)
        self._event_types = frozenset(event_types) if event_types is not None else None
        self._now = 0
        self._users: dict[int, _User] = {}          # public number -> user, first appearance order
        self._str_numbers: dict[str, int] = {}       # string id -> public number
        self._number_str: dict[int, str] = {}        # public number -> string id
        self._next_str = _MAX_USER - 1               # next number for a string (counting down)
        self._n_created = 0                          # users ever created (their order)
        self._ids: dict[Any, int] = {}               # message id -> engine time of first sighting
        self._arrival = 0
        self._event_codes: dict[str, int] = {}      # event type -> code (event_code())
        self._code_events: list[str] = []
        # segments
        self._ast: dict[str, Any] = {}               # definition order
        self._text: dict[str, str] = {}
        self._refs: dict[str, list[str]] = {}
        self._topo: list[str] = []
        self._rules_version = 0
        self._durations: dict[str | None, tuple[int, ...]] = {}
        self._now_cmps: list = []
        self._now_ids: set[int] = set()
        self._numeric: dict[str, dict[str, str]] = {}   # event -> prop -> segment needing numbers
        # triggers and journeys (docs/triggers.md), in one registration order
        self._items: list = []                       # _Trigger and Journey objects
        self._triggers: dict[str, _Trigger] = {}
        self._journeys: dict[str, Journey] = {}
        self._caps: dict[str, tuple[int, int] | None] = {}  # channel -> (n, W ms)
        if isinstance(max_queued_firings, bool) or not isinstance(max_queued_firings, int) \
                or max_queued_firings < 0:
            raise SegcoreError("max_queued_firings must be an int >= 0")
        self._max_queued = max_queued_firings
        self._queue: collections.deque = collections.deque()
        self._held: list = []       # transitions of catch-ups, returned by the next call
        self._call_firings: list = []                # firings of the current call, in order
        self._stats = {"events": 0, "duplicates": 0, "transitions": 0, "callback_errors": 0,
                       "firings": 0, "suppressed": 0, "firings_dropped": 0, "seq_evicted": 0}
        self._rebuild()             # what events must carry before any segment exists

    # ================================================================== time
    def _clock_ms(self) -> int | None:
        return None if self._clock is None else int(self._clock() * 1000)

    def _sync(self, clock_ms: int | None) -> list:
        return [] if clock_ms is None else self._move_time(clock_ms)

    def _candidates(self, user: _User) -> tuple[list[int], list[int]]:
        """Instants at which some rule may flip for ``user`` (see the module docstring), as two
        sorted lists: those derived from each event's ts (maintained incrementally as events
        arrive, rebuilt when the rules change) and the flip instants of the comparisons with
        ``now`` (recomputed when the user's events change)."""
        if user.cand_key is None or user.cand_key[1] != self._rules_version:
            user.cand_ev = []
            user.cand_key = (0, self._rules_version)
        n_done = user.cand_key[0]
        if n_done != len(user.events):
            every = self._durations.get(None, ())
            for e in user.events[n_done:]:
                for d in every + self._durations.get(e.type, ()):
                    for c in ((e.ts + d, e.ts + d + 1) if PLUS_ONE else (e.ts + d,)):
                        i = bisect.bisect_left(user.cand_ev, c)
                        if i == len(user.cand_ev) or user.cand_ev[i] != c:
                            user.cand_ev.insert(i, c)
            flips = set()
            for node in self._now_cmps:
                x = self._now_flip(node, user)
                if x is not None:
                    flips.update((x - 1, x, x + 1))
            for name, k in self._pred_cmps:
                flips.update(_predict.crossings(self._pred, self._pred_model, user, name, k))
            user.cand_now = sorted(flips)
            user.cand_key = (len(user.events), self._rules_version)
        return user.cand_ev, user.cand_now

    def _now_flip(self, node, user: _User) -> int | None:
        """The instant X at which comparison ``node`` (linear in now, slope +-1) crosses zero,
        or None when a term is missing (then it is false at every instant)."""
        f = []
        for t in (0, 1):
            ev = Evaluator(user, t, {}, user.bucket, session_ms=self._session_ms,
                           pred=self._pred_ctx)
            a = ev.value(node.left, exact=True)
            b = ev.value(node.right, exact=True)
            if a is MISSING or b is MISSING:
                return None
            f.append(a - b)
        slope = f[1] - f[0]
        if slope == 0:                     # cannot happen for a validated rule
            return None
        return -f[0] * slope               # f0 + slope * X == 0 with slope = +-1

    def _evaluate(self, user: _User, t: int) -> dict[str, bool]:
        """Membership of ``user`` in every segment at instant ``t``, in evaluation order, so
        that ``in(S)`` sees the membership of S at the same instant."""
        memb: dict[str, bool] = {}
        ev = Evaluator(user, t, memb, user.bucket, self._now_ids, session_ms=self._session_ms,
                       pred=self._pred_ctx)
        for name in self._topo:
            memb[name] = bool(ev.cond(self._ast[name]))
        return memb

    def _move_time(self, n1: int) -> list:
        """Move time to ``n1``; returns the time-driven transitions in (n0, n1], ordered by
        (ts, user first appearance, segment evaluation order)."""
        n0 = self._now
        if n1 <= n0:
            return []
        found = []
        topo_idx = {name: i for i, name in enumerate(self._topo)}
        version = self._rules_version
        fired = []
        n_topo = len(self._topo)
        for user in self._users.values():
            # Shortcut: nothing can flip for this user before its next candidate instant
            # (and no pending firing or journey step is due before it).
            if (not PARANOID and user.due_key == (len(user.events), version)
                    and user.due > n1 and self._next_deadline(user) > n1):
                continue
            in_range = set()
            due = math.inf
            for cands in self._candidates(user):
                lo = bisect.bisect_right(cands, n0)
                hi = bisect.bisect_right(cands, n1)
                in_range.update(cands[lo:hi])
                if hi < len(cands):
                    due = min(due, cands[hi])
            user.due, user.due_key = due, (len(user.events), version)
            prev = user.memb
            cands = sorted(in_range)
            i = 0
            while True:
                # The next instant: a rule candidate or a pending deadline (deadlines are
                # created by the evaluations themselves, always later than the instant that
                # creates them, so they are looked up afresh each time).
                c = min(cands[i] if i < len(cands) else math.inf, self._next_deadline(user))
                if c > n1:
                    break
                while i < len(cands) and cands[i] <= c:
                    i += 1
                cur = self._evaluate(user, c)
                trs = []
                for name in self._topo:
                    if cur[name] != prev[name]:
                        tr = Transition(user.uid, name, cur[name], c)
                        trs.append(tr)
                        found.append((c, user.order, topo_idx[name], tr))
                for j, f in enumerate(self._fire(user, c, trs, cur)):
                    fired.append((c, user.order, n_topo + j, f))
                prev = cur
            if PARANOID:
                check = self._evaluate(user, n1)
                assert check == prev, (user.uid, n0, n1, prev, check)
            user.memb = prev
        self._now = n1
        found.sort(key=lambda x: x[:3])
        fired.sort(key=lambda x: x[:3])
        self._call_firings.extend(x[3] for x in fired)
        return [x[3] for x in found]

    def _reevaluate(self, user: _User) -> list:
        """Event-driven change of ``user``: evaluate at now, transitions with ts = now."""
        cur = self._evaluate(user, self._now)
        out = []
        for name in self._topo:
            before = user.memb.get(name, False)     # a brand-new user is in nothing
            if cur[name] != before:
                out.append(Transition(user.uid, name, cur[name], self._now))
        user.memb = cur
        self._call_firings.extend(self._fire(user, self._now, out, cur))
        return out

    def _finish(self, transitions, duplicates=(), hold: bool = False) -> TransitionList:
        """Count the transitions, queue the call's firings and run the callbacks of the
        delivered ones (after the call's state change, in firing order). Transitions of a
        read's (or registration's, or forget's) catch-up with the clock are ``hold``: the next
        call that returns transitions returns them first."""
        self._stats["transitions"] += len(transitions)
        firings, self._call_firings = self._call_firings, []
        calls = []
        for f in firings:
            if f.delivered:
                self._stats["firings"] += 1
                fn = (self._triggers[f.trigger].fn if f.journey is None
                      else self._journeys[f.journey].steps[f.step].do)
                if fn is not None:
                    calls.append((fn, f))
            else:
                self._stats["suppressed"] += 1
            self._queue.append(f)
        over = len(self._queue) - self._max_queued
        if over > 0:
            for _ in range(over):
                self._queue.popleft()
            self._stats["firings_dropped"] += over
        for fn, f in calls:
            try:
                fn(f)
            except Exception:
                self._stats["callback_errors"] += 1
                log.exception("segcore_ref: callback %r for %s raised", fn, f)
        if hold:
            self._held.extend(transitions)
            return TransitionList([], duplicates)
        if self._held:
            transitions, self._held = self._held + list(transitions), []
        return TransitionList(transitions, duplicates)

    # ================================================================== triggers: state
    @staticmethod
    def _next_deadline(user: _User):
        """The earliest pending firing or journey step of ``user`` (inf if none)."""
        due = min(user.pending.values(), default=math.inf)
        for js in user.jstate.values():
            if js[1] < due:
                due = js[1]
        return due

    def _fire(self, user: _User, c: int, trs: list, cur: dict) -> list:
        """After one evaluation of ``user`` at instant ``c`` (whose transitions are ``trs``
        and memberships ``cur``): update every trigger and journey, in registration order, and
        return the firings due at ``c`` in that order, policies applied."""
        if not self._items:
            return []
        entered = {t.segment for t in trs if t.entered}
        left = {t.segment for t in trs if not t.entered}
        out = []
        for item in self._items:
            if isinstance(item, _Trigger):
                tg = item
                hit = tg.segment in (entered if tg.entered else left)
                if not tg.after:
                    if hit:
                        out.append(self._policies(user, c, tg))
                    continue
                opposite = tg.segment in (left if tg.entered else entered)
                if opposite:
                    user.pending.pop(tg.name, None)       # an exit (entry) cancels the wait
                elif hit:
                    user.pending[tg.name] = c + tg.after  # a new wait starts
                due = user.pending.get(tg.name)
                assert due is None or due >= c, (tg.name, due, c)
                if due == c:
                    del user.pending[tg.name]
                    out.append(self._policies(user, c, tg))
                continue
            j = item
            js = user.jstate.get(j.name)
            if j.entry in entered and js is None:
                if j.steps:
                    js = user.jstate[j.name] = [0, c + j.steps[0].after, c]
            if js is not None and (j.entry in left or any(s in entered for s in j.exit_on)):
                del user.jstate[j.name]
                js = None
            while js is not None and js[1] == c:
                k = js[0]
                step = j.steps[k]
                f = Firing(user.uid, j.entry, True, c, f"{j.name}:{k}",
                           f"journey {j.name} step {k + 1}", channel=step.channel,
                           journey=j.name, step=k)
                if step.only_if is not None and not Evaluator(
                        user, c, cur, user.bucket, session_ms=self._session_ms,
                        pred=self._pred_ctx).cond(step.only_if):
                    f = msgspec.structs.replace(f, delivered=False, suppressed_by="only_if")
                else:
                    f = self._cap(user, c, f)
                out.append(f)
                if k + 1 < len(j.steps):
                    js[0] = k + 1
                    js[1] = c + j.steps[k + 1].after
                else:                                     # completed
                    del user.jstate[j.name]
                    js = None
        return out

    def _policies(self, user: _User, c: int, tg: _Trigger):
        """The firing of trigger ``tg`` for ``user`` at ``c``, checked against once, cooldown,
        max_per and the channel cap, in that order; a delivered one is recorded."""
        f = Firing(user.uid, tg.segment, tg.entered, c, tg.name, tg.reason, channel=tg.channel)
        hist = user.hist.get(tg.name, ())
        why = None
        if tg.once and hist:
            why = "once"
        elif tg.cooldown is not None and hist and c - hist[-1] < tg.cooldown:
            why = "cooldown"
        elif tg.max_per is not None and sum(1 for t in hist if t > c - tg.max_per[1]) \
                >= tg.max_per[0]:
            why = "max_per"
        if why is not None:
            return msgspec.structs.replace(f, delivered=False, suppressed_by=why)
        f = self._cap(user, c, f)
        if f.delivered:
            user.hist.setdefault(tg.name, []).append(c)
        return f

    def _cap(self, user: _User, c: int, f):
        """Apply the channel cap of ``f.channel`` (if any); record a delivered firing in the
        channel's history."""
        ch = f.channel
        if ch is None or ch not in self._caps:      # only capped channels keep a history
            return f
        hist = user.chist.setdefault(ch, [])
        cap = self._caps[ch]
        if cap is not None and sum(1 for t in hist if t > c - cap[1]) >= cap[0]:
            return msgspec.structs.replace(f, delivered=False, suppressed_by=f"cap:{ch}")
        hist.append(c)
        return f

    # ================================================================== users
    def _plan_numbers(self):
        """A scratch numbering for validating a call without changing state."""
        return {"str": {}, "num": {}, "int": set(), "next": self._next_str}

    def _number(self, plan, u, index) -> int:
        """Public number of user id ``u`` under ``plan`` (assigning one if new); raises
        EventError on an int/string clash."""
        if isinstance(u, str):
            n = self._str_numbers.get(u)
            if n is None:
                n = plan["str"].get(u)
            if n is None:
                n = plan["next"]
                # Never give a string a number already used by an int user.
                while n >= 0 and (n in self._users or n in plan["int"]):
                    n -= 1
                if n < 0:
                    raise EventError("no public user numbers left for string ids",
                                     index=index, field="user")
                plan["str"][u] = n
                plan["num"][n] = u
                plan["next"] = n - 1
            return n
        owner = self._number_str.get(u, plan["num"].get(u))
        if owner is not None:
            raise EventError(f"int user id {u} clashes with the public number of string user "
                             f"id `{owner}`", index=index, field="user")
        if u not in self._users:
            plan["int"].add(u)
        return u

    def _commit_numbers(self, plan) -> None:
        self._str_numbers.update(plan["str"])
        self._number_str.update(plan["num"])
        self._next_str = plan["next"]

    def _user(self, uid, number: int) -> _User:
        user = self._users.get(number)
        if user is None:
            user = _User(uid, number, self._n_created, self._seed)
            self._n_created += 1
            self._users[number] = user
        return user

    def user_number(self, id) -> int:
        """Public uint32 number of a known user id (ints are themselves); KeyError if the
        engine never heard of the user."""
        user = self._lookup(id)
        if user is None:
            raise KeyError(f"unknown user {id!r}")
        return user.number

    def user_id(self, number: int):
        """The user id (int or str) behind the public number of a known user; KeyError
        otherwise."""
        user = self._users.get(int(_scalar(number)))
        if user is None:
            raise KeyError(f"unknown user number {number}")
        return user.uid

    def _lookup(self, id) -> _User | None:
        id = _scalar(id)
        if isinstance(id, str):
            n = self._str_numbers.get(id)
            return None if n is None else self._users.get(n)
        if isinstance(id, int) and not isinstance(id, bool):
            return self._users.get(id)
        return None

    # ================================================================== segments
    @property
    def segments(self) -> dict[str, str]:
        """Segment name -> rule text, in definition order."""
        return dict(self._text)

    def _check_name(self, name) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RuleError(f"`{name}` is not a valid segment name (letters, digits and "
                            "underscores, not starting with a digit)")
        if name in self._ast:
            raise RuleError(f"segment `{name}` already exists", segment=name)

    def _compile(self, name: str, rule, known) -> tuple[Any, str]:
        """Parse / validate one rule; returns (ast, text)."""
        if isinstance(rule, str):
            parsed = R.parse_full(rule, segment=name, segments=known,
                                  event_types=self._event_types)
            self._check_builtin(parsed.ast, name)
            return parsed.ast, rule
        try:
            R.validate(rule, segment=name)
        except RuleError:
            raise
        except Exception as e:                  # not an AST at all
            raise RuleError(f"not a rule: {e}", segment=name) from None
        for ref in R.references(rule):
            if ref not in known:
                close = difflib.get_close_matches(ref, list(known), n=1, cutoff=0.6)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                raise RuleError(f"unknown segment `{ref}`{hint}", segment=name)
        self._check_builtin(rule, name)
        if self._event_types is not None:
            for n in walk(rule):
                evs = [getattr(n, "event", None), getattr(n, "a", None), getattr(n, "b", None)]
                if isinstance(n, R.Seq):
                    evs = [st.event for st in n.steps]
                for ev in evs:
                    if isinstance(n, (R.Agg, R.First, R.Last, R.Abandoned, R.Seq)) \
                            and ev is not None and ev not in self._event_types:
                        raise RuleError(f"unknown event type `{ev}`", segment=name)
        return rule, R.to_text(rule)

    @property
    def _pred_ctx(self):
        return None if self._pred is None else (self._pred, self._pred_model)

    def _check_builtin(self, ast, name) -> None:
        if self._pred is not None:
            try:
                _predict.check_rule(ast, self._pred.score_ids)
            except RuleError as e:
                raise RuleError(str(e.args[0]) if e.args else str(e), segment=name) from None

    def _rebuild(self) -> None:
        """Recompute everything derived from the rule set."""
        self._topo = R.topo_order(self._refs)
        # Durations after which an event of a given type (None: of any type) may make a rule
        # flip: an E event leaves the window W of every aggregate over E at ts + W; the latest
        # event makes inactive(W) true at ts + W; the latest A makes abandoned(A, B, T) true
        # at ts + T; a session leaves the window W of a session aggregate at start + W (a
        # start is an event's ts); in_session turns false at last_seen + T (the timeout); a
        # seq match leaves the window at t1 + W (t1: an event of the first step); an A of
        # seq(A, not B within D[, W]) counts from tA + D until tA + W. Comparisons with `now`
        # get their own exact flip instants (_now_flip). (share and mode are windowed Aggs.)
        durations: dict[str | None, set[int]] = {}
        now_cmps = []
        numeric: dict[str, dict[str, str]] = {}
        for name, ast in self._ast.items():
            for n in walk(ast):
                if isinstance(n, R.Agg):
                    if n.window_ms is not None:
                        durations.setdefault(n.event, set()).add(n.window_ms)
                    if n.fn in _NUMERIC_FNS:
                        numeric.setdefault(n.event, {}).setdefault(n.prop, name)
                elif isinstance(n, R.Inactive):
                    durations.setdefault(None, set()).add(n.window_ms)
                elif isinstance(n, R.Abandoned):
                    durations.setdefault(n.a, set()).add(n.within_ms)
                elif isinstance(n, R.Sessions):
                    if n.window_ms is not None:
                        durations.setdefault(None, set()).add(n.window_ms)
                elif isinstance(n, R.InSession):
                    durations.setdefault(None, set()).add(self._session_ms)
                elif isinstance(n, R.Seq):
                    first = n.steps[0].event
                    if n.steps[-1].negated:
                        durations.setdefault(first, set()).add(n.within_ms)
                    if n.window_ms is not None:
                        durations.setdefault(first, set()).add(n.window_ms)
                elif isinstance(n, R.Compare) and has_now(n):
                    now_cmps.append(n)
        # built-in predictive scores compared with constants (their crossing instants)
        pcmps = set()
        names = self._pred.score_ids if self._pred is not None else {}
        for ast in self._ast.values():
            for n in walk(ast):
                for v, other in ((getattr(n, "left", None), getattr(n, "right", None)),
                                 (getattr(n, "right", None), getattr(n, "left", None)),
                                 (getattr(n, "value", None), None)):
                    if isinstance(v, R.Score) and v.name in names:
                        ks = [other.value] if isinstance(other, R.Num) else [0.0]
                        if isinstance(n, R.InList):
                            ks = [x for x in n.items if is_num(x)] or [0.0]
                        elif isinstance(n, R.Between):
                            ks = [b.value for b in (n.low, n.high) if isinstance(b, R.Num)]
                        pcmps.update((v.name, float(k)) for k in ks)
        self._pred_cmps = sorted(pcmps)
        self._durations = {k: tuple(sorted(v)) for k, v in durations.items()}
        self._now_cmps = now_cmps
        self._now_ids = {id(n) for n in now_cmps}
        if self._pred is not None:
            numeric.setdefault(self._pred.purchase, {})[self._pred.amount] = None
        self._numeric = numeric
        self._rules_version += 1

    def add_segment(self, name: str, rule) -> TransitionList:
        """Define segment ``name`` by ``rule`` (text or AST) and back-fill it: returns the users
        entering it, at ``ts = now``, in user order."""
        return self.add_segments({name: rule})

    def add_segments(self, segments: dict) -> TransitionList:
        """Define several segments at once (they may reference each other, in any order)."""
        if not isinstance(segments, dict):
            raise RuleError("add_segments takes a dict of name -> rule")
        clock_ms = self._clock_ms()
        seen_names = set()
        for name in segments:
            self._check_name(name)
            if name in seen_names:
                raise RuleError(f"segment `{name}` already exists", segment=name)
            seen_names.add(name)
        known = list(self._ast) + list(segments)
        compiled = {name: self._compile(name, rule, known) for name, rule in segments.items()}
        refs = dict(self._refs)
        for name, (ast, _) in compiled.items():
            refs[name] = R.references(ast)
        R.topo_order(refs)                      # raises RuleError naming a cycle
        # --- valid: change state
        out = self._sync(clock_ms)
        for name, (ast, text) in compiled.items():
            self._ast[name] = ast
            self._text[name] = text
            self._refs[name] = refs[name]
        self._rebuild()
        for user in self._users.values():
            before = user.memb
            cur = self._evaluate(user, self._now)
            for name in self._topo:
                if name in compiled:
                    if cur[name]:
                        out.append(Transition(user.uid, name, True, self._now))
                elif PARANOID:
                    assert cur[name] == before[name], (user.uid, name)
            user.memb = cur
        return self._finish(out)

    def replace_segment(self, name: str, rule) -> TransitionList:
        """Give segment ``name`` a new rule; returns the transitions of the users whose
        membership changes (``ts = now``, in user order, then segment evaluation order —
        segments referencing it may flip too)."""
        clock_ms = self._clock_ms()
        self._segment(name)
        ast, text = self._compile(name, rule, list(self._ast))
        refs = dict(self._refs)
        refs[name] = R.references(ast)
        R.topo_order(refs)                      # raises RuleError naming a cycle
        out = self._sync(clock_ms)
        self._ast[name] = ast
        self._text[name] = text
        self._refs[name] = refs[name]
        self._rebuild()
        for user in self._users.values():      # users in order; triggers see the flips
            out.extend(self._reevaluate(user))
        return self._finish(out)

    def remove_segment(self, name: str) -> None:
        """Remove a segment (not allowed while another segment references it with ``in()``)."""
        clock_ms = self._clock_ms()
        if name not in self._ast:
            close = difflib.get_close_matches(str(name), list(self._ast), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise RuleError(f"unknown segment `{name}`{hint}")
        users_of = [s for s, refs in self._refs.items() if name in refs and s != name]
        if users_of:
            raise RuleError(f"segment `{name}` is referenced by "
                            + ", ".join(f"`{s}`" for s in users_of), segment=name)
        used_by = self._used_by(name)
        if used_by:
            raise RuleError(f"segment `{name}` is used by " + ", ".join(used_by), segment=name)
        out = self._sync(clock_ms)
        del self._ast[name], self._text[name], self._refs[name]
        for user in self._users.values():
            user.memb.pop(name, None)
        self._rebuild()
        self._finish(out)

    def _segment(self, name) -> None:
        if name not in self._ast:
            close = difflib.get_close_matches(str(name), list(self._ast), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise RuleError(f"unknown segment `{name}`{hint}")

    # ================================================================== events
    def event_code(self, name: str) -> int:
        """The integer code of an event type, usable in ``track_many(event=codes)``. Codes
        are given in order of first request."""
        if not isinstance(name, str) or not name:
            raise EventError("an event type must be a non-empty string", field="event")
        if name not in self._event_codes:
            self._event_codes[name] = len(self._event_codes)
            self._code_events.append(name)
        return self._event_codes[name]

    def _check_row(self, user, event, ts, props, id, index, clock_ms, iso=False,
                   codes=False) -> _Row:
        user = _check_user(user, index)
        event = _scalar(event)
        if codes and isinstance(event, int) and not isinstance(event, bool):
            # track_many only: an event code from event_code()
            if not 0 <= event < len(self._code_events):
                raise EventError(f"unknown event code {event} (see event_code())",
                                 index=index, field="event")
            event = self._code_events[event]
        if not isinstance(event, str) or not event:
            raise EventError("an event type must be a non-empty string", index=index,
                             field="event")
        if self._event_types is not None and event not in self._event_types:
            close = difflib.get_close_matches(event, list(self._event_types), n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise EventError(f"unknown event type `{event}`{hint}", index=index, field="event")
        if ts is not None:
            ts = _ts(ts, index, iso=iso)
            if clock_ms is not None and ts > clock_ms + self._max_future:
                raise EventError(f"timestamp {ts} is more than max_future "
                                 f"({self._max_future} ms) ahead of the clock ({clock_ms})",
                                 index=index, field="ts")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise EventError(f"props must be a dict, got {type(props).__name__}", index=index,
                             field="props")
        clean = {}
        for k, v in props.items():
            k = _scalar(k)
            if not isinstance(k, str):
                raise EventError(f"property names must be strings, got {k!r}", index=index,
                                 field="props")
            try:
                v = _prop_value(v)
            except TypeError as e:
                raise EventError(f"a property value must be an int, float, str, bool or None, "
                                 f"got {e}", index=index, field=f"props.{k}") from None
            if v is not MISSING:
                clean[k] = v
        for prop, seg in self._numeric.get(event, {}).items():
            if prop in clean and not is_num(clean[prop]):
                why = f"segment `{seg}` aggregates it" if seg is not None else \
                    "the predictive scores read it"
                raise EventError(f"`{event}.{prop}` must be a number (int or float) because "
                                 f"{why}, got "
                                 f"{type(clean[prop]).__name__}", index=index,
                                 field=f"props.{prop}")
            if prop in clean and type(clean[prop]) is int and not _fits_float(clean[prop]):
                raise EventError(f"`{event}.{prop}` must fit in a float, got an int of "
                                 f"{clean[prop].bit_length()} bits", index=index,
                                 field=f"props.{prop}")
        id = _scalar(id)
        if id is not None and (isinstance(id, bool) or not isinstance(id, (str, int))):
            raise EventError(f"a message id must be a string or an int, got "
                             f"{type(id).__name__}", index=index, field="id")
        if isinstance(id, int) and not -2 ** 63 <= id < 2 ** 63:
            raise EventError(f"an int message id must fit in 64 bits, got {id}", index=index,
                             field="id")
        return _Row(user, event, ts, clean, id)

    def _ingest(self, rows: list[_Row], clock_ms, batch: bool) -> TransitionList:
        """Apply validated rows one by one (the batch is fully checked first)."""
        # --- dry run: which rows are duplicates, and is the user numbering consistent?
        plan = self._plan_numbers()
        now = self._now if clock_ms is None else max(self._now, clock_ms)
        seen: dict[Any, int] = {}
        dup = set()
        for i, row in enumerate(rows):
            if row.id is not None:
                t0 = seen.get(row.id, self._ids.get(row.id))
                if t0 is not None and now - t0 <= self._horizon:
                    dup.add(i)
                    continue
            self._number(plan, row.user, i if batch else None)
            now = max(now, now if row.ts is None else row.ts)
            if row.id is not None:
                seen[row.id] = now
        # --- apply
        out = self._sync(clock_ms)
        self._commit_numbers(plan)
        duplicates = []
        for i, row in enumerate(rows):
            if row.id is not None:
                t0 = self._ids.get(row.id)
                if t0 is not None and self._now - t0 <= self._horizon:
                    assert i in dup
                    duplicates.append(i)
                    self._stats["duplicates"] += 1
                    continue
            ts = self._now if row.ts is None else row.ts
            # Time moves to the event's ts first (time-driven transitions up to and including
            # ts come before the event's own); a late event is applied at the current now.
            out.extend(self._move_time(ts))
            if row.id is not None:
                self._ids[row.id] = self._now
            number = self._number(plan, row.user, i)     # already assigned: a lookup
            user = self._user(row.user, number)
            # dated in the user's timezone (trait `tz`) as it is when the event is accepted
            tz = user.traits.get("tz")
            local = local_time(ts, _dt.timezone.utc if tz is None else zone(tz))
            # mode ties: it arrives after every event the user has, merged ones included
            e = Event(ts, row.event, row.props, self._arrival, local, user.mtop)
            self._arrival += 1
            user.events.append(e)
            user.by_type.setdefault(row.event, []).append(e)
            self._stats["events"] += 1
            out.extend(self._reevaluate(user))
        return self._finish(out, duplicates)

    def track(self, user, event: str, ts=None, props: dict | None = None,
              id=None) -> TransitionList:
        """Accept one event (``ts`` None means now); returns the transitions it caused,
        time-driven ones first. A duplicate id returns ``[]``."""
        clock_ms = self._clock_ms()
        row = self._check_row(user, event, ts, props, id, None, clock_ms)
        return self._ingest([row], clock_ms, batch=False)

    def track_many(self, user, event, ts, props: dict | None = None, id=None) -> TransitionList:
        """Track a batch given as columns; exactly the same as tracking its rows one by one.
        ``event`` holds type names or codes from :meth:`event_code`. A missing property in a
        row is None or NaN. ``.duplicates`` lists duplicate rows."""
        clock_ms = self._clock_ms()
        cols = {"user": _column(user, "user"), "event": _column(event, "event"),
                "ts": _column(ts, "ts")}
        if id is not None:
            cols["id"] = _column(id, "id")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise EventError(f"props must be a dict of columns, got {type(props).__name__}",
                             field="props")
        pcols = {}
        for k, col in props.items():
            if not isinstance(k, str):
                raise EventError(f"property names must be strings, got {k!r}", field="props")
            pcols[k] = _column(col, f"props.{k}")
        n = len(cols["user"])
        for name, col in list(cols.items()) + [(f"props.{k}", c) for k, c in pcols.items()]:
            if len(col) != n:
                raise EventError(f"column `{name}` has {len(col)} rows but `user` has {n}",
                                 field=name)
        rows = []
        for i in range(n):
            if cols["ts"][i] is None:
                raise EventError("a timestamp is required", index=i, field="ts")
            rows.append(self._check_row(
                cols["user"][i], cols["event"][i], cols["ts"][i],
                {k: c[i] for k, c in pcols.items()},
                cols["id"][i] if "id" in cols else None, i, clock_ms, codes=True))
        return self._ingest(rows, clock_ms, batch=True)

    def track_json(self, data) -> TransitionList:
        """Track a JSON array of ``{"user", "event", "ts", "props"?, "id"?}`` objects; ``ts``
        is an int of ms or an ISO 8601 string. Same result as :meth:`track_many`."""
        clock_ms = self._clock_ms()
        try:
            docs = msgspec.json.decode(data)
        except (msgspec.DecodeError, TypeError, UnicodeError) as e:
            raise EventError(f"invalid JSON: {e}") from None
        if not isinstance(docs, list):
            raise EventError("expected a JSON array of events")
        rows = []
        for i, d in enumerate(docs):
            if not isinstance(d, dict):
                raise EventError("each event must be a JSON object", index=i)
            for k in d:
                if k not in _JSON_KEYS:
                    raise EventError(f"unknown field `{k}` (expected user, event, ts, props, "
                                     "id)", index=i, field=k)
            for k in ("user", "event", "ts"):
                if d.get(k) is None:
                    raise EventError(f"`{k}` is required", index=i, field=k)
            rows.append(self._check_row(d["user"], d["event"], d["ts"], d.get("props"),
                                        d.get("id"), i, clock_ms, iso=True))
        return self._ingest(rows, clock_ms, batch=True)

    def advance(self, ts) -> TransitionList:
        """Move time to ``ts`` (a no-op if not later than now); returns the transitions that
        time caused, each at the instant its rule flipped."""
        clock_ms = self._clock_ms()
        ts = _ts(ts, None)
        out = self._sync(clock_ms)
        out.extend(self._move_time(ts))
        return self._finish(out)

    # ================================================================== traits and scores
    def _check_traits(self, traits, index, kind: str) -> dict:
        if not isinstance(traits, dict):
            raise EventError(f"{kind} must be a dict, got {type(traits).__name__}", index=index,
                             field=kind)
        clean = {}
        for k, v in traits.items():
            if not isinstance(k, str) or not k:
                raise EventError(f"{kind} names must be non-empty strings, got {k!r}",
                                 index=index, field=kind)
            if kind == "traits" and k == "tz":
                _check_tz(v, index)
            if kind == "scores":
                v = _scalar(v)
                finite = (isinstance(v, int) and not isinstance(v, bool)
                          or isinstance(v, float) and math.isfinite(v))
                if v is not None and not finite:
                    raise EventError(f"score `{k}` must be a finite number or None, got {v!r}",
                                     index=index, field=f"scores.{k}")
            elif isinstance(v, int) and not isinstance(v, bool) and not -2 ** 63 <= v < 2 ** 63:
                raise EventError(f"trait `{k}` must fit in 64 bits, got {v}", index=index,
                                 field=f"traits.{k}")
            try:
                v = _prop_value(v)
            except TypeError as e:
                raise EventError(f"a {kind[:-1]} value must be an int, float, str, bool or "
                                 f"None, got {e}", index=index, field=f"{kind}.{k}") from None
            clean[k] = v                        # MISSING deletes
        return clean

    def _set(self, rows: list[tuple[Any, dict]], attr: str, clock_ms, batch: bool):
        plan = self._plan_numbers()
        for i, (u, _) in enumerate(rows):
            self._number(plan, u, i if batch else None)
        out = self._sync(clock_ms)
        self._commit_numbers(plan)
        for i, (u, values) in enumerate(rows):
            user = self._user(u, self._number(plan, u, i))
            store = getattr(user, attr)
            for k, v in values.items():
                if v is MISSING:
                    store.pop(k, None)
                else:
                    store[k] = v
            out.extend(self._reevaluate(user))
        return self._finish(out)

    def set_traits(self, user, traits: dict) -> TransitionList:
        """Set a user's traits (a None value deletes that trait); creates the user if new."""
        clock_ms = self._clock_ms()
        u = _check_user(user, None)
        return self._set([(u, self._check_traits(traits, None, "traits"))], "traits",
                         clock_ms, False)

    def set_traits_many(self, user, **columns) -> TransitionList:
        """Set traits for many users from columns (``user=`` ids, one column per trait); a
        None/NaN entry deletes that trait for that row. Rows are applied in order."""
        clock_ms = self._clock_ms()
        users = _column(user, "user")
        cols = {k: _column(c, f"traits.{k}") for k, c in columns.items()}
        for k, c in cols.items():
            if len(c) != len(users):
                raise EventError(f"column `{k}` has {len(c)} rows but `user` has {len(users)}",
                                 field=f"traits.{k}")
        rows = []
        for i, u in enumerate(users):
            rows.append((_check_user(u, i),
                         self._check_traits({k: c[i] for k, c in cols.items()}, i, "traits")))
        return self._set(rows, "traits", clock_ms, True)

    def set_scores(self, user, scores: dict) -> TransitionList:
        """Set a user's scores (numbers; None deletes)."""
        clock_ms = self._clock_ms()
        u = _check_user(user, None)
        return self._set([(u, self._check_traits(scores, None, "scores"))], "scores",
                         clock_ms, False)

    def forget(self, user) -> bool:
        """Erase a user: every event, trait, score, membership, pending firing and queued
        firing of theirs. Returns whether the engine knew the user. The id may come back later
        as a new user (a string id then gets a new number)."""
        clock_ms = self._clock_ms()
        u = _check_user(user, None)
        out = self._sync(clock_ms)
        rec = self._lookup(u)
        if rec is not None:
            del self._users[rec.number]
            if isinstance(u, str):
                del self._str_numbers[u]
                del self._number_str[rec.number]
            self._queue = collections.deque(f for f in self._queue if f.user != u)
            out = [t for t in out if t.user != u]
            self._held = [t for t in self._held if t.user != u]
        self._finish(out, hold=True)
        return rec is not None

    def alias(self, new, old) -> TransitionList:
        """Merge profile ``old`` into ``new``: every event of ``old`` becomes ``new``'s (in
        arrival order), traits and scores merge (``new``'s values win), ``old`` is forgotten,
        and ``new`` is re-evaluated at now. Returns the transitions: those that catching up
        with the clock caused first (``old``'s under its own id), then ``new``'s."""
        clock_ms = self._clock_ms()
        n, o = _check_user(new, None), _check_user(old, None)
        if type(n) is type(o) and n == o:
            raise EventError("alias needs two different users", field="user")
        plan = self._plan_numbers()
        self._number(plan, n, None)
        out = self._sync(clock_ms)
        ro = self._lookup(o)
        if ro is None:
            return self._finish(out)
        self._commit_numbers(plan)
        rn = self._user(n, self._number(plan, n, None))
        # For the ties of `mode`, old's events count as arriving after new's (keeping their
        # own order): their rank goes above every rank of new's events.
        m = 1 + max((e.mrank for e in rn.events), default=0)
        for e in ro.events:
            e.mrank += m
        rn.events = sorted(rn.events + ro.events, key=lambda e: e.arrival)
        rn.mtop = max((e.mrank for e in rn.events), default=0)
        rn.by_type = {}
        for e in rn.events:
            rn.by_type.setdefault(e.type, []).append(e)
        rn.traits = {**ro.traits, **rn.traits}
        rn.scores = {**ro.scores, **rn.scores}
        rn.cand_key = rn.due_key = None
        del self._users[ro.number]
        if isinstance(o, str):
            del self._str_numbers[o]
            del self._number_str[ro.number]
        self._queue = collections.deque(f for f in self._queue if f.user != o)
        out.extend(self._reevaluate(rn))
        return self._finish(out)

    # ================================================================== reads
    def _read(self) -> None:
        clock_ms = self._clock_ms()
        if clock_ms is not None:
            self._finish(self._move_time(clock_ms), hold=True)

    def members(self, name: str) -> BitMap:
        """Public numbers of the users in segment ``name`` (a fresh BitMap)."""
        self._read()
        return self._members(name)

    def _members(self, name: str) -> BitMap:
        self._segment(name)
        return BitMap(u.number for u in self._users.values() if u.memb[name])

    def size(self, name: str) -> int:
        return len(self.members(name))

    def sizes(self) -> dict[str, int]:
        self._read()
        return {name: sum(1 for u in self._users.values() if u.memb[name]) for name in self._ast}

    def segments_of(self, user) -> list[str]:
        """Segments the user is in, in definition order ([] for an unknown user)."""
        self._read()
        u = self._lookup(user)
        if u is None:
            return []
        return [name for name in self._ast if u.memb[name]]

    def query(self, expr: str) -> BitMap:
        """Bitmap algebra over segment names: ``&``, ``|``, ``-``, ``~`` (complement within all
        known users) and parentheses."""
        self._read()
        universe = BitMap(self._users.keys())
        return _query.evaluate(expr, self._members, universe, self._ast)

    @property
    def now(self) -> int:
        self._read()
        return self._now

    # ================================================================== predictive
    def _require_predictive(self, what):
        return _require_predictive(self._pred, what)

    @property
    def predictive_model(self):
        return self._pred_model

    def predictive_training_data(self) -> dict:
        """What fit_predictive fits on, computed naively from the kept events (users in
        first-appearance order, like the engine's dense order)."""
        spec = self._require_predictive("predictive_training_data()")
        now, DAY = self._now, _predict.DAY
        x, t_x, T, xm, m, X, y = [], [], [], [], [], [], []
        anchor = now // DAY - 8
        lo, hi = (anchor + 1) * DAY, (anchor + 8) * DAY
        for user in self._users.values():
            b = _predict.purchases(spec, user, now)
            if b is not None:
                x.append(b.x)
                t_x.append(b.t_x)
                T.append(b.T)
                if b.xm >= 1 and b.repeat_spend / b.xm > 0:
                    xm.append(b.xm)
                    m.append(b.repeat_spend / b.xm)
            feats, ok = _predict.convert_features(spec, user, anchor)
            if ok and (b is None or b.first >= lo):
                X.append(feats)
                y.append(1.0 if b is not None and b.first < hi else 0.0)
        k = len(spec.convert_events) + 2
        return {"x": np.array(x, dtype=np.float64), "t_x": np.array(t_x), "T": np.array(T),
                "x_m": np.array(xm, dtype=np.float64), "m": np.array(m),
                "X": np.array(X, dtype=np.float64).reshape(-1, k), "y": np.array(y)}

    def fit_predictive(self, *, l2: float = 1.0) -> TransitionList:
        """Fit the built-in scores on the naive training data (see segcore.Engine)."""
        self._require_predictive("fit_predictive()")
        if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
            raise SegcoreError(f"l2 must be a number >= 0, got {l2!r}")
        clock_ms = self._clock_ms()
        out = self._sync(clock_ms)
        model = _pred_fit.fit_from_data(self.predictive_training_data(), self._pred_model,
                                        self._now, l2=float(l2))
        return self._finish(out + self._set_model(model))

    def set_predictive_model(self, model) -> TransitionList:
        spec = self._require_predictive("set_predictive_model()")
        m = _pred_fit.PredictiveModel.coerce(model, spec)
        clock_ms = self._clock_ms()
        out = self._sync(clock_ms)
        return self._finish(out + self._set_model(m))

    def _set_model(self, m):
        self._pred_model = m
        self._rules_version += 1            # every user's crossing instants change
        out = []
        for user in list(self._users.values()):
            out.extend(self._reevaluate(user))
        return out

    def scores_of(self, user) -> dict:
        self._read()
        rec = self._lookup(_check_user(user, None))
        if rec is None:
            return {}
        out = {}
        if self._pred is not None:
            for name in self._pred.score_ids:
                v = _predict.value(self._pred, self._pred_model, rec, name, self._now)
                if v is not MISSING and not math.isnan(v):
                    out[name] = float(v)
        out.update(rec.scores)
        return out

    def predictive_scores(self) -> dict:
        spec = self._require_predictive("predictive_scores()")
        self._read()
        users = list(self._users.values())
        out = {"user": np.array([u.number for u in users], dtype=np.uint32)}
        for name in spec.score_ids:
            vals = [_predict.value(spec, self._pred_model, u, name, self._now) for u in users]
            out[name] = np.array([np.nan if v is MISSING else v for v in vals], dtype=np.float64)
        return out

    def stats(self) -> dict[str, int]:
        self._read()
        return {"users": len(self._users), "segments": len(self._ast), "now": self._now,
                **self._stats}

    # ================================================================== triggers
    def _sync_registration(self) -> None:
        """With a clock, a registration first catches up with it (after validation), so that
        what is registered sees only what happens after it."""
        clock_ms = self._clock_ms()
        if clock_ms is not None:
            self._finish(self._move_time(clock_ms), hold=True)

    def _used_by(self, segment: str) -> list[str]:
        """The triggers and journeys that use ``segment`` (described for an error)."""
        out = []
        for item in self._items:
            if isinstance(item, _Trigger):
                if item.segment == segment:
                    out.append(f"trigger `{item.name}`")
            elif (item.entry == segment or segment in item.exit_on
                  or any(segment in st.refs for st in item.steps)):
                out.append(f"journey `{item.name}`")
        return out

    @staticmethod
    def _opt_duration(v, what: str, positive: bool = False) -> int | None:
        if v is None:
            return None
        ms = R.parse_duration(v)
        if positive and ms <= 0:
            raise RuleError(f"`{what}` must be a positive duration, got `{v}`")
        return ms

    @staticmethod
    def _max_per(v, what: str = "max_per") -> tuple[int, int] | None:
        if v is None:
            return None
        if not isinstance(v, (tuple, list)) or len(v) != 2:
            raise SegcoreError(f"`{what}` must be a pair (n, window), got `{v!r}`")
        n, w = v
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SegcoreError(f"`{what}`: n must be an int >= 1, got `{n!r}`")
        ms = R.parse_duration(w)
        if ms <= 0:
            raise SegcoreError(f"`{what}`: the window must be a positive duration, got `{w!r}`")
        return n, ms

    @staticmethod
    def _channel(channel) -> str | None:
        if channel is not None and (not isinstance(channel, str) or not channel):
            raise RuleError(f"a channel must be a non-empty string, got `{channel!r}`")
        return channel

    def add_trigger(self, name: str, segment: str, on: str = "enter", *, after=None,
                    cooldown=None, max_per=None, once: bool = False, channel: str | None = None,
                    fn: Callable | None = None) -> None:
        """Register a trigger (docs/triggers.md) named ``name`` on the entries (``on="enter"``)
        or exits (``on="exit"``) of ``segment``. Its firings are queued for
        :meth:`drain_firings`; ``fn`` (optional) is called with each delivered one."""
        if on not in ("enter", "exit"):
            raise SegcoreError(f"`on` must be \"enter\" or \"exit\", got `{on!r}`")
        self._add_trigger(name=name, segment=segment, entered=on == "enter", after=after,
                          cooldown=cooldown, max_per=max_per, once=once, channel=channel, fn=fn)

    def _make_trigger(self, name, segment, entered, after, cooldown, max_per, once, channel,
                      fn) -> _Trigger:
        """Validate a trigger's definition (nothing changes)."""
        self._segment(segment)
        if name is None:
            name = f"{segment}:{'enter' if entered else 'exit'}:{len(self._triggers)}"
        if not isinstance(name, str) or not name:
            raise RuleError(f"a trigger name must be a non-empty string, got `{name!r}`")
        if name in self._triggers or name in self._journeys:
            raise RuleError(f"a trigger or journey named `{name}` already exists")
        if not isinstance(once, bool):
            raise SegcoreError(f"once must be a bool, got `{once!r}`")
        after_ms = self._opt_duration(after, "after") or 0     # 0: immediate
        cooldown_ms = self._opt_duration(cooldown, "cooldown")
        mp = self._max_per(max_per)
        channel = self._channel(channel)
        if fn is not None and not callable(fn):
            raise SegcoreError("a callback must be callable")
        return _Trigger(name, segment, entered, after_ms, cooldown_ms, mp, bool(once), channel,
                        fn)

    def _add_trigger(self, **kw) -> None:
        tg = self._make_trigger(**kw)
        self._sync_registration()
        self._triggers[tg.name] = tg
        self._items.append(tg)

    def _register(self, segment, fn, entered: bool, opts: dict):
        if fn is None:
            # validate now (the decorator registers; a default name is given then)
            self._make_trigger(segment=segment, entered=entered, fn=None, **opts)

            def deco(f):
                self._add_trigger(segment=segment, entered=entered, fn=f, **opts)
                return f

            return deco
        self._add_trigger(segment=segment, entered=entered, fn=fn, **opts)
        return fn

    def on_enter(self, segment: str, fn: Callable | None = None, *, after=None, cooldown=None,
                 max_per=None, once: bool = False, channel: str | None = None,
                 name: str | None = None):
        """Register a trigger on the entries of ``segment``: ``fn(firing)`` is called for each
        delivered firing (usable as a decorator). Options: ``after`` (fire only if the user is
        still in after that long), ``cooldown``, ``max_per=(n, window)``, ``once``,
        ``channel`` (see :meth:`cap`) and ``name``. Returns ``fn``."""
        return self._register(segment, fn, True, dict(
            after=after, cooldown=cooldown, max_per=max_per, once=once, channel=channel,
            name=name))

    def on_exit(self, segment: str, fn: Callable | None = None, *, after=None, cooldown=None,
                max_per=None, once: bool = False, channel: str | None = None,
                name: str | None = None):
        """Register a trigger on the exits of ``segment`` (see :meth:`on_enter`)."""
        return self._register(segment, fn, False, dict(
            after=after, cooldown=cooldown, max_per=max_per, once=once, channel=channel,
            name=name))

    def cap(self, channel: str, max_per) -> None:
        """Cap the delivered firings on ``channel`` (triggers and journey steps alike) to
        ``max_per=(n, window)`` per user; ``max_per=None`` lifts the cap. A cap counts the
        firings delivered on the channel since the channel was first capped."""
        channel = self._channel(channel)
        if channel is None:
            raise RuleError("a channel must be a non-empty string, got `None`")
        self._caps[channel] = self._max_per(max_per)

    def journey(self, name: str, entry: str, exit_on=None) -> Journey:
        """Register a journey: users enter it by entering ``entry`` and leave it when they
        leave ``entry`` or enter a segment of ``exit_on``; add steps with ``.step()``."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RuleError(f"`{name}` is not a valid journey name (letters, digits and "
                            "underscores, not starting with a digit)")
        if name in self._journeys or name in self._triggers:
            raise RuleError(f"a trigger or journey named `{name}` already exists")
        self._segment(entry)
        if exit_on is None:
            exit_on = []
        elif isinstance(exit_on, str):
            exit_on = [exit_on]
        exit_on = list(exit_on)
        for s in exit_on:
            self._segment(s)
        j = Journey(self, name, entry, exit_on)
        self._sync_registration()
        self._journeys[name] = j
        self._items.append(j)
        return j

    def _add_step(self, j: Journey, after, do, only_if, channel) -> None:
        after_ms = R.parse_duration(after)
        if do is not None and not callable(do):
            raise SegcoreError("a callback must be callable")
        channel = self._channel(channel)
        ast, refs = None, []
        if only_if is not None:
            ast, _ = self._compile(f"{j.name}:{len(j.steps)}", only_if, list(self._ast))
            refs = R.references(ast)
        self._sync_registration()
        j.steps.append(_Step(after_ms, do, ast, refs, channel))
        # re-registered: the users in it leave it
        for user in self._users.values():
            user.jstate.pop(j.name, None)

    def journey_state(self, user) -> dict:
        """The journeys ``user`` is in: name -> ``{"step": k, "due": ts, "since": ts}`` (the
        pending step, 0-based, its due instant, and the instant the user entered)."""
        self._read()
        u = self._lookup(user)
        if u is None:
            return {}
        return {name: {"step": js[0], "due": js[1], "since": js[2]}
                for name in self._journeys if (js := u.jstate.get(name)) is not None}

    def drain_firings(self) -> list:
        """Every firing (delivered or suppressed) since the last drain, in order."""
        self._read()
        out = list(self._queue)
        self._queue.clear()
        return out
