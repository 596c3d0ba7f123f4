"""The two sides of decoder_vs_hf.py (see its docstring): the shapes and Qwen3-MoE config of a run,
one random checkpoint loaded by moe_jax and by transformers, each side's forward and generate
callables, their agreement, and the interleaved timing of both.

torch and transformers are imported only inside the HF side's functions.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import numpy as np

import bench_io


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What one run measures: the model's sizes and the batches."""

  hidden_size: int
  num_experts: int
  top_k: int
  expert_width: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  vocab_size: int
  batch: int            # B, for prefill and decode
  prefill_length: int   # L, prompt tokens per row in the prefill measurement
  prompt_length: int    # P, prompt tokens per row before decoding
  new_tokens: int       # N, decode steps timed


def model_config(s: Shapes):
  """The Qwen3-MoE config of `s`: every layer MoE, renormalised top-k, untied head, no eos."""
  from moe_jax.models import qwen3_moe  # pylint: disable=import-outside-toplevel
  return qwen3_moe.Config(
      vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=4 * s.hidden_size,
      moe_intermediate_size=s.expert_width, num_hidden_layers=s.layers,
      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
      num_experts=s.num_experts, num_experts_per_tok=s.top_k, norm_topk_prob=True,
      decoder_sparse_step=1, mlp_only_layers=(), tie_word_embeddings=False,
      bos_token_id=None, eos_token_id=(), pad_token_id=0,
      max_position_embeddings=max(4096, s.prefill_length, s.prompt_length + s.new_tokens + 1))


# --- the model pair ---


def write_checkpoint(cfg, directory: str, seed: int) -> None:
  """Random moe_jax params of `cfg` as a Hugging Face checkpoint (config.json + safetensors)."""
  from moe_jax.checkpoints import hf_io  # pylint: disable=import-outside-toplevel
  from moe_jax.models import qwen3_moe  # pylint: disable=import-outside-toplevel
  params = qwen3_moe.random_params(cfg, seed=seed)
  hf_io.save_hf_safetensors(params, qwen3_moe.hf_key_map(cfg), directory,
                            config_json=cfg.to_hf_dict())


def load_jax(directory: str, gmm_backend: str):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moe_jax.config import ExecutionConfig  # pylint: disable=import-outside-toplevel
  from moe_jax.models import qwen3_moe  # pylint: disable=import-outside-toplevel
  return qwen3_moe.from_pretrained(directory, dtype=jnp.float32,
                                   execution=ExecutionConfig(gmm_backend=gmm_backend))


def load_hf(directory: str, experts_implementation: str):
  """transformers' model of `directory`, float32, eval, fixed-length generation."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                            **kwargs).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def random_batch(batch: int, length: int, vocab: int, seed: int):
  """(<int64>[B, L] ids in [1, vocab), all-ones mask)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int64)
  return ids, np.ones_like(ids)


def load_pair(cfg, f, have_torch: bool, threads: int, log):
  """(moe_jax model, HF model or None, HF facts) of one random checkpoint in a temp dir."""
  directory = tempfile.mkdtemp(prefix="decoder_vs_hf_")
  try:
    write_checkpoint(cfg, directory, f.seed)
    jax_model = load_jax(directory, f.gmm_backend)
    hf_model = load_hf(directory, f.hf_experts) if have_torch else None
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  if hf_model is None:
    return jax_model, None, {}
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  implementation = lambda kind: getattr(hf_model.config, f"_{kind}_implementation", None)
  info = {"torch": torch.__version__, "transformers": transformers.__version__,
          "torch_threads": torch.get_num_threads(), "attn_implementation": implementation("attn"),
          "experts_implementation": implementation("experts")}
  log(f"transformers {info['transformers']}, torch {info['torch']} with "
      f"{info['torch_threads']} threads (as many as XLA:CPU: the CPUs this process may run "
      f"on), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, attention "
      f"{info['attn_implementation']}, experts {info['experts_implementation']}")
  return jax_model, hf_model, info


# --- the two sides' callables ---


def jax_forward(model, ids, mask):
  """() -> <f32>[B, L, V] logits of `model(ids, attention_mask=mask)`, computed."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  return lambda: jax.block_until_ready(model(ids, attention_mask=mask).logits)


def jax_generate(model, ids, mask, new_tokens: int):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  return lambda: jax.block_until_ready(
      model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None))


def hf_forward(model, ids, mask):
  import torch  # pylint: disable=import-outside-toplevel
  ids, mask = torch.tensor(ids), torch.tensor(mask)

  def run():
    with torch.inference_mode():
      return model(input_ids=ids, attention_mask=mask).logits
  return run


def hf_generate(model, ids, mask, new_tokens: int):
  import torch  # pylint: disable=import-outside-toplevel
  ids, mask = torch.tensor(ids), torch.tensor(mask)

  def run():
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                            use_cache=True, pad_token_id=0)
  return run


# --- agreement ---


def router_min_margin(jax_model, ids, mask) -> float:
  """The smallest gap between the k-th and (k+1)-th router probability over the tokens and MoE
  layers of this batch: below ~1e-6, float32 rounding may pick different experts on each side."""
  k, num_experts = jax_model.config.num_experts_per_tok, jax_model.config.num_experts
  if k == num_experts:
    return float("inf")
  out = jax_model(ids, attention_mask=mask, output_router=True)
  margins = []
  for record in out.router:
    probs = -np.sort(-np.asarray(record.router_probs), axis=-1)
    margins.append(float(np.min(probs[..., k - 1] - probs[..., k])))
  return min(margins)


def agreement(hf_model, jax_model, s: Shapes, prefill, decode) -> dict:
  """Prefill logits' max |diff| / max |HF| and cached greedy token equality."""
  ids, mask = prefill
  hf_logits = hf_forward(hf_model, ids, mask)().float().numpy()
  jx_logits = np.asarray(jax_forward(jax_model, ids, mask)())
  scale = float(np.max(np.abs(hf_logits)))
  rel = float(np.max(np.abs(hf_logits - jx_logits))) / max(scale, 1e-30)
  ids, mask = decode
  hf_tokens = hf_generate(hf_model, ids, mask, s.new_tokens)().numpy()
  jx_tokens = np.asarray(jax_generate(jax_model, ids, mask, s.new_tokens)())
  same = hf_tokens.shape == jx_tokens.shape and bool(np.array_equal(hf_tokens, jx_tokens))
  first = None
  if not same:
    width = min(hf_tokens.shape[1], jx_tokens.shape[1])
    differ = np.argwhere(hf_tokens[:, :width] != jx_tokens[:, :width])
    first = differ[0].tolist() if len(differ) else "shape"
  return {"logits_max_rel_diff": rel, "logits_max_abs": scale, "greedy_tokens_equal": same,
          "greedy_first_difference": first, "greedy_new_tokens": s.new_tokens,
          "router_min_topk_margin_prefill": router_min_margin(jax_model, *prefill)}


# --- timing ---

interleaved_times = bench_io.interleaved_times   # shared with the other benchmarks



def time_prefill(sides: dict, prefill, rounds: int) -> dict:
  """{side: {"s": median seconds, "min_s", "rounds_s"}} of one prefill forward."""
  ids, mask = prefill
  contenders = {name: side["forward"](side["model"], ids, mask) for name, side in sides.items()}
  times = interleaved_times(contenders, rounds)
  return {name: _summary(ts) for name, ts in times.items()}


def time_decode(sides: dict, decode, new_tokens: int, rounds: int) -> dict:
  """{side: {"s": median seconds per decode step, ...}}: per round, (generate(N + 1) -
  generate(1)) / N, paired within the round; "min_s" from each generate's fastest round (a
  difference of two disturbed runs is no bound on anything); also both whole generates."""
  ids, mask = decode
  contenders = {}
  for name, side in sides.items():
    contenders[f"{name}:short"] = side["generate"](side["model"], ids, mask, 1)
    contenders[f"{name}:long"] = side["generate"](side["model"], ids, mask, new_tokens + 1)
  times = interleaved_times(contenders, rounds)
  out = {}
  for name in sides:
    short, long = np.array(times[f"{name}:short"]), np.array(times[f"{name}:long"])
    out[name] = {**_summary((long - short) / new_tokens),
                 "min_s": float(np.min(long) - np.min(short)) / new_tokens,   # fastest of each
                 "generate_1_s": float(np.median(short)),
                 f"generate_{new_tokens + 1}_s": float(np.median(long))}
  return out


def _summary(times) -> dict:
  times = [float(t) for t in times]
  return {"s": float(np.median(times)), "min_s": min(times), "rounds_s": times}
