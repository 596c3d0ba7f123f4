"""What the source paper's approximate mode costs: the seed predictor's experts replace the
routers (`ReplicationConfig(predictor="seed", route_by="prediction")`), scored against the exact
model on the same batches, on the training and the held-out pydoc windows of a shipped model.

  python benchmarks/approx_quality.py --model=switch_tiny [--batches=8]
  python benchmarks/approx_quality.py --model=qwen3_moe_small

Prints, per split, the exact and approximate cross-entropy and next-token accuracy and the
accuracy kept (approximate / exact); the bench's `seed_approx` row reports the held-out figure
over its scored batches. 8 simulated CPU devices, the model's bench mesh and batch size.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import _setup  # noqa: E402  (launch-script convention: before anything imports jax)

_setup.simulate_cpu_devices()

import json  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from moe_jax import distributed  # noqa: E402
from moe_jax.app import config as config_lib, data as data_lib, presets, runtime  # noqa: E402
from moe_jax.app import workflows  # noqa: E402
from moe_jax.bench import harness, programs  # noqa: E402

flags.DEFINE_string("model", "switch_tiny", "a shipped model with a seed predictor")
flags.DEFINE_integer("batches", 8, "batches per split")
FLAGS = flags.FLAGS


def _split_quality(step, state, batches) -> dict:
  """Mean exact and approximate ce / accuracy over `batches`, and the accuracy kept."""
  rows = {"exact": [], "approx": []}
  for batch in batches:
    rows["approx"].append(step(programs.APPROX, batch, state, None)[0])
    rows["exact"].append(step.quality(batch, state))
  out = {side: {key: float(np.mean([float(r[key]) for r in rows[side]]))
                for key in ("ce", "accuracy")} for side in rows}
  out["kept"] = out["approx"]["accuracy"] / out["exact"]["accuracy"]
  return out


def main(argv):
  del argv
  tree = presets.named(FLAGS.model)
  tree.bench.warmup_batches, tree.data.num_batches = 0, 1
  job = config_lib.from_tree(tree)
  mesh = runtime.make_mesh(job.mesh)
  setup, _ = harness.load_setup(job, mesh)
  if setup.seed is None:
    raise SystemExit(f"{FLAGS.model} has no seed predictor (launch/train_seed_predictor.py).")
  _, tokenizer = runtime.load_model(job, mesh=mesh)
  step = programs.Stepper(setup, setup.execution)
  state = step.initial_state()
  for split in ("train", "held_out"):
    windows = workflows.pydoc_windows(job, tokenizer, split)
    batches = list(data_lib.batches(windows, job.data.batch_size, seed=7))[:FLAGS.batches]
    batches = [distributed.from_host(b, mesh) for b in batches]
    print(split, json.dumps(_split_quality(step, state, batches)), flush=True)


if __name__ == "__main__":
  app.run(main)
