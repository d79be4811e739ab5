"""How tensors are laid out as zarr v3 arrays in the job store: dtypes, chunks, numpy views.

zarr speaks numpy, which has no bfloat16 or float8: those are stored as an unsigned integer view of
the same width, and the torch dtype is kept in the array's ``torch_dtype`` attribute.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import zarr

#: Default chunk size when chunking along the first axis.
TARGET_CHUNK_BYTES = 64 * 2**20

# Torch dtypes numpy lacks: stored as an unsigned integer view of the same width.
_VIEW_DTYPES: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.uint16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _VIEW_DTYPES[getattr(torch, _name)] = torch.uint8


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise TypeError(f"unknown torch dtype {dtype!r}")
    return value


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a tensor of ``dtype`` is stored as."""
    stored = _VIEW_DTYPES.get(dtype, dtype)
    try:
        return torch.empty((), dtype=stored).numpy().dtype
    except TypeError as exc:
        raise ValueError(f"tensors of dtype {dtype} cannot be stored in a job store") from exc


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().to("cpu").contiguous()
    if t.dtype in _VIEW_DTYPES:
        t = t.view(_VIEW_DTYPES[t.dtype])
    return t.numpy()


def from_numpy(array: Any, dtype: torch.dtype) -> torch.Tensor:
    arr = np.asarray(array)  # zarr gives a numpy scalar for 0-d arrays
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    t = torch.from_numpy(arr)
    return t.view(dtype) if dtype in _VIEW_DTYPES else t


def default_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk along the first axis only, about ``TARGET_CHUNK_BYTES`` per chunk."""
    if not shape:
        return ()
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = max(1, TARGET_CHUNK_BYTES // max(row_bytes, 1))
    return (max(1, min(shape[0], rows)), *(max(1, s) for s in shape[1:]))


def normalize_chunks(
    chunks: int | Iterable[int] | None, shape: tuple[int, ...], itemsize: int
) -> tuple[int, ...]:
    """A full chunk shape from ``chunks``: None (about 64 MiB along the first axis), an int (rows
    per chunk) or a full shape (checked)."""
    if chunks is None:
        return default_chunks(shape, itemsize)
    if isinstance(chunks, int):
        if not shape:
            return ()
        return (max(1, chunks), *(max(1, s) for s in shape[1:]))
    out = tuple(int(c) for c in chunks)
    if len(out) != len(shape) or any(c < 1 for c in out):
        raise ValueError(f"chunks {out} do not fit an array of shape {shape}")
    return out


def write_head(z: zarr.Array, data: np.ndarray, start: int = 0) -> None:
    """Write the first half of ``data``'s rows at ``start`` (a torn write, for fault injection)."""
    if data.ndim == 0:
        return
    half = (len(data) + 1) // 2
    z[start : start + half] = data[:half]
