"""Type stub of segcore's private compiled kernel (see _kernel.pyx)."""

from typing import Any

import numpy as np
import numpy.typing as npt

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
    n_users: int
    cap: int
    now: int

    def __init__(self, plan: dict[str, Any]) -> None: ...
    def add_users(self, n: int, buckets: npt.NDArray[np.int32]) -> None: ...
    def track(
        self,
        uidx: npt.NDArray[np.uint32],
        ecode: npt.NDArray[np.int32],
        ts: npt.NDArray[np.int64],
        fpass: npt.NDArray[np.uint8],
        vals: npt.NDArray[np.float64],
        keys: npt.NDArray[np.int64],
    ) -> int: ...
    def advance(self, t: int) -> int: ...
    def eval_users(self, uidx: npt.NDArray[np.uint32]) -> int: ...
    def eval_all(self) -> int: ...
    def set_trait_bits(self, uidx: npt.NDArray[np.uint32], bits: npt.NDArray[np.uint8]) -> None: ...
    def set_scores(self, uidx: npt.NDArray[np.uint32], values: npt.NDArray[np.float64]) -> None: ...
    def set_now(self, t: int) -> None: ...
    def take_transitions(
        self,
    ) -> tuple[
        npt.NDArray[np.uint32], npt.NDArray[np.int32], npt.NDArray[np.bool_], npt.NDArray[np.int64]
    ]: ...
    def member_row(self, u: int) -> npt.NDArray[np.bool_]: ...
    def migrate_from(
        self, old: Kernel, fmap: npt.NDArray[np.int32], smap: npt.NDArray[np.int32]
    ) -> None: ...
    def stats(self) -> dict[str, int]: ...
