"""Parts (a), (b) and (c) of gpu_check.py (see its docstring), and the timing they share with (d):

  (a) part_grouped_matmul: the grouped expert FFN vs one dense FFN of equal FLOPs;
  (b) part_model: a switch-base-128-shaped model in transformers and in moe_jax, agreement and
      encoder tokens/s;
  (c) part_replication: predictor + placement + prefetch time vs one MoE layer's; and
      `ragged_backward`: jax.grad through the ragged exchanges vs the padded ones (skipped on CPU).

Each takes the run's shapes (gpu_check.FULL or SMOKE) and a `log` callable and returns its result
dict; gpu_check.py guards them.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np


def timed(fn, rounds):
  """Median seconds of fn() (block_until_ready'd by the caller's fn) after one warm-up call."""
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# --- (a) grouped matmul ---


def zipf_sizes(num_rows, num_groups, seed=0, exponent=1.2):
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, num_groups + 1) ** exponent
  popularity = popularity[rng.permutation(num_groups)]
  return rng.multinomial(num_rows, popularity / popularity.sum()).astype(np.int32)


def balanced_sizes(num_rows, num_groups):
  sizes = np.full(num_groups, num_rows // num_groups)
  sizes[:num_rows % num_groups] += 1
  return sizes.astype(np.int32)


def part_grouped_matmul(shapes, dtype, backend, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax import experts, grouped_matmul  # pylint: disable=import-outside-toplevel
  d, f, e = shapes["d_model"], shapes["d_ff"], shapes["num_experts"]
  keys = jax.random.split(jax.random.key(0), 3)
  weights = {"wi": (jax.random.normal(keys[0], (e, d, f)) * d ** -0.5).astype(dtype),
             "wo": (jax.random.normal(keys[1], (e, f, d)) * f ** -0.5).astype(dtype)}
  grouped = jax.jit(lambda x, s, w: grouped_matmul.grouped_ffn(x, s, w, activation="relu",
                                                                backend=backend))
  dense = jax.jit(lambda x, w: experts.ffn(x, w["wi"][0], w["wo"][0], None, "relu"))
  rows = []
  for tokens in shapes["tokens"]:
    x = jax.random.normal(keys[2], (tokens, d)).astype(dtype)
    flops = 4.0 * tokens * d * f
    dense_s = timed(lambda: jax.block_until_ready(dense(x, weights)), shapes["rounds"])
    for load, sizes in (("balanced", balanced_sizes(tokens, e)), ("zipf", zipf_sizes(tokens, e))):
      s = jnp.asarray(sizes)
      grouped_s = timed(lambda: jax.block_until_ready(grouped(x, s, weights)), shapes["rounds"])
      rows.append({"tokens": tokens, "experts": e, "load": load, "max_group": int(sizes.max()),
                   "grouped_ms": grouped_s * 1e3, "dense_ms": dense_s * 1e3,
                   "grouped_tflops": flops / grouped_s / 1e12,
                   "dense_tflops": flops / dense_s / 1e12, "x_dense": grouped_s / dense_s})
      log(f"(a) T={tokens} E={e} {load:8s} grouped {grouped_s * 1e3:8.2f} ms "
          f"({rows[-1]['grouped_tflops']:.1f} TFLOP/s)  dense {dense_s * 1e3:8.2f} ms "
          f"({rows[-1]['dense_tflops']:.1f} TFLOP/s)  x{rows[-1]['x_dense']:.2f}")
  return {"backend": backend, "dtype": str(jnp.dtype(dtype)), "d_model": d, "d_ff": f,
          "rows": rows}


# --- (b) the model against transformers ---


def part_model(shapes, dtype_name, layers, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import peer_switch  # pylint: disable=import-outside-toplevel
  from moe_jax.models.switch import stack as switch_stack  # pylint: disable=import-outside-toplevel
  result = {"layers": layers, "num_experts": shapes["num_experts"], "dtype": dtype_name,
            "rows": []}
  setup = peer_switch.Setup(shapes["num_experts"], layers)
  torch = _torch_or_none(result)
  directory = tempfile.mkdtemp(prefix="gpu_check_")
  if torch is not None:
    hf_model, jax_model = _hf_and_loaded(setup, shapes, dtype_name, directory, result, log)
  else:
    hf_model, jax_model = None, _random_switch(shapes, layers, dtype_name)
  encode = jax.jit(lambda p, ids, mask: switch_stack.encode(p, jax_model.config, ids, mask,
                                                            moe_fn=jax_model.moe_fn)[0])
  for batch, length in shapes["batches"]:
    ids, mask = peer_switch.random_inputs(batch, length, jax_model.config.vocab_size)
    jids, jmask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    run_jax = lambda: jax.block_until_ready(encode(jax_model.params, jids, jmask))  # noqa: E731
    row = {"batch": f"{batch}x{length}", "tokens": batch * length}
    ours = np.asarray(run_jax(), np.float32)
    row["moe_jax_s"] = timed(run_jax, shapes["rounds"])
    row["moe_jax_tok_s"] = batch * length / row["moe_jax_s"]
    if hf_model is not None:
      run_hf = _hf_encoder(hf_model, ids, mask, result["hf_device"])
      row.update(_hf_row(run_hf, ours, batch * length, row["moe_jax_s"], shapes["rounds"]))
    result["rows"].append(row)
    log(f"(b) {row['batch']}: moe_jax {row['moe_jax_tok_s']:.0f} tok/s"
        + (f", HF {row['hf_tok_s']:.0f} tok/s, x{row['speedup']:.2f}, max |diff| "
           f"{row['encoder_max_abs_diff']:.2e} (of {row['encoder_max_abs']:.1f})"
           if hf_model is not None else ""))
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.rmtree(directory, ignore_errors=True)
  return result


def _torch_or_none(result):
  """The torch module, or None (noting the ImportError in `result`) where it is missing."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    return torch
  except ImportError as e:
    result["hf_error"] = f"ImportError: {e}"
    return None


def _hf_and_loaded(setup, shapes, dtype_name, directory, result, log):
  """(HF model of `setup` on the GPU when there is one, moe_jax's load of its checkpoint)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import peer_switch  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  gpu = jax.default_backend() == "gpu"
  device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
  torch_dtype = getattr(torch, dtype_name)
  start = time.perf_counter()
  with torch.device(device):
    hf_model = peer_switch.build_hf_model(setup, capacity=1 << 20, widths=shapes["model"])
  hf_model = hf_model.to(torch_dtype)
  result["hf_device"] = device
  log(f"(b) built the HF model on {device} in {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  jax_model = peer_switch.save_and_load(hf_model, directory, dtype=jnp.dtype(dtype_name))
  log(f"(b) save_pretrained + moe_jax load: {time.perf_counter() - start:.1f} s")
  return hf_model, jax_model


def _random_switch(shapes, layers, dtype_name):
  """A random-init moe_jax Switch model of the check's shapes (no transformers to load from)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  from moe_jax.models.switch import SwitchConfig  # pylint: disable=import-outside-toplevel
  config = SwitchConfig(**shapes["model"], num_layers=layers, num_decoder_layers=layers,
                        num_sparse_encoder_layers=max(layers // 2, 1),
                        num_sparse_decoder_layers=max(layers // 2, 1),
                        num_experts=shapes["num_experts"], expert_capacity=1 << 20)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype_name),
                                  switch.random_params(config))
  return switch.SwitchModel(config, params)


def _hf_encoder(hf_model, ids, mask, device):
  """() -> the HF encoder's last hidden state of (ids, mask), synchronized on CUDA."""
  import torch  # pylint: disable=import-outside-toplevel
  tids = torch.tensor(ids, device=device)
  tmask = torch.tensor(mask, device=device)

  def run_hf():
    with torch.inference_mode():
      out = hf_model.encoder(input_ids=tids, attention_mask=tmask).last_hidden_state
    if device == "cuda":
      torch.cuda.synchronize()
    return out
  return run_hf


def _hf_row(run_hf, ours, tokens, moe_jax_s, rounds):
  """The HF columns of one row: agreement with `ours`, HF time and speed, moe_jax's speedup."""
  theirs = run_hf().float().cpu().numpy()
  row = {"encoder_max_abs_diff": float(np.max(np.abs(theirs - ours))),
         "encoder_mean_abs_diff": float(np.mean(np.abs(theirs - ours))),
         "encoder_max_abs": float(np.max(np.abs(theirs)))}
  row["hf_s"] = timed(run_hf, rounds)
  row["hf_tok_s"] = tokens / row["hf_s"]
  row["speedup"] = row["hf_s"] / moe_jax_s
  return row


# --- (c) predictor + placement + prefetch vs the MoE layer ---


def part_replication(shapes, dtype, backend, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  from moe_jax import predictor  # pylint: disable=import-outside-toplevel
  e = shapes["num_experts"]
  devices = len(jax.devices())
  expert_axis = max(dv for dv in range(1, devices + 1) if devices % dv == 0 and e % dv == 0)
  mesh = moe_jax.make_mesh(1, expert_axis)
  cfg = moe_jax.MoEConfig(num_experts=e, d_model=shapes["d_model"], d_ff=shapes["d_ff"],
                          dtype=jnp.dtype(dtype).name)
  execution = moe_jax.ExecutionConfig(gmm_backend=backend or "auto")
  num_replica_slots = shapes["replica_slots"]
  keys = jax.random.split(jax.random.key(1), 3)
  params = moe_jax.init_moe_params(keys[0], cfg)
  next_router = jax.random.normal(keys[1], (cfg.d_model, e)) * cfg.d_model ** -0.5
  tokens = shapes["moe_tokens"]
  x = jax.random.normal(keys[2], (8, tokens // 8, cfg.d_model)).astype(dtype)
  predict = jax.jit(lambda x: predictor.pregate_load(x.reshape(-1, cfg.d_model), next_router, 1))
  place = jax.jit(lambda load: moe_jax.place(load, cfg, num_replica_slots=num_replica_slots,
                                             mesh=mesh))
  columns = place(predict(x))
  # Jitted, the columns are traced: no host-side check (a device-to-host copy) in the timing.
  prefetch = jax.jit(lambda p, c: moe_jax.prefetch(p, c, cfg, mesh=mesh, execution=execution))

  def run_prefetch():
    return jax.block_until_ready(prefetch(params, columns))

  replicas = run_prefetch()
  layer = jax.jit(lambda p, x, r: moe_jax.moe_apply(p, x, cfg, execution=execution, mesh=mesh,
                                                    replicas=r)[0])
  rounds = shapes["rounds"]
  result = {"tokens": tokens, "experts": e, "expert_axis": expert_axis,
            "replica_slots": replicas.num_replica_slots, "dtype": cfg.dtype,
            "predictor_ms": timed(lambda: jax.block_until_ready(predict(x)), rounds) * 1e3,
            "placement_ms": timed(lambda: jax.block_until_ready(place(predict(x))), rounds) * 1e3,
            "prefetch_ms": timed(run_prefetch, rounds) * 1e3,
            "layer_ms": timed(lambda: jax.block_until_ready(layer(params, x, replicas)),
                              rounds) * 1e3}
  result["placement_ms"] -= result["predictor_ms"]   # it was timed on top of a prediction
  overhead = result["predictor_ms"] + max(result["placement_ms"], 0.0) + result["prefetch_ms"]
  result["overhead_ms"] = overhead
  result["fraction_of_layer"] = overhead / result["layer_ms"]
  result["replicas_placed"] = int(np.sum(np.asarray(columns) >= 0))
  result["ragged_backward"] = ragged_backward(cfg, mesh, columns, backend, log)
  log(f"(c) T={tokens} E={e} expert axis {expert_axis}: predictor {result['predictor_ms']:.2f} ms"
      f" + placement {result['placement_ms']:.2f} ms + prefetch {result['prefetch_ms']:.2f} ms = "
      f"{overhead:.2f} ms vs layer {result['layer_ms']:.2f} ms -> "
      f"{100 * result['fraction_of_layer']:.1f}% ({result['replicas_placed']} replicas placed)")
  return result


def ragged_backward(cfg, mesh, columns, backend, log):
  """(c) also: jax.grad through the ragged exchanges (dispatch, combine, replica prefetch; their
  custom VJP is the reverse ragged all-to-all) vs through the padded ones, float32, small batch.

  XLA:CPU cannot compile `lax.ragged_all_to_all`: skipped there (the CPU tests check the same
  VJP through the "emulated_ragged" exchange).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu":
    return {"skipped": "XLA:CPU cannot compile lax.ragged_all_to_all"}
  cfg = cfg.replace(dtype="float32")
  keys = jax.random.split(jax.random.key(2), 3)
  params = moe_jax.init_moe_params(keys[0], cfg)
  x = jax.random.normal(keys[1], (8, 32, cfg.d_model))
  ct = jax.random.normal(keys[2], x.shape)

  def grad_fn(mode):
    execution = moe_jax.ExecutionConfig(gmm_backend=backend or "auto", all_to_all=mode)

    def loss(params, x):
      replicas = moe_jax.prefetch(params, columns, cfg, mesh=mesh, execution=execution)
      y, stats = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh,
                                   replicas=replicas)
      return jnp.sum(y * ct) + 0.1 * stats.routing.aux_loss
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  result = {}
  grads = {}
  for mode in ("ragged", "padded"):
    start = time.perf_counter()
    grads[mode] = jax.block_until_ready(grad_fn(mode)(params, x))
    result[f"{mode}_compile_and_run_s"] = time.perf_counter() - start
  errors = [float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
            for a, b in zip(jax.tree.leaves(grads["ragged"]), jax.tree.leaves(grads["padded"]))]
  result["max_rel_err"] = max(errors)
  result["ok"] = result["max_rel_err"] <= 1e-5
  log(f"(c) ragged backward: grads (params, x) vs the padded exchange: max rel err "
      f"{result['max_rel_err']:.1e} ({'ok' if result['ok'] else 'MISMATCH'})")
  return result
