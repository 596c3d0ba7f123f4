"""Train a model on the pydoc text that ships with Python (+ its SentencePiece vocab).

  python launch/train.py --config=configs/switch_tiny.py [--config.train.steps=1500]
      [--config.train.out_dir=/tmp/switch_tiny] [--config.train.gmm_backend=auto]
      [--config.train.replication=history]

Trains on the config.mesh mesh (default: every device on the 'expert' axis; on CPU
--config.cpu_devices=N simulates N, default 8): params replicated, each batch split over the
devices, the MoE layers run expert-parallel with --config.train.gmm_backend (default auto:
windowed on CPU, ragged_dot on GPU/TPU, both differentiable; dense: the slow reference). With
--config.train.replication=history (or pregate) every step also places replicas
(config.replication's num_replica_slots, history_decay), the load history carried step to step;
the router decides either way, so the loss curve is that of training without replicas.

Writes OUT_DIR/spiece.model, the orbax checkpoint (OUT_DIR/moe_jax.json + params/) with the
training log and the per-layer expert-load skew in its metadata. OUT_DIR defaults to the path of
config.checkpoint (for configs/switch_tiny.py: the packaged moe_jax/assets/switch_tiny).
"""

import _setup

_setup.simulate_cpu_devices()   # --config.cpu_devices=N (default 8) for the training mesh

import json  # noqa: E402

from absl import flags, logging  # noqa: E402

from moe_jax.app import config as config_lib, workflows  # noqa: E402

_CONFIG = _setup.define_config("configs/switch_tiny.py")
flags.DEFINE_bool("force", False, "overwrite an existing checkpoint in the output dir")


def main(argv):
  del argv
  job = config_lib.from_tree(_CONFIG.value)
  out_dir = job.train.out_dir or job.checkpoint_path
  summary = workflows.train_on_pydoc(job, out_dir, force=flags.FLAGS.force)
  logging.info("wrote %s", out_dir)
  print(json.dumps({layer: round(s["max_over_mean"], 2) for layer, s in summary["skew"].items()}))
  print(f"final: {json.dumps(summary['final'])}")


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
