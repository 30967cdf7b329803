"""segcore: real-time, exact, incremental behavioural segmentation.

>>> import segcore
>>> eng = segcore.Engine()
>>> _ = eng.add_segment("engaged", "count(app_open, 7d) >= 2")
>>> _ = eng.track(1, "app_open", ts=0)
>>> eng.track(1, "app_open", ts=1_000)
[Transition(user=1, segment='engaged', entered=True, ts=1000)]
"""

from .engine import Engine, Firing, Transition, Transitions
from .errors import EventError, RuleError, SegcoreError, SnapshotError
from .hashing import bucket_of
from .sharded import ShardedEngine

__version__ = "0.1.0"

__all__ = [
    "Engine", "Transition", "Transitions", "Firing", "SegcoreError", "RuleError", "EventError",
    "SnapshotError", "bucket_of", "ShardedEngine", "__version__",
]
