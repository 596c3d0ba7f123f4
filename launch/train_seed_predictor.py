"""Train the seed predictor of a model (any family): an LSTM over each stack's embedding output
that predicts every MoE layer's expert for every token at once (`moe_jax.seed_predictor`).

  python launch/train_seed_predictor.py --config=configs/switch_tiny.py [--steps=2000 --hidden=96]
  python launch/train_seed_predictor.py --config=configs/qwen3_moe_small.py [--out_dir=... --force]

Records (embedding output, every MoE layer's router probabilities) on the training split of the
pydoc text, trains one LSTM per stack with AdamW (bidirectional for the stacks in the family's
optional BIDIRECTIONAL_STACKS, e.g. ("encoder",); none by default), and saves it
with orbax to --out_dir (default: <checkpoint dir>/seed_predictor). Prints its metadata, then per
MoE layer the held-out top-1 hit rate, recall@k of the router's top-k and load L1 error of seed,
and for layers >= 1 of pregate and of the learned map (config.predictor_checkpoint) beside it.
"""

import _setup

_setup.simulate_cpu_devices(1)

import json  # noqa: E402

from absl import flags  # noqa: E402

from moe_jax.app import config as config_lib, seed_training  # noqa: E402

_CONFIG = _setup.define_config("configs/switch_tiny.py")
flags.DEFINE_string("out_dir", "", "where to save (default: <checkpoint dir>/seed_predictor)")
flags.DEFINE_bool("force", False, "overwrite an existing seed predictor")
flags.DEFINE_integer("steps", 2000, "AdamW steps per stack", lower_bound=1)
flags.DEFINE_integer("hidden", 96, "LSTM width", lower_bound=1)
flags.DEFINE_integer("batches", 0, "training batches of config.data.batch_size windows to record "
                     "(0: config.train.predictor_batches)", lower_bound=0)
flags.DEFINE_integer("batch_size", 32, "windows per training step", lower_bound=1)
flags.DEFINE_integer("log_every", 200, "log the training loss every this many steps",
                     lower_bound=0)


def main(argv):
  del argv
  job = config_lib.from_tree(_CONFIG.value)
  f = flags.FLAGS
  out_dir = f.out_dir or seed_training.default_out_dir(job)
  summary = seed_training.train_on_pydoc(
      job, out_dir, hidden=f.hidden, steps=f.steps,
      num_batches=f.batches or job.train.predictor_batches, batch_size=f.batch_size,
      log_every=f.log_every, force=f.force)
  print(json.dumps({k: v for k, v in summary.items() if k != "held_out"}))
  print(f"saved to {out_dir}")
  print(f"held out ({summary['held_out_tokens']} tokens per stack): MoE layer, then hit / "
        "recall@k / load L1 error of each predictor")
  print("\n".join(seed_training.table_lines(summary["held_out"])))


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
