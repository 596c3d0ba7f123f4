"""Part (d) of gpu_check.py (see its docstring): a decoder family (Qwen3-MoE, random weights,
float32 at "highest" matmul precision), prefill and KV-cached greedy decode on the devices'
('data', 'expert') mesh, home slots only and with pregate replicas; checks that the replicas change
nothing and times both phases of both. `part_decoder(shapes, backend, log)` -> its result dict.
"""

from __future__ import annotations

import time

import numpy as np

from gpu_check_parts import timed


def expert_mesh(num_experts):
  """A (1, De) mesh: De the largest device count that divides both the devices and E."""
  import jax  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  devices = len(jax.devices())
  expert_axis = max(dv for dv in range(1, devices + 1)
                    if devices % dv == 0 and num_experts % dv == 0)
  return moe_jax.make_mesh(1, expert_axis)


def placed_params(family, config, mesh, seed=0):
  """The family's random params on `mesh`: expert stacks sharded over 'expert', the rest
  replicated (as `from_pretrained(..., mesh=mesh)` places them)."""
  from moe_jax.checkpoints import hf_io, layout  # pylint: disable=import-outside-toplevel
  key_map = family.hf_key_map(config)
  place = hf_io.device_placer(mesh, "expert", key_map.expert_paths())
  flat = layout.flatten(family.random_params(config, seed=seed))
  return layout.build_tree({path: place(path, leaf) for path, leaf in flat.items()})


REPLICATION = dict(predictor="pregate", num_replica_slots=2)


def decoder_programs(model, max_new_tokens):
  """(prefill, generate), each taking `replicate`: False runs home slots only (the model's
  `DefaultMoE`), True replicas placed one MoE layer ahead (`replication.Replicator`: a fresh
  `StackRunner` per decoder pass, the load history carried from pass to pass).

  generate is the model's own (`model.generate(..., replication=...)`, no eos: every row decodes
  all steps) and returns (tokens <int32>[B, P + N], rows computed in replica slots over all
  passes). prefill is its first pass, jitted alone (the prompt into a cache of P + N slots, then
  the first token's logits); it returns (hidden <f>[B, P, d], first-token logits <f32>[B, V],
  routing <int32>[MoE layers, B, P, k], rows computed in replica slots, replica slots filled,
  the cache).
  """
  from moe_jax import replication  # pylint: disable=import-outside-toplevel
  rcfg = replication.ReplicationConfig(**REPLICATION)
  return (prefill_program(model, rcfg, max_new_tokens),
          generate_program(model, rcfg, max_new_tokens))


def prefill_program(model, rcfg, max_new_tokens):
  """decoder_programs' prefill: generate's first pass, jitted alone."""
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax import replication  # pylint: disable=import-outside-toplevel
  from moe_jax.models.decoder import generate as decoder_generate  # pylint: disable=C0415
  from moe_jax.models.decoder import stack  # pylint: disable=import-outside-toplevel
  cfg = model.config
  replicator = replication.Replicator(rcfg, model.moe_config, model.mesh, model.execution)
  home = cfg.num_experts // model.mesh.shape["expert"]

  def filled(runner):
    tables = [r.slot_table for records in runner.records().values() for r in records]
    return sum(jnp.sum(t[:, home:] >= 0) for t in tables).astype(jnp.int32)

  @functools.partial(jax.jit, static_argnames="replicate")
  def prefill(params, ids, mask, replicate):
    batch, prompt = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = decoder_generate.generation_positions(full_mask)[:, :prompt]
    cache = stack.init_cache(cfg, batch, prompt + max_new_tokens, params["embed"].dtype)
    runner = None
    if replicate:
      layers = stack.moe_layers(params, cfg)
      runner = replicator.runner(layers, replicator.init_state(layers))
    hidden, cache, records = stack.decode(params, cfg, ids, positions, full_mask, cache,
                                          moe_fn=model.moe_fn if runner is None else runner.moe_fn)
    first = stack.lm_logits(params, cfg, hidden[:, -1:])[:, 0]
    routing = jnp.stack([r.expert_index for r in records])
    zero = jnp.zeros((), jnp.int32)
    counts = (zero, zero) if runner is None else (runner.replica_rows(), filled(runner))
    return (hidden, first, routing) + counts + (cache,)

  return prefill


def generate_program(model, rcfg, max_new_tokens):
  """decoder_programs' generate: the model's own, home slots only or with replicas."""

  def generate(params, ids, mask, replicate):
    del params   # the model's own
    if not replicate:
      return model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=None), 0
    tokens, stats = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=None,
                                   replication=rcfg, return_stats=True)
    return tokens, stats.replica_rows

  return generate


def rel_diff(a, b):
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def time_decoder(programs, params, ids, mask, replicate, rounds, new_tokens):
  """Prefill and per-step decode times of one variant (decode: (generate - prefill) /
  new_tokens; every row decodes all steps: no eos)."""
  import jax  # pylint: disable=import-outside-toplevel
  prefill, generate = programs
  prefill_s = timed(lambda: jax.block_until_ready(prefill(params, ids, mask, replicate)), rounds)
  generate_s = timed(lambda: jax.block_until_ready(generate(params, ids, mask, replicate)),
                     rounds)
  batch, prompt = ids.shape
  decode_s = max(generate_s - prefill_s, 0.0) / new_tokens
  return {"prefill_ms": prefill_s * 1e3,
          "prefill_tok_s": batch * prompt / prefill_s, "generate_ms": generate_s * 1e3,
          "decode_step_ms": decode_s * 1e3,
          "decode_tok_s": batch / decode_s if decode_s > 0 else None}


def check_replicas(programs, params, ids, mask):
  """Replicated vs home-only prefill and generate of the same inputs (also compiles them)."""
  prefill, generate = programs
  start = time.perf_counter()
  plain = prefill(params, ids, mask, False)
  hidden, first, routing, replica_rows, filled, _ = prefill(params, ids, mask, True)
  plain_tokens = np.asarray(generate(params, ids, mask, False)[0])
  tokens, generate_rows = generate(params, ids, mask, True)
  tokens = np.asarray(tokens)
  out = {"hidden_rel_diff": rel_diff(hidden, plain[0]),
         "logits_rel_diff": rel_diff(first, plain[1]),
         "routing_mismatches": int(np.sum(np.asarray(routing) != np.asarray(plain[2]))),
         "replica_rows": int(replica_rows), "replicas_placed": int(filled),
         "generate_replica_rows": int(generate_rows),
         "tokens_identical": bool(np.array_equal(tokens, plain_tokens)),
         "tokens_mismatched": int(np.sum(tokens != plain_tokens)),
         "compile_and_check_s": time.perf_counter() - start}
  out["ok"] = (max(out["hidden_rel_diff"], out["logits_rel_diff"]) <= 1e-6
               and out["tokens_identical"])
  return out


def log_decoder(result, log):
  log(f"(d) replicas vs home only: prefill hidden states rel diff "
      f"{result['hidden_rel_diff']:.1e}, first-token logits {result['logits_rel_diff']:.1e}, "
      f"routing mismatches {result['routing_mismatches']}, generated tokens "
      f"{'identical' if result['tokens_identical'] else 'DIFFER'}; {result['replicas_placed']} "
      f"replica slots filled in the prefill, {result['replica_rows']} rows computed in them "
      f"({result['generate_replica_rows']} over all of generate's passes; compile + check "
      f"{result['compile_and_check_s']:.1f} s)")
  for name in ("home_only", "replicas"):
    r = result[name]
    log(f"(d) {name:9s} B={result['batch']} P={result['prompt']}: prefill "
        f"{r['prefill_ms']:.1f} ms ({r['prefill_tok_s']:.0f} tok/s), decode "
        f"{r['decode_step_ms']:.2f} ms/step over {result['new_tokens']} steps")


def part_decoder(shapes, backend, log):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import moe_jax  # pylint: disable=import-outside-toplevel
  from moe_jax import grouped_matmul, models, replicas  # pylint: disable=import-outside-toplevel
  spec = shapes["decoder"]
  family = models.get_family("qwen3_moe")
  config = family.Config(**spec["config"])
  mesh = expert_mesh(config.num_experts)
  execution = moe_jax.ExecutionConfig(gmm_backend=backend or "auto")
  start = time.perf_counter()
  model = family.Model(config, placed_params(family, config, mesh), mesh=mesh,
                       execution=execution)
  log(f"(d) built a random {family.NAME} model on mesh {dict(mesh.shape)} in "
      f"{time.perf_counter() - start:.1f} s")
  batch, prompt, new = spec["batch"], spec["prompt"], spec["new_tokens"]
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt)),
                    jnp.int32)
  mask = jnp.ones((batch, prompt), jnp.int32)
  result = {"family": family.NAME, "config": spec["config"], "mesh": dict(mesh.shape),
            "batch": batch, "prompt": prompt, "new_tokens": new, "dtype": "float32",
            "matmul_precision": "highest", "replication": REPLICATION,
            "gmm_backend": (grouped_matmul.default_backend() if execution.gmm_backend == "auto"
                            else execution.gmm_backend),
            "all_to_all": replicas.exchange_mode(execution)}
  programs = decoder_programs(model, new)
  with jax.default_matmul_precision("highest"):
    result.update(check_replicas(programs, model.params, ids, mask))
    for name, replicate in (("home_only", False), ("replicas", True)):
      result[name] = time_decoder(programs, model.params, ids, mask, replicate, spec["rounds"],
                                  new)
  log_decoder(result, log)
  if not result["ok"]:
    raise AssertionError(f"replicas changed the decoder's outputs: {result}")
  return result
