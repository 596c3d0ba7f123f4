"""Tensor-at-a-time safetensors reading and writing, so memory stays at about one tensor.

Reading goes through `safetensors.safe_open(..., framework="numpy")`. It memory-maps the whole
file, and every page a read touches stays in the process's resident set (as file-backed pages)
until the map is closed, so reading a 10 GB shard through one handle shows up as +10 GB of RSS.
`ShardReader` therefore reopens the file after every `reopen_bytes` read. A checkpoint is one
`model.safetensors` or the shards of `model.safetensors.index.json`: `open_safetensors` finds them
(refusing torch pickles) and `SafetensorsSource` locates and reads their tensors.

Writing streams: the header (names, dtypes, shapes, offsets) is known from shapes alone, so
`write_file` writes it first and then each tensor as it is produced, never holding more than one.
The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
N bytes of JSON header, then the raw little-endian tensor bytes at the header's offsets.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from moe_jax.checkpoints.layout import CheckpointError

# numpy dtype name -> safetensors dtype code
DTYPE_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_ALIGN = 8
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


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
      try:
        handle = safe_open(self.path, framework="numpy")
        handle.__enter__()
      except SafetensorError as e:
        raise unreadable(self.path, e) from None
      self._handle, self._read_since_open = handle, 0
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
      try:
        tensor_slice = handle.get_slice(key)
        out[key] = (tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
      except SafetensorError as e:
        raise unreadable(self.path, e, key) from None
    return out

  def get(self, key: str) -> np.ndarray:
    try:
      array = self._open().get_tensor(key)
    except SafetensorError as e:
      raise unreadable(self.path, e, key) from None
    self._read_since_open += array.nbytes
    if self._read_since_open >= self.reopen_bytes:
      self.close()  # unmap: drops the file-backed pages this handle touched from our RSS
    return array


def unreadable(path: str, error: Exception, key: str | None = None) -> CheckpointError:
  """The one-line error for a file safetensors cannot read (truncated, corrupt, not safetensors)."""
  tensor = f" (tensor {key!r})" if key else ""
  size = os.path.getsize(path) if os.path.exists(path) else 0
  return CheckpointError(f"{path}{tensor} is not a readable safetensors file ({size} bytes; "
                         f"safetensors says: {error}); it is truncated or corrupt: download or "
                         "convert it again.")


# --- a checkpoint's files ---

@dataclasses.dataclass(frozen=True)
class TensorLocation:
  """Where one stored tensor is: its shape, safetensors dtype code and file."""

  shape: tuple[int, ...]
  dtype: str
  file: str


class SafetensorsSource:
  """The tensors of one checkpoint: a single `model.safetensors` or the shards of an index."""

  def __init__(self, files: Sequence[str], weight_map: dict[str, str] | None = None,
               index_file: str | None = None):
    self.files = list(files)
    self.weight_map = weight_map
    self.index_file = index_file

  def describe(self) -> str:
    return self.index_file or (self.files[0] if len(self.files) == 1 else str(self.files))

  def locate(self) -> dict[str, TensorLocation]:
    """Every tensor of every file, from the headers only; checks the index agrees with them."""
    found: dict[str, TensorLocation] = {}
    for file in self.files:
      with ShardReader(file) as reader:
        for key, (shape, dtype) in reader.infos().items():
          if key in found:
            raise CheckpointError(f"tensor {key!r} is stored twice: in {found[key].file} and "
                                  f"{file}; re-export the checkpoint.")
          found[key] = TensorLocation(shape, dtype, file)
    for key, name in (self.weight_map or {}).items():
      expected_file = os.path.join(os.path.dirname(self.index_file), name)
      if key not in found or os.path.abspath(found[key].file) != os.path.abspath(expected_file):
        where = found[key].file if key in found else "no shard"
        raise CheckpointError(f"{self.index_file} maps {key!r} to {name}, but it is in {where}; "
                              "the index and its shards disagree: re-download or re-export the "
                              "checkpoint.")
    return found

  def read(self, file: str, keys: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) for `keys` of `file`, one tensor alive at a time."""
    with ShardReader(file) as reader:
      for key in keys:
        yield key, reader.get(key)


def _bin_refusal(path: str) -> CheckpointError:
  directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
  return CheckpointError(
      f"{path!r} holds PyTorch pickle weights (pytorch_model*.bin), which moe_jax does not load "
      "(unpickling can run code). Convert them once to safetensors with `python "
      f"launch/convert_hf.py --src={directory} --dst={directory.rstrip('/')}-safetensors` "
      "(needs torch; it reads tensors only), or download the repository's model.safetensors "
      "files (for some checkpoints they are on a refs/pr/N revision).")


def open_safetensors(path: str) -> tuple[str, SafetensorsSource]:
  """(checkpoint directory, source) for a checkpoint directory, a .safetensors file or an index."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist.")
  if os.path.isfile(path):
    name = os.path.basename(path)
    directory = os.path.dirname(os.path.abspath(path))
    if name.endswith(".bin") or name.endswith(".bin.index.json") or name.endswith(".pt"):
      raise _bin_refusal(path)
    if name.endswith(".index.json"):
      return directory, _source_from_index(path)
    if name.endswith(".safetensors"):
      return directory, SafetensorsSource([path])
    raise CheckpointError(f"{path!r} is neither a .safetensors file nor a *.index.json; point at "
                          "a Hugging Face checkpoint directory.")
  index = os.path.join(path, INDEX_NAME)
  single = os.path.join(path, WEIGHTS_NAME)
  if os.path.exists(index):
    return path, _source_from_index(index)
  if os.path.exists(single):
    return path, SafetensorsSource([single])
  if glob.glob(os.path.join(path, "pytorch_model*.bin")):
    raise _bin_refusal(path)
  stray = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if stray:
    raise FileNotFoundError(f"{path!r} has {[os.path.basename(s) for s in stray]} but no "
                            f"{INDEX_NAME} saying which tensor is in which shard; download it too.")
  raise FileNotFoundError(f"{path!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; point at a "
                          "Hugging Face checkpoint directory.")


def read_json(file: str):
  """The JSON content of `file`; CheckpointError naming the file if it is not valid JSON."""
  try:
    with open(file) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file} is not valid JSON ({e}); it is truncated or corrupt: download "
                          "it again.") from None


def _source_from_index(index_file: str) -> SafetensorsSource:
  index = read_json(index_file)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise CheckpointError(f"{index_file} has no 'weight_map' {{tensor name: shard file}}; it is "
                          "not a safetensors index.")
  directory = os.path.dirname(index_file)
  names = sorted(set(weight_map.values()))
  files = [os.path.join(directory, n) for n in names]
  missing = [n for n, f in zip(names, files) if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(f"{index_file} lists shards {missing} that are not in {directory}; "
                            "download all shards.")
  return SafetensorsSource(files, weight_map, index_file)



# --- writing ---

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
