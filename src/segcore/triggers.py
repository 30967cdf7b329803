"""Triggers, journeys and frequency caps (docs/triggers.md).

The kernel keeps what is time-critical — each user's pending firing per trigger and position per
journey, on the same timer heap that expires windows — and reports candidate firings in order.
This module turns them into :class:`Firing` objects, applies the per-user policies (``once``,
``cooldown``, ``max_per``, channel caps) in that order, and keeps their histories.

A story: one hour after a cart is abandoned, an email; a day later, if the cart is still
abandoned, an SMS — but no more than one message a day per channel.

>>> import segcore
>>> eng = segcore.Engine()
>>> _ = eng.add_segment("cart_abandoners", "abandoned(add_to_cart, purchase, 1h)")
>>> sent = []
>>> j = eng.journey("cart_recovery", entry="cart_abandoners")
>>> _ = j.step(after="1h", do=lambda f: sent.append(("email", f.ts)), channel="email")
>>> _ = j.step(after="24h", do=lambda f: sent.append(("sms", f.ts)), channel="sms",
...            only_if="in(cart_abandoners)")
>>> _ = eng.track(7, "add_to_cart", ts=0)
>>> _ = eng.advance(2 * 3_600_000)            # abandoned at 1h; the email is due at 2h
>>> sent
[('email', 7200000)]
>>> _ = eng.advance(30 * 3_600_000)           # still abandoned 24h later: the SMS
>>> sent
[('email', 7200000), ('sms', 93600000)]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Union

import msgspec

from . import rules as R
from .errors import RuleError, SegcoreError

__all__ = ["Firing", "Journey"]


class Firing(msgspec.Struct, frozen=True):
    """One firing of a trigger or journey step (a ``Transition``-like record).

    ``delivered`` is False when a policy suppressed it; ``suppressed_by`` then says which
    (``"once"``, ``"cooldown"``, ``"max_per"``, ``"cap:<channel>"`` or ``"only_if"``).
    """
    user: Union[int, str]
    segment: str
    entered: bool
    ts: int
    trigger: str
    reason: str
    delivered: bool = True
    suppressed_by: Union[str, None] = None
    channel: Union[str, None] = None
    journey: Union[str, None] = None
    step: Union[int, None] = None


def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2 ** 31:
        raise SegcoreError(f"{what} must be a positive int below 2**31, got {v!r}")
    return v


def parse_max_per(max_per) -> tuple[int, int] | None:
    """``(n, window)`` with window a duration; returns ``(n, window_ms)``."""
    if max_per is None:
        return None
    if not isinstance(max_per, (tuple, list)) or len(max_per) != 2:
        raise SegcoreError(f"max_per must be (count, window) such as (3, \"7d\"), got "
                           f"{max_per!r}")
    n = _positive_int(max_per[0], "max_per's count")
    w = R.parse_duration(max_per[1])
    if w <= 0:
        raise SegcoreError("max_per's window must be longer than 0")
    return n, w


class TriggerSpec(msgspec.Struct):
    name: str
    segment: str
    entered: bool
    after_ms: int = 0
    cooldown_ms: Union[int, None] = None
    max_per: Union[tuple[int, int], None] = None
    once: bool = False
    channel: Union[str, None] = None
    fn: Any = None

    def key(self) -> tuple:
        return ("trigger", self.name, self.segment, self.entered, self.after_ms)

    def item(self) -> dict:
        return {"kind": "trigger", "segment": self.segment, "enter": self.entered,
                "delay_ms": self.after_ms}

    def reason(self) -> str:
        if not self.after_ms:
            return f"{'entered' if self.entered else 'left'} {self.segment}"
        return (f"{'in' if self.entered else 'out of'} {self.segment} for "
                f"{R._fmt_dur(self.after_ms)}")


class StepSpec(msgspec.Struct):
    after_ms: int
    fn: Any = None
    only_if: Union[str, None] = None       # hidden segment name evaluating the condition
    channel: Union[str, None] = None


class JourneySpec(msgspec.Struct):
    name: str
    entry: str
    exits: list[str]
    steps: list[StepSpec] = msgspec.field(default_factory=list)

    def key(self) -> tuple:
        return ("journey", self.name, self.entry, tuple(self.exits),
                tuple((s.after_ms, s.only_if) for s in self.steps))

    def item(self) -> dict:
        return {"kind": "journey", "segment": self.entry, "exits": list(self.exits),
                "steps": [(s.after_ms, s.only_if) for s in self.steps]}


class Journey:
    """A journey under construction: add steps with :meth:`step` (chainable)."""

    def __init__(self, engine, spec: JourneySpec):
        self._engine = engine
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def step(self, after, do: Callable[[Firing], Any] | None = None, *, only_if=None,
             channel: str | None = None) -> "Journey":
        """Add a step due ``after`` the previous one (the first: after the journey entry).

        ``do(firing)`` is called when it fires; ``only_if`` is a rule (text or AST) that must
        hold for the user at that instant, or the step is reported as suppressed by
        ``"only_if"``. Adding a step re-registers the journey (users in it leave it).
        """
        after_ms = R.parse_duration(after)
        if do is not None and not callable(do):
            raise SegcoreError("a journey step's `do` must be callable")
        if channel is not None and (not isinstance(channel, str) or not channel):
            raise SegcoreError("a channel must be a non-empty string")
        self._engine._add_journey_step(self.spec, StepSpec(after_ms, do, None, channel),
                                       only_if)
        return self

    def __repr__(self) -> str:
        return f"<Journey {self.spec.name!r}: {len(self.spec.steps)} steps>"


class Policies:
    """Per-user histories behind ``once``, ``cooldown``, ``max_per`` and channel caps."""

    def __init__(self):
        self.caps: dict[str, tuple[int, int]] = {}
        self.once: set[tuple[str, int]] = set()
        self.last: dict[tuple[str, int], int] = {}
        self.hist: dict[tuple[str, int], deque] = {}
        self.chan: dict[tuple[str, int], deque] = {}

    @staticmethod
    def _count(q: deque | None, t: int, w: int) -> int:
        if q is None:
            return 0
        while q and q[0] <= t - w:    # an entry exactly W old no longer counts
            q.popleft()
        return len(q)

    def check(self, name: str, user: int, t: int, once: bool, cooldown_ms, max_per,
              channel) -> str | None:
        """The policy that suppresses this firing, or None; records it when delivered."""
        key = (name, user)
        if once and key in self.once:
            return "once"
        if cooldown_ms is not None:
            t0 = self.last.get(key)
            if t0 is not None and t - t0 < cooldown_ms:
                return "cooldown"
        if max_per is not None and self._count(self.hist.get(key), t, max_per[1]) >= max_per[0]:
            return "max_per"
        cap = self.caps.get(channel) if channel is not None else None
        if cap is not None and self._count(self.chan.get((channel, user)), t, cap[1]) >= cap[0]:
            return f"cap:{channel}"
        # delivered: remember it
        if once:
            self.once.add(key)
        if cooldown_ms is not None:
            self.last[key] = t
        if max_per is not None:
            self.hist.setdefault(key, deque()).append(t)
        if channel is not None and channel in self.caps:
            self.chan.setdefault((channel, user), deque()).append(t)
        return None


def check_name(name, what: str = "name") -> str:
    if not isinstance(name, str) or not name:
        raise RuleError(f"a {what} must be a non-empty string, got {name!r}")
    return name
