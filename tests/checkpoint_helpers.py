"""Shared pieces of the checkpoint tests: a tiny Switch config, its random params (as fixtures),
save/load through the Switch key map, tree comparison and an in-memory tensor source."""

import os

import numpy as np
import pytest
import safetensors.numpy

from moe_jax.checkpoints import hf_io
from moe_jax.checkpoints import layout
from moe_jax.checkpoints import orbax_io
from moe_jax.models import switch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWITCH_TINY = os.path.join(REPO, "moe_jax", "assets", "switch_tiny")
SPARSE_WI = "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"


def tiny_config(**changes) -> switch.Config:
  # Encoder: 3 blocks, step 3 -> sparse block 1 only; decoder: 2 blocks, step 2 -> block 1.
  base = dict(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=3,
              num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=8)
  base.update(changes)
  return switch.Config(**base)


def save_hf(params, config, path, **kwargs):
  return hf_io.save_hf_safetensors(params, switch.hf_key_map(config), str(path),
                                   config_json=config.to_hf_dict(), **kwargs)


def load_hf(path, config, **kwargs):
  return hf_io.load_params(str(path), switch.hf_key_map(config), **kwargs)


def assert_trees_equal(expected, actual, dtype=None):
  want, got = layout.flatten(expected), layout.flatten(actual)
  assert list(want) == list(got)
  for path, leaf in want.items():
    value = np.asarray(got[path])
    assert value.dtype == (np.dtype(dtype) if dtype is not None else leaf.dtype), path
    np.testing.assert_array_equal(value, np.asarray(leaf).astype(value.dtype), err_msg=str(path))


def read_all(directory):
  """{key: array} of a single-file checkpoint (small test files only)."""
  return safetensors.numpy.load_file(os.path.join(directory, hf_io.WEIGHTS_NAME))


def rewrite(directory, tensors):
  safetensors.numpy.save_file(tensors, os.path.join(directory, hf_io.WEIGHTS_NAME))


@pytest.fixture(scope="module")
def tied():
  """A tied tiny config and random params."""
  config = tiny_config()
  return config, switch.random_params(config, seed=0)


@pytest.fixture(scope="module")
def untied():
  """An untied tiny config and random params."""
  config = tiny_config(tie_word_embeddings=False)
  return config, switch.random_params(config, seed=1)


def save_orbax(path, params, config, **kwargs):
  """The Switch params with their config, family and expert stacks recorded."""
  return orbax_io.save_params(str(path), params, config_json=config.to_hf_dict(),
                              family=switch.NAME, key_map=switch.hf_key_map(config), **kwargs)


class MemorySource:
  """A one-file source over an in-memory tree, for `assemble_params`."""

  def __init__(self, params, key_map):
    flat = layout.flatten(params)
    self.tensors = {k: hf_io.hf_tensor(flat[s.path], s) for k, s in key_map.specs.items()}
    self.files = ["memory"]

  def describe(self):
    return "memory"

  def locate(self):
    return {k: hf_io.TensorLocation(t.shape, "F32", "memory") for k, t in self.tensors.items()}

  def read(self, file, keys):
    for key in keys:
      yield key, self.tensors[key]
