"""Side by side: Hugging Face `Qwen3MoeForCausalLM` vs moe_jax's Qwen3-MoE, in one process: prefill
and cached greedy decode tokens/s, each next to its lower bound on this machine.

  /tmp/peervenv/bin/python benchmarks/decoder_vs_hf.py       # a python with torch + transformers
  python benchmarks/decoder_vs_hf.py --hf_python=/tmp/peervenv/bin/python   # re-runs itself there
  python benchmarks/decoder_vs_hf.py --quick                  # tiny shapes: a smoke test (~1 min)

The model (default; flags change every size): Qwen3-MoE-shaped, random weights, float32, hidden
1024, 4 layers (all MoE), 64 experts, top-8, expert width 512, norm_topk_prob, 16 query / 4 kv
heads of 64, vocab 8192, untied LM head, no eos (fixed-length generation).

  1. Same weights: random params from `qwen3_moe.random_params`, written as a Hugging Face
     checkpoint (`hf_io.save_hf_safetensors`, per-expert keys, `config.to_hf_dict()`) into a temp
     dir; transformers loads it (`AutoModelForCausalLM.from_pretrained(dir, dtype=float32)`, eval)
     and so does moe_jax (`qwen3_moe.from_pretrained(dir, execution=...)`).
  2. Agreement before any timing: the prefill batch's logits (max |diff| / max |HF logit| <=
     --tolerance) and cached greedy tokens of the decode batch (identical). Otherwise the script
     exits 1 naming the difference (and the router's smallest top-k margin: random weights can
     put two experts within float32 rounding of each other) and times nothing.
  3. Timing, in interleaved rounds (every contender runs once first, so compilation and warm-up
     are excluded; medians of --rounds are reported, and moe_jax / HF of the fastest rounds next
     to them, which a shared machine disturbs less):
     * prefill: one forward over B x L prompt tokens, every position's logits on both sides
       (`model(ids, attention_mask=am)`); tokens/s = B * L / time;
     * decode: per step = (generate(N + 1 new tokens) - generate(1 new token)) / N on the same
       B x P prompt, each side's own generate (moe_jax: `model.generate`, one jitted program,
       prefill + `while_loop`; HF: `generate(do_sample=False, use_cache=True)` under
       `torch.inference_mode`), paired per round. Each side's two generates run the same
       prefill (moe_jax's keys span its preallocated P + 1 vs P + N + 1 cache slots) and then
       exactly N more cached decode forwards in the longer one; tokens/s = B / step.
  4. Lower bounds (roofline.py `decoder_prefill_need`, `decoder_decode_step_need`): the bytes a
     call must read at least once (weights it uses, the experts its tokens hit, the KV cache) over
     the memory bandwidth, and its FLOPs over the dense-FFN FLOP/s, both measured here after the
     timings (fastest of 7 runs; the faster of XLA's and torch's, `best_rates`). time / bound >= 1
     for any implementation; HF time / bound is the most anything could gain over HF here.

Threads: torch gets as many threads as XLA:CPU uses (the CPUs this process may run on;
`--hf_threads` changes it), and OMP_WAIT_POLICY=PASSIVE (unless set) so torch's idle OpenMP
threads do not spin against XLA's on a shared machine (see peer_switch.py).

Where torch lives: the HF side runs in this process, so this python needs torch + transformers
(`pip install -e ".[peer]"`, or a venv with them that also sees jax and moe_jax, e.g. one made
with --system-site-packages). Without torch, `--hf_python=PY` re-runs the script under PY; with
neither, only moe_jax is timed (next to its bounds) and HF's columns say n/a.

Results: benchmarks/results/decoder_vs_hf_<date>_<host>.json (--quick: decoder_vs_hf_quick_...),
plus a table on stdout with the load average next to it.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import roofline  # noqa: E402  (this directory is on sys.path when run as a script)
from bench_io import write_result  # noqa: E402

_REEXEC_ENV = "MOE_JAX_DECODER_VS_HF_REEXEC"

# Flag defaults --quick swaps in (a flag given on the command line always wins).
QUICK = dict(hidden_size=64, num_experts=8, top_k=2, expert_width=32, layers=2, heads=4,
             kv_heads=2, head_dim=16, vocab_size=256, batch=2, prefill_length=16,
             prompt_length=8, new_tokens=4, rounds=2)


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


def interleaved_times(contenders: dict, rounds: int) -> dict:
  """{name: fn()} -> {name: [seconds per round]}; each fn runs once first (compile, warm-up)."""
  for fn in contenders.values():
    fn()
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


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


# --- bounds and the table ---


def experts_hit(jax_model, ids, mask) -> list[int]:
  """Distinct experts the real router chose for this batch, per MoE layer."""
  out = jax_model(ids, attention_mask=mask, output_router=True)
  return [int(np.unique(np.asarray(r.expert_index)).size) for r in out.router]


def machine_rates(cfg, have_torch: bool) -> dict:
  """XLA's (and torch's) peak bandwidth and FFN FLOP/s here, and the best of them (used)."""
  rates = {"xla": roofline.xla_peak_rates(cfg.hidden_size, cfg.expert_width)}
  if have_torch:
    rates["torch"] = roofline.torch_rates(cfg.hidden_size, cfg.expert_width)
  rates["used"] = roofline.best_rates(*rates.values())
  return rates


def phase_row(phase: str, batch_text: str, tokens: int, timed: dict, need: dict,
              machine: dict) -> dict:
  """One table row: tokens/s per side, moe_jax / HF (of the medians, and of the fastest
  rounds), each median time over the phase's lower bound."""
  row = {"phase": phase, "batch": batch_text, "tokens_per_call": tokens, **need,
         **roofline.bound_of(need, machine)}
  for name, t in timed.items():
    seen = t["s"] > 0     # a decode step can vanish in generate's timing noise at tiny sizes
    row[name] = {**t, "tok_s": tokens / t["s"] if seen else None,
                 "of_bound": t["s"] / row["bound_s"] if seen else None}
  if "hf" in timed:
    ratio = lambda key: (row["hf"][key] / row["moe_jax"][key]
                         if min(row["hf"][key], row["moe_jax"][key]) > 0 else None)
    row["moe_jax_over_hf"], row["moe_jax_over_hf_fastest"] = ratio("s"), ratio("min_s")
  return row


def table(rows: list[dict], goals: dict) -> str:
  """The printed table: one line per phase."""
  head = (f"{'phase':7s} {'batch':>11s} {'HF tok/s':>9s} {'moe_jax tok/s':>13s} "
          f"{'moe_jax/HF':>10s} {'(fastest)':>9s} {'goal':>6s} {'bound ms':>8s} "
          f"{'HF ms (x bound)':>17s} {'moe_jax ms (x bound)':>20s}")
  lines = [head, "-" * len(head)]
  for r in rows:
    hf, jx, ratio = r.get("hf"), r["moe_jax"], r.get("moe_jax_over_hf")
    goal = goals[r["phase"]]
    met = "" if ratio is None else (">=" if ratio >= goal else "< ") + f"{goal:g}x"
    lines.append(
        f"{r['phase']:7s} {r['batch']:>11s} {_or_na(hf, _tok_s):>9s} {_tok_s(jx):>13s} "
        f"{_or_na(ratio, _times):>10s} {_or_na(r.get('moe_jax_over_hf_fastest'), _times):>9s} "
        f"{met:>6s} {r['bound_s'] * 1e3:8.2f} {_or_na(hf, _time_of_bound):>17s} "
        f"{_time_of_bound(jx):>20s}")
  return "\n".join(lines)


def _or_na(value, fmt) -> str:
  return "n/a" if value is None else fmt(value)


def _tok_s(t: dict) -> str:
  return "<noise" if t["tok_s"] is None else f"{t['tok_s']:.1f}"


def _times(ratio: float) -> str:
  return f"{ratio:.2f}x"


def _time_of_bound(t: dict) -> str:
  if t["of_bound"] is None:
    return f"{t['s'] * 1e3:.1f} (noise)"
  return f"{t['s'] * 1e3:.1f} ({t['of_bound']:.1f}x)"


def legend(s: Shapes, rounds: int, rows: list[dict], rates: dict) -> str:
  used = rates["used"]
  prefill, decode = rows
  source = "the faster of XLA's and torch's peak" if "torch" in rates else "XLA's peak"
  return (
      f"prefill: one forward over B x L tokens; decode: one cached step of B rows, "
      f"(generate({s.new_tokens + 1}) - generate(1)) / {s.new_tokens}. Medians of {rounds} "
      f"interleaved rounds; (fastest): the ratio of each side's fastest round. bound = "
      f"max(bytes / {used['memory_bytes_per_s'] / 1e9:.1f} GB/s, FLOPs / "
      f"{used['flops_per_s'] / 1e9:.1f} GFLOP/s), {source} here; "
      f"(x bound) = median time / bound.\n"
      f"prefill needs >= {prefill['bytes'] / 1e6:.0f} MB and {prefill['flops'] / 1e9:.1f} GFLOP "
      f"(memory {prefill['memory_bound_s'] * 1e3:.0f} ms, compute "
      f"{prefill['compute_bound_s'] * 1e3:.0f} ms; experts hit "
      f"{prefill['experts_hit_per_moe_layer']}); a decode step >= {decode['bytes'] / 1e6:.0f} MB "
      f"({decode['distinct_experts_per_moe_layer']} experts per layer, uniform estimate) and "
      f"{decode['flops'] / 1e9:.2f} GFLOP (memory {decode['memory_bound_s'] * 1e3:.0f} ms, "
      f"compute {decode['compute_bound_s'] * 1e3:.0f} ms).")


def load_text(load) -> str:
  return "/".join(f"{x:.2f}" for x in load)


# --- main ---


def flag_value(f, name: str):
  """A flag's value; under --quick, QUICK's default unless the flag was given."""
  if f.quick and name in QUICK and not f[name].present:
    return QUICK[name]
  return getattr(f, name)


def shapes_from_flags(f) -> Shapes:
  return Shapes(**{field.name: flag_value(f, field.name) for field in dataclasses.fields(Shapes)})


def torch_or_reexec(f) -> bool:
  """True when this python has torch + transformers; else re-runs the script under --hf_python
  (never returns) or, without it, returns False (moe_jax is then timed alone)."""
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    pass
  if f.hf_python and not os.environ.get(_REEXEC_ENV):
    os.environ[_REEXEC_ENV] = "1"
    argv = [a for a in sys.argv[1:] if not a.startswith("--hf_python")]
    print(f"torch is not importable here; re-running under {f.hf_python}", flush=True)
    os.execv(f.hf_python, [f.hf_python, os.path.abspath(__file__), *argv])
  where = f" (not even under --hf_python={f.hf_python})" if f.hf_python else ""
  print(f"warning: torch/transformers not importable{where}: timing moe_jax alone; pass "
        "--hf_python=PY (a python with torch + transformers that sees jax and moe_jax) or "
        "`pip install -e .[peer]` for the comparison.", flush=True)
  return False


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


def check_agreement(hf_model, jax_model, s: Shapes, prefill, decode, f, result, log) -> None:
  """Records the agreement in `result`; exits 1 (after writing it) when the sides differ."""
  check = result["agreement"] = agreement(hf_model, jax_model, s, prefill, decode)
  log(f"agreement: logits max rel diff {check['logits_max_rel_diff']:.2e} (tolerance "
      f"{f.tolerance:g}), greedy tokens equal: {check['greedy_tokens_equal']}, router min "
      f"top-k margin {check['router_min_topk_margin_prefill']:.1e}")
  if check["logits_max_rel_diff"] <= f.tolerance and check["greedy_tokens_equal"]:
    return
  path = write_result(result_name(f), {**result, "aborted": "outputs disagree"})
  sys.exit(f"error: HF and moe_jax disagree before timing (logits max rel diff "
           f"{check['logits_max_rel_diff']:.2e}, tolerance {f.tolerance:g}; greedy tokens "
           f"equal: {check['greedy_tokens_equal']}, first difference at [row, column] "
           f"{check['greedy_first_difference']}). Router min top-k margin "
           f"{check['router_min_topk_margin_prefill']:.1e}: a near-tie can flip an expert on "
           f"float32 rounding; try another --seed. Nothing timed; wrote {path}")


def result_name(f) -> str:
  return "decoder_vs_hf_quick" if f.quick else "decoder_vs_hf"


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  have_torch = torch_or_reexec(f)
  import jax  # pylint: disable=import-outside-toplevel
  started = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)
  s, rounds = shapes_from_flags(f), flag_value(f, "rounds")
  cfg = model_config(s)
  xla_threads = len(os.sched_getaffinity(0))
  loads = {"start": os.getloadavg()}
  log(f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} "
      f"experts top-{cfg.num_experts_per_tok} of width {cfg.expert_width}, "
      f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_width}, vocab "
      f"{cfg.vocab_size}, float32; jax {jax.__version__} on {jax.devices()[0].platform}")
  jax_model, hf_model, hf_info = load_pair(cfg, f, have_torch, f.hf_threads or xla_threads, log)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax_model.params))
  log(f"loaded ({num_params / 1e6:.1f} M params, {num_params * 4 / 2**30:.2f} GiB per side)")
  sides = {"moe_jax": {"model": jax_model, "forward": jax_forward, "generate": jax_generate}}
  if hf_model is not None:
    sides = {"hf": {"model": hf_model, "forward": hf_forward, "generate": hf_generate}, **sides}
  prefill = random_batch(s.batch, s.prefill_length, s.vocab_size, seed=f.seed + 1)
  decode = random_batch(s.batch, s.prompt_length, s.vocab_size, seed=f.seed + 2)
  result = {"flags": {k: getattr(f, k) for k in ("quick", "seed", "tolerance", "gmm_backend",
                                                 "hf_threads", "hf_experts")},
            "shapes": dataclasses.asdict(s), "rounds": rounds, "config_json": cfg.to_hf_dict(),
            "num_params": num_params, "xla_cpu_threads": xla_threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "hf": hf_info,
            "decode_timing": "(generate(N + 1) - generate(1)) / N per round, paired"}
  if hf_model is not None:
    check_agreement(hf_model, jax_model, s, prefill, decode, f, result, log)
  hit = experts_hit(jax_model, *prefill)
  loads["before_timing"] = os.getloadavg()
  log(f"timing prefill {s.batch}x{s.prefill_length}: {rounds} rounds after a warm-up call each")
  prefill_times = time_prefill(sides, prefill, rounds)
  log(f"timing decode: B={s.batch}, prompt {s.prompt_length}, generate({s.new_tokens + 1}) - "
      f"generate(1) = {s.new_tokens} steps, {rounds} rounds")
  decode_times = time_decode(sides, decode, s.new_tokens, rounds)
  loads["after_timing"] = os.getloadavg()
  log("measuring this machine's peak bandwidth and FLOP/s for the bounds")
  rates = machine_rates(cfg, hf_model is not None)
  context = s.prompt_length + (s.new_tokens + 1) / 2    # mean valid slots over the timed steps
  params = jax_model.params
  rows = [
      phase_row("prefill", f"{s.batch}x{s.prefill_length}", s.batch * s.prefill_length,
                prefill_times,
                roofline.decoder_prefill_need(params, cfg, s.batch, s.prefill_length, hit),
                rates["used"]),
      phase_row("decode", f"{s.batch} P{s.prompt_length}+{s.new_tokens}", s.batch, decode_times,
                roofline.decoder_decode_step_need(params, cfg, s.batch, context), rates["used"]),
  ]
  goals = {"prefill": 1.0, "decode": 1.5}
  elapsed = time.perf_counter() - started
  result.update(rows=rows, goals_moe_jax_over_hf=goals, machine_rates=rates, load_average=loads,
                elapsed_s=elapsed)
  path = write_result(result_name(f), result)
  threads = (f"torch threads {hf_info['torch_threads']}, XLA:CPU threads {xla_threads}"
             if hf_info else f"XLA:CPU threads {xla_threads}")
  print(f"\n{table(rows, goals)}\n\n{legend(s, rounds, rows, rates)}\n{threads}; load average "
        f"(1/5/15 min) at start {load_text(loads['start'])}, before timing "
        f"{load_text(loads['before_timing'])}, after {load_text(loads['after_timing'])} on "
        f"{os.cpu_count()} CPUs; took {elapsed:.0f} s.\nwrote {path}")


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_bool("quick", False, "tiny shapes (a smoke test); explicit size flags still win")
  flags.DEFINE_integer("hidden_size", 1024, "d")
  flags.DEFINE_integer("num_experts", 64, "E")
  flags.DEFINE_integer("top_k", 8, "experts per token")
  flags.DEFINE_integer("expert_width", 512, "moe_intermediate_size")
  flags.DEFINE_integer("layers", 4, "decoder layers (all MoE)")
  flags.DEFINE_integer("heads", 16, "query heads")
  flags.DEFINE_integer("kv_heads", 4, "key/value heads")
  flags.DEFINE_integer("head_dim", 64, "head width")
  flags.DEFINE_integer("vocab_size", 8192, "vocabulary")
  flags.DEFINE_integer("batch", 8, "B, rows in prefill and decode")
  flags.DEFINE_integer("prefill_length", 128, "L, prompt tokens per row in the prefill timing")
  flags.DEFINE_integer("prompt_length", 16, "P, prompt tokens per row before decoding")
  flags.DEFINE_integer("new_tokens", 32, "N, decode steps timed")
  flags.DEFINE_integer("rounds", 5, "timed interleaved rounds (median reported)")
  flags.DEFINE_integer("seed", 0, "params seed (inputs use seed + 1, seed + 2)")
  flags.DEFINE_float("tolerance", 1e-4, "max |logit diff| / max |HF logit| allowed before timing")
  flags.DEFINE_string("gmm_backend", "auto", "moe_jax grouped-matmul backend (ExecutionConfig)")
  flags.DEFINE_integer("hf_threads", 0, "torch threads; 0: as many as XLA:CPU uses")
  flags.DEFINE_string("hf_experts", "", "transformers experts_implementation; '': its default")
  flags.DEFINE_string("hf_python", "", "a python with torch + transformers to re-run under when "
                      "this one lacks them")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
