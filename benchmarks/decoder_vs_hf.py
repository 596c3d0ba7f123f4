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

Code: the two sides (loading, forward/generate, agreement, timing) are in decoder_vs_hf_sides.py,
the bounds, rows and table in decoder_vs_hf_report.py; this file holds the flags and the run.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dataclasses  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# This directory is on sys.path when run as a script.
from bench_io import write_result  # noqa: E402
from decoder_vs_hf_report import experts_hit, machine_rates, phase_rows, report_text  # noqa: E402
from decoder_vs_hf_sides import (Shapes, agreement, hf_forward, hf_generate,  # noqa: E402
                                 jax_forward, jax_generate, load_pair, model_config,
                                 random_batch, time_decode, time_prefill)

_REEXEC_ENV = "MOE_JAX_DECODER_VS_HF_REEXEC"

# Flag defaults --quick swaps in (a flag given on the command line always wins).
QUICK = dict(hidden_size=64, num_experts=8, top_k=2, expert_width=32, layers=2, heads=4,
             kv_heads=2, head_dim=16, vocab_size=256, batch=2, prefill_length=16,
             prompt_length=8, new_tokens=4, rounds=2)


# --- flags, the check before timing, the run ---


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
  rows, rates = measure(jax_model, hf_model, cfg, s, rounds, (prefill, decode), loads, log)
  goals = {"prefill": 1.0, "decode": 1.5}
  elapsed = time.perf_counter() - started
  result.update(rows=rows, goals_moe_jax_over_hf=goals, machine_rates=rates, load_average=loads,
                elapsed_s=elapsed)
  path = write_result(result_name(f), result)
  print(f"{report_text(rows, goals, s, rounds, rates, hf_info, xla_threads, loads, elapsed)}\n"
        f"wrote {path}")


def measure(jax_model, hf_model, cfg, s: Shapes, rounds: int, batches, loads: dict, log):
  """(rows, machine rates): both phases timed on each side (HF's only when `hf_model`), this
  machine's peak rates, and each phase next to its lower bound; `loads` gains the load average
  before and after the timing."""
  prefill, decode = batches
  sides = {"moe_jax": {"model": jax_model, "forward": jax_forward, "generate": jax_generate}}
  if hf_model is not None:
    sides = {"hf": {"model": hf_model, "forward": hf_forward, "generate": hf_generate}, **sides}
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
  rows = phase_rows(jax_model, cfg, s, prefill_times, decode_times, hit, rates)
  return rows, rates


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
