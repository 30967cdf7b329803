"""The exceptions segcore raises. All derive from :class:`SegcoreError`."""

from __future__ import annotations

__all__ = ["SegcoreError", "RuleError", "EventError", "SnapshotError"]


class SegcoreError(Exception):
    """Base class of every error segcore raises on purpose."""


class RuleError(SegcoreError, ValueError):
    """A rule could not be parsed or compiled.

    Attributes
    ----------
    reason : str
        What is wrong, without the location.
    segment : str or None
        The segment whose rule is at fault.
    line, column : int or None
        1-based position in the rule text (None for rules given as builder objects or JSON).
    path : str or None
        For rules given as JSON, where in the document the problem is.
    """

    def __init__(self, reason: str, *, segment: str | None = None, line: int | None = None,
                 column: int | None = None, path: str | None = None):
        self.reason = reason
        self.segment = segment
        self.line = line
        self.column = column
        self.path = path
        where = []
        if line is not None:
            where.append(f"at line {line}, column {column}")
        if path is not None:
            where.append(f"at `{path}`")
        msg = reason
        if where or segment is not None:
            loc = " ".join(where)
            if segment is not None:
                loc = f"{loc} of `{segment}`" if loc else f"in `{segment}`"
            msg = f"{reason} - {loc}"
        super().__init__(msg)

    def with_segment(self, segment: str) -> "RuleError":
        return RuleError(self.reason, segment=segment, line=self.line, column=self.column,
                         path=self.path)


class EventError(SegcoreError, ValueError):
    """An event (or a batch of events, traits or scores) was rejected. Nothing was applied.

    Attributes
    ----------
    index : int or None
        Row of the offending event in the batch (None for a single event).
    field : str or None
        The offending field (``user``, ``event``, ``ts``, ``props.amount`` …).
    reason : str
        Why it was rejected.
    """

    def __init__(self, reason: str, *, index: int | None = None, field: str | None = None):
        self.reason = reason
        self.index = index
        self.field = field
        where = []
        if field is not None:
            where.append(f"field `{field}`")
        if index is not None:
            where.append(f"event {index}")
        msg = reason if not where else f"{reason} - at {' of '.join(where)}"
        super().__init__(msg)


class SnapshotError(SegcoreError):
    """A snapshot could not be read: truncated, corrupted, or of an unknown version."""


class ShardGap(SegcoreError):
    """A shard was sent call ``n`` but has applied calls only up to ``applied`` (it lost its
    process and recovered less than the driver sent): the driver re-sends the calls between."""

    def __init__(self, applied: int):
        super().__init__(f"the shard has applied calls up to {applied}")
        self.applied = applied

    def __reduce__(self):
        return (type(self), (self.applied,))
