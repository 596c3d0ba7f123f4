"""Routing traces as per-layer, per-expert counts: a small JSON file format.

A counts file records, for every MoE layer of a model, how many routed choices went to each
expert over some set of tokens (recorded by moe_jax or elsewhere), so that a placement such as
EPLB (`moe_jax.eplb`) can be driven by counts measured on another system:

  {
    "format": "moe_jax.expert_counts",
    "version": 1,
    "num_experts": 8,
    "stacks": {"encoder": [[120, 3, 40, 0, 9, 11, 60, 13],      <- MoE layer 0 of "encoder"
                           [15, 80, 22, 31, 7, 44, 19, 38]],     <- MoE layer 1
               "decoder": [[...], ...]},
    "tokens": 128,
    "source": "switch_tiny on pydoc text, batch 16 x 8"
  }

  format       the string "moe_jax.expert_counts" (required).
  version      1 (required); a reader rejects versions it does not know.
  num_experts  E (required): every row has exactly E entries.
  stacks       {stack name: rows} (required): one row per MoE layer of that stack, in layer order
               (the model's MoE layers only; dense layers have no row). Entry e of a row is the
               number of (token, top-k choice) pairs routed to expert e; finite and >= 0.
               Integers for raw counts; fractions are allowed (averaged or decayed counts).
  tokens       tokens the counts were recorded over (optional; an int >= 0, or null).
  source       free text: model, data, commit (optional).
Other keys are ignored.

  save("counts.json", {"decoder": counts}, tokens=4096, source="...")   # counts: [n, E]
  counts = load("counts.json", layer_counts={"decoder": 4}, num_experts=32)
  columns = eplb.place(counts["decoder"][layer], cfg, num_replica_slots=2, mesh=mesh)

Every problem is one `ValueError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

FORMAT = "moe_jax.expert_counts"
VERSION = 1


def save(path, counts: dict, *, tokens: int | None = None, source: str = "") -> None:
  """Writes `counts` {stack: <[n, E]>} (arrays or nested lists) to `path` in the format above.

  ValueError (naming `path`) for ragged or non-2-D counts, stacks of different E, negative or
  non-finite counts, or a bad `tokens`.
  """
  if not isinstance(counts, dict) or not counts:
    raise ValueError(f"{path}: counts must be a non-empty dict {{stack name: [n, E] counts}}, "
                     f"got {type(counts).__name__}.")
  if tokens is not None and (not isinstance(tokens, (int, np.integer)) or isinstance(tokens, bool)
                             or tokens < 0):
    raise ValueError(f"{path}: tokens must be an int >= 0 or None, got {tokens!r}.")
  stacks = {}
  for stack, rows in counts.items():
    try:
      array = np.asarray(rows, np.float64)
    except (TypeError, ValueError) as error:
      raise ValueError(f"{path}: stack {stack!r} is not an [n, E] array of numbers "
                       f"(ragged rows?): {error}") from None
    stacks[str(stack)] = _checked(path, str(stack), array)
  widths = {stack: a.shape[1] for stack, a in stacks.items() if a.shape[0]}
  if len(set(widths.values())) > 1:
    raise ValueError(f"{path}: stacks have different numbers of experts {widths}; one file holds "
                     "one model's counts.")
  num_experts = next(iter(widths.values()), next(iter(stacks.values())).shape[1])
  document = {"format": FORMAT, "version": VERSION, "num_experts": int(num_experts),
              "stacks": {s: [[_number(v) for v in row] for row in a] for s, a in stacks.items()},
              "tokens": None if tokens is None else int(tokens), "source": str(source)}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(document, f, allow_nan=False)
    f.write("\n")


def load(path, *, layer_counts: dict | None = None,
         num_experts: int | None = None) -> dict:
  """{stack: <np.float32>[n, E]} the counts in the file at `path`.

  Args:
    layer_counts: {stack: n}, the model's MoE layers per stack; when given, the file must have
      exactly these stacks with these numbers of rows.
    num_experts: the model's E; when given, the file's must match.

  Raises:
    ValueError naming the file and the problem: not JSON, wrong format or version, E mismatch,
    stack or layer-count mismatch, ragged rows, negative or non-finite counts.
  """
  name = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      document = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{name}: not a JSON file ({error}); expected a {FORMAT} file.") from None
  if not isinstance(document, dict) or document.get("format") != FORMAT:
    found = document.get("format") if isinstance(document, dict) else type(document).__name__
    raise ValueError(f"{name}: format is {found!r}, expected {FORMAT!r} (see "
                     "moe_jax.expert_counts for the layout).")
  if document.get("version") != VERSION:
    raise ValueError(f"{name}: version {document.get('version')!r} is not supported; this "
                     f"moe_jax reads version {VERSION}.")
  declared = document.get("num_experts")
  if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
    raise ValueError(f"{name}: num_experts must be a positive int, got {declared!r}.")
  if num_experts is not None and declared != num_experts:
    raise ValueError(f"{name}: counts are for num_experts={declared}, but the model has "
                     f"{num_experts}; record counts with this model.")
  tokens = document.get("tokens")
  if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
    raise ValueError(f"{name}: tokens must be an int >= 0 or null, got {tokens!r}.")
  stacks = document.get("stacks")
  if not isinstance(stacks, dict) or not stacks:
    raise ValueError(f"{name}: stacks must be a non-empty object {{stack name: [[counts of "
                     f"layer 0], ...]}}, got {type(stacks).__name__}.")
  if layer_counts is not None and set(stacks) != set(layer_counts):
    raise ValueError(f"{name}: the file has stacks {sorted(stacks)}, the model has "
                     f"{sorted(layer_counts)}.")
  counts = {stack: _rows(name, stack, rows, declared) for stack, rows in stacks.items()}
  for stack, array in counts.items():
    if layer_counts is not None and array.shape[0] != layer_counts[stack]:
      raise ValueError(f"{name}: stack {stack!r} has {array.shape[0]} layers of counts, the "
                       f"model has {layer_counts[stack]} MoE layers there.")
  return counts


def _rows(name: str, stack: str, rows, num_experts: int) -> np.ndarray:
  """<np.float32>[n, E] one stack's rows, checked."""
  if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
    raise ValueError(f"{name}: stack {stack!r} must be a list of rows (one list of "
                     f"{num_experts} counts per MoE layer).")
  for index, row in enumerate(rows):
    if len(row) != num_experts:
      raise ValueError(f"{name}: stack {stack!r} layer {index} has {len(row)} counts, expected "
                       f"num_experts={num_experts} (ragged rows).")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
      raise ValueError(f"{name}: stack {stack!r} layer {index} holds a non-number.")
  array = np.asarray(rows, np.float64).reshape(len(rows), num_experts)
  return _checked(name, stack, array).astype(np.float32)


def _checked(name, stack: str, array: np.ndarray) -> np.ndarray:
  """`array` if it is [n, E] with finite, non-negative entries; else ValueError."""
  if array.ndim != 2:
    raise ValueError(f"{name}: stack {stack!r} has shape {array.shape}, expected [n, E] "
                     "(one row of per-expert counts per MoE layer).")
  bad = ~np.isfinite(array) | (array < 0)
  if bad.any():
    layer, expert = np.argwhere(bad)[0]
    raise ValueError(f"{name}: stack {stack!r} layer {layer} expert {expert} has count "
                     f"{array[layer, expert]}; counts must be finite and >= 0.")
  return array


def _number(value: float):
  """An int when the count is whole (compact files), else the float."""
  return int(value) if float(value).is_integer() and math.fabs(value) < 2 ** 53 else float(value)
