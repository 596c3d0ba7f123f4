"""Tensor-at-a-time safetensors reading and writing, so memory stays at about one tensor.

Reading goes through `safetensors.safe_open(..., framework="numpy")`. It memory-maps the whole
file, and every page a read touches stays in the process's resident set (as file-backed pages)
until the map is closed, so reading a 10 GB shard through one handle shows up as +10 GB of RSS.
`ShardReader` therefore reopens the file after every `reopen_bytes` read.

Writing streams: the header (names, dtypes, shapes, offsets) is known from shapes alone, so
`write_file` writes it first and then each tensor as it is produced, never holding more than one.
The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
N bytes of JSON header, then the raw little-endian tensor bytes at the header's offsets.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import numpy as np
from safetensors import safe_open

# numpy dtype name -> safetensors dtype code
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_ALIGN = 8


class ShardReader:
  """Reads tensors from one safetensors file, reopening it every `reopen_bytes` (see module doc).

    with ShardReader(path) as reader:
      shape, dtype_code = reader.infos()[key]
      array = reader.get(key)            # <dtype>[shape] numpy copy
  """

  def __init__(self, path: str, *, reopen_bytes: int = 64 << 20):
    self.path = path
    self.reopen_bytes = reopen_bytes
    self._handle = None
    self._read_since_open = 0

  def __enter__(self) -> "ShardReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _open(self):
    if self._handle is None:
      self._handle = safe_open(self.path, framework="numpy")
      self._handle.__enter__()
      self._read_since_open = 0
    return self._handle

  def close(self) -> None:
    if self._handle is not None:
      self._handle.__exit__(None, None, None)
      self._handle = None

  def infos(self) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, safetensors dtype code)} read from the header only."""
    handle = self._open()
    out = {}
    for key in handle.keys():
      tensor_slice = handle.get_slice(key)
      out[key] = (tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
    return out

  def get(self, key: str) -> np.ndarray:
    array = self._open().get_tensor(key)
    self._read_since_open += array.nbytes
    if self._read_since_open >= self.reopen_bytes:
      self.close()  # unmap: drops the file-backed pages this handle touched from our RSS
    return array


def nbytes(shape: Iterable[int], dtype) -> int:
  return int(np.prod(tuple(shape), dtype=np.int64)) * np.dtype(dtype).itemsize


def dtype_code(dtype) -> str:
  name = np.dtype(dtype).name
  if name not in DTYPE_CODES:
    raise ValueError(f"dtype {name} has no safetensors code; use one of {sorted(DTYPE_CODES)}.")
  return DTYPE_CODES[name]


def write_file(path: str, entries: list[tuple[str, tuple[int, ...], np.dtype]],
               get_tensor: Callable[[str], np.ndarray], *,
               metadata: dict[str, str] | None = None) -> int:
  """Writes a safetensors file tensor by tensor; returns the bytes of tensor data written.

  Args:
    path: destination file (written to `path + ".tmp"`, then renamed).
    entries: (key, shape, dtype) of every tensor, in the order they are written.
    get_tensor: key -> array of exactly that shape and dtype, called once per key, in order.
    metadata: the header's `__metadata__` (str -> str), e.g. {"format": "pt"} for transformers.
  """
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for key, shape, dtype in entries:
    size = nbytes(shape, dtype)
    header[key] = {"dtype": dtype_code(dtype), "shape": [int(s) for s in shape],
                   "data_offsets": [offset, offset + size]}
    offset += size
  header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
  header_bytes += b" " * (-len(header_bytes) % _ALIGN)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for key, shape, dtype in entries:
      array = np.ascontiguousarray(get_tensor(key))
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"{key}: produced {array.dtype}{list(array.shape)}, the header promised "
                         f"{np.dtype(dtype)}{list(shape)}.")
      if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
      f.write(array.reshape(-1).view(np.uint8).data)
      del array
  os.replace(tmp, path)
  return offset
