"""The report of decoder_vs_hf.py (see its docstring): each phase's lower bound on this machine
(roofline.py), the result rows (tokens/s per side, moe_jax / HF, time over the bound), and the
printed table with its legend and the machine's load.
"""

from __future__ import annotations

import os

import numpy as np

import roofline
from decoder_vs_hf_sides import Shapes


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


def phase_rows(jax_model, cfg, s: Shapes, prefill_times: dict, decode_times: dict, hit,
               rates: dict) -> list[dict]:
  """The prefill and decode rows of the timings, each next to its lower bound."""
  context = s.prompt_length + (s.new_tokens + 1) / 2    # mean valid slots over the timed steps
  params = jax_model.params
  return [
      phase_row("prefill", f"{s.batch}x{s.prefill_length}", s.batch * s.prefill_length,
                prefill_times,
                roofline.decoder_prefill_need(params, cfg, s.batch, s.prefill_length, hit),
                rates["used"]),
      phase_row("decode", f"{s.batch} P{s.prompt_length}+{s.new_tokens}", s.batch, decode_times,
                roofline.decoder_decode_step_need(params, cfg, s.batch, context), rates["used"]),
  ]


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


def report_text(rows: list[dict], goals: dict, s: Shapes, rounds: int, rates: dict,
                hf_info: dict, xla_threads: int, loads: dict, elapsed: float) -> str:
  """The table, its legend, the threads and the load average over the run."""
  threads = (f"torch threads {hf_info['torch_threads']}, XLA:CPU threads {xla_threads}"
             if hf_info else f"XLA:CPU threads {xla_threads}")
  return (f"\n{table(rows, goals)}\n\n{legend(s, rounds, rows, rates)}\n{threads}; load "
          f"average (1/5/15 min) at start {load_text(loads['start'])}, before timing "
          f"{load_text(loads['before_timing'])}, after {load_text(loads['after_timing'])} on "
          f"{os.cpu_count()} CPUs; took {elapsed:.0f} s.")

