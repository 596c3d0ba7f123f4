"""The dropless expert FFN on CPU: grouped-matmul backends vs a dense matmul of equal FLOPs.

  python benchmarks/grouped_matmul.py [--cases=1024:8,1024:16,1024:128,4096:8,4096:16,4096:128]
                                      [--loads=balanced,uniform,zipf] [--rounds=5]

For each case "T:E" (T rows sorted by expert, E experts, d_model --d_model, d_ff --d_ff, relu) and
each load ("balanced": equal group sizes; "uniform": multinomial with equal popularity; "zipf":
multinomial with Zipf(--zipf) popularity), contenders run in interleaved rounds (medians):
  dense ideal    one FFN over all T rows (the FLOPs every exact backend must do),
  windowed       moe_jax's CPU backend (`gmm_backend="windowed"`),
  windowed_prev  the backend as it was before this benchmark's changes (kept here for the record),
  ragged_dot     `jax.lax.ragged_dot` (timed once when its warm-up takes > --slow_s seconds),
  batched@max    one batched einsum over every expert with C = the largest group (exact; all
                 experts' weights read once, in place; shown for the sparse regime),
  capacity       a capacity-factor einsum, C = ceil(1.25 T / E) rows per expert: fast but drops
                 the overflow (its drop rate is printed), so not a like-for-like contender.
  torch          (opt-in: add it to --contenders; needs torch) one torch matmul pair per
                 non-empty group, as transformers' Switch expert loop runs them (MKL/oneDNN
                 sgemm), float32 only: how far XLA:CPU's own GEMM is from torch's at these sizes.
Every exact contender is checked against a numpy per-group reference before it is timed.

Results: a table on stdout and benchmarks/results/grouped_matmul_<date>_<host>.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the torch contender: see peer_switch.py

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moe_jax import experts, experts_cpu, grouped_matmul  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("cases", "1024:8,1024:16,1024:128,4096:8,4096:16,4096:128",
                    "comma-separated rows:experts")
flags.DEFINE_string("loads", "balanced,zipf", "comma-separated: balanced, uniform, zipf")
flags.DEFINE_string("contenders", "dense ideal,windowed,windowed_prev,ragged_dot,capacity",
                    "comma-separated contenders to run")
flags.DEFINE_integer("d_model", 768, "model width")
flags.DEFINE_integer("d_ff", 3072, "expert hidden width")
flags.DEFINE_float("zipf", 1.2, "Zipf exponent of the skewed load")
flags.DEFINE_integer("rounds", 5, "timed interleaved rounds")
flags.DEFINE_float("slow_s", 5.0, "a contender whose warm-up takes longer is timed only once")
flags.DEFINE_string("dtype", "float32", "float32 or bfloat16")
flags.DEFINE_bool("write", True, "write a JSON result file")


def group_sizes(num_rows: int, num_groups: int, load: str, *, zipf: float, seed: int = 0):
  """<int32>[G] group sizes summing to R: equal, multinomial-uniform, or multinomial-Zipf."""
  rng = np.random.default_rng(seed)
  if load == "balanced":
    sizes = np.full(num_groups, num_rows // num_groups)
    sizes[:num_rows % num_groups] += 1
    return sizes.astype(np.int32)
  if load == "uniform":
    popularity = np.ones(num_groups)
  elif load == "zipf":
    popularity = 1.0 / np.arange(1, num_groups + 1) ** zipf
    popularity = popularity[rng.permutation(num_groups)]
  else:
    raise ValueError(f"unknown load {load!r}; use balanced, uniform or zipf.")
  return rng.multinomial(num_rows, popularity / popularity.sum()).astype(np.int32)


def reference_ffn(x, sizes, wi, wo):
  """numpy per-group FFN in float32: the exactness oracle."""
  out = np.zeros_like(x)
  row = 0
  for g, n in enumerate(sizes):
    if n:
      out[row:row + n] = np.maximum(x[row:row + n] @ wi[g], 0) @ wo[g]
    row += n
  return out


def legacy_windowed_ffn(x, group_sizes, weights, *, window=256, tail_window=64):
  """The windowed backend as it was at HEAD before this change (relu), for before/after figures.

  Two fori_loops over windows that lie inside one group: full `window`-row windows, then masked
  `tail_window`-row windows for each group's remainder; expert weights are indexed per window.
  """
  num_rows = x.shape[0]
  starts = jnp.cumsum(group_sizes) - group_sizes
  full = group_sizes // window
  x_padded = jnp.pad(x, ((0, window), (0, 0)))
  out = jnp.zeros_like(x_padded)

  def loop(out, starts, windows, size, group_end):
    ends = jnp.cumsum(windows)
    firsts = ends - windows

    def body(i, out):
      g = jnp.searchsorted(ends, i, side="right")
      row = starts[g] + (i - firsts[g]) * size
      x_win = jax.lax.dynamic_slice_in_dim(x_padded, row, size)
      y_win = jnp.dot(jax.nn.relu(jnp.dot(x_win, weights["wi"][g])), weights["wo"][g])
      if group_end is not None:
        inside = (row + jnp.arange(size)) < group_end[g]
        y_win = jnp.where(inside[:, None], y_win, jax.lax.dynamic_slice_in_dim(out, row, size))
      return jax.lax.dynamic_update_slice_in_dim(out, y_win, row, axis=0)

    return jax.lax.fori_loop(0, ends[-1], body, out)

  out = loop(out, starts, full, window, None)
  tail_rows = group_sizes - full * window
  out = loop(out, starts + full * window, (tail_rows + tail_window - 1) // tail_window,
             tail_window, starts + group_sizes)
  valid = jnp.arange(num_rows) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], out[:num_rows], 0)


def capacity_contender(x, sizes, weights, capacity):
  """Capacity-factor einsum: the first `capacity` rows of each group; the rest dropped (0)."""
  num_rows = x.shape[0]
  num_groups = sizes.shape[0]
  starts = jnp.cumsum(sizes) - sizes
  index = starts[:, None] + jnp.arange(capacity)[None, :]                    # [G, C]
  kept = jnp.arange(capacity)[None, :] < sizes[:, None]
  buffers = jnp.where(kept[..., None], x[jnp.clip(index, 0, num_rows - 1)], 0)
  y = experts.capacity_ffn(buffers, weights, activation="relu")               # [G, C, d]
  flat = jnp.where(kept, index, num_rows).reshape(-1)
  return jnp.zeros_like(x).at[flat].set(y.reshape(num_groups * capacity, -1), mode="drop")


def contender_fns(num_rows, num_groups, max_group):
  capacity = int(np.ceil(1.25 * num_rows / num_groups))
  return {
      "dense ideal": jax.jit(lambda x, s, w: experts.ffn(x, w["wi"][0], w["wo"][0], None,
                                                          "relu")),
      "windowed": jax.jit(lambda x, s, w: grouped_matmul.grouped_ffn(
          x, s, w, activation="relu", backend="windowed")),
      "windowed_prev": jax.jit(legacy_windowed_ffn),
      "ragged_dot": jax.jit(lambda x, s, w: grouped_matmul.grouped_ffn(
          x, s, w, activation="relu", backend="ragged_dot")),
      "batched@max": jax.jit(lambda x, s, w: capacity_contender(x, s, w, max(max_group, 1))),
      "capacity": jax.jit(lambda x, s, w: capacity_contender(x, s, w, capacity)),
  }


def torch_contender(x, sizes, weights):
  """() -> <f32>[R, d] numpy: relu(x_g wi_g) wo_g per non-empty group g with torch (inputs
  converted once, outside the timed call)."""
  import torch  # pylint: disable=import-outside-toplevel
  wi = torch.from_numpy(np.array(weights["wi"], np.float32))   # writable copies for torch
  wo = torch.from_numpy(np.array(weights["wo"], np.float32))
  rows = torch.from_numpy(np.array(x, np.float32))
  bounds = np.concatenate([[0], np.cumsum(sizes)])

  def run():
    out = torch.zeros_like(rows)
    with torch.inference_mode():
      for g in np.flatnonzero(sizes):
        lo, hi = bounds[g], bounds[g + 1]
        out[lo:hi] = torch.relu(rows[lo:hi] @ wi[g]) @ wo[g]
    return out.numpy()
  return run


def run_case(num_rows, num_groups, load, *, names, rounds, slow_s, dtype, weights, log=print):
  sizes = group_sizes(num_rows, num_groups, load, zipf=FLAGS.zipf)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((num_rows, FLAGS.d_model), dtype=np.float32)
  want = reference_ffn(x, sizes, np.asarray(weights["wi"], np.float32),
                       np.asarray(weights["wo"], np.float32))
  scale = float(np.max(np.abs(want)))
  args = (jnp.asarray(x, dtype), jnp.asarray(sizes), weights)
  fns = {k: v for k, v in contender_fns(num_rows, num_groups, int(sizes.max())).items()
         if k in names}
  if "torch" in names:
    if dtype != jnp.float32:
      raise app.UsageError("the torch contender runs float32 only; drop it or use "
                           "--dtype=float32.")
    run_torch = torch_contender(x, sizes, weights)
    fns["torch"] = lambda *_: run_torch()
  result = {"rows": num_rows, "experts": num_groups, "load": load,
            "max_group": int(sizes.max()), "min_group": int(sizes.min()), "contenders": {}}
  once = set()
  for name, fn in fns.items():
    start = time.perf_counter()
    got = np.asarray(jax.block_until_ready(fn(*args)), np.float32)
    warm = time.perf_counter() - start
    if warm > slow_s:
      once.add(name)
    entry = result["contenders"].setdefault(name, {})
    if name not in ("dense ideal",):
      err = float(np.max(np.abs(got - want))) / scale
      entry["max_rel_err"] = err
      if name == "capacity":
        entry["dropped_rows"] = int(np.maximum(sizes - int(np.ceil(1.25 * num_rows / num_groups)),
                                               0).sum())
      elif err > (2e-2 if dtype == jnp.bfloat16 else 1e-4):
        raise AssertionError(f"{name} disagrees with the reference: rel err {err:.2e}")
  times = {name: [] for name in fns}
  for r in range(rounds):
    for name, fn in fns.items():
      if name in once and r > 0:
        continue
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  ideal = np.median(times["dense ideal"]) if "dense ideal" in times else None
  for name, ts in times.items():
    entry = result["contenders"][name]
    entry["median_ms"] = float(np.median(ts) * 1e3)
    entry["samples_ms"] = [t * 1e3 for t in ts]
    if ideal:
      entry["x_dense"] = float(np.median(ts) / ideal)
  log(_table(result))
  return result


def _table(result):
  lines = [f"T={result['rows']} E={result['experts']} {result['load']} "
           f"(groups {result['min_group']}..{result['max_group']})"]
  for name, entry in result["contenders"].items():
    extra = ""
    if "dropped_rows" in entry:
      extra = f"  drops {entry['dropped_rows']}/{result['rows']} rows"
    elif "max_rel_err" in entry:
      extra = f"  rel err {entry['max_rel_err']:.1e}"
    ratio = f"{entry['x_dense']:7.2f}x" if "x_dense" in entry else ""
    lines.append(f"  {name:16s} {entry['median_ms']:10.1f} ms {ratio}{extra}")
  return "\n".join(lines)


def main(argv):
  del argv
  dtype = jnp.dtype(FLAGS.dtype)
  names = [n.strip() for n in FLAGS.contenders.split(",")]
  results = []
  weights_cache = {}
  for case in FLAGS.cases.split(","):
    num_rows, num_groups = (int(v) for v in case.split(":"))
    if num_groups not in weights_cache:
      weights_cache.clear()
      keys = jax.random.split(jax.random.key(0), 2)
      weights_cache[num_groups] = {
          "wi": (jax.random.normal(keys[0], (num_groups, FLAGS.d_model, FLAGS.d_ff))
                 * FLAGS.d_model ** -0.5).astype(dtype),
          "wo": (jax.random.normal(keys[1], (num_groups, FLAGS.d_ff, FLAGS.d_model))
                 * FLAGS.d_ff ** -0.5).astype(dtype)}
    for load in FLAGS.loads.split(","):
      results.append(run_case(num_rows, num_groups, load, names=names, rounds=FLAGS.rounds,
                              slow_s=FLAGS.slow_s, dtype=dtype,
                              weights=weights_cache[num_groups]))
  if FLAGS.write:
    import peer_switch  # pylint: disable=import-outside-toplevel
    path = peer_switch.write_result("grouped_matmul", {
        "flags": {k: getattr(FLAGS, k) for k in ("cases", "loads", "contenders", "d_model",
                                                 "d_ff", "zipf", "rounds", "dtype")},
        "plans": {f"{r['rows']}:{r['experts']}": str(experts_cpu.window_plan(r["rows"],
                                                                             r["experts"]))
                  for r in results},
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)
