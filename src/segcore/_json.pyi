"""Type stub of segcore's compiled ``track_json`` scanner (see _json.pyx)."""

from typing import Any

import numpy as np
import numpy.typing as npt

def json_row_columns(
    rows: list[Any],
) -> tuple[
    npt.NDArray[np.int64] | list[Any],
    list[Any],
    npt.NDArray[np.int64] | list[Any],
    list[Any] | None,
    dict[str, list[Any]],
]: ...
def scan_events(
    body: bytes | bytearray,
) -> (
    tuple[
        npt.NDArray[np.int64] | list[Any],
        list[str],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64] | list[Any],
        list[Any] | None,
        dict[str, npt.NDArray[Any]],
    ]
    | None
): ...
