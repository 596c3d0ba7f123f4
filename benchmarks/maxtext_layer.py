"""One dropless MoE layer: MaxText's `RoutedMoE` vs moe_jax's `moe_apply`, same weights and routing.

MaxText needs Python >= 3.12 and jax >= 0.11, so this runs in its own virtual environment:

  ~/.pyenv/versions/3.12.1/bin/python -m venv .venv312
  .venv312/bin/pip install "jax>=0.11.1" flax aqtp qwix tokamax omegaconf pydantic etils \
      ml-collections optax orbax-checkpoint sentencepiece jaxtyping absl-py safetensors \
      jinja2 pathwaysutils huggingface_hub transformers grain drjax pillow
  .venv312/bin/pip install --no-deps maxtext          # its wheel declares no base dependencies
  .venv312/bin/python benchmarks/maxtext_layer.py --devices=1,8 --cases=1024:8,1024:32,1024:128

moe_jax is imported from this checkout (no install needed).

Same computation on both sides (d_model --d_model, expert width --d_ff, gated SiLU experts):
  MaxText: logits = x @ gate; top-k of the logits; weights = softmax over the k chosen logits;
           expert = wo(silu(wi_0 x) * wi_1 x); `sparse_matmul=True, megablox=False,
           capacity_factor=-1` (dropless, `jax.lax.ragged_dot` grouped matmul).
  moe_jax: top-k of softmax(x @ router) renormalised over the k chosen (the same weights);
           expert = wo(silu(wi_gate x) * wi x) with wi_gate = wi_0, wi = wi_1;
           ExecutionConfig(capacity_mode="dropless") with the CPU grouped-matmul backend
           (gmm_backend="auto" -> "windowed").
Each device count runs in its own subprocess (XLA's host device count is fixed at start-up):
1 device, and D simulated CPU devices with D-way expert parallelism (MaxText
ici_expert_parallelism=D, with its ragged all-to-all ("a2a", which XLA:CPU cannot compile) and its
all-gather based ring of experts ("ring"); and D-way FSDP without expert parallelism, "fsdp");
moe_jax always runs a mesh data=1 x expert=D with its padded all-to-all CPU fallback. Outputs are
compared (max abs diff) before anything is timed; a configuration that fails in MaxText is reported
with its error and skipped.

Results: a table on stdout and benchmarks/results/maxtext_layer_<date>_<host>.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("devices", "1,8", "comma-separated device counts (each in a subprocess)")
  flags.DEFINE_string("cases", "1024:8,1024:32,1024:128", "comma-separated tokens:experts")
  flags.DEFINE_integer("top_k", 1, "experts per token")
  flags.DEFINE_integer("d_model", 768, "model width")
  flags.DEFINE_integer("d_ff", 3072, "expert hidden width")
  flags.DEFINE_integer("seq_len", 128, "tokens per sequence (batch = tokens / seq_len)")
  flags.DEFINE_integer("rounds", 3, "timed interleaved rounds")
  flags.DEFINE_float("tolerance", 1e-4, "max abs diff / max abs value allowed before timing")
  flags.DEFINE_integer("worker_devices", 0, "internal: run the cases on this many devices")
  flags.DEFINE_string("worker_out", "", "internal: where the worker writes its JSON")
  flags.DEFINE_string("ep_modes", "a2a,ring,fsdp", "MaxText modes tried on > 1 device: a2a "
                      "(expert parallel, ragged all-to-all: its default), ring (expert parallel, "
                      "use_ring_of_experts), fsdp (ici_fsdp_parallelism=D, no expert parallelism)")
  flags.DEFINE_integer("timeout_s", 3600, "per-subprocess limit")
  return flags.FLAGS


# --- worker (one process per device count) ---


def maxtext_config(num_experts, top_k, d_model, d_ff, seq_len, batch, num_devices, mode="a2a"):
  """MaxText config: mode "a2a"/"ring" = D-way expert parallelism, "fsdp" = D-way FSDP."""
  import maxtext  # pylint: disable=import-outside-toplevel
  from maxtext.configs import pyconfig  # pylint: disable=import-outside-toplevel
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  return pyconfig.initialize(
      [None, base], run_name="moe_jax_compare", enable_checkpointing=False,
      base_output_directory=os.path.join("/tmp", "maxtext_layer_out"),
      base_emb_dim=d_model, base_mlp_dim=d_ff, base_moe_mlp_dim=d_ff, num_experts=num_experts,
      num_experts_per_tok=top_k, dtype="float32", weight_dtype="float32",
      float32_gate_logits=True, megablox=False, sparse_matmul=True, capacity_factor=-1.0,
      mlp_activations=["silu", "linear"], max_target_length=seq_len,
      per_device_batch_size=max(batch / num_devices, 1),
      ici_expert_parallelism=1 if mode == "fsdp" else num_devices,
      ici_fsdp_parallelism=num_devices if mode == "fsdp" else 1,
      use_ring_of_experts=mode == "ring")


def build_maxtext(cfg, num_experts, top_k, d_ff, num_devices):
  """(jitted forward x -> y, {gate, wi_0, wi_1, wo} as numpy) of a MaxText RoutedMoE."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flax.linen import partitioning as nn_partitioning  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from maxtext.layers import moe  # pylint: disable=import-outside-toplevel
  from maxtext.layers.initializers import nd_dense_init  # pylint: disable=import-outside-toplevel
  from maxtext.utils import maxtext_utils  # pylint: disable=import-outside-toplevel
  if num_devices == len(jax.devices()):
    devices = maxtext_utils.create_device_mesh(cfg)
  else:
    devices = np.array(jax.devices()[:num_devices]).reshape([1] * len(cfg.mesh_axes))
  mesh = Mesh(devices, cfg.mesh_axes)
  with nn_partitioning.axis_rules(cfg.logical_axis_rules):
    model = moe.RoutedMoE(config=cfg, num_experts=num_experts, num_experts_per_tok=top_k,
                          mesh=mesh, kernel_init=nd_dense_init(1.0, "fan_in", "truncated_normal"),
                          kernel_axes=("embed", "mlp"), intermediate_dim=d_ff,
                          dtype=jnp.float32, rngs=nnx.Rngs(params=0))
  graph, state = nnx.split(model)
  weights = {"gate": np.asarray(model.gate.kernel[...]), "wi_0": np.asarray(model.wi_0[...]),
             "wi_1": np.asarray(model.wi_1[...]), "wo": np.asarray(model.wo[...])}

  @jax.jit
  def forward(state, x):
    with nn_partitioning.axis_rules(cfg.logical_axis_rules):
      return nnx.merge(graph, state)(x)[0]

  return (lambda x: forward(state, x)), weights, mesh


def build_moe_jax(weights, num_experts, top_k, d_model, d_ff, num_devices):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ROOT)
  import moe_jax  # pylint: disable=import-outside-toplevel
  cfg = moe_jax.MoEConfig(num_experts=num_experts, d_model=d_model, d_ff=d_ff, top_k=top_k,
                          activation="silu", renormalize=True)
  execution = moe_jax.ExecutionConfig(capacity_mode="dropless")
  params = {"router": jnp.asarray(weights["gate"]), "wi_gate": jnp.asarray(weights["wi_0"]),
            "wi": jnp.asarray(weights["wi_1"]), "wo": jnp.asarray(weights["wo"])}
  mesh = moe_jax.make_mesh(1, num_devices)
  forward = jax.jit(lambda p, x: moe_jax.moe_apply(p, x, cfg, execution=execution, mesh=mesh)[0])
  return lambda x: forward(params, x)


def run_case(num_tokens, num_experts, *, devices, args, log, ep_mode="a2a"):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  batch = max(num_tokens // args["seq_len"], 1)
  length = num_tokens // batch
  entry = {"tokens": batch * length, "experts": num_experts, "devices": devices,
           "top_k": args["top_k"], "batch": f"{batch}x{length}", "maxtext_ep": ep_mode}
  try:
    cfg = maxtext_config(num_experts, args["top_k"], args["d_model"], args["d_ff"], length, batch,
                         devices, mode=ep_mode)
    maxtext_fn, weights, _ = build_maxtext(cfg, num_experts, args["top_k"], args["d_ff"], devices)
  except Exception as e:  # pylint: disable=broad-except
    entry["maxtext_error"] = f"{type(e).__name__}: {e}"[:2000]
    entry["maxtext_traceback"] = traceback.format_exc()[-4000:]
    log(f"  MaxText setup failed: {entry['maxtext_error'][:300]}")
    return entry
  jax_fn = build_moe_jax(weights, num_experts, args["top_k"], args["d_model"], args["d_ff"],
                         devices)
  x = jax.random.normal(jax.random.key(1), (batch, length, args["d_model"]), jax.numpy.float32)
  try:
    start = time.perf_counter()
    want = np.asarray(jax.block_until_ready(maxtext_fn(x)))
    entry["maxtext_first_call_s"] = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except
    entry["maxtext_error"] = f"{type(e).__name__}: {e}"[:2000]
    entry["maxtext_traceback"] = traceback.format_exc()[-4000:]
    log(f"  MaxText forward failed: {entry['maxtext_error'][:300]}")
    return entry
  got = np.asarray(jax.block_until_ready(jax_fn(x)))
  entry["max_abs_diff"] = float(np.max(np.abs(got - want)))
  entry["max_abs"] = float(np.max(np.abs(want)))
  if entry["max_abs_diff"] > args["tolerance"] * max(entry["max_abs"], 1.0):
    entry["skipped"] = "outputs disagree; not timed"
    log(f"  outputs disagree: max abs diff {entry['max_abs_diff']:.3e}")
    return entry
  calls = {"maxtext": lambda: jax.block_until_ready(maxtext_fn(x)),
           "moe_jax": lambda: jax.block_until_ready(jax_fn(x))}
  times = {k: [] for k in calls}
  for _ in range(args["rounds"]):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  for name, ts in times.items():
    entry[f"{name}_ms"] = float(np.median(ts) * 1e3)
    entry[f"{name}_samples_ms"] = [t * 1e3 for t in ts]
  entry["speedup"] = entry["maxtext_ms"] / entry["moe_jax_ms"]
  log(f"  T={entry['tokens']} E={num_experts} D={devices} ({ep_mode}): MaxText "
      f"{entry['maxtext_ms']:.1f} ms, "
      f"moe_jax {entry['moe_jax_ms']:.1f} ms, x{entry['speedup']:.1f}, max |diff| "
      f"{entry['max_abs_diff']:.1e}")
  return entry


def worker(args) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  devices = args["worker_devices"]
  out = {"devices": devices, "jax": jax.__version__, "cases": []}
  try:
    import maxtext  # pylint: disable=import-outside-toplevel
    out["maxtext"] = getattr(maxtext, "__version__", None) or _dist_version("maxtext")
    from maxtext.layers import moe  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except Exception as e:  # pylint: disable=broad-except
    out["import_error"] = f"{type(e).__name__}: {e}"
    out["import_traceback"] = traceback.format_exc()[-4000:]
    print(f"MaxText import failed: {out['import_error']}", flush=True)
  modes = args["ep_modes"].split(",") if devices > 1 else ["a2a"]
  if "import_error" not in out:
    for case in args["cases"].split(","):
      num_tokens, num_experts = (int(v) for v in case.split(":"))
      for mode in modes:
        out["cases"].append(run_case(num_tokens, num_experts, devices=devices, args=args,
                                     log=lambda s: print(s, flush=True), ep_mode=mode))
  with open(args["worker_out"], "w") as f:
    json.dump(out, f, indent=1)


def _dist_version(name):
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return metadata.version(name)
  except Exception:  # pylint: disable=broad-except
    return None


# --- driver ---


def main(argv):
  del argv
  flags = _flags_values
  args = {k: getattr(flags, k) for k in ("cases", "top_k", "d_model", "d_ff", "seq_len",
                                         "rounds", "tolerance", "worker_devices", "worker_out",
                                         "ep_modes")}
  if flags.worker_devices:
    worker(args)
    return
  runs = []
  for devices in (int(d) for d in flags.devices.split(",")):
    out_file = os.path.join("/tmp", f"maxtext_layer_{os.getpid()}_{devices}.json")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, os.path.abspath(__file__), f"--worker_devices={devices}",
               f"--worker_out={out_file}"] + [f"--{k}={args[k]}" for k in
                                              ("cases", "top_k", "d_model", "d_ff", "seq_len",
                                               "rounds", "tolerance", "ep_modes")]
    print(f"== {devices} device(s)", flush=True)
    try:
      proc = subprocess.run(command, env=env, timeout=flags.timeout_s, capture_output=True,
                            text=True, check=False)
      print(_useful_lines(proc.stdout), flush=True)
      if os.path.exists(out_file):
        with open(out_file) as f:
          run = json.load(f)
        os.remove(out_file)
      else:
        run = {"devices": devices, "worker_error": proc.stderr[-4000:]}
        print(proc.stderr[-2000:], flush=True)
    except subprocess.TimeoutExpired:
      run = {"devices": devices, "worker_error": f"timed out after {flags.timeout_s} s"}
    runs.append(run)
  sys.path.insert(0, HERE)
  import peer_switch  # pylint: disable=import-outside-toplevel
  path = peer_switch.write_result("maxtext_layer", {
      "flags": {k: args[k] for k in ("cases", "top_k", "d_model", "d_ff", "seq_len", "rounds",
                                     "tolerance", "ep_modes")} | {"devices": flags.devices},
      "runs": runs})
  print(f"wrote {path}")


def _useful_lines(text):
  return "\n".join(line for line in text.splitlines()
                   if line.strip() and not line.startswith(("I1", "W1", "[transformers]")))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _flags_values = _flags()
  app.run(main)
