"""Hugging Face safetensors import/export by a family's key map (here the Switch family's): round
trips, meshes and the errors users see. (That the checkpoint IO imports no model: test_imports.py.)
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import moe_jax
from moe_jax import models
from moe_jax.checkpoints import convert
from moe_jax.checkpoints import hf_io
from moe_jax.checkpoints import layout
from moe_jax.checkpoints import safetensors_io
from moe_jax.checkpoints import torch_bin
from moe_jax.models import switch

from tests.checkpoint_helpers import (  # noqa: F401  (tied, untied: fixtures)
    SPARSE_WI, assert_trees_equal, load_hf, read_all, rewrite, save_hf, tied, tiny_config,
    untied)


# --- HF safetensors round trips ---

@pytest.mark.parametrize("which", ["tied", "untied"])
def test_single_file_round_trip(which, request, tmp_path):
  config, params = request.getfixturevalue(which)
  written = save_hf(params, config, str(tmp_path))
  assert [os.path.basename(f) for f in written] == ["model.safetensors"]
  keys = set(read_all(tmp_path))
  assert keys == set(switch.hf_key_map(config).specs)
  assert ("lm_head.weight" in keys) == (not config.tie_word_embeddings)
  family, stored, loaded = models.load_checkpoint(str(tmp_path))  # family + config from config.json
  assert family is switch and stored == config
  assert_trees_equal(params, loaded)
  wi = loaded["encoder"]["blocks"][1]["ff"]["wi"]
  assert wi.shape == (8, 8, 16) and isinstance(wi, jax.Array)
  # One HF tensor, by hand: expert 3's wi is [d_ff, d_model] = wi[3].T.
  np.testing.assert_array_equal(read_all(tmp_path)[SPARSE_WI], np.asarray(wi[3]).T)


def test_sharded_round_trip(untied, tmp_path):
  config, params = untied
  written = save_hf(params, config, str(tmp_path), max_shard_bytes=3000)
  shards = [f for f in written if f.endswith(".safetensors")]
  assert len(shards) > 3 and written[-1].endswith(hf_io.INDEX_NAME)
  with open(written[-1]) as f:
    weight_map = json.load(f)["weight_map"]
  # An expert stack is spread over several shards: it must still be assembled in full.
  stack_files = {weight_map[f"encoder.block.1.layer.1.mlp.experts.expert_{e}.wi.weight"]
                 for e in range(8)}
  assert len(stack_files) > 1
  assert not os.path.exists(tmp_path / hf_io.WEIGHTS_NAME)
  assert_trees_equal(params, load_hf(str(tmp_path), config))
  assert_trees_equal(params, load_hf(written[-1], config))  # the index itself


def test_bf16_file_loads_as_requested_dtype(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path), dtype=jnp.bfloat16)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert_trees_equal(rounded, load_hf(str(tmp_path), config), dtype=np.float32)
  assert_trees_equal(rounded, load_hf(str(tmp_path), config, dtype=jnp.bfloat16))


@pytest.mark.parametrize("data,expert", [(2, 4), (1, 8)])
def test_mesh_shards_expert_stacks(data, expert, tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path), max_shard_bytes=4000)
  mesh = moe_jax.make_mesh(data, expert)
  loaded = load_hf(str(tmp_path), config, mesh=mesh)
  assert_trees_equal(params, loaded)
  experts = switch.hf_key_map(config).expert_paths()
  assert experts == {(stack, "blocks", 1, "ff", name) for stack in ("encoder", "decoder")
                     for name in ("wi", "wo")}
  for path, leaf in layout.flatten(loaded).items():
    if path in experts:
      assert leaf.sharding.spec == jax.sharding.PartitionSpec("expert"), path
      assert {s.data.shape[0] for s in leaf.addressable_shards} == {8 // expert}
      assert len(leaf.addressable_shards) == data * expert
    else:
      assert leaf.sharding.is_fully_replicated, path
  ff = loaded["decoder"]["blocks"][1]["ff"]
  assert ff["wo"].sharding.spec == jax.sharding.PartitionSpec("expert")
  assert ff["router"].sharding.is_fully_replicated
  # Export gathers sharded leaves shard by shard.
  save_hf(loaded, config, str(tmp_path / "again"))
  assert_trees_equal(params, load_hf(str(tmp_path / "again"), config))


def test_mesh_must_divide_experts(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  with pytest.raises(ValueError, match="num_experts=8 is not divisible by the mesh's 'expert'"):
    load_hf(str(tmp_path), config, mesh=moe_jax.make_mesh(1, 3))


def test_tied_copies_are_accepted_and_ignored(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
    tensors[key] = np.zeros_like(tensors["shared.weight"])  # ignored, whatever they hold
  rewrite(tmp_path, tensors)
  assert_trees_equal(params, load_hf(str(tmp_path), config))


def test_untied_embeddings_fall_back_to_shared(untied, tmp_path):
  # transformers 4 saved untied models with encoder/decoder.embed_tokens shared with `shared`.
  config, params = untied
  save_hf(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  del tensors["encoder.embed_tokens.weight"], tensors["decoder.embed_tokens.weight"]
  rewrite(tmp_path, tensors)
  loaded = load_hf(str(tmp_path), config)
  np.testing.assert_array_equal(loaded["encoder_embed"], params["shared"])
  np.testing.assert_array_equal(loaded["decoder_embed"], params["shared"])
  np.testing.assert_array_equal(loaded["lm_head"], params["lm_head"])


def test_reader_reopening_reads_the_same(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  want = read_all(tmp_path)
  with safetensors_io.ShardReader(str(tmp_path / hf_io.WEIGHTS_NAME), reopen_bytes=1) as r:
    assert {k: s for k, (s, _) in r.infos().items()} == {k: v.shape for k, v in want.items()}
    for key in sorted(want):  # reopens before every tensor
      np.testing.assert_array_equal(r.get(key), want[key])


# --- errors ---

def test_missing_key(untied, tmp_path):
  config, params = untied
  save_hf(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  del tensors[SPARSE_WI], tensors["lm_head.weight"]
  rewrite(tmp_path, tensors)
  with pytest.raises(ValueError) as e:
    load_hf(str(tmp_path), config)
  msg = str(e.value)
  assert f"missing {SPARSE_WI}: expected shape [16, 8], found no such tensor in" in msg
  assert "missing lm_head.weight: expected shape [32, 8]" in msg
  assert "model.safetensors" in msg and "2 problem(s)" in msg


def test_unexpected_key(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  tensors["encoder.block.1.layer.1.mlp.router.classifier.bias"] = np.zeros((8,), np.float32)
  rewrite(tmp_path, tensors)
  with pytest.raises(ValueError, match=r"unexpected encoder\.block\.1\.layer\.1\.mlp\.router\."
                     r"classifier\.bias: shape \[8\] in .*model\.safetensors"):
    load_hf(str(tmp_path), config)


def test_wrong_shape_names_key_both_shapes_and_file(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path), max_shard_bytes=3000)
  with open(tmp_path / hf_io.INDEX_NAME) as f:
    shard = json.load(f)["weight_map"][SPARSE_WI]
  file = tmp_path / shard
  tensors = safetensors.numpy.load_file(str(file))
  tensors[SPARSE_WI] = np.zeros((16, 9), np.float32)
  safetensors.numpy.save_file(tensors, str(file))
  with pytest.raises(ValueError, match=rf"wrong shape {SPARSE_WI}: expected shape \[16, 8\], "
                     rf"found \[16, 9\] in .*{shard}"):
    load_hf(str(tmp_path), config)


def test_config_mismatch_lists_problems(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  with pytest.raises(ValueError, match=r"num_experts=4.*problem\(s\)") as e:
    load_hf(str(tmp_path), config.replace(num_experts=4))
  assert "unexpected encoder.block.1.layer.1.mlp.experts.expert_7.wi.weight" in str(e.value)
  assert "router_bias are not supported" in str(e.value)  # the family's hint


@pytest.mark.parametrize("target", ["dir", "file", "index"])
def test_torch_bin_is_refused_without_unpickling(target, tmp_path):
  (tmp_path / "config.json").write_text("{}")
  # Not a pickle at all: a loader that tried to unpickle would fail differently.
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
  (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
  path = {"dir": tmp_path, "file": tmp_path / "pytorch_model.bin",
          "index": tmp_path / "pytorch_model.bin.index.json"}[target]
  with pytest.raises(ValueError, match=r"python launch/convert_hf\.py --src=.* --dst="):
    load_hf(str(path), tiny_config())


def test_missing_config_json(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    switch.from_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"neither moe_jax\.json .* nor config\.json"):
    models.from_pretrained(str(tmp_path))
  assert_trees_equal(params, load_hf(str(tmp_path), config))  # a key map needs no config.json


def test_no_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    load_hf(str(tmp_path), tiny_config())
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf(str(tmp_path / "nope"), tiny_config())


def test_index_listing_a_missing_shard(tied, tmp_path):
  config, params = tied
  written = save_hf(params, config, str(tmp_path), max_shard_bytes=3000)
  os.remove(written[1])
  with pytest.raises(FileNotFoundError, match=os.path.basename(written[1])):
    load_hf(str(tmp_path), config)


def test_save_rejects_wrong_tree(tied, tmp_path):
  config, params = tied
  bad = jax.tree.map(lambda x: x, params)
  bad["encoder"]["blocks"][1]["ff"]["wi"] = np.zeros((8, 8, 15), np.float32)
  with pytest.raises(ValueError, match=r"wrong shape encoder/blocks/1/ff/wi: expected "
                     r"\[8, 8, 16\], found \[8, 8, 15\]"):
    save_hf(bad, config, str(tmp_path))


def test_torch_missing_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="pip install torch"):
    torch_bin.require_torch()


# --- unreadable files: one line naming the file ---

@pytest.mark.parametrize("cut", ["half", "header", "empty"])
def test_truncated_safetensors_names_the_file(tied, tmp_path, cut):
  config, params = tied
  shard = save_hf(params, config, str(tmp_path), max_shard_bytes=3000)[1]
  data = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write({"half": data[:len(data) // 2], "header": data[:20], "empty": b""}[cut])
  with pytest.raises(layout.CheckpointError) as error:
    models.from_pretrained(str(tmp_path))
  message = str(error.value)
  assert "\n" not in message and shard in message
  assert "is not a readable safetensors file" in message and "truncated or corrupt" in message


def test_corrupt_config_json_names_the_file(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  (tmp_path / "config.json").write_text('{"d_model": 8,')
  with pytest.raises(layout.CheckpointError, match=r"config\.json is not valid JSON"):
    models.from_pretrained(str(tmp_path))


def test_missing_config_key_is_named_with_the_default_assumed(tied, tmp_path):
  config, params = tied
  save_hf(params, config, str(tmp_path))
  fields = json.loads((tmp_path / "config.json").read_text())
  del fields["d_model"]
  (tmp_path / "config.json").write_text(json.dumps(fields))
  assert switch.Config.from_hf_dir(str(tmp_path)).assumed_defaults == (("d_model", 768),)
  with pytest.raises(layout.CheckpointError) as error:
    models.from_pretrained(str(tmp_path))
  headline = str(error.value).splitlines()[0]
  assert "config.json has no d_model; assumed HF's default d_model=768." in headline
  # A complete config.json assumes nothing, and the record does not change equality.
  assert switch.Config.from_hf_dict(config.to_hf_dict()).assumed_defaults == ()
  assert config.replace(assumed_defaults=(("d_model", 768),)) == config


def test_failed_conversion_removes_what_it_created(tmp_path):
  dst = tmp_path / "new"
  with pytest.raises(RuntimeError):
    with convert.removed_on_failure(str(dst)):
      (dst / "sub").mkdir(parents=True)
      (dst / "model.safetensors.tmp").write_bytes(b"partial")
      raise RuntimeError("disk full")
  assert not dst.exists()
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "keep.txt").write_text("theirs")
  with pytest.raises(KeyboardInterrupt):
    with convert.removed_on_failure(str(tmp_path / "old")):
      (tmp_path / "old" / "model.safetensors").write_bytes(b"partial")
      raise KeyboardInterrupt
  assert os.listdir(tmp_path / "old") == ["keep.txt"]
