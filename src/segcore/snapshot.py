"""Snapshots: an engine's whole state in one file, restored exactly (no pickle).

Layout (all integers little-endian)::

    b"SEGCORE-SNAP\\0\\0\\0\\0"   16 bytes of magic
    u32  format version (1)
    u64  length of the metadata
    ...  metadata: msgspec MessagePack (rules, triggers, id maps, interned values, traits,
         policies, counters, and a table of the sections: name, dtype, offset, length)
    ...  sections: raw little-endian array buffers (kernel state) and roaring bitmaps in the
         portable format, back to back
    32   BLAKE2b-256 digest of everything before it

Restoring checks the magic, version and digest first, then decodes the metadata into typed
structures and validates every section's dtype, offset and size before anything uses it, and
the kernel validates the shapes of its arrays against the recompiled plan. A truncated,
corrupted or hostile file raises :class:`~segcore.SnapshotError`; it never crashes the process.

>>> import io, segcore
>>> eng = segcore.Engine()
>>> _ = eng.add_segment("recent", "did(x, 1h)")
>>> _ = eng.track(1, "x", ts=0)
>>> buf = io.BytesIO()
>>> eng.snapshot(buf)
>>> twin = segcore.Engine.restore(io.BytesIO(buf.getvalue()))
>>> sorted(twin.members("recent")), twin.advance(3_600_000).to_list()
([1], [Transition(user=1, segment='recent', entered=False, ts=3600000)])
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections import deque
from typing import Any, Union

import msgspec
import numpy as np

from .errors import SegcoreError, SnapshotError
from .hashing import N_BUCKETS

__all__ = ["write", "read", "MAGIC", "VERSION"]

MAGIC = b"SEGCORE-SNAP\0\0\0\0"
VERSION = 1
_HEAD = struct.Struct("<16sIQ")
_DIGEST = 32
_DTYPES = {"i8": np.int64, "f8": np.float64, "u1": np.uint8, "i4": np.int32, "u4": np.uint32,
           "raw": np.uint8}
#: Refuse absurd files before reading them whole (a snapshot is state, not a data lake).
MAX_BYTES = 1 << 40

Scalar = Union[str, int, float, bool, None]


class Section(msgspec.Struct, frozen=True):
    name: str
    dtype: str
    offset: int
    length: int          # in elements


class TriggerMeta(msgspec.Struct, frozen=True, tag="trigger"):
    name: str
    segment: str
    entered: bool
    after_ms: int
    cooldown_ms: Union[int, None]
    max_per: Union[tuple[int, int], None]
    once: bool
    channel: Union[str, None]


class StepMeta(msgspec.Struct, frozen=True):
    after_ms: int
    only_if: Union[str, None]
    channel: Union[str, None]


class JourneyMeta(msgspec.Struct, frozen=True, tag="journey"):
    name: str
    entry: str
    exits: list[str]
    steps: list[StepMeta]


class Meta(msgspec.Struct, frozen=True):
    max_future_ms: int
    seed: int
    dedup_ms: int
    event_types: Union[list[str], None]
    max_queue: int
    segments: list[tuple[str, str]]          # public (name, rule text), definition order
    hidden: list[tuple[str, str]]            # journey only_if conditions
    items: list[Union[TriggerMeta, JourneyMeta]]
    item_kinds: list[str]
    event_names: list[str]
    event_counts: list[int]
    values: list[tuple[bool, Scalar]]        # interned property values, in code order
    n_users: int
    erased: list[int]                        # dense slots of forgotten users
    now: int
    str_users: list[tuple[int, str]]         # (public number, string id)
    next_str: int
    stats: dict[str, int]
    seen_ids: list[tuple[Union[str, int], int]]
    traits: dict[str, list[Scalar]]
    scores: list[tuple[int, dict[str, float]]]
    caps: dict[str, Union[tuple[int, int], None]]
    once: list[tuple[str, int]]
    last: list[tuple[str, int, int]]
    hist: list[tuple[str, int, list[int]]]
    chan: list[tuple[str, int, list[int]]]
    queue: list[Any]
    sections: list[Section]
    shard_seq: int = 0                       # last call applied from a ShardedEngine driver
    session_ms: int = 1_800_000              # Engine(session_timeout=...)
    seq_cap: int = 1024                      # Engine(seq_max_events=...)
    compact: bool = False                    # Engine(compact_rows=...)
    predictive: Union[dict[str, Any], None] = None   # Engine(predictive=...), normalised
    pred_model: Any = None                   # its fitted model (PredictiveModel builtins)


def _fail(reason: str) -> SnapshotError:
    return SnapshotError(f"cannot restore snapshot: {reason}")


# ---------------------------------------------------------------- writing
_KERNEL = (("istate", "i8"), ("fstate", "f8"), ("members", "u1"), ("tbits", "u1"),
           ("scores", "f8"), ("bucket", "i4"), ("wake", "i8"), ("fresh", "u1"), ("dead", "i8"),
           ("jpos", "i4"), ("pool_count", "i8"), ("pool_ts", "i8"), ("pool_val", "f8"),
           ("pool_key", "i8"), ("pool_aux", "i8"))
_POOL = ("k:pool_ts", "k:pool_val", "k:pool_key", "k:pool_aux")
_DTYPE_OF = {"k:" + k: d for k, d in _KERNEL} | {"pub": "u4"}


def write(eng, target) -> None:
    """Write ``eng``'s state to a path or a binary file object."""
    meta, arrays = state(eng)
    chunks = encode(meta, arrays)
    if isinstance(target, (str, os.PathLike)):
        tmp = f"{os.fspath(target)}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)       # atomic: a crash leaves the old snapshot or the new one
    else:
        for c in chunks:
            target.write(c)


def encode(meta: "Meta", arrays: dict) -> list[bytes]:
    """The file's chunks for a state: arrays are numpy arrays (dtype from the section name)
    or, for ``bitmap:*`` sections, bytes."""
    raw: list[tuple[str, str, bytes]] = []
    for name, arr in arrays.items():
        if isinstance(arr, (bytes, bytearray)):
            raw.append((name, "raw", bytes(arr)))
        else:
            dt = _DTYPE_OF[name]
            raw.append((name, dt, np.ascontiguousarray(arr, dtype=_DTYPES[dt])
                        .astype(np.dtype(_DTYPES[dt]).newbyteorder("<")).tobytes()))
    sections, offset = [], 0
    for name, dtype, data in raw:
        size = np.dtype(_DTYPES[dtype]).itemsize
        sections.append(Section(name, dtype, offset, len(data) // size))
        offset += len(data)
    meta = msgspec.structs.replace(meta, sections=sections)
    meta_bytes = msgspec.msgpack.encode(meta)
    h = hashlib.blake2b(digest_size=_DIGEST)
    chunks = [_HEAD.pack(MAGIC, VERSION, len(meta_bytes)), meta_bytes] + [a[2] for a in raw]
    for c in chunks:
        h.update(c)
    chunks.append(h.digest())
    return chunks


def state(eng) -> tuple["Meta", dict]:
    """An engine's state as (metadata, arrays), the arrays as numpy copies and the bitmaps
    in roaring's portable format."""
    from .engine import _plain
    from .triggers import JourneySpec, TriggerSpec

    ks = eng._kernel.export_state()
    arrays: dict[str, Any] = {"k:" + name: ks[name] for name, _ in _KERNEL}
    arrays["pub"] = eng._pub[: eng._n_users].copy()
    for name in eng._asts:
        arrays["bitmap:" + name] = eng._bitmaps[name].serialize()
    items, kinds = [], []
    for it in eng._items:
        if isinstance(it, TriggerSpec):
            kinds.append("trigger")
            items.append(TriggerMeta(it.name, it.segment, it.entered, it.after_ms,
                                     it.cooldown_ms, it.max_per, it.once, it.channel))
        elif isinstance(it, JourneySpec):
            kinds.append("journey")
            items.append(JourneyMeta(it.name, it.entry, list(it.exits),
                                     [StepMeta(s.after_ms, s.only_if, s.channel)
                                      for s in it.steps]))
    pol = eng._policies
    n = eng._n_users
    meta = Meta(
        max_future_ms=eng._max_future_ms, seed=eng._seed, dedup_ms=eng._dedup_ms,
        session_ms=eng._session_ms, seq_cap=eng._seq_cap, compact=eng._compact,
        event_types=None if eng._event_types is None else sorted(eng._event_types),
        max_queue=eng._max_queue,
        segments=list(eng._texts.items()),
        hidden=[(k, _text(v)) for k, v in eng._hidden.items()],
        items=items, item_kinds=kinds,
        event_names=list(eng._event_names),
        event_counts=[int(c) for c in eng._event_counts[: len(eng._event_names)]],
        values=[(k[0], k[1]) for k in eng._values],
        n_users=n, erased=sorted(eng._erased), now=int(ks["now"]), str_users=sorted(eng._str_num.items()), next_str=eng._next_str,
        stats={**eng._stats, "seq_evicted": eng._evicted()},
        seen_ids=list(eng._seen_ids.items()),
        traits={k: [_plain(v) for v in col[:n].tolist()] for k, col in eng._traits.cols.items()},
        scores=sorted((d, dict(v)) for d, v in eng._scores.items()),
        caps=dict(pol.caps), once=sorted(pol.once),
        last=sorted((k[0], k[1], t) for k, t in pol.last.items()),
        hist=sorted((k[0], k[1], list(q)) for k, q in pol.hist.items()),
        chan=sorted((k[0], k[1], list(q)) for k, q in pol.chan.items()),
        queue=list(eng._queue),
        sections=[],
        shard_seq=eng._shard_seq,
        predictive=None if eng._pred is None else {
            "purchase": eng._pred.purchase, "amount": eng._pred.amount,
            "convert_events": list(eng._pred.convert_events), "horizon": eng._pred.horizon_ms},
        pred_model=msgspec.to_builtins(eng._pred_model),
    )
    return meta, arrays


def _text(ast) -> str:
    from .rules import to_text
    return to_text(ast)


# ---------------------------------------------------------------- reading
def _read_bytes(source) -> bytes:
    try:
        if isinstance(source, (str, os.PathLike)):
            size = os.path.getsize(source)
            if size > MAX_BYTES:
                raise _fail(f"file of {size} bytes is too large")
            with open(source, "rb") as f:
                return f.read()
        if isinstance(source, (bytes, bytearray, memoryview)):
            return bytes(source)
        if not callable(getattr(source, "read", None)):
            raise _fail(f"expected a path, bytes or a binary file object, got "
                        f"{type(source).__name__}")
        data = source.read()
    except OSError as e:
        raise _fail(f"cannot read it ({e})") from None
    if not isinstance(data, (bytes, bytearray)):
        raise _fail("the file object must be opened in binary mode")
    return bytes(data)


def read(source, *, clock=None, callbacks=None):
    """Restore an engine from a path, bytes, or a binary file object."""
    meta, arrays = parse(_read_bytes(source))
    return rebuild(meta, arrays, clock=clock, callbacks=callbacks)


def rebuild(meta: "Meta", arrays: dict, *, clock=None, callbacks=None,
            derive_bitmaps: bool = False):
    """An engine from (metadata, arrays); every inconsistency is a SnapshotError. With
    ``derive_bitmaps`` the segment bitmaps are computed from the kernel's member bits
    (a state assembled by :func:`select` / :func:`merge` has none)."""
    try:
        return _rebuild(meta, arrays, clock, callbacks, derive_bitmaps)
    except SnapshotError:
        raise
    except (SegcoreError, ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        raise _fail(f"inconsistent state ({type(e).__name__}: {e})") from None


def parse(data: bytes) -> tuple["Meta", dict]:
    """Check a snapshot's framing and digest and decode it into (metadata, arrays)."""
    if len(data) < _HEAD.size + _DIGEST:
        raise _fail(f"truncated ({len(data)} bytes)")
    magic, version, meta_len = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise _fail("not a segcore snapshot (bad magic)")
    if version != VERSION:
        raise _fail(f"unsupported format version {version} (this segcore reads {VERSION})")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise _fail("checksum mismatch (the file is truncated or corrupted)")
    if meta_len > len(body) - _HEAD.size:
        raise _fail("metadata length is past the end of the file")
    try:
        meta = msgspec.msgpack.decode(data[_HEAD.size:_HEAD.size + meta_len], type=Meta)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise _fail(f"bad metadata ({e})") from None
    payload = memoryview(body)[_HEAD.size + meta_len:]
    arrays: dict[str, Any] = {}
    for sec in meta.sections:
        if sec.dtype not in _DTYPES or sec.name in arrays:
            raise _fail(f"bad section `{sec.name}`")
        size = np.dtype(_DTYPES[sec.dtype]).itemsize
        if sec.offset < 0 or sec.length < 0 or sec.offset + sec.length * size > len(payload):
            raise _fail(f"section `{sec.name}` is out of bounds")
        raw = payload[sec.offset: sec.offset + sec.length * size]
        if sec.dtype == "raw":
            arrays[sec.name] = bytes(raw)
        else:
            arrays[sec.name] = np.frombuffer(
                raw, dtype=np.dtype(_DTYPES[sec.dtype]).newbyteorder("<")).astype(
                _DTYPES[sec.dtype])
    return meta, arrays


def _rebuild(meta: Meta, arrays: dict, clock, callbacks, derive_bitmaps=False):
    from pyroaring import BitMap

    from . import rules as R
    from ._kernel import IdMap
    from .compile import compile_segments
    from .engine import Engine, _TraitStore
    from .triggers import Firing, JourneySpec, StepSpec, TriggerSpec

    callbacks = dict(callbacks or {})
    try:
        eng = Engine(clock=clock, max_future=meta.max_future_ms, seed=meta.seed,
                     dedup_horizon=meta.dedup_ms, event_types=meta.event_types,
                     max_queued_firings=meta.max_queue, session_timeout=meta.session_ms,
                     seq_max_events=meta.seq_cap, predictive=meta.predictive,
                     compact_rows=meta.compact)
        if meta.pred_model is not None and eng._pred is not None:
            from .predict import PredictiveModel
            eng._pred_model = PredictiveModel.coerce(meta.pred_model, eng._pred)
    except SnapshotError:
        raise
    except SegcoreError as e:
        raise _fail(f"bad engine options ({e})") from None
    # (a predictive engine has interned its purchase and convert event types already)
    for i, name in enumerate(meta.event_names):
        if not isinstance(name, str) or not name or eng._event_code(name) != i:
            raise _fail("duplicate or empty event type")
    if len(eng._event_names) != len(meta.event_names):
        raise _fail("the event types do not match the engine options")
    if len(meta.event_counts) != len(meta.event_names) or min(meta.event_counts, default=0) < 0:
        raise _fail("the event counts do not match the event types")
    names = [n for n, _ in meta.segments]
    asts = {}
    for name, text in meta.segments:
        asts[name] = R.parse_full(text, segment=name, segments=set(names)).ast
    hidden = {name: R.parse_full(text, segment=name, segments=set(names)).ast
              for name, text in meta.hidden}
    items = []
    if len(meta.items) != len(meta.item_kinds):
        raise _fail("item kinds do not match the items")
    for it in meta.items:
        if isinstance(it, TriggerMeta):
            if it.segment not in asts:
                raise _fail(f"trigger `{it.name}` names an unknown segment")
            items.append(TriggerSpec(it.name, it.segment, it.entered, it.after_ms,
                                     it.cooldown_ms, it.max_per, it.once, it.channel,
                                     callbacks.pop(it.name, None)))
        else:
            if it.entry not in asts or any(x not in asts for x in it.exits) or any(
                    s.only_if is not None and s.only_if not in hidden for s in it.steps):
                raise _fail(f"journey `{it.name}` names an unknown segment")
            items.append(JourneySpec(it.name, it.entry, list(it.exits), [
                StepSpec(s.after_ms, callbacks.pop(f"{it.name}:{k}", None), s.only_if,
                         s.channel) for k, s in enumerate(it.steps)]))
    if callbacks:
        raise SegcoreError("callbacks for unknown triggers: "
                           + ", ".join(f"`{k}`" for k in sorted(callbacks)))
    # interned values first: the rules' mode() constants are looked up among them
    eng._values = {}
    for is_s, v in meta.values:
        if is_s != isinstance(v, str):
            raise _fail("bad interned value")
        eng._values[(is_s, v)] = len(eng._values)
    eng._value_keys = list(eng._values)
    if len(eng._value_keys) != len(meta.values):
        raise _fail("an interned value appears twice")
    plan = eng._compile({**asts, **hidden}, [it.item() for it in items])
    if len(eng._event_names) != len(meta.event_names):
        raise _fail("the rules name event types the snapshot does not list")
    kernel = eng._new_kernel(plan)
    st = {k[2:]: v for k, v in arrays.items() if k.startswith("k:")}
    st.update(n_users=meta.n_users, now=meta.now)
    kernel.import_state(st)
    eng._kernel = kernel
    eng._set_plan(plan)
    eng._asts = asts
    eng._texts = dict(meta.segments)
    eng._hidden = hidden
    eng._items = items
    # ids
    n = meta.n_users
    pub = arrays.get("pub")
    if not isinstance(pub, np.ndarray) or len(pub) != n:
        raise _fail("user numbers do not match the user count")
    eng._pub = np.zeros(max(16, n), dtype=np.uint32)
    eng._pub[:n] = pub
    eng._n_users = n
    erased = set(meta.erased)
    if any(not 0 <= d < n for d in erased):
        raise _fail("erased slot out of range")
    eng._erased = erased
    for d in erased:                # (marks the slots erased in snapshots from before the
        eng._kernel.forget(d)       # kernel kept that mark; they hold nothing either way)
    alive = np.ones(n, dtype=bool)
    alive[list(erased)] = False
    bucket = arrays["k:bucket"]             # (the kernel's import checked its length)
    if ((bucket < 0) | (bucket >= N_BUCKETS))[alive].any():
        raise _fail("a user's bucket is out of range")
    eng._str_num = dict(meta.str_users)
    if len(eng._str_num) != len(meta.str_users):
        raise _fail("a user number is given twice")
    eng._str_dense = {}
    is_str = np.zeros(n, dtype=bool)
    for d, num in enumerate(pub.tolist()):
        s = eng._str_num.get(num) if alive[d] else None
        if s is not None:
            if s in eng._str_dense:
                raise _fail("a string id appears twice")
            eng._str_dense[s] = d
            is_str[d] = True
    if len(eng._str_dense) != len(eng._str_num):
        raise _fail("string ids do not match the user numbers")
    int_slots = ~is_str & alive
    ints = pub[int_slots]
    if len(np.unique(ints)) != len(ints):
        raise _fail("a user number appears twice")
    eng._int_dense = IdMap(max(16, len(ints)))
    eng._int_dense.insert(np.ascontiguousarray(ints, dtype=np.uint32),
                          np.flatnonzero(int_slots).astype(np.int64))
    eng._next_str = meta.next_str
    eng._all = BitMap(pub[alive].astype(np.uint32))
    # events, values, dedup
    eng._event_counts = list(meta.event_counts) + [0] * max(0, 16 - len(meta.event_counts))
    eng._shard_seq = meta.shard_seq
    eng._seen_ids = dict(meta.seen_ids)
    eng._stats.update({k: int(v) for k, v in meta.stats.items() if k in eng._stats})
    # profiles
    store = _TraitStore()
    store.reserve(n)
    for name, values in meta.traits.items():
        if len(values) != n:
            raise _fail(f"trait `{name}` does not cover every user")
        col = np.empty(len(values), dtype=object)
        col[:] = values
        store.set(name, np.arange(n), col)
    eng._traits = store
    eng._scores = {}
    for d, sc in meta.scores:
        if not 0 <= d < n:
            raise _fail("scores of an unknown user")
        eng._scores[d] = dict(sc)
    # policies and queue
    pol = eng._policies
    pol.caps = dict(meta.caps)
    pol.once = {(a, b) for a, b in meta.once}
    pol.last = {(a, b): t for a, b, t in meta.last}
    pol.hist = {(a, b): deque(ts) for a, b, ts in meta.hist}
    pol.chan = {(a, b): deque(ts) for a, b, ts in meta.chan}
    eng._queue = deque(msgspec.convert(f, Firing) for f in meta.queue)
    # bitmaps, checked against the kernel's member bits
    members = kernel.export_state()["members"].reshape(n, max(len(plan.names), 1)) if n else \
        np.zeros((0, max(len(plan.names), 1)), np.uint8)
    eng._bitmaps = {}
    for name in asts:
        raw = arrays.get("bitmap:" + name)
        col = plan.names.index(name)
        want = BitMap(pub[(members[:, col] != 0) & alive].astype(np.uint32)) if n else \
            BitMap()
        if raw is None and derive_bitmaps:
            eng._bitmaps[name] = want
            continue
        if raw is None:
            raise _fail(f"bitmap of `{name}` is missing")
        try:
            bm = BitMap.deserialize(raw)
        except Exception:  # noqa: BLE001 - pyroaring raises various errors on bad input
            raise _fail(f"bitmap of `{name}` is corrupted") from None
        if bm != want:
            raise _fail(f"bitmap of `{name}` disagrees with the kernel state")
        eng._bitmaps[name] = bm
    return eng


def to_bytes(eng) -> bytes:
    buf = io.BytesIO()
    write(eng, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- moving users between engines
def _strides(meta: Meta, arrays: dict, other: dict | None = None) -> dict[str, int]:
    """Elements per user of every per-user section (taken from ``other`` when this state has
    no users to divide by)."""
    n = meta.n_users
    out = {}
    for name, arr in arrays.items():
        if name in _POOL or name.startswith("bitmap:"):
            continue
        if n:
            if len(arr) % n:
                raise _fail(f"section `{name}` is not a whole number of users")
            out[name] = len(arr) // n
        elif other is not None and name in other:
            out[name] = other[name]
        else:
            out[name] = 0
    return out


def _pool_rows(counts: np.ndarray, n_var: int, rows: np.ndarray) -> np.ndarray:
    """Indices into the pool entry arrays of the pools of users ``rows`` (in order)."""
    if not n_var or not len(rows):
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    per = counts.reshape(-1, n_var)[rows].reshape(-1)
    st = starts.reshape(-1, n_var)[rows].reshape(-1)
    if not per.sum():
        return np.zeros(0, np.int64)
    rep = np.repeat(st - np.concatenate(([0], np.cumsum(per)[:-1])), per)
    return np.arange(int(per.sum()), dtype=np.int64) + rep


def select(meta: Meta, arrays: dict, rows) -> tuple[Meta, dict]:
    """The state of users ``rows`` (dense slots of live users) alone, numbered 0..k-1: their
    kernel state, ids, traits, scores, trigger histories and queued firings. Rules, event
    types and interned values stay whole; counters, dedup ids and bitmaps are left out."""
    n = meta.n_users
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n or set(rows.tolist()) & set(meta.erased)):
        raise _fail("select: a row is not a live user")
    strides = _strides(meta, arrays)
    out: dict[str, Any] = {}
    for name, k in strides.items():
        out[name] = arrays[name].reshape(n, k)[rows].reshape(-1) if n else arrays[name]
    n_var = strides.get("k:pool_count", 0)
    take = _pool_rows(arrays["k:pool_count"], n_var, rows) if n else np.zeros(0, np.int64)
    for name in _POOL:
        out[name] = arrays[name][take]
    remap = {int(d): i for i, d in enumerate(rows.tolist())}
    pub = out["pub"]
    nums = set(pub.tolist())
    strs = [(num, sid) for num, sid in meta.str_users if num in nums]
    ids = {sid for _, sid in strs} | {int(x) for x in pub.tolist()} - {num for num, _ in strs}
    sub = msgspec.structs.replace(
        meta, n_users=len(rows), erased=[], str_users=strs,
        event_counts=[0] * len(meta.event_counts), stats={k: 0 for k in meta.stats},
        seen_ids=[],
        traits={k: [v[d] for d in rows.tolist()] for k, v in meta.traits.items()},
        scores=[(remap[d], sc) for d, sc in meta.scores if d in remap],
        once=[(a, remap[d]) for a, d in meta.once if d in remap],
        last=[(a, remap[d], t) for a, d, t in meta.last if d in remap],
        hist=[(a, remap[d], q) for a, d, q in meta.hist if d in remap],
        chan=[(a, remap[d], q) for a, d, q in meta.chan if d in remap],
        queue=[f for f in meta.queue if _firing_user(f) in ids],
        sections=[], shard_seq=0)
    return sub, out


def _firing_user(f):
    return f.get("user") if isinstance(f, dict) else getattr(f, "user", None)


def merge(a: tuple[Meta, dict], b: tuple[Meta, dict]) -> tuple[Meta, dict]:
    """``a``'s state with ``b``'s users added after its own. Both must share rules, triggers,
    event types and interned values (the shards of one ShardedEngine do), and no user."""
    ma, xa = a
    mb, xb = b
    for field in ("segments", "hidden", "items", "item_kinds", "event_names", "values"):
        if getattr(ma, field) != getattr(mb, field):
            raise _fail(f"merge: the two states differ in `{field}`")
    na, nb = ma.n_users, mb.n_users
    sa, sb = _strides(ma, xa, None), None
    sb = _strides(mb, xb, sa)
    sa = _strides(ma, xa, sb)
    if sa != sb:
        raise _fail("merge: the kernel layouts differ")
    out: dict[str, Any] = {}
    for name in sa:
        out[name] = np.concatenate([xa[name], xb[name]])
    for name in _POOL:
        out[name] = np.concatenate([xa[name], xb[name]])
    nums_a = {num for num, _ in ma.str_users}
    if nums_a & {num for num, _ in mb.str_users}:
        raise _fail("merge: a user number is in both states")
    names = list(dict.fromkeys([*ma.traits, *mb.traits]))
    traits = {k: list(ma.traits.get(k, [None] * na)) + list(mb.traits.get(k, [None] * nb))
              for k in names}
    seen = dict(ma.seen_ids)
    for k, t in mb.seen_ids:
        seen.setdefault(k, t)
    merged = msgspec.structs.replace(
        ma, n_users=na + nb, now=max(ma.now, mb.now), next_str=min(ma.next_str, mb.next_str),
        str_users=sorted(ma.str_users + mb.str_users), traits=traits,
        seen_ids=list(seen.items()),
        scores=ma.scores + [(d + na, sc) for d, sc in mb.scores],
        once=ma.once + [(x, d + na) for x, d in mb.once],
        last=ma.last + [(x, d + na, t) for x, d, t in mb.last],
        hist=ma.hist + [(x, d + na, q) for x, d, q in mb.hist],
        chan=ma.chan + [(x, d + na, q) for x, d, q in mb.chan],
        queue=ma.queue + mb.queue, sections=[])
    return merged, out
