"""Minimal safetensors reading (memory-mapped, lazy) and writing with numpy, bfloat16 included.

The `safetensors` package's numpy backend cannot represent bfloat16, which is how most Llama
checkpoints are stored; the format is simple (u64 header length, JSON header, raw little-endian
bytes), so it is read here directly with `np.memmap` and `ml_dtypes`. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from apo_jax.errors import UserError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(UserError, ValueError):
    """A .safetensors file that is truncated or not a safetensors file (the file is named)."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: header parsed now, tensor bytes mapped on access.

    Raises:
      SafetensorsError: the header does not parse or the file is shorter than it says.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if 8 + n > size:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
            raise SafetensorsError(
                f"{self.path}: not a readable safetensors file ({e}): download or export it again"
            ) from None
        if 8 + n + end > size:
            raise SafetensorsError(
                f"{self.path}: truncated: {size} bytes, its header needs {8 + n + end}; "
                "download or export it again"
            )
        self.metadata = header.pop("__metadata__", {})
        self._header = header
        self._offset = 8 + n

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return tuple(self._header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Read-only memory-mapped array for tensor `name` (bytes are read when touched)."""
        info = self._header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(
                f"{self.path}: unsupported safetensors dtype {info['dtype']} for {name}"
            )
        begin, _ = info["data_offsets"]
        shape = tuple(info["shape"])
        if 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._offset + begin, shape=shape)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Writes `tensors` (numpy arrays, bfloat16 allowed) to one .safetensors file.

    Args:
      path: output file.
      tensors: name -> array, written in the given order.
      metadata: string metadata; `format: pt` is added so transformers accepts the file.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _CODES:
            raise ValueError(f"cannot write dtype {arr.dtype} of {name} to safetensors")
        header[name] = {
            "dtype": _CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
