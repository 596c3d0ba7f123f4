"""The grouped expert FFN's backward per backend: forward vs forward + backward time.

  python benchmarks/grad_backends.py [--cases=1024:8,1024:64,4096:16] [--loads=balanced,zipf]
                                     [--backends=windowed,ragged_dot,dense] [--rounds=5]

For each case "R:E" (R rows sorted by expert into E groups; d_model --d_model, d_ff --d_ff,
--activation) and load ("balanced": equal groups; "zipf": multinomial, Zipf(--zipf) popularity),
every contender is timed in interleaved rounds (medians) as
  fwd      the jitted `grouped_matmul.grouped_ffn`, and
  fwd+bwd  the jitted `jax.value_and_grad` of sum(y * ct) w.r.t. the rows and the weights,
and the table gives their ratio. "dense ideal" is one FFN over all R rows with expert 0's
weights: the FLOP floor of an exact grouped FFN; its gradient is taken w.r.t. the whole [E, ...]
weight stack like the others' (zeros but for expert 0), so its fwd+bwd also pays for writing a
gradient of every expert's weights, which any grouped backward must (at E = 64 that write, not
the FLOPs, dominates). A backend whose warm-up takes longer than --slow_s seconds is timed once.
Every backend's gradients are checked against `jax.grad` of the "dense" backend's reference math
run group by group on the concrete group sizes before they are timed.

Results: a table on stdout and benchmarks/results/grad_backends_<date>_<host>.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moe_jax import experts, grouped_matmul  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("cases", "1024:8,1024:64,4096:16", "comma-separated rows:experts")
flags.DEFINE_string("loads", "balanced,zipf", "comma-separated: balanced, zipf")
flags.DEFINE_string("backends", "windowed,ragged_dot,dense", "comma-separated grouped backends")
flags.DEFINE_integer("d_model", 512, "model width")
flags.DEFINE_integer("d_ff", 1024, "expert hidden width")
flags.DEFINE_string("activation", "silu", "relu or silu (gated)")
flags.DEFINE_float("zipf", 1.2, "Zipf exponent of the skewed load")
flags.DEFINE_integer("rounds", 5, "timed interleaved rounds")
flags.DEFINE_float("slow_s", 20.0, "a contender whose warm-up takes longer is timed only once")
flags.DEFINE_bool("write", True, "write a JSON result file")


def group_sizes(num_rows, num_groups, load, *, zipf, seed=0):
  """<int32>[G] sizes summing to R: equal, or multinomial with Zipf popularity."""
  rng = np.random.default_rng(seed)
  if load == "balanced":
    sizes = np.full(num_groups, num_rows // num_groups)
    sizes[:num_rows % num_groups] += 1
    return sizes.astype(np.int32)
  if load != "zipf":
    raise app.UsageError(f"unknown load {load!r}; use balanced or zipf.")
  popularity = 1.0 / np.arange(1, num_groups + 1) ** zipf
  popularity = popularity[rng.permutation(num_groups)]
  return rng.multinomial(num_rows, popularity / popularity.sum()).astype(np.int32)


def make_weights(num_groups, d_model, d_ff, activation, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  weights = {"wi": jax.random.normal(keys[0], (num_groups, d_model, d_ff)) * d_model ** -0.5,
             "wo": jax.random.normal(keys[1], (num_groups, d_ff, d_model)) * d_ff ** -0.5}
  if activation == "silu":
    weights["wi_gate"] = jax.random.normal(keys[2], (num_groups, d_model, d_ff)) * d_model ** -0.5
  return weights


def reference_grads(x, sizes, weights, ct, activation):
  """(dx, dW) by `jax.grad` of each group's FFN over its own rows (concrete sizes)."""
  def loss(x, weights):
    total, row = 0.0, 0
    for g, n in enumerate(np.asarray(sizes)):
      if n:
        y = experts.ffn(x[row:row + n], weights["wi"][g], weights["wo"][g],
                        weights["wi_gate"][g] if "wi_gate" in weights else None, activation)
        total = total + jnp.sum(y * ct[row:row + n])
      row += int(n)
    return total
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, weights)


def contenders(backends, activation):
  """{name: (fwd(x, s, w, ct), fwd_bwd(x, s, w, ct))} jitted."""
  out = {}
  for name in ["dense ideal"] + backends:
    if name == "dense ideal":
      def ffn(x, s, w, name=name):
        del s
        return experts.ffn(x, w["wi"][0], w["wo"][0], w["wi_gate"][0] if "wi_gate" in w else None,
                           activation)
    else:
      def ffn(x, s, w, name=name):
        return grouped_matmul.grouped_ffn(x, s, w, activation=activation, backend=name)
    loss = lambda x, s, w, ct, ffn=ffn: jnp.sum(ffn(x, s, w) * ct)
    out[name] = (jax.jit(lambda x, s, w, ct, ffn=ffn: ffn(x, s, w)),
                 jax.jit(jax.value_and_grad(loss, argnums=(0, 2))))
  return out


def run_case(num_rows, num_groups, load, *, fns, weights, rounds, slow_s, log=print):
  sizes = group_sizes(num_rows, num_groups, load, zipf=FLAGS.zipf)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((num_rows, FLAGS.d_model), dtype=np.float32))
  ct = jnp.asarray(rng.standard_normal((num_rows, FLAGS.d_model), dtype=np.float32))
  args = (x, jnp.asarray(sizes), weights, ct)
  want = jax.tree.leaves(reference_grads(x, sizes, weights, ct, FLAGS.activation))
  result = {"rows": num_rows, "experts": num_groups, "load": load,
            "max_group": int(sizes.max()), "min_group": int(sizes.min()), "contenders": {}}
  calls, once = {}, set()
  for name, (fwd, fwd_bwd) in fns.items():
    entry = result["contenders"].setdefault(name, {})
    for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args))
      if time.perf_counter() - start > slow_s:
        once.add((name, kind))
      calls[(name, kind)] = lambda fn=fn: jax.block_until_ready(fn(*args))
    if name != "dense ideal":
      got = jax.tree.leaves(out[1])
      entry["grad_max_rel_err"] = max(
          float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, want))
      if entry["grad_max_rel_err"] > 1e-4:
        raise AssertionError(f"{name}: gradients disagree with the per-group reference "
                             f"(rel err {entry['grad_max_rel_err']:.1e})")
  times = {key: [] for key in calls}
  for r in range(rounds):
    for key, call in calls.items():
      if key in once and r > 0:
        continue
      start = time.perf_counter()
      call()
      times[key].append(time.perf_counter() - start)
  for (name, kind), ts in times.items():
    result["contenders"][name][f"{kind}_ms"] = float(np.median(ts) * 1e3)
    result["contenders"][name][f"{kind}_samples_ms"] = [t * 1e3 for t in ts]
  for entry in result["contenders"].values():
    entry["ratio"] = entry["fwd+bwd_ms"] / entry["fwd_ms"]
  log(_table(result))
  return result


def _table(result):
  lines = [f"R={result['rows']} E={result['experts']} {result['load']} "
           f"(groups {result['min_group']}..{result['max_group']})",
           f"  {'contender':12s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'ratio':>6s}  grad rel err"]
  for name, entry in result["contenders"].items():
    err = f"{entry['grad_max_rel_err']:.1e}" if "grad_max_rel_err" in entry else "-"
    lines.append(f"  {name:12s} {entry['fwd_ms']:9.1f} {entry['fwd+bwd_ms']:11.1f} "
                 f"{entry['ratio']:6.2f}  {err}")
  return "\n".join(lines)


def main(argv):
  del argv
  backends = [b.strip() for b in FLAGS.backends.split(",") if b.strip()]
  unknown = sorted(set(backends) - set(grouped_matmul.BACKENDS))
  if unknown:
    raise app.UsageError(f"unknown --backends {unknown}; use some of "
                         f"{sorted(grouped_matmul.BACKENDS)}.")
  fns = contenders(backends, FLAGS.activation)
  results = []
  for case in FLAGS.cases.split(","):
    num_rows, num_groups = (int(v) for v in case.split(":"))
    weights = make_weights(num_groups, FLAGS.d_model, FLAGS.d_ff, FLAGS.activation)
    for load in FLAGS.loads.split(","):
      results.append(run_case(num_rows, num_groups, load, fns=fns, weights=weights,
                              rounds=FLAGS.rounds, slow_s=FLAGS.slow_s))
  if FLAGS.write:
    import bench_io  # pylint: disable=import-outside-toplevel
    path = bench_io.write_result("grad_backends", {
        "flags": {k: getattr(FLAGS, k) for k in ("cases", "loads", "backends", "d_model", "d_ff",
                                                 "activation", "zipf", "rounds")},
        "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)
