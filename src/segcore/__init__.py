from .errors import EventError, RuleError, SegcoreError, SnapshotError
__all__ = ["EventError", "RuleError", "SegcoreError", "SnapshotError"]
