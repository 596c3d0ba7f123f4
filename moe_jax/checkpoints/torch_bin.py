"""PyTorch `pytorch_model*.bin` checkpoints: read shard by shard, never through a full unpickler.

Needs torch (the `peer` extra); importing this module without it is fine, calling it is not.
Every load is `torch.load(file, weights_only=True, map_location="cpu", mmap=True)`: the restricted
unpickler only rebuilds tensors and plain containers, and `mmap` leaves the tensor bytes in the
file until they are read. A file it refuses (a pickle that needs any other object) or cannot read
is a one-line `CheckpointError` naming it; nothing here ever retries with a full unpickler.
As with safetensors (see `safetensors_io`), pages read through a map stay in our resident set
until it is dropped, so the shard is re-mapped every `reopen_bytes`.

  bin_to_safetensors("switch-base-128", "switch-base-128-st")   # same keys, shard by shard
  params = hf_io.assemble_params(BinSource.open("switch-base-8"), key_map)
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from typing import Iterator, Sequence

import numpy as np

from moe_jax.checkpoints import safetensors_io
from moe_jax.checkpoints.layout import CheckpointError
from moe_jax.checkpoints.safetensors_io import TensorLocation

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
_DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def require_torch():
  """The torch module, or ImportError saying how to get it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading pytorch_model*.bin needs torch, which is not installed: "
                      "`pip install torch` (CPU wheels suffice), or download the checkpoint's "
                      "model*.safetensors files instead.") from e
  return torch


def load_state_dict(file: str) -> dict:
  """{key: torch.Tensor} of one .bin file, restricted unpickler, memory-mapped when possible."""
  return _load(file)[0]


def _load(file: str) -> tuple[dict, bool]:
  """(state dict, whether it is memory-mapped); CheckpointError naming `file` if it is refused or
  unreadable."""
  torch = require_torch()
  mapped = True
  try:
    with warnings.catch_warnings():   # e.g. "Detected pickle protocol 4": the refusal says it all
      warnings.simplefilter("ignore", UserWarning)
      try:
        state = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
      except RuntimeError as e:
        if "mmap" not in str(e):  # only the legacy (pre zip) format cannot be mapped
          raise
        state = torch.load(file, weights_only=True, map_location="cpu")
        mapped = False
  except pickle.UnpicklingError as e:
    raise refused(file, e) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    reason = " ".join(str(e).split()).split(". ")[0]
    raise CheckpointError(f"{file} is not a readable torch checkpoint ({reason}); it is truncated "
                          "or corrupt: download it again.") from None
  if not isinstance(state, dict):
    raise CheckpointError(f"{file} holds a {type(state).__name__}, not a state dict {{name: "
                          "tensor}}; it is not a model checkpoint.")
  return state, mapped


def refused(file: str, error: Exception) -> CheckpointError:
  """The one-line refusal of a pickle that needs more than tensors and plain containers."""
  message = str(error)
  needed = re.search(r"GLOBAL ([\w.]+)", message)
  operand = re.search(r"Unsupported operand \d+", message)
  if needed:
    what = f"it needs {needed.group(1)}"
  elif operand:
    what = f"it is not a pickle of tensors ({operand.group(0)})"
  else:
    what = "it holds more than tensors"
  return CheckpointError(
      f"{file} is refused on purpose: {what}, and moe_jax reads .bin files with torch's "
      "weights-only unpickler, which rebuilds only tensors and plain containers, because "
      "unpickling anything else can run code. Use the checkpoint's model*.safetensors files, or "
      "a .bin saved as a plain state dict {name: tensor}.")


def to_numpy(tensor) -> np.ndarray:
  """A CPU torch tensor as numpy (zero-copy where possible); bf16 via ml_dtypes."""
  torch = require_torch()
  tensor = tensor.detach().contiguous()
  if tensor.dtype == torch.bfloat16:
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def numpy_dtype(torch_dtype) -> np.dtype:
  """The numpy dtype `to_numpy` gives a tensor of `torch_dtype`."""
  torch = require_torch()
  return to_numpy(torch.empty((0,), dtype=torch_dtype)).dtype


def bin_files(src: str) -> tuple[str, list[str], dict[str, str] | None]:
  """(directory, .bin files in order, weight_map or None) of a .bin checkpoint dir or file."""
  if os.path.isdir(src):
    index = os.path.join(src, BIN_INDEX_NAME)
    single = os.path.join(src, BIN_NAME)
    if os.path.exists(index):
      src = index
    elif os.path.exists(single):
      src = single
    else:
      raise FileNotFoundError(f"{src!r} has neither {BIN_NAME} nor {BIN_INDEX_NAME}.")
  if not os.path.exists(src):
    raise FileNotFoundError(f"{src!r} does not exist.")
  directory = os.path.dirname(os.path.abspath(src))
  if src.endswith(".index.json"):
    index = safetensors_io.read_json(src)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{src} has no 'weight_map'; it is not a sharded checkpoint index.")
    files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(f"{src} lists shards that are missing: {missing}.")
    return directory, files, weight_map
  if src.endswith(".bin"):
    return directory, [os.path.abspath(src)], None
  raise ValueError(f"{src!r} is not a pytorch_model*.bin file, its index, or a directory of them.")


class BinSource:
  """The tensors of a .bin checkpoint, for `hf_io.assemble_params`."""

  def __init__(self, files: Sequence[str], *, reopen_bytes: int = 64 << 20):
    self.files = list(files)
    self.reopen_bytes = reopen_bytes

  @classmethod
  def open(cls, src: str, **kwargs) -> "BinSource":
    return cls(bin_files(src)[1], **kwargs)

  def describe(self) -> str:
    return self.files[0] if len(self.files) == 1 else str(self.files)

  def locate(self) -> dict[str, TensorLocation]:
    found = {}
    for file in self.files:
      for key, tensor in load_state_dict(file).items():
        name = str(tensor.dtype).removeprefix("torch.")
        found[key] = TensorLocation(tuple(tensor.shape), _DTYPE_CODES.get(name, name), file)
    return found

  def read(self, file: str, keys: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    state, mapped, read = None, False, 0
    for key in keys:
      if state is None:
        (state, mapped), read = _load(file), 0
      array = to_numpy(state[key])
      read += array.nbytes
      yield key, array
      del array
      if mapped and read >= self.reopen_bytes:
        state = None  # drop the map (see module doc); an unmapped legacy file is kept whole


def _safetensors_name(bin_name: str) -> str:
  """pytorch_model.bin -> model.safetensors; pytorch_model-00001-of-00003.bin ->
  model-00001-of-00003.safetensors (the names transformers writes)."""
  stem = bin_name[:-len(".bin")]
  if stem.startswith("pytorch_model"):
    stem = "model" + stem[len("pytorch_model"):]
  return stem + ".safetensors"


def bin_to_safetensors(src: str, dst: str, *, reopen_bytes: int = 64 << 20) -> list[str]:
  """Converts a .bin checkpoint to safetensors with the same keys, one shard at a time.

  Each output shard is written tensor by tensor from the memory-mapped input shard, so memory
  stays at about one tensor plus `reopen_bytes` of mapped pages. The other files of the directory
  (config.json, tokenizer, ...) are copied.

  Returns:
    The files written under `dst`.
  """
  require_torch()
  directory, files, weight_map = bin_files(src)
  os.makedirs(dst, exist_ok=True)
  source = BinSource(files, reopen_bytes=reopen_bytes)
  written, new_map, total = [], {}, 0
  for file in files:
    name = _safetensors_name(os.path.basename(file))
    entries = [(key, tuple(t.shape), numpy_dtype(t.dtype)) for key, t in
               load_state_dict(file).items()]
    tensors = source.read(file, [key for key, _, _ in entries])

    def get_tensor(key, tensors=tensors):
      read_key, array = next(tensors)
      assert read_key == key, (read_key, key)
      return array

    out = os.path.join(dst, name)
    total += safetensors_io.write_file(out, entries, get_tensor, metadata={"format": "pt"})
    tensors.close()
    new_map.update({key: name for key, _, _ in entries})
    written.append(out)
  if weight_map is not None:
    index = os.path.join(dst, "model.safetensors.index.json")
    with open(index, "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": new_map}, f, indent=2)
    written.append(index)
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path) and not name.endswith(".bin") and name != BIN_INDEX_NAME:
      shutil.copy2(path, os.path.join(dst, name))
      written.append(os.path.join(dst, name))
  return written
