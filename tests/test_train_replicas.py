"""Training with replicas (app/training.py + workflows.training_setup): a tiny Qwen3-MoE trained
a few steps on the (2, 4) CPU mesh with the fast grouped matmul, once with the MoE layers on home
slots only and once with `history` replicas placed every step (the load history carried from step
to step). The router decides both: the loss curves and final params agree to float32 rounding
(a replicated expert's gradient is summed over its slots in another order), while the replicated
run really computed rows in replica slots.
"""

import jax
import numpy as np
import pytest

from moe_jax.app import config as config_lib
from moe_jax.app import presets, training, workflows

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16)
STEPS = 3


def _job(**train):
  tree = presets.named("qwen3_moe_tiny")
  tree.model.update(TINY)
  tree.mesh.update(dict(data=2, expert=4))
  tree.replication.update(dict(num_replica_slots=1))
  tree.train.update(dict(steps=STEPS, batch_size=8, log_every=1, warmup=1, **train))
  return config_lib.from_tree(tree)


def _windows(job):
  stream = np.random.default_rng(0).integers(2, TINY["vocab_size"], 2000).astype(np.int32)
  return job.family.text_windows(stream, length=8)


@pytest.fixture(scope="module")
def runs():
  out = {}
  for mode in ("none", "history"):
    job = _job(replication=mode)
    mesh, moe_fn, replicator = workflows.training_setup(job)
    t = job.train
    out[mode] = training.train(job.family, job.model, _windows(job), moe_fn=moe_fn,
                               steps=t.steps, batch_size=t.batch_size, warmup=t.warmup,
                               log_every=t.log_every, mesh=mesh, replicator=replicator)
  return out


def test_history_replicas_leave_the_loss_curve_and_params(runs):
  (plain, plain_log), (replicated, replicated_log) = runs["none"], runs["history"]
  assert [r["step"] for r in replicated_log] == list(range(1, STEPS + 1))
  assert sum(r["replica_rows"] for r in replicated_log) > 0     # replicas did compute rows
  np.testing.assert_allclose([r["loss"] for r in replicated_log],
                             [r["loss"] for r in plain_log], rtol=2e-5)
  assert plain_log[-1]["loss"] != plain_log[0]["loss"]            # the params did move
  for a, b in zip(jax.tree.leaves(replicated), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_training_setup_follows_the_train_flags():
  mesh, moe_fn, replicator = workflows.training_setup(
      _job(gmm_backend="dense", replication="pregate"))
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  assert moe_fn.execution.gmm_backend == "dense"
  assert replicator.execution.gmm_backend == "dense"
  assert (replicator.config.predictor, replicator.config.num_replica_slots) == ("pregate", 1)
  assert workflows.training_setup(_job())[1].execution.gmm_backend == "auto"


@pytest.mark.parametrize("flag, value", [("replication", "learned"), ("gmm_backend", "fast")])
def test_bad_train_flags_are_one_usage_error(flag, value):
  with pytest.raises(config_lib.UsageError, match=f"--config.train.{flag}"):
    _job(**{flag: value})
