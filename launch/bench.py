"""The main job: MoE inference with predictive replication vs the alternatives, with a report.

  python launch/bench.py [--config=configs/bench.py:model=switch_tiny] [--config.bench.repeats=3]

Runs the model over held-out text for each policy (none, history, pregate, learned, seed, eplb,
reactive, oracle; and the source paper's approximate mode, seed_approx) and capacity mode
(dropless, capacity) on a (data, expert) mesh (8 simulated CPU devices by default), then writes
REPORT_DIR/report.json, REPORT_DIR/expert_counts.json (none's per-layer, per-expert counts:
`--config.bench.eplb_counts=` reads such a file) and PNG plots and prints a table. Decoder-only
families report two phases: prefill (the prompt pass) and decode (config.bench.decode_steps
greedy steps with the KV cache after each prompt, the placement re-issued one MoE layer ahead in
every step).

  python launch/bench.py --config=configs/bench.py:model=qwen3_moe_tiny \
      --config.checkpoint=random          # random params of config.model: a smoke run

  python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
      python launch/bench.py --config.cpu_devices=4       # one job of 2 processes x 4 devices
"""

import _setup

_setup.simulate_cpu_devices()

import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import jax  # noqa: E402
from absl import logging  # noqa: E402

from moe_jax import expert_counts  # noqa: E402
from moe_jax.app import config as config_lib, runtime  # noqa: E402
from moe_jax.bench import decode, decode_report, harness, plots, programs  # noqa: E402
from moe_jax.bench import report as report_lib  # noqa: E402

_CONFIG = _setup.define_config("configs/bench.py")


def main(argv):
  del argv
  job = config_lib.from_tree(_CONFIG.value)
  mesh = runtime.make_mesh(job.mesh)
  logging.info("loading %s, its learned predictor and %d held-out batches of %d", job.checkpoint,
               job.bench.warmup_batches + job.data.num_batches, job.data.batch_size)
  start = time.perf_counter()
  setup, batches = harness.load_setup(job, mesh)
  logging.info("loaded in %.1f s; running capacity modes %s", time.perf_counter() - start,
               ",".join(job.bench.capacity_modes))
  policies = _policies(job, setup)
  calibration = _calibration(job, setup)
  runs, warm = {}, job.bench.warmup_batches
  for mode in job.bench.capacity_modes:
    runs[mode] = harness.run_mode(setup, batches[warm:], mode, policies,
                                  repeats=job.bench.repeats, warmup=batches[:warm],
                                  calibration=calibration)
  steps = job.bench.decode_steps if setup.decodes else 0
  in_decode = [p for p in policies if p in decode.POLICIES]
  decode_runs = {mode: decode.run_decode(setup, batches[warm:], mode, in_decode, steps=steps,
                                         repeats=job.bench.repeats,
                                         calibration=runs[mode]["none"]["calibration"])
                 for mode in job.bench.capacity_modes if steps}
  logging.info("writing the report")
  meta = harness.describe(job, setup, batches[warm:], mesh)
  report = report_lib.build_report(runs, meta)
  if decode_runs:
    shape = batches[0]["input_ids"].shape
    meta["phases"] = ["prefill", "decode"]
    meta["decode"] = {"steps": steps, "batch": int(shape[0]), "prompt": int(shape[1])}
    report["decode"] = decode_report.build(decode_runs, meta["stacks"])
  if jax.process_index() != 0:   # multi-process: process 0 writes and prints
    return
  report_dir = job.bench.report_dir
  os.makedirs(report_dir, exist_ok=True)
  report_lib.write_json(report, os.path.join(report_dir, "report.json"))
  counts_path = os.path.join(report_dir, "expert_counts.json")
  expert_counts.save(counts_path, _none_counts(runs, setup), tokens=meta["tokens"],
                     source=f"launch/bench.py: {meta['summary']}, policy none")
  if job.bench.plots:
    for path in plots.write_all(report, report_dir):
      logging.info("wrote %s", path)
  print(f"\n{meta['summary']}")
  print(decode_report.phase_tables(report) if decode_runs else report_lib.table(report))
  print(f"\nreport: {os.path.join(report_dir, 'report.json')}; expert counts: {counts_path}")


def _policies(job, setup) -> list:
  """config.bench.policies less those without their predictor, plus the approximate mode."""
  policies = list(job.bench.policies)
  missing = {"learned": (setup.learned, job.predictor_checkpoint, "launch/train_predictor.py"),
             "learned_load": (setup.learned, job.predictor_checkpoint,
                              "launch/train_predictor.py"),
             "seed": (setup.seed, job.seed_predictor_checkpoint,
                      "launch/train_seed_predictor.py")}
  missing["hybrid"] = missing["seed"] if setup.seed is None else missing["learned"]
  for kind, (params, path, script) in missing.items():
    if params is None and kind in policies:
      logging.warning("no predictor at %r: skipping policy %r (train one with %s)", path, kind,
                      script)
      policies.remove(kind)
  if "seed" in policies and job.bench.approximate:
    policies.append(programs.APPROX)
  return policies


def _calibration(job, setup):
  """eplb's calibration counts from --config.bench.eplb_counts, or None (the warm-up batches)."""
  if not job.bench.eplb_counts:
    return None
  try:
    return expert_counts.load(job.bench.eplb_counts,
                              layer_counts={s: len(v) for s, v in setup.layers.items()},
                              num_experts=setup.moe_cfg.num_experts)
  except (OSError, ValueError) as e:
    raise config_lib.UsageError(f"--config.bench.eplb_counts: {e}") from None


def _none_counts(runs, setup) -> dict:
  """stack -> <f32>[n, E] none's true loads over the scored batches (the first capacity mode)."""
  records = next(iter(runs.values()))["none"]["records"]
  return {s: sum(np.stack([np.asarray(r.stats.tokens_per_expert, np.float32) for r in batch[s]])
                 for batch in records) for s in setup.layers}


if __name__ == "__main__":
  _setup.run(main)
