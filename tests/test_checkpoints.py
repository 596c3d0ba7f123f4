"""Checkpoint import/export: HF safetensors <-> param tree, orbax, torch .bin conversion.

Runs without torch; the transformers / torch cross-checks skip when those are absent.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import moe_jax
from moe_jax.checkpoints import convert
from moe_jax.checkpoints import hf_switch
from moe_jax.checkpoints import layout
from moe_jax.checkpoints import orbax_io
from moe_jax.checkpoints import safetensors_io
from moe_jax.checkpoints import synthetic
from moe_jax.checkpoints import torch_bin
from moe_jax.models.switch_config import SwitchConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSE_WI = "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"


def tiny_config(**changes) -> SwitchConfig:
  # Encoder: 3 blocks, step 3 -> sparse block 1 only; decoder: 2 blocks, step 2 -> block 1.
  base = dict(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=3,
              num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=8)
  base.update(changes)
  return SwitchConfig(**base)


def assert_trees_equal(expected, actual, dtype=None):
  want, got = layout.flatten(expected), layout.flatten(actual)
  assert list(want) == list(got)
  for path, leaf in want.items():
    value = np.asarray(got[path])
    assert value.dtype == (np.dtype(dtype) if dtype is not None else leaf.dtype), path
    np.testing.assert_array_equal(value, np.asarray(leaf).astype(value.dtype), err_msg=str(path))


def read_all(directory):
  """{key: array} of a single-file checkpoint (small test files only)."""
  return safetensors.numpy.load_file(os.path.join(directory, hf_switch.WEIGHTS_NAME))


def rewrite(directory, tensors):
  safetensors.numpy.save_file(tensors, os.path.join(directory, hf_switch.WEIGHTS_NAME))


@pytest.fixture(scope="module")
def tied():
  config = tiny_config()
  return config, synthetic.random_params(config, seed=0)


@pytest.fixture(scope="module")
def untied():
  config = tiny_config(tie_word_embeddings=False)
  return config, synthetic.random_params(config, seed=1)


# --- HF safetensors round trips ---

@pytest.mark.parametrize("which", ["tied", "untied"])
def test_single_file_round_trip(which, request, tmp_path):
  config, params = request.getfixturevalue(which)
  written = hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  assert [os.path.basename(f) for f in written] == ["model.safetensors"]
  keys = set(read_all(tmp_path))
  assert keys == set(layout.hf_tensor_specs(config))
  assert ("lm_head.weight" in keys) == (not config.tie_word_embeddings)
  loaded = hf_switch.load_params(str(tmp_path))  # config read back from config.json
  assert_trees_equal(params, loaded)
  assert hf_switch.load_config(str(tmp_path)) == config
  wi = loaded["encoder"]["blocks"][1]["ff"]["wi"]
  assert wi.shape == (8, 8, 16) and isinstance(wi, jax.Array)
  # One HF tensor, by hand: expert 3's wi is [d_ff, d_model] = wi[3].T.
  np.testing.assert_array_equal(read_all(tmp_path)[SPARSE_WI], np.asarray(wi[3]).T)


def test_sharded_round_trip(untied, tmp_path):
  config, params = untied
  written = hf_switch.save_hf_safetensors(params, config, str(tmp_path), max_shard_bytes=3000)
  shards = [f for f in written if f.endswith(".safetensors")]
  assert len(shards) > 3 and written[-1].endswith(hf_switch.INDEX_NAME)
  with open(written[-1]) as f:
    weight_map = json.load(f)["weight_map"]
  # An expert stack is spread over several shards: it must still be assembled in full.
  stack_files = {weight_map[f"encoder.block.1.layer.1.mlp.experts.expert_{e}.wi.weight"]
                 for e in range(8)}
  assert len(stack_files) > 1
  assert not os.path.exists(tmp_path / hf_switch.WEIGHTS_NAME)
  assert_trees_equal(params, hf_switch.load_params(str(tmp_path), config))
  assert_trees_equal(params, hf_switch.load_params(written[-1], config))  # the index itself


def test_bf16_file_loads_as_requested_dtype(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path), dtype=jnp.bfloat16)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert_trees_equal(rounded, hf_switch.load_params(str(tmp_path), config), dtype=np.float32)
  assert_trees_equal(rounded, hf_switch.load_params(str(tmp_path), config, dtype=jnp.bfloat16))


@pytest.mark.parametrize("data,expert", [(2, 4), (1, 8)])
def test_mesh_shards_expert_stacks(data, expert, tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path), max_shard_bytes=4000)
  mesh = moe_jax.make_mesh(data, expert)
  loaded = hf_switch.load_params(str(tmp_path), config, mesh=mesh)
  assert_trees_equal(params, loaded)
  for path, leaf in layout.flatten(loaded).items():
    if layout.is_expert_stack(path, leaf.shape):
      assert leaf.sharding.spec == jax.sharding.PartitionSpec("expert"), path
      assert {s.data.shape[0] for s in leaf.addressable_shards} == {8 // expert}
      assert len(leaf.addressable_shards) == data * expert
    else:
      assert leaf.sharding.is_fully_replicated, path
  ff = loaded["decoder"]["blocks"][1]["ff"]
  assert ff["wo"].sharding.spec == jax.sharding.PartitionSpec("expert")
  assert ff["router"].sharding.is_fully_replicated
  # Export gathers sharded leaves shard by shard.
  hf_switch.save_hf_safetensors(loaded, config, str(tmp_path / "again"))
  assert_trees_equal(params, hf_switch.load_params(str(tmp_path / "again"), config))


def test_mesh_must_divide_experts(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  with pytest.raises(ValueError, match="num_experts=8 is not divisible by the mesh's 'expert'"):
    hf_switch.load_params(str(tmp_path), config, mesh=moe_jax.make_mesh(1, 3))


def test_tied_copies_are_accepted_and_ignored(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
    tensors[key] = np.zeros_like(tensors["shared.weight"])  # ignored, whatever they hold
  rewrite(tmp_path, tensors)
  assert_trees_equal(params, hf_switch.load_params(str(tmp_path), config))


def test_untied_embeddings_fall_back_to_shared(untied, tmp_path):
  # transformers 4 saved untied models with encoder/decoder.embed_tokens shared with `shared`.
  config, params = untied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  del tensors["encoder.embed_tokens.weight"], tensors["decoder.embed_tokens.weight"]
  rewrite(tmp_path, tensors)
  loaded = hf_switch.load_params(str(tmp_path), config)
  np.testing.assert_array_equal(loaded["encoder_embed"], params["shared"])
  np.testing.assert_array_equal(loaded["decoder_embed"], params["shared"])
  np.testing.assert_array_equal(loaded["lm_head"], params["lm_head"])


def test_reader_reopening_reads_the_same(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  want = read_all(tmp_path)
  with safetensors_io.ShardReader(str(tmp_path / hf_switch.WEIGHTS_NAME), reopen_bytes=1) as r:
    assert {k: s for k, (s, _) in r.infos().items()} == {k: v.shape for k, v in want.items()}
    for key in sorted(want):  # reopens before every tensor
      np.testing.assert_array_equal(r.get(key), want[key])


# --- errors ---

def test_missing_key(untied, tmp_path):
  config, params = untied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  del tensors[SPARSE_WI], tensors["lm_head.weight"]
  rewrite(tmp_path, tensors)
  with pytest.raises(ValueError) as e:
    hf_switch.load_params(str(tmp_path), config)
  msg = str(e.value)
  assert f"missing {SPARSE_WI}: expected shape [16, 8], found no such tensor in" in msg
  assert "missing lm_head.weight: expected shape [32, 8]" in msg
  assert "model.safetensors" in msg and "2 problem(s)" in msg


def test_unexpected_key(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  tensors = read_all(tmp_path)
  tensors["encoder.block.1.layer.1.mlp.router.classifier.bias"] = np.zeros((8,), np.float32)
  rewrite(tmp_path, tensors)
  with pytest.raises(ValueError, match=r"unexpected encoder\.block\.1\.layer\.1\.mlp\.router\."
                     r"classifier\.bias: shape \[8\] in .*model\.safetensors"):
    hf_switch.load_params(str(tmp_path), config)


def test_wrong_shape_names_key_both_shapes_and_file(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path), max_shard_bytes=3000)
  with open(tmp_path / hf_switch.INDEX_NAME) as f:
    shard = json.load(f)["weight_map"][SPARSE_WI]
  file = tmp_path / shard
  tensors = safetensors.numpy.load_file(str(file))
  tensors[SPARSE_WI] = np.zeros((16, 9), np.float32)
  safetensors.numpy.save_file(tensors, str(file))
  with pytest.raises(ValueError, match=rf"wrong shape {SPARSE_WI}: expected shape \[16, 8\], "
                     rf"found \[16, 9\] in .*{shard}"):
    hf_switch.load_params(str(tmp_path), config)


def test_config_mismatch_lists_problems(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  with pytest.raises(ValueError, match=r"num_experts=4.*problem\(s\)") as e:
    hf_switch.load_params(str(tmp_path), config.replace(num_experts=4))
  assert "unexpected encoder.block.1.layer.1.mlp.experts.expert_7.wi.weight" in str(e.value)


@pytest.mark.parametrize("target", ["dir", "file", "index"])
def test_torch_bin_is_refused_without_unpickling(target, tmp_path):
  (tmp_path / "config.json").write_text("{}")
  # Not a pickle at all: a loader that tried to unpickle would fail differently.
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
  (tmp_path / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
  path = {"dir": tmp_path, "file": tmp_path / "pytorch_model.bin",
          "index": tmp_path / "pytorch_model.bin.index.json"}[target]
  with pytest.raises(ValueError, match=r"python launch/convert_hf\.py --src=.* --dst="):
    hf_switch.load_params(str(path), tiny_config())


def test_missing_config_json(tied, tmp_path):
  config, params = tied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf_switch.load_params(str(tmp_path))
  assert_trees_equal(params, hf_switch.load_params(str(tmp_path), config))  # given: not needed


def test_no_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf_switch.load_params(str(tmp_path), tiny_config())
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_switch.load_params(str(tmp_path / "nope"), tiny_config())


def test_index_listing_a_missing_shard(tied, tmp_path):
  config, params = tied
  written = hf_switch.save_hf_safetensors(params, config, str(tmp_path), max_shard_bytes=3000)
  os.remove(written[1])
  with pytest.raises(FileNotFoundError, match=os.path.basename(written[1])):
    hf_switch.load_params(str(tmp_path), config)


def test_save_rejects_wrong_tree(tied, tmp_path):
  config, params = tied
  bad = jax.tree.map(lambda x: x, params)
  bad["encoder"]["blocks"][1]["ff"]["wi"] = np.zeros((8, 8, 15), np.float32)
  with pytest.raises(ValueError, match=r"wrong shape encoder/blocks/1/ff/wi: expected "
                     r"\[8, 8, 16\], found \[8, 8, 15\]"):
    hf_switch.save_hf_safetensors(bad, config, str(tmp_path))


def test_torch_missing_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="pip install torch"):
    torch_bin.require_torch()


# --- orbax ---

def test_orbax_round_trip(untied, tmp_path):
  config, params = untied
  path = orbax_io.save_params(str(tmp_path / "ckpt"), params, config=config,
                              metadata={"source": "test", "step": 3})
  restored = orbax_io.restore_params(path)
  assert isinstance(restored["encoder"]["blocks"], list)
  assert_trees_equal(params, restored)
  assert orbax_io.load_config(path) == config
  assert orbax_io.load_metadata(path) == {"source": "test", "step": 3}
  target = layout.param_shapes(config)
  assert_trees_equal(params, orbax_io.restore_params(path, target=target))
  with pytest.raises(ValueError, match="already holds a checkpoint"):
    orbax_io.save_params(path, params)


def test_orbax_restore_on_mesh(tied, tmp_path):
  config, params = tied
  device_params = hf_switch.assemble_params(_MemorySource(params, config), config,
                                            place=hf_switch.device_placer())
  path = orbax_io.save_params(str(tmp_path / "ckpt"), device_params)  # jax.Array leaves
  restored = orbax_io.restore_params(path, mesh=moe_jax.make_mesh(2, 4))
  assert_trees_equal(params, restored)
  wi = restored["encoder"]["blocks"][1]["ff"]["wi"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("expert")
  assert {s.data.shape for s in wi.addressable_shards} == {(2, 8, 16)}
  assert restored["shared"].sharding.is_fully_replicated


def test_orbax_target_mismatch(tied, tmp_path):
  config, params = tied
  path = orbax_io.save_params(str(tmp_path / "ckpt"), params)
  target = layout.param_shapes(config.replace(d_ff=12))
  with pytest.raises(ValueError, match=r"encoder/blocks/1/ff/wi: target shape \[8, 8, 12\], "
                     r"checkpoint shape \[8, 8, 16\]"):
    orbax_io.restore_params(path, target=target)
  target = layout.param_shapes(config)
  del target["decoder"]["final_norm"]
  with pytest.raises(ValueError, match=r"decoder/final_norm: in the checkpoint \(shape \[8\]\), "
                     "not in target"):
    orbax_io.restore_params(path, target=target)


def test_safetensors_to_orbax(untied, tmp_path):
  config, params = untied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path / "hf"), max_shard_bytes=5000)
  out = convert.to_orbax(str(tmp_path / "hf"), str(tmp_path / "orbax"), dtype=jnp.bfloat16)
  restored = orbax_io.restore_params(out)
  assert_trees_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), restored)
  assert orbax_io.load_config(out) == config


class _MemorySource:
  """A one-file source over an in-memory tree, for `assemble_params`."""

  def __init__(self, params, config):
    specs = layout.hf_tensor_specs(config)
    flat = layout.flatten(params)
    self.tensors = {k: hf_switch.hf_tensor(flat[s.path], s) for k, s in specs.items()}
    self.files = ["memory"]

  def describe(self):
    return "memory"

  def locate(self):
    return {k: hf_switch.TensorLocation(t.shape, "F32", "memory") for k, t in self.tensors.items()}

  def read(self, file, keys):
    for key in keys:
      yield key, self.tensors[key]


# --- peers: transformers and torch (skipped when absent) ---

def _tiny_hf_model(tie):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  fields = tiny_config(tie_word_embeddings=tie).to_hf_dict()
  del fields["model_type"]
  hf_config = transformers.SwitchTransformersConfig(**fields)
  return transformers.SwitchTransformersForConditionalGeneration(hf_config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_save_pretrained_loads(tie, tmp_path):
  model = _tiny_hf_model(tie)
  model.save_pretrained(str(tmp_path))
  config = hf_switch.load_config(str(tmp_path))
  assert config.tie_word_embeddings == tie and config.sparse_blocks("encoder") == (1,)
  loaded = hf_switch.load_params(str(tmp_path))  # no missing / unexpected keys
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for key, spec in layout.hf_tensor_specs(config).items():
    leaf = np.asarray(layout.flatten(loaded)[spec.path])
    np.testing.assert_array_equal(hf_switch.hf_tensor(leaf, spec), state[key], err_msg=key)


def test_transformers_loads_our_export(untied, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  config, params = untied
  hf_switch.save_hf_safetensors(params, config, str(tmp_path), max_shard_bytes=4000)
  model, info = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert not info["mismatched_keys"]
  state = model.state_dict()
  np.testing.assert_array_equal(state[SPARSE_WI].numpy(),
                                params["encoder"]["blocks"][1]["ff"]["wi"][3].T)
  np.testing.assert_array_equal(state["lm_head.weight"].numpy(), params["lm_head"].T)


def _torch_save_sharded(model, directory, torch):
  """pytorch_model-0000i-of-00002.bin + index, as transformers 4 wrote them (bf16 experts)."""
  state = {k: (v.to(torch.bfloat16) if "experts" in k else v).clone()
           for k, v in model.state_dict().items()}
  keys = sorted(state)
  halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
  weight_map = {}
  for i, part in enumerate(halves):
    name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
    torch.save({k: state[k] for k in part}, os.path.join(directory, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(directory, torch_bin.BIN_INDEX_NAME), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  model.config.to_json_file(os.path.join(directory, "config.json"))
  return state


def test_convert_sharded_bin_to_safetensors(tmp_path):
  torch = pytest.importorskip("torch")
  model = _tiny_hf_model(True)
  src, dst = tmp_path / "bin", tmp_path / "st"
  src.mkdir()
  state = _torch_save_sharded(model, str(src), torch)
  with pytest.raises(ValueError, match="convert_hf.py"):
    hf_switch.load_params(str(src))
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "convert_hf.py"), f"--src={src}",
       f"--dst={dst}"], capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(dst)) == ["config.json", "model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors",
                                     "model.safetensors.index.json"]
  with safetensors.safe_open(str(dst / "model-00002-of-00002.safetensors"), "numpy") as f:
    assert any(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
  config = hf_switch.load_config(str(dst))
  loaded = layout.flatten(hf_switch.load_params(str(dst)))
  for key, spec in layout.hf_tensor_specs(config).items():
    want = state[key].to(torch.float32).numpy()
    np.testing.assert_array_equal(hf_switch.hf_tensor(np.asarray(loaded[spec.path]), spec), want,
                                  err_msg=key)


def test_convert_bin_to_orbax(tmp_path):
  torch = pytest.importorskip("torch")
  model = _tiny_hf_model(False)
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))  # tied storages inside
  model.config.to_json_file(str(tmp_path / "config.json"))
  out = convert.to_orbax(str(tmp_path), str(tmp_path / "orbax"))
  restored = orbax_io.restore_params(out)
  config = orbax_io.load_config(out)
  flat = layout.flatten(restored)
  for key, spec in layout.hf_tensor_specs(config).items():
    np.testing.assert_array_equal(hf_switch.hf_tensor(np.asarray(flat[spec.path]), spec),
                                  model.state_dict()[key].numpy(), err_msg=key)
  # Re-mapping the file before every tensor reads the same values.
  source = torch_bin.BinSource.open(str(tmp_path), reopen_bytes=1)
  assert_trees_equal(restored, hf_switch.assemble_params(source, config))
