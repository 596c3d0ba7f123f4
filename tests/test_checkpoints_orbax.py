"""Orbax save/restore with the manifest (family, config, expert stacks), safetensors -> orbax
conversion, and the model registry reading both kinds of checkpoint directory."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import models
from moe_jax.checkpoints import convert
from moe_jax.checkpoints import hf_io
from moe_jax.checkpoints import layout
from moe_jax.checkpoints import orbax_io
from moe_jax.models import switch

from tests.checkpoint_helpers import (  # noqa: F401  (tied, untied: fixtures)
    SWITCH_TINY, MemorySource, assert_trees_equal, save_hf, save_orbax, tied, untied)


def test_orbax_round_trip(untied, tmp_path):
  config, params = untied
  path = save_orbax(tmp_path / "ckpt", params, config, metadata={"source": "test", "step": 3})
  restored = orbax_io.restore_params(path)
  assert isinstance(restored["encoder"]["blocks"], list)
  assert_trees_equal(params, restored)
  assert orbax_io.load_config(path) == config.to_hf_dict()
  assert orbax_io.load_family(path) == "switch"
  assert orbax_io.load_metadata(path) == {"source": "test", "step": 3}
  target = switch.hf_key_map(config).param_shapes()
  assert_trees_equal(params, orbax_io.restore_params(path, target=target))
  with pytest.raises(ValueError, match="already holds a checkpoint"):
    orbax_io.save_params(path, params)


def test_orbax_manifest_records_family_and_expert_stacks(tied, tmp_path):
  config, params = tied
  path = save_orbax(tmp_path / "ckpt", params, config)
  with open(os.path.join(path, orbax_io.MANIFEST_NAME)) as f:
    manifest = json.load(f)
  assert manifest["format"] == orbax_io.FORMAT and manifest["family"] == "switch"
  assert manifest["config"]["model_type"] == "switch_transformers"
  experts = {tuple(leaf["path"]) for leaf in manifest["leaves"] if leaf["expert"]}
  assert experts == switch.hf_key_map(config).expert_paths()
  with pytest.raises(ValueError, match=r"expert_paths \['encoder/blocks/1/ff/w'\] are not leaves"):
    orbax_io.save_params(str(tmp_path / "bad"), params,
                         expert_paths=[("encoder", "blocks", 1, "ff", "w")])


def test_orbax_restore_on_mesh(tied, tmp_path):
  config, params = tied
  key_map = switch.hf_key_map(config)
  device_params = hf_io.assemble_params(MemorySource(params, key_map), key_map,
                                        place=hf_io.device_placer())
  path = save_orbax(tmp_path / "ckpt", device_params, config)  # jax.Array leaves
  restored = orbax_io.restore_params(path, mesh=moe_jax.make_mesh(2, 4))
  assert_trees_equal(params, restored)
  wi = restored["encoder"]["blocks"][1]["ff"]["wi"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("expert")
  assert {s.data.shape for s in wi.addressable_shards} == {(2, 8, 16)}
  assert restored["shared"].sharding.is_fully_replicated
  # Without expert_paths every leaf is replicated: the manifest, not leaf names, decides.
  plain = orbax_io.save_params(str(tmp_path / "plain"), params)
  restored = orbax_io.restore_params(plain, mesh=moe_jax.make_mesh(2, 4))
  assert restored["encoder"]["blocks"][1]["ff"]["wi"].sharding.is_fully_replicated


def test_orbax_format_1_manifest_shards_by_name():
  """The shipped model predates the family seam: its expert stacks are found by their names."""
  with open(os.path.join(SWITCH_TINY, orbax_io.MANIFEST_NAME)) as f:
    assert json.load(f)["format"] == "moe_jax.params/1"
  assert orbax_io.load_family(SWITCH_TINY) is None
  assert models.checkpoint_family(SWITCH_TINY) is switch   # from the stored model_type
  restored = orbax_io.restore_params(SWITCH_TINY, mesh=moe_jax.make_mesh(2, 4))
  config = switch.Config.from_hf_dict(orbax_io.load_config(SWITCH_TINY))
  experts = switch.hf_key_map(config).expert_paths()
  for path, leaf in layout.flatten(restored).items():
    if path in experts:
      assert leaf.sharding.spec == jax.sharding.PartitionSpec("expert"), path
    else:
      assert leaf.sharding.is_fully_replicated, path


def test_orbax_target_mismatch(tied, tmp_path):
  config, params = tied
  path = orbax_io.save_params(str(tmp_path / "ckpt"), params)
  target = switch.hf_key_map(config.replace(d_ff=12)).param_shapes()
  with pytest.raises(ValueError, match=r"encoder/blocks/1/ff/wi: target shape \[8, 8, 12\], "
                     r"checkpoint shape \[8, 8, 16\]"):
    orbax_io.restore_params(path, target=target)
  target = switch.hf_key_map(config).param_shapes()
  del target["decoder"]["final_norm"]
  with pytest.raises(ValueError, match=r"decoder/final_norm: in the checkpoint \(shape \[8\]\), "
                     "not in target"):
    orbax_io.restore_params(path, target=target)


def test_safetensors_to_orbax(untied, tmp_path):
  config, params = untied
  save_hf(params, config, str(tmp_path / "hf"), max_shard_bytes=5000)
  out = convert.to_orbax(str(tmp_path / "hf"), str(tmp_path / "orbax"),
                         switch.hf_key_map(config), config_json=config.to_hf_dict(),
                         family=switch.NAME, dtype=jnp.bfloat16)
  restored = orbax_io.restore_params(out)
  assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), restored)
  assert orbax_io.load_config(out) == config.to_hf_dict()
  # The registry reads it back as a model, on a mesh, in the dtype asked for.
  model = models.from_pretrained(out, mesh=moe_jax.make_mesh(2, 4), dtype=jnp.float32)
  assert isinstance(model, switch.Model) and model.config == config
  assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), model.params,
                     dtype=np.float32)
  assert model.params["decoder"]["blocks"][1]["ff"]["wo"].sharding.spec == (
      jax.sharding.PartitionSpec("expert"))
