"""The shipped Qwen3-MoE (moe_jax/assets/qwen3_moe_small, made as the README says): it loads as
a user loads it (`models.from_pretrained`, orbax), is the `qwen3_moe_small` preset, routes held-out
pydoc text skewed, and its learned predictor restores. A few seconds: one forward of 512 tokens."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import models
from moe_jax.app import config as config_lib
from moe_jax.app import data, predictor_training, presets

NAME = "qwen3_moe_small"
ASSET = os.path.join(presets.ASSETS, NAME)
TOKENS = 512
# Max/mean expert load of every layer on the first TOKENS held-out tokens must exceed this.
# Measured: 2.53, 2.53, 6.00, 5.72 (layers 0-3); uniformly random top-2 choices over 32 experts
# give ~1.4 at 512 tokens.
MIN_SKEW = 2.0


@pytest.fixture(scope="module")
def job():
  return config_lib.from_tree(presets.named(NAME))


@pytest.fixture(scope="module")
def model():
  return models.from_pretrained(ASSET)


def test_the_preset_points_at_the_asset(job):
  assert job.checkpoint_path == ASSET
  assert job.predictor_path == os.path.join(ASSET, "predictor")


def test_it_loads_as_the_preset(job, model):
  assert model.config == job.model
  assert type(model.config) is models.get_family("qwen3_moe").Config
  assert model.config.norm_topk_prob and model.config.sparse_layers == (0, 1, 2, 3)
  assert data.load_tokenizer(ASSET).get_piece_size() == job.model.vocab_size


def _held_out_ids():
  _, held_out = data.split_topics()
  stream = data.token_stream(list(held_out.values()), data.load_tokenizer(ASSET))
  return jnp.asarray(stream[None, :TOKENS])


def test_routing_on_held_out_text_is_skewed(job, model):
  ids = _held_out_ids()
  out = model(ids, attention_mask=jnp.ones_like(ids), output_router=True)
  assert len(out.router) == job.model.num_hidden_layers
  for i, layer in enumerate(out.router):
    counts = np.bincount(np.asarray(layer.expert_index).reshape(-1),
                         minlength=job.model.num_experts)
    assert counts.sum() == TOKENS * job.model.num_experts_per_tok
    skew = counts.max() / counts.mean()
    assert skew > MIN_SKEW, f"layer {i}: max/mean expert load {skew:.2f}"


def test_the_learned_predictor_restores(job):
  template = predictor_training.learned_template(
      {"layers": job.model.num_hidden_layers}, job.model.hidden_size, job.model.num_experts,
      rank=job.predictor_rank)
  learned = predictor_training.restore_learned(job.predictor_path, template=template)
  assert len(learned["layers"]) == job.model.num_hidden_layers - 1
  assert all(np.isfinite(np.asarray(pair["w"])).all() for pair in learned["layers"])
