"""Train the learned one-layer-ahead predictor of a model (any family) from its routing traces.

  python launch/train_predictor.py --config=configs/switch_tiny.py \
      [--config.train.predictor_steps=400 --config.train.predictor_rank=0] [--out_dir=...]
  python launch/train_predictor.py --config=configs/qwen3_moe_small.py

Records (layer-l input, layer-l' router probabilities) on the training split of the pydoc text,
trains one small map per consecutive MoE-layer pair with AdamW (per token: "learned"), then its
load head on per-window load shares ("learned_load"), and saves both with orbax to --out_dir
(default: config.predictor_checkpoint). Prints the metadata stored with it, then per layer pair
the held-out top-1 hit rate, recall@k of the router's top-k, load L1 error and mean load L1 error
per window of pregate, the learned map and the load head.
"""

import _setup

_setup.simulate_cpu_devices(1)

import json  # noqa: E402

from absl import flags  # noqa: E402

from moe_jax.app import config as config_lib, predictor_training, workflows  # noqa: E402

_CONFIG = _setup.define_config("configs/switch_tiny.py")
flags.DEFINE_string("out_dir", "", "where to save (default: config.predictor_checkpoint)")
flags.DEFINE_bool("force", False, "overwrite an existing predictor checkpoint")


def main(argv):
  del argv
  job = config_lib.from_tree(_CONFIG.value)
  out_dir = flags.FLAGS.out_dir or job.predictor_path
  if not out_dir:
    raise config_lib.UsageError("no output dir: pass --out_dir or set "
                                "--config.predictor_checkpoint.")
  summary = workflows.train_predictor(job, out_dir, force=flags.FLAGS.force)
  print(json.dumps(summary))
  print(f"held out ({summary['held_out_tokens']} tokens): pair, then hit / recall@k / load L1 "
        f"error / mean L1 error per {predictor_training.LOAD_GROUP_TOKENS} tokens of pregate | "
        "learned | learned_load")
  for pair, by_kind in summary["held_out"].items():
    scores = [f"{kind} {predictor_training.format_scores(m)}" for kind, m in by_kind.items()]
    print(f"  {pair}: " + " | ".join(scores))


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
