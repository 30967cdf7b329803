"""Type stub of segcore's private compiled kernel (see _kernel.pyx)."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

@final
class Kernel:
    """Per-user hot state, the timer heap and the evaluator for one compiled plan."""

    n_feat: int
    n_seg: int
    n_atom: int
    n_codes: int
    istride: int
    fstride: int
    n_var: int
    n_trait: int
    n_score: int
    n_filter: int
    n_val: int
    n_key: int
    n_items: int
    n_users: int
    cap: int
    now: int
    mstride: int
    packed: bool                     # counter rows stored 6 bytes a value (else int64)
    row_f: npt.NDArray[np.uint8]      # one event's property row (track_one's buffers)
    row_v: npt.NDArray[np.float64]
    row_k: npt.NDArray[np.int64]
    n_fired: int
    n_evals: int
    pending_firings: int
    seq_cap: int
    seq_evicted: int
    pred_f: int
    pr_buy: int
    n_conv: int
    n_patom: int
    pr_spd: int

    def __init__(self, plan: dict[str, Any], compact: bool = ...) -> None: ...
    def add_users(self, n: int, buckets: npt.NDArray[np.int32]) -> None: ...
    def track(
        self,
        uidx: npt.NDArray[np.uint32],
        ecode: npt.NDArray[np.int32],
        ts: npt.NDArray[np.int64],
        fpass: npt.NDArray[np.uint8],
        vals: npt.NDArray[np.float64],
        keys: npt.NDArray[np.int64],
        clock: npt.NDArray[np.int64] | None = ...,
    ) -> int: ...
    def track_one(
        self,
        u: int,
        e: int,
        ts: int,
        fpass: npt.NDArray[np.uint8],
        vals: npt.NDArray[np.float64],
        keys: npt.NDArray[np.int64],
    ) -> int: ...
    def member_bits(
        self, uidx: npt.NDArray[np.uint32], seg: npt.NDArray[np.int32]
    ) -> npt.NDArray[np.bool_]: ...
    def advance(self, t: int) -> int: ...
    def eval_users(self, uidx: npt.NDArray[np.uint32]) -> int: ...
    def eval_all(self) -> int: ...
    def set_trait_bits(self, uidx: npt.NDArray[np.uint32], bits: npt.NDArray[np.uint8]) -> None: ...
    def set_scores(self, uidx: npt.NDArray[np.uint32], values: npt.NDArray[np.float64]) -> None: ...
    def copy_features_from(
        self, src: Kernel, dst_f: npt.NDArray[np.int32], src_f: npt.NDArray[np.int32]
    ) -> None: ...
    def merge_into(self, dst: int, src: int) -> None: ...
    def take_evicted(self) -> int: ...
    def set_pred_params(self, params: npt.NDArray[np.float64]) -> None: ...
    def pred_params(self) -> npt.NDArray[np.float64]: ...
    def pred_stats(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64],
                                  npt.NDArray[np.int64], npt.NDArray[np.float64],
                                  npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
    def pred_features(self, day: int) -> tuple[npt.NDArray[np.float64],
                                               npt.NDArray[np.uint8]]: ...
    def pred_scores_of(self, uidx: npt.NDArray[np.uint32], t: int) -> npt.NDArray[np.float64]: ...
    def pred_scores(self, t: int) -> npt.NDArray[np.float64]: ...
    def forget(self, u: int) -> None: ...
    def set_now(self, t: int) -> None: ...
    def take_transitions(
        self,
    ) -> tuple[
        npt.NDArray[np.uint32], npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.int64]
    ]: ...
    def take_transitions_list(self) -> list[tuple[int, int, bool, int]]: ...
    def member_row(self, u: int) -> npt.NDArray[np.bool_]: ...
    def _member_bytes(self, n: int) -> npt.NDArray[np.uint8]: ...
    def migrate_from(
        self,
        old: Kernel,
        fmap: npt.NDArray[np.int32],
        smap: npt.NDArray[np.int32],
        imap: npt.NDArray[np.int32] | None = ...,
    ) -> None: ...
    def take_firings(
        self,
    ) -> tuple[
        npt.NDArray[np.int32],
        npt.NDArray[np.uint32],
        npt.NDArray[np.int64],
        npt.NDArray[np.int32],
        npt.NDArray[np.bool_],
    ]: ...
    def item_state(self, u: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]: ...
    def export_state(self) -> dict[str, Any]: ...
    def _rows_int64(self, n: int) -> npt.NDArray[np.int64]: ...
    def import_state(self, st: dict[str, Any]) -> None: ...
    def stats(self) -> dict[str, int]: ...


@final
class IdMap:
    """Open-addressing hash map from uint32 user numbers to dense indices (< 2**32 - 2)."""

    size: int
    capacity: int

    def __init__(self, capacity: int = ...) -> None: ...
    def lookup(self, ids: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]: ...
    def get(self, key: int) -> int: ...
    def remove(self, key: int) -> None: ...
    def insert(self, ids: npt.NDArray[np.uint32], dense: npt.NDArray[np.int64]) -> None: ...
    def put(self, key: int, dense: int) -> None: ...

@final
class FastState:
    """The engine state the compiled single-event path reads on every call."""

    kernel: Kernel | None
    ids: IdMap | None
    str_num: dict[int, str] | None
    specs: dict[str, Any] | None
    counts: list[int] | None
    values: dict[Any, int] | None
    clock: Any
    replaying: bool
    @property
    def stats(self) -> dict[str, int]: ...
    @stats.setter
    def stats(self, value: dict[str, int]) -> None: ...

def track_entry(
    eng: Any, user: Any, event: Any, ts: Any = ..., props: Any = ..., id: Any = ...
) -> Any: ...
