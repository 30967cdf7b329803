"""The HTTP server: a thin Starlette + msgspec wrapper over one :class:`~segcore.Engine`.

``segcore serve --rules RULES`` runs it on uvicorn (``pip install 'segcore[server]'``);
:func:`create_app` gives the ASGI app for an engine you built yourself. Every behaviour lives
in the engine: the server only decodes requests, calls it, and encodes what it returns.

* One process owns one engine, and every engine call happens on the event loop's thread
  (the endpoints are ``async`` and call the engine directly; nothing runs in a thread pool).
* JSON in and out through msgspec; every error is ``{"error": {"type", "message", "path"}}``
  with a 4xx status, and a rejected request changes nothing.
* ``GET /v1/stream`` sends transitions and trigger firings as Server-Sent Events from a
  bounded buffer; ``Last-Event-ID`` resumes, and a ``gap`` event says when it cannot.
* ``GET /metrics`` is Prometheus text; ``GET /openapi.json`` is generated from the msgspec
  types below.

The endpoints, their bodies and the security notes are in ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Union

import msgspec
import numpy as np

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
except ImportError as _e:  # pragma: no cover - depends on the installed extras
    raise ImportError("segcore.server needs the server extra: pip install 'segcore[server]' "
                      f"({_e})") from None

from . import rules as R
from . import wal as _wal
from .engine import Engine, Transition, Transitions, _to_ms
from .errors import EventError, RuleError, SegcoreError
from .triggers import Firing, TriggerSpec

__all__ = ["create_app", "build_engine", "serve", "ServeError", "DEFAULT_MAX_BODY"]

log = logging.getLogger("segcore.server")

DEFAULT_MAX_BODY = 10_000_000       # bytes of a request body (413 above)
DEFAULT_STREAM_BUFFER = 100_000     # transitions and firings kept for SSE resume
DEFAULT_PAGE = 1_000                # members per page
MAX_PAGE = 100_000
_PING_S = 15.0                      # SSE keep-alive comment when nothing happens
_STREAM_CHUNK = 5_000               # SSE events written per chunk
_U32 = 2 ** 32


# ------------------------------------------------------------------ wire types (msgspec)
UserId = Union[int, str]
Int64 = Annotated[int, msgspec.Meta(ge=-2 ** 63, le=2 ** 63 - 1)]
Scalar = Union[str, Int64, float, bool, None]
Score = Union[float, None]


class EventIn(msgspec.Struct, forbid_unknown_fields=True):
    """One event of ``POST /v1/events``: ``ts`` in ms since the epoch or ISO 8601."""
    user: UserId
    event: str
    ts: Union[int, str]
    props: Union[dict[str, Scalar], None] = None
    id: Union[str, Int64, None] = None


class TransitionOut(msgspec.Struct):
    """A user entering (``entered``) or leaving a segment at engine time ``ts``."""
    user: UserId
    segment: str
    entered: bool
    ts: int


class EventsResponse(msgspec.Struct):
    accepted: int
    duplicates: int
    transitions: list[TransitionOut]


class AdvanceIn(msgspec.Struct, forbid_unknown_fields=True):
    ts: Union[Int64, str]


class TransitionsResponse(msgspec.Struct):
    now: int
    transitions: list[TransitionOut]


class SegmentInfo(msgspec.Struct):
    name: str
    rule: str
    size: int


class SegmentList(msgspec.Struct):
    segments: list[SegmentInfo]


class SegmentIn(msgspec.Struct, forbid_unknown_fields=True):
    rule: str


class SegmentPut(msgspec.Struct):
    name: str
    rule: str
    size: int
    created: bool
    transitions: list[TransitionOut]


class SegmentSize(msgspec.Struct):
    name: str
    size: int


class MembersPage(msgspec.Struct):
    """A page of members in ascending user-number order; pass ``next_cursor`` back as
    ``cursor`` for the next page (null on the last one)."""
    size: int
    members: list[UserId]
    next_cursor: Union[str, None]


class QueryIn(msgspec.Struct, forbid_unknown_fields=True):
    expr: str
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE
    cursor: Union[Annotated[str, msgspec.Meta(pattern="^[0-9]{1,10}$")], None] = None


class UserSegments(msgspec.Struct):
    user: UserId
    segments: list[str]


class UserChange(msgspec.Struct):
    user: UserId
    transitions: list[TransitionOut]


class Forgotten(msgspec.Struct):
    user: UserId
    forgotten: bool


class TriggerIn(msgspec.Struct, forbid_unknown_fields=True):
    """A trigger whose firings go to ``GET /v1/stream`` (and ``/metrics``)."""
    segment: str
    on: Literal["enter", "exit"] = "enter"
    after: Union[str, Int64, None] = None
    cooldown: Union[str, Int64, None] = None
    max_per: Union[tuple[Annotated[int, msgspec.Meta(ge=1, le=2 ** 31 - 1)],
                         Union[str, Int64]], None] = None
    once: bool = False
    channel: Union[str, None] = None


class TriggerInfo(msgspec.Struct):
    name: str
    segment: str
    on: str
    after_ms: int
    cooldown_ms: Union[int, None]
    max_per: Union[tuple[int, int], None]
    once: bool
    channel: Union[str, None]


class TriggerList(msgspec.Struct):
    triggers: list[TriggerInfo]


class Health(msgspec.Struct):
    status: str
    now: int
    segments: int


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    type: str
    message: str
    path: Union[str, None] = None
    line: Union[int, None] = None
    column: Union[int, None] = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ApiError(Exception):
    """An error response: status, a stable ``type`` and a message (and where)."""

    def __init__(self, status: int, type: str, message: str, path: str | None = None, *,
                 line: int | None = None, column: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(type, message, path, line, column)
        self.headers = headers


_enc = msgspec.json.Encoder()


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_enc.encode(obj), status_code=status, media_type="application/json",
                    headers=headers)


def _error_response(err: ApiError) -> Response:
    return _json(ErrorBody(err.detail), err.status, err.headers)


def _decode(body: bytes, typ: type) -> Any:
    """Decode a JSON body into ``typ``; a 422 with the JSON path of the bad field if not."""
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as e:
        msg = str(e)
        path = "$"
        if " - at `" in msg:
            msg, _, where = msg.rpartition(" - at `")
            path = where.rstrip("`")
        raise ApiError(422, "invalid_body", msg, path) from None
    except msgspec.DecodeError as e:
        raise ApiError(422, "invalid_json", f"invalid JSON: {e}", "$") from None


def _engine_error(e: SegcoreError, path: str | None = None) -> ApiError:
    if isinstance(e, RuleError):
        return ApiError(422, "invalid_rule", str(e), path or e.path, line=e.line,
                        column=e.column)
    if isinstance(e, EventError):
        if e.index is not None:
            where = f"$[{e.index}]" + (f".{e.field}" if e.field else "")
        else:
            where = f"$.{e.field}" if e.field else "$"
        return ApiError(422, "invalid_event", e.reason, path or where)
    return ApiError(422, "invalid_request", str(e), path)


# ------------------------------------------------------------------ the SSE buffer
class _Hub:
    """A bounded, id-numbered buffer of transitions and firings for ``GET /v1/stream``.

    Ids are ``<boot>-<seq>``: ``boot`` is random per server process, so a client resuming
    across a restart is told about the gap instead of silently skipping ahead.
    """

    def __init__(self, size: int):
        self.boot = secrets.token_hex(4)
        self.size = size
        self.buf: deque[tuple[int, bytes, Any]] = deque()
        self.seq = 0                 # id of the latest item
        self.evicted = 0             # highest id dropped for lack of room
        self.closed = False
        self.subscribers = 0
        self._event = asyncio.Event()

    def publish(self, kind: bytes, items: Iterable[Any]) -> None:
        start = self.seq
        for obj in items:
            self.seq += 1
            self.buf.append((self.seq, kind, obj))
        if self.seq == start:
            return
        while len(self.buf) > self.size:
            self.evicted = self.buf.popleft()[0]
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    def purge(self, user: UserId) -> None:
        """Drop a forgotten user's items (the ids they had are simply skipped)."""
        self.buf = deque(it for it in self.buf if it[2].user != user)

    def close(self) -> None:
        self.closed = True
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def after(self, seq: int, limit: int) -> list[tuple[int, bytes, Any]]:
        """Items with an id above ``seq``, oldest first (at most ``limit``)."""
        out = []
        for it in reversed(self.buf):
            if it[0] <= seq:
                break
            out.append(it)
        out.reverse()
        return out[:limit]

    def parse_id(self, raw: str | None) -> tuple[int, str | None]:
        """Where a client resumes: ``(seq, gap reason or None)``."""
        if raw is None:
            return self.seq, None
        boot, _, num = raw.strip().partition("-")
        if boot != self.boot or not (num.isascii() and num.isdigit() and len(num) <= 18):
            return 0, (f"Last-Event-ID `{raw[:64]}` is not from this server process (it "
                       "restarted, or the id is malformed): resuming from the oldest event "
                       "still buffered")
        seq = int(num)
        if seq > self.seq:
            return self.seq, f"Last-Event-ID `{raw[:64]}` is ahead of this server"
        return seq, None

    def gap(self, seq: int) -> str | None:
        if seq < self.evicted:
            return (f"events {self.boot}-{seq + 1} to {self.boot}-{self.evicted} are no "
                    f"longer buffered (the buffer keeps the latest {self.size:,})")
        return None

    def frame(self, it: tuple[int, bytes, Any]) -> bytes:
        return b"id: %s-%d\nevent: %s\ndata: %s\n\n" % (
            self.boot.encode(), it[0], it[1], _enc.encode(it[2]))

    def gap_frame(self, reason: str, resume: int) -> bytes:
        data = _enc.encode({"reason": reason, "resumes_after": f"{self.boot}-{resume}"})
        return b"event: gap\ndata: %s\n\n" % data


# ------------------------------------------------------------------ metrics
class _EngineCollector:
    """Gauges read from the engine at scrape time (on the event loop's thread)."""

    def __init__(self, eng: Engine, hub: _Hub):
        self.eng, self.hub = eng, hub

    def collect(self):
        sizes = GaugeMetricFamily("segcore_segment_size", "Members of each segment",
                                  labels=["segment"])
        for name, n in self.eng.sizes().items():
            sizes.add_metric([name], n)
        yield sizes
        st = self.eng.stats()
        for key, doc in (("users", "Users the engine knows"),
                         ("now", "Engine time (ms since the epoch)"),
                         ("timers", "Pending timers"),
                         ("memory_bytes", "Kernel memory"),
                         ("queued_firings", "Firings not yet drained")):
            yield GaugeMetricFamily(f"segcore_{key}", doc, value=st[key])
        yield GaugeMetricFamily("segcore_stream_subscribers", "Open /v1/stream connections",
                                value=self.hub.subscribers)


class _Metrics:
    def __init__(self, eng: Engine, hub: _Hub):
        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.accepted = Counter("segcore_events_accepted", "Events accepted", registry=reg)
        self.duplicates = Counter("segcore_events_duplicate",
                                  "Events ignored as repeated message ids", registry=reg)
        self.rejected = Counter("segcore_events_rejected",
                                "Events in rejected batches (0 for a body that is not a "
                                "JSON array)", registry=reg)
        self.rejected_batches = Counter("segcore_batches_rejected",
                                        "Rejected POST /v1/events requests", ["reason"],
                                        registry=reg)
        self.transitions = Counter("segcore_transitions", "Segment entries and exits",
                                   ["segment", "direction"], registry=reg)
        self.firings = Counter("segcore_firings", "Trigger and journey firings",
                               ["trigger", "delivered"], registry=reg)
        self.latency = Histogram(
            "segcore_ingest_seconds", "Time in the engine per POST /v1/events batch",
            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                     2.5), registry=reg)
        reg.register(_EngineCollector(eng, hub))

    def count(self, tr: Transitions | list, names: tuple[str, ...] | None = None) -> None:
        if isinstance(tr, Transitions):
            if not len(tr):
                return
            k = len(tr.segment_names)
            idx = np.asarray(tr.segment, dtype=np.int64) * 2 + np.asarray(tr.entered, bool)
            counts = np.bincount(idx, minlength=2 * k)
            for j in np.flatnonzero(counts).tolist():
                self.transitions.labels(tr.segment_names[j // 2],
                                        "enter" if j % 2 else "exit").inc(int(counts[j]))
            return
        for t in tr:
            self.transitions.labels(t.segment, "enter" if t.entered else "exit").inc()


# ------------------------------------------------------------------ the app
def _transitions_out(tr: Transitions | list[Transition]) -> list[TransitionOut]:
    if isinstance(tr, Transitions):
        if not len(tr):
            return []
        strs = tr._strs
        users = tr.user.tolist()
        if strs:
            users = [strs.get(u, u) for u in users]
        names = tr.segment_names
        segs = [names[i] for i in tr.segment.tolist()]
        return list(map(TransitionOut, users, segs, tr.entered.tolist(), tr.ts.tolist()))
    return [TransitionOut(t.user, t.segment, t.entered, t.ts) for t in tr]


def _path_user(request: Request) -> UserId:
    raw = request.path_params["user"]
    kind = request.query_params.get("id_type", "auto")
    if kind not in ("auto", "int", "string"):
        raise ApiError(422, "invalid_request", "id_type must be auto, int or string",
                       "id_type")
    if kind == "string":
        return raw
    if raw.isascii() and raw.isdigit() and len(raw) <= 10 and int(raw) < _U32:
        return int(raw)
    if kind == "int":
        raise ApiError(422, "invalid_request",
                       f"`{raw[:64]}` is not an int user id in [0, 2**32)", "user")
    return raw


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not lo <= int(raw) <= hi:
        raise ApiError(422, "invalid_request",
                       f"`{name}` must be an integer between {lo} and {hi}", name)
    return int(raw)


def _cursor(raw: str | None, path: str = "cursor") -> int:
    if raw is None:
        return -1
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or int(raw) >= _U32:
        raise ApiError(422, "invalid_request", "`cursor` must be a `next_cursor` value from "
                       "a previous page", path)
    return int(raw)


def _wants_bitmap(accept: str) -> bool:
    """Whether ``Accept`` asks for ``application/octet-stream`` (with a non-zero q)."""
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() == "application/octet-stream":
            q = next((p[2:] for p in params if p.startswith("q=")), "1")
            return q.strip("0.") != ""          # q=0, 0.0, 0.000 refuse it
    return False


class _Auth:
    """ASGI middleware: ``Authorization: Bearer <token>`` on everything but ``/healthz``,
    compared in constant time."""

    def __init__(self, app, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/healthz":
            got = b""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    got = v
                    break
            if not hmac.compare_digest(got, self.expected):
                msg = ("missing `Authorization: Bearer <token>` header" if not got
                       else "invalid token")
                resp = _error_response(ApiError(401, "unauthorized", msg, "Authorization",
                                                headers={"WWW-Authenticate": "Bearer"}))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _App:
    """The endpoints, over one engine (see :func:`create_app`)."""

    def __init__(self, eng: Engine, *, max_body: int, stream_buffer: int, tick: float | None,
                 on_shutdown: Callable[[], None] | None):
        self.eng = eng
        self.max_body = max_body
        self.hub = _Hub(stream_buffer)
        self.metrics = _Metrics(eng, self.hub)
        self.tick = tick
        self.on_shutdown = on_shutdown
        self._ticker: asyncio.Task | None = None

    # ---- plumbing
    async def body(self, request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > self.max_body:
            raise ApiError(413, "payload_too_large",
                           f"request body of {int(cl):,} bytes is over the limit of "
                           f"{self.max_body:,}")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body:
                raise ApiError(413, "payload_too_large",
                               f"request body is over the limit of {self.max_body:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def publish(self, tr: Transitions | list[Transition]) -> list[TransitionOut]:
        """Account for what an engine call caused: transitions (returned for the response)
        and the firings it queued; both go to the stream."""
        out = _transitions_out(tr)
        if out:
            self.metrics.count(tr)
            self.hub.publish(b"transition", out)
        firings = self.eng.drain_firings()
        if firings:
            for f in firings:
                self.metrics.firings.labels(f.trigger, "true" if f.delivered else "false").inc()
            self.hub.publish(b"firing", firings)
        return out

    def segment(self, request: Request) -> str:
        name = request.path_params["name"]
        if name not in self.eng.segments:
            raise ApiError(404, "not_found", f"unknown segment `{name[:200]}`"
                           f"{R._suggest(name, self.eng.segments)}", "name")
        return name

    def page(self, bm, request_limit: int, cursor: int) -> MembersPage:
        start = bm.rank(cursor) if cursor >= 0 else 0
        nums = bm[start: start + request_limit]
        members = [self.eng.user_id(u) for u in nums] if self.eng._str_num else list(nums)
        more = start + request_limit < len(bm)
        return MembersPage(len(bm), members, str(nums[-1]) if more and len(nums) else None)

    # ---- lifespan
    async def startup(self) -> None:
        if self.tick:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def shutdown(self) -> None:
        self.hub.close()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.on_shutdown is not None:
            self.on_shutdown()

    async def _tick(self) -> None:
        """Wall-clock mode: move engine time with the clock, so time alone moves users."""
        while True:
            await asyncio.sleep(self.tick)
            try:
                self.publish(self.eng.advance(int(time.time() * 1000)))
            except Exception:  # noqa: BLE001 - keep ticking; the error is logged
                log.exception("advancing to the wall clock failed")

    # ---- endpoints
    async def healthz(self, request: Request) -> Response:
        return _json(Health("ok", self.eng.now, len(self.eng.segments)))

    async def events(self, request: Request) -> Response:
        try:
            body = await self.body(request)
        except ApiError:
            self.metrics.rejected_batches.labels("too_large").inc()
            raise
        before = self.eng._stats["events"]
        t0 = time.perf_counter()
        try:
            tr = self.eng.track_json(body)
        except SegcoreError as e:
            self.metrics.rejected_batches.labels("invalid").inc()
            try:
                self.metrics.rejected.inc(len(msgspec.json.decode(body, type=list)))
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                pass
            raise _engine_error(e) from None
        self.metrics.latency.observe(time.perf_counter() - t0)
        kept = self.eng._stats["events"] - before
        n_dup = len(tr.duplicates)
        self.metrics.accepted.inc(kept)
        if n_dup:
            self.metrics.duplicates.inc(n_dup)
        return _json(EventsResponse(kept, n_dup, self.publish(tr)))

    async def advance(self, request: Request) -> Response:
        req = _decode(await self.body(request), AdvanceIn)
        if self.eng._clock is not None:
            raise ApiError(409, "conflict", "the engine follows the wall clock (serve "
                           "--clock wall): time cannot be moved by hand", "ts")
        try:
            ts = _to_ms(req.ts, "ts")
            tr = self.eng.advance(ts)
        except SegcoreError as e:
            raise _engine_error(e, "$.ts") from None
        return _json(TransitionsResponse(self.eng.now, self.publish(tr)))

    async def list_segments(self, request: Request) -> Response:
        sizes = self.eng.sizes()
        return _json(SegmentList([SegmentInfo(n, r, sizes[n])
                                  for n, r in self.eng.segments.items()]))

    async def put_segment(self, request: Request) -> Response:
        name = request.path_params["name"]
        req = _decode(await self.body(request), SegmentIn)
        created = name not in self.eng.segments
        try:
            tr = (self.eng.add_segment(name, req.rule) if created
                  else self.eng.replace_segment(name, req.rule))
        except SegcoreError as e:
            raise _engine_error(e, "$.rule") from None
        out = self.publish(tr)
        return _json(SegmentPut(name, self.eng.segments[name], self.eng.size(name), created,
                                out), 201 if created else 200)

    async def segment_endpoint(self, request: Request) -> Response:
        if request.method == "PUT":
            return await self.put_segment(request)
        return await self.delete_segment(request)

    async def delete_segment(self, request: Request) -> Response:
        name = self.segment(request)
        try:
            self.eng.remove_segment(name)
        except RuleError as e:
            raise ApiError(409, "conflict", str(e), "name") from None
        return Response(status_code=204)

    async def segment_size(self, request: Request) -> Response:
        name = self.segment(request)
        return _json(SegmentSize(name, self.eng.size(name)))

    def _bitmap_or_page(self, request: Request, bm, limit: int, cursor: int) -> Response:
        if _wants_bitmap(request.headers.get("accept", "")):
            return Response(bm.serialize(), media_type="application/octet-stream",
                            headers={"X-Segcore-Size": str(len(bm))})
        return _json(self.page(bm, limit, cursor))

    async def members(self, request: Request) -> Response:
        name = self.segment(request)
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        cursor = _cursor(request.query_params.get("cursor"))
        return self._bitmap_or_page(request, self.eng.members(name), limit, cursor)

    async def query(self, request: Request) -> Response:
        req = _decode(await self.body(request), QueryIn)
        if not 1 <= req.limit <= MAX_PAGE:
            raise ApiError(422, "invalid_body", f"`limit` must be between 1 and {MAX_PAGE}",
                           "$.limit")
        cursor = _cursor(req.cursor, "$.cursor")
        try:
            bm = self.eng.query(req.expr)
        except SegcoreError as e:
            raise ApiError(422, "invalid_query", str(e), "$.expr") from None
        return self._bitmap_or_page(request, bm, req.limit, cursor)

    async def user_segments(self, request: Request) -> Response:
        user = _path_user(request)
        return _json(UserSegments(user, self.eng.segments_of(user)))

    async def _profile(self, request: Request, what: str) -> Response:
        user = _path_user(request)
        values = _decode(await self.body(request),
                         dict[str, Scalar] if what == "traits" else dict[str, Score])
        fn = self.eng.set_traits if what == "traits" else self.eng.set_scores
        try:
            tr = fn(user, values)
        except SegcoreError as e:
            err = _engine_error(e)
            if isinstance(e, EventError) and e.field:
                err.detail.path = "$." + e.field.partition(".")[2] if "." in e.field else "$"
            raise err from None
        return _json(UserChange(user, self.publish(tr)))

    async def put_traits(self, request: Request) -> Response:
        return await self._profile(request, "traits")

    async def put_scores(self, request: Request) -> Response:
        return await self._profile(request, "scores")

    async def forget(self, request: Request) -> Response:
        user = _path_user(request)
        done = self.eng.forget(user)
        if done:
            self.hub.purge(user)
        return _json(Forgotten(user, done))

    async def list_triggers(self, request: Request) -> Response:
        return _json(TriggerList([
            TriggerInfo(it.name, it.segment, "enter" if it.entered else "exit", it.after_ms,
                        it.cooldown_ms, it.max_per, it.once, it.channel)
            for it in self.eng._items if isinstance(it, TriggerSpec)]))

    async def put_trigger(self, request: Request) -> Response:
        name = request.path_params["name"]
        req = _decode(await self.body(request), TriggerIn)
        if any(it.name == name for it in self.eng._items):
            raise ApiError(409, "conflict", f"a trigger or journey named `{name[:200]}` "
                           "already exists", "name")
        if req.segment not in self.eng.segments:
            raise ApiError(422, "invalid_body", f"unknown segment `{req.segment[:200]}`",
                           "$.segment")
        try:
            self.eng.add_trigger(name, req.segment, req.on, after=req.after,
                                 cooldown=req.cooldown, max_per=req.max_per, once=req.once,
                                 channel=req.channel)
        except SegcoreError as e:
            raise ApiError(422, "invalid_body", str(e), "$") from None
        return Response(status_code=201)

    async def stream(self, request: Request) -> Response:
        hub = self.hub
        seq, why = hub.parse_id(request.headers.get("last-event-id"))
        if why is not None and seq == 0 and hub.buf:
            seq = hub.buf[0][0] - 1

        async def frames():
            nonlocal seq, why
            hub.subscribers += 1
            try:
                yield b"retry: 2000\n\n"
                if why is not None:
                    yield hub.gap_frame(why, seq)
                while not hub.closed:
                    gap = hub.gap(seq)
                    if gap is not None:
                        seq = hub.buf[0][0] - 1 if hub.buf else hub.seq
                        yield hub.gap_frame(gap, seq)
                    items = hub.after(seq, _STREAM_CHUNK)
                    if items:
                        seq = items[-1][0]
                        yield b"".join(hub.frame(it) for it in items)
                        continue
                    if not await hub.wait(_PING_S) and not hub.closed:
                        yield b": ping\n\n"
            finally:
                hub.subscribers -= 1

        return StreamingResponse(frames(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return Response(_openapi_bytes(), media_type="application/json")


def create_app(eng: Engine, *, token: str | None = None, max_body: int = DEFAULT_MAX_BODY,
               stream_buffer: int = DEFAULT_STREAM_BUFFER, tick: float | None = None,
               on_shutdown: Callable[[], None] | None = None):
    """The ASGI app serving ``eng``.

    ``token``: when set, every endpoint but ``/healthz`` requires ``Authorization: Bearer
    <token>``. ``max_body``: largest request body in bytes (413 above). ``stream_buffer``:
    how many transitions and firings ``/v1/stream`` keeps for ``Last-Event-ID`` resume.
    ``tick``: in wall-clock mode, seconds between two moves of engine time to the clock.
    ``on_shutdown`` runs at the end of the app's lifespan (``segcore serve`` checkpoints
    there).
    """
    if max_body < 1 or stream_buffer < 1:
        raise ValueError("max_body and stream_buffer must be positive")
    disable_created_metrics()       # no `_created` series next to every counter
    a = _App(eng, max_body=max_body, stream_buffer=stream_buffer, tick=tick,
             on_shutdown=on_shutdown)
    routes = [
        Route("/healthz", a.healthz, methods=["GET"]),
        Route("/metrics", a.metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", a.openapi, methods=["GET"]),
        Route("/v1/events", a.events, methods=["POST"]),
        Route("/v1/advance", a.advance, methods=["POST"]),
        Route("/v1/segments", a.list_segments, methods=["GET"]),
        Route("/v1/segments/{name}", a.segment_endpoint, methods=["PUT", "DELETE"]),
        Route("/v1/segments/{name}/size", a.segment_size, methods=["GET"]),
        Route("/v1/segments/{name}/members", a.members, methods=["GET"]),
        Route("/v1/query", a.query, methods=["POST"]),
        Route("/v1/users/{user}/segments", a.user_segments, methods=["GET"]),
        Route("/v1/users/{user}/traits", a.put_traits, methods=["PUT"]),
        Route("/v1/users/{user}/scores", a.put_scores, methods=["PUT"]),
        Route("/v1/users/{user}", a.forget, methods=["DELETE"]),
        Route("/v1/triggers", a.list_triggers, methods=["GET"]),
        Route("/v1/triggers/{name}", a.put_trigger, methods=["PUT"]),
        Route("/v1/stream", a.stream, methods=["GET"]),
    ]

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, kind, str(exc.detail),
                                        headers=exc.headers))

    async def server_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, RecursionError):     # parsers fail before changing anything
            return _error_response(ApiError(422, "invalid_body", "nested too deeply"))
        log.exception("internal error on %s %s", request.method, request.url.path,
                      exc_info=exc)
        return _error_response(ApiError(500, "internal", "internal error (the server log "
                                        "has the details)"))

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await a.startup()
        try:
            yield
        finally:
            await a.shutdown()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        Exception: server_error})
    app.state.segcore = a
    return _Auth(app, token) if token else app


# ------------------------------------------------------------------ OpenAPI
def _route_docs() -> list[tuple[str, str, str, Any, Any, Any, list[dict]]]:
    """(method, path, summary, request type, response type, status(es), parameters)."""
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    user = {"name": "user", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "a user id; digits mean an int id unless id_type=string"}
    id_type = {"name": "id_type", "in": "query", "required": False,
               "schema": {"type": "string", "enum": ["auto", "int", "string"]}}
    page = [{"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
            {"name": "cursor", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,10}$"}}]
    return [
        ("get", "/healthz", "Liveness (never needs a token)", None, Health, 200, []),
        ("post", "/v1/events", "Track a batch of events", list[EventIn], EventsResponse, 200,
         []),
        ("post", "/v1/advance", "Move engine time (event-time mode)", AdvanceIn,
         TransitionsResponse, 200, []),
        ("get", "/v1/segments", "Every segment: name, rule, size", None, SegmentList, 200, []),
        ("put", "/v1/segments/{name}", "Add (201) or replace (200) a segment", SegmentIn,
         SegmentPut, (201, 200), [name]),
        ("delete", "/v1/segments/{name}", "Remove a segment", None, None, 204, [name]),
        ("get", "/v1/segments/{name}/size", "Size of a segment", None, SegmentSize, 200,
         [name]),
        ("get", "/v1/segments/{name}/members", "A page of members (or the portable roaring "
         "bitmap with Accept: application/octet-stream)", None, MembersPage, 200,
         [name] + page),
        ("post", "/v1/query", "Bitmap algebra over segments (a page of members)", QueryIn,
         MembersPage, 200, []),
        ("get", "/v1/users/{user}/segments", "The segments a user is in", None, UserSegments,
         200, [user, id_type]),
        ("put", "/v1/users/{user}/traits", "Set traits (null deletes one)", dict[str, Scalar],
         UserChange, 200, [user, id_type]),
        ("put", "/v1/users/{user}/scores", "Set scores (null deletes one)",
         dict[str, Score], UserChange, 200, [user, id_type]),
        ("delete", "/v1/users/{user}", "Forget a user everywhere", None, Forgotten, 200,
         [user, id_type]),
        ("get", "/v1/triggers", "The triggers", None, TriggerList, 200, []),
        ("put", "/v1/triggers/{name}", "Add a trigger (firings go to /v1/stream)", TriggerIn,
         None, 201, [name]),
    ]


_OPENAPI: bytes | None = None


def _openapi_bytes() -> bytes:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = _enc.encode(openapi_spec())
    return _OPENAPI


def openapi_spec() -> dict:
    """The OpenAPI 3.1 document of the server, generated from the msgspec wire types."""
    from importlib.metadata import PackageNotFoundError, version
    docs = _route_docs()
    types = [t for d in docs for t in (d[3], d[4]) if t is not None] + [ErrorBody]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}")
    by_type = dict(zip(types, schemas))
    err = {"description": "error", "content": {"application/json": {
        "schema": by_type[ErrorBody]}}}
    paths: dict[str, dict] = {}
    for method, path, summary, req, resp, status, params in docs:
        op: dict[str, Any] = {"summary": summary, "operationId": f"{method}_{path}"
                              .replace("/", "_").replace("{", "").replace("}", "")}
        if params:
            op["parameters"] = params
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": by_type[req]}}}
        ok: dict[str, Any] = {"description": "ok"}
        if resp is not None:
            ok["content"] = {"application/json": {"schema": by_type[resp]}}
            if resp is MembersPage:
                ok["content"]["application/octet-stream"] = {
                    "schema": {"type": "string", "format": "binary"}}
        op["responses"] = {str(s): ok for s in (status if isinstance(status, tuple)
                                                else (status,))}
        op["responses"]["4XX"] = err
        if path != "/healthz":
            op["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[method] = op
    paths["/v1/stream"] = {"get": {
        "summary": "Server-Sent Events: `transition`, `firing` and `gap` events; "
                   "Last-Event-ID resumes", "operationId": "get_v1_stream",
        "security": [{"bearer": []}],
        "parameters": [{"name": "Last-Event-ID", "in": "header", "required": False,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "an event stream",
                              "content": {"text/event-stream": {}}},
                      "4XX": err}}}
    paths["/metrics"] = {"get": {
        "summary": "Prometheus metrics", "operationId": "get_metrics",
        "security": [{"bearer": []}],
        "responses": {"200": {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "4XX": err}}}
    try:
        ver = version("segcore")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ver = "0"
    return {"openapi": "3.1.0",
            "info": {"title": "segcore", "version": ver,
                     "description": "Real-time, exact behavioural segmentation over HTTP."},
            "paths": paths,
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http",
                                                          "scheme": "bearer"}}}}


# ------------------------------------------------------------------ serve
class ServeError(SegcoreError):
    """``segcore serve`` refused to start (the message says why)."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_engine(rules: dict[str, str] | None, data_dir: str | None = None, *,
                 clock: Callable[[], float] | None = None, fsync: str = "always") -> Engine:
    """The engine ``segcore serve`` runs: recovered from ``data_dir`` when it holds state
    (segments of ``rules`` that are new are added and changed ones replaced; segments added
    at run time over HTTP are kept), else a new one with ``rules``."""
    if data_dir is not None and os.path.isdir(data_dir) and _wal.latest(data_dir) is not None:
        eng = Engine.open(data_dir, clock=clock, fsync=fsync)
        rules = rules or {}
        # the file's segments after the ones they reference, so that `a: in(b)` may come
        # before `b` (segments only in the engine are known already)
        deps = {n: [r for r in R.references(R.parse(rule, segment=n, segments={
            **eng.segments, **rules})) if r in rules] for n, rule in rules.items()}
        for name in R.topo_order(deps):
            if name not in eng.segments:
                eng.add_segment(name, rules[name])
            elif eng.segments[name] != rules[name]:
                eng.replace_segment(name, rules[name])
        return eng
    if rules is None:
        raise ServeError("no rules: pass --rules RULES_FILE (or a --data-dir that holds "
                         "an engine's state)")
    eng = Engine(clock=clock, wal=data_dir, fsync=fsync)
    eng.add_segments(rules)
    return eng


def serve(rules: dict[str, str] | None, *, host: str = "127.0.0.1", port: int = 8000,
          data_dir: str | None = None, token: str | None = None,
          max_body: int = DEFAULT_MAX_BODY, fsync: str = "always", clock: str = "event",
          tick: float = 1.0, stream_buffer: int = DEFAULT_STREAM_BUFFER,
          log_level: str = "info", access_log: bool = False) -> int:
    """Run the server until SIGTERM or SIGINT, then checkpoint (with a data dir) and return
    the exit status: 0, or 1 when the checkpoint did not happen (a second Ctrl-C, a full disk;
    the log still holds every acknowledged call and is replayed on the next start).

    ``token`` defaults to ``$SEGCORE_TOKEN``; binding a non-loopback address without one
    raises :class:`ServeError`."""
    import uvicorn
    if token is None:
        token = os.environ.get("SEGCORE_TOKEN") or None
    if not token and not is_loopback(host):
        raise ServeError(f"refusing to bind {host} without a token: anyone who can reach it "
                         "could read and change every segment; set SEGCORE_TOKEN (clients "
                         "send `Authorization: Bearer <token>`) or bind 127.0.0.1")
    if clock not in ("event", "wall"):
        raise ServeError(f"--clock must be event or wall, got {clock!r}")
    eng = build_engine(rules, data_dir, clock=time.time if clock == "wall" else None,
                       fsync=fsync)

    done = {"checkpoint": data_dir is None}

    def on_shutdown() -> None:
        if data_dir is None:
            return
        try:
            eng.checkpoint()
            eng.close()
        except Exception:  # noqa: BLE001 - reported, and the exit status says so
            log.exception("checkpoint into %s failed", data_dir)
            return
        done["checkpoint"] = True
        log.info("checkpointed the engine into %s", data_dir)

    app = create_app(eng, token=token, max_body=max_body, stream_buffer=stream_buffer,
                     tick=tick if clock == "wall" else None, on_shutdown=on_shutdown)
    hub = app.app.state.segcore.hub if isinstance(app, _Auth) else app.state.segcore.hub
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=5, server_header=False)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # End the event streams at once (they never finish on their own), and exit with
            # status 0 once the lifespan has checkpointed instead of re-raising the signal.
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            try:
                asyncio.get_running_loop().call_soon_threadsafe(hub.close)
            except RuntimeError:
                hub.close()

    log.info("segcore: %d segments on http://%s:%d (auth %s, data dir %s, %s time)",
             len(eng.segments), host, port, "on" if token else "off", data_dir or "none",
             clock)
    _Server(config).run()
    if not done["checkpoint"]:
        log.error("stopped without a checkpoint: the write-ahead log in %s holds every "
                  "acknowledged call and is replayed on the next start", data_dir)
        return 1
    return 0

