"""The write-ahead log: every accepted call, appended before the call returns.

A data directory holds ``snapshot-<n>.snap`` (the state at checkpoint ``n``) and
``wal-<n>.log`` (every accepted call since). ``Engine.open(dir)`` restores the snapshot and
replays the log; ``eng.checkpoint()`` writes snapshot ``n + 1``, starts log ``n + 1`` and deletes
the older pair.

Each record is ``u32 length | u32 crc32 | payload``, the payload a msgspec MessagePack record of
the call (its validated inputs and the clock reading it used, so that a replay is exact). A record
cut short by a crash (the torn tail) fails its length or checksum and is dropped with everything
after it. With ``fsync="always"`` the record is on disk (``os.fsync``) before the call returns, so
a process killed at any moment loses no acknowledged call; ``"batch"`` syncs at most every 100 ms
and at checkpoints, ``"never"`` leaves it to the operating system.

>>> import os, tempfile, segcore
>>> d = os.path.join(tempfile.mkdtemp(), "data")
>>> eng = segcore.Engine(wal=d)
>>> _ = eng.add_segment("buyers", "did(purchase)")
>>> _ = eng.track(42, "purchase", ts=1)
>>> eng.close()                                  # (or the process dies: nothing acked is lost)
>>> [c.method for c in read_records(os.path.join(d, "wal-0.log"))[0]]
['add_segments', 'track']
>>> sorted(segcore.Engine.open(d).members("buyers"))
[42]
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from typing import Any, Union

import msgspec

from .errors import SegcoreError, SnapshotError

__all__ = ["Log", "FSYNC_POLICIES", "latest", "read_records"]

FSYNC_POLICIES = ("always", "batch", "never")
_FRAME = struct.Struct("<II")
_MAX_RECORD = 1 << 31
_SNAP_RE = re.compile(r"snapshot-(\d+)\.snap\Z")


class Call(msgspec.Struct, frozen=True):
    """One logged engine call: the method's name, its arguments, and the clock it read."""
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    clock_ms: Union[int, None] = None


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Call)


def latest(directory: str) -> int | None:
    """The number of the newest snapshot in a data directory (None if there is none)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    nums = [int(m.group(1)) for n in names if (m := _SNAP_RE.match(n))]
    return max(nums) if nums else None


def paths(directory: str, n: int) -> tuple[str, str]:
    return (os.path.join(directory, f"snapshot-{n}.snap"),
            os.path.join(directory, f"wal-{n}.log"))


def read_records(path: str) -> tuple[list[Call], int, bool]:
    """The intact records of a log, the byte length they span, and whether a torn or corrupt
    tail was dropped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0, False
    out: list[Call] = []
    pos = 0
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        payload = data[start:start + length]
        if length > _MAX_RECORD or len(payload) != length or zlib.crc32(payload) != crc:
            break
        try:
            out.append(_dec.decode(payload))
        except (msgspec.DecodeError, msgspec.ValidationError):
            break
        pos = start + length
    return out, pos, pos != len(data)


class Log:
    """An append-only log file with an fsync policy."""

    def __init__(self, path: str, fsync: str = "always", truncate_at: int | None = None):
        if fsync not in FSYNC_POLICIES:
            raise SegcoreError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got "
                               f"{fsync!r}")
        self.path = path
        self.fsync = fsync
        self._f = open(path, "ab")
        if truncate_at is not None and truncate_at != self._f.tell():
            self._f.truncate(truncate_at)       # drop a torn tail before appending after it
            self._f.seek(truncate_at)
            self._sync()
        self._last_sync = time.monotonic()
        self.records = 0

    def append(self, call: Call) -> None:
        payload = _enc.encode(call)
        self._f.write(_FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
        self._f.flush()
        self.records += 1
        if self.fsync == "always":
            self._sync()
        elif self.fsync == "batch" and time.monotonic() - self._last_sync > 0.1:
            self._sync()

    def flush(self) -> None:
        """Make everything appended so far readable by another reader of the file."""
        self._f.flush()

    def _sync(self) -> None:
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            if self.fsync != "never":
                self._sync()
            self._f.close()


def fsync_dir(directory: str) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_dir_empty_of_state(directory: str) -> None:
    if latest(directory) is not None:
        raise SegcoreError(f"`{directory}` already holds an engine's data: use "
                           f"segcore.Engine.open({directory!r}) to continue it")


def snapshot_error(path: str, e: Exception) -> SnapshotError:
    return SnapshotError(f"cannot open `{path}`: {e}")
