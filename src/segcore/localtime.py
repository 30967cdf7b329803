"""Local time of events: ``hour`` and ``weekday`` in the user's timezone (docs/patterns.md).

The timezone is the user's trait ``tz``, an IANA name resolved with :mod:`zoneinfo` (the
``tzdata`` package supplies the database where the system has none); UTC without one.

>>> hours_weekdays([0, 1_700_000_000_000], ["UTC", "Europe/Stockholm"])
([0, 23], ['thu', 'tue'])
>>> hours_weekdays([2**48 - 1], ["Europe/Stockholm"])        # year 10889
([7], ['tue'])
"""

from __future__ import annotations

import datetime as _dt
import functools
import zoneinfo

import numpy as np

from .errors import EventError
from .rules import WEEKDAYS

__all__ = ["zone", "check_tz", "hours_weekdays", "TZ_TRAIT"]

#: The trait that names a user's timezone.
TZ_TRAIT = "tz"
_UTC = _dt.timezone.utc
_Y9000 = int(_dt.datetime(9000, 1, 1, tzinfo=_UTC).timestamp())
_CYCLE = 146_097 * 86_400          # seconds in 400 Gregorian years (a whole number of weeks)


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> _dt.tzinfo:
    """The timezone called ``name`` (raises ValueError for an unknown one)."""
    if name == "UTC":
        return _UTC
    try:
        return zoneinfo.ZoneInfo(name)
    except Exception as e:       # ZoneInfoNotFoundError, ValueError for "../x", ...
        raise ValueError(str(e)) from None


def check_tz(v, index=None):
    """Check a value of the ``tz`` trait (None deletes it); EventError if it names no zone."""
    if v is None:
        return v
    ok = isinstance(v, str) and bool(v)
    if ok:
        try:
            zone(v)
        except ValueError:
            ok = False
    if not ok:
        raise EventError(f"trait `tz` must be an IANA timezone name such as "
                         f"\"Europe/Stockholm\", got {v!r}", index=index, field="traits.tz")
    return v


def hours_weekdays(tss, tzs) -> tuple[list[int], list[str]]:
    """``hour`` and ``weekday`` of events at ``tss`` (ms) in the zones ``tzs`` (one name or
    None per event): the local time of ``ts // 1000`` seconds."""
    tss = np.asarray(tss, dtype=np.int64)
    n = len(tss)
    hours = np.empty(n, dtype=np.int64)
    days = np.empty(n, dtype=np.int64)
    names = np.array([t or "UTC" for t in tzs], dtype=object) if n else np.zeros(0, object)
    utc = names == "UTC"
    if utc.any():
        sec = tss[utc] // 1000
        hours[utc] = (sec // 3600) % 24
        days[utc] = (sec // 86400 + 3) % 7         # 1970-01-01 was a Thursday
    for name in set(names[~utc].tolist()):
        z = zone(name)
        rows = np.flatnonzero(names == name)
        for i, s in zip(rows.tolist(), (tss[rows] // 1000).tolist()):
            if s >= _Y9000:
                # past datetime's year 9999 (ts go up to 2**48 ms): whole 400-year cycles
                # back keep the weekday and zoneinfo's (by then repeating) DST rule
                s -= ((s - _Y9000) // _CYCLE + 1) * _CYCLE
            d = _dt.datetime.fromtimestamp(s, z)
            hours[i] = d.hour
            days[i] = d.weekday()
    return hours.tolist(), [WEEKDAYS[d] for d in days.tolist()]
