"""Checkpoints against transformers and torch: transformers' own saves load, transformers loads our
exports, torch `.bin` converts to safetensors and to orbax. Skipped when torch / transformers are
absent."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors

from moe_jax import models
from moe_jax.checkpoints import hf_io
from moe_jax.checkpoints import layout
from moe_jax.checkpoints import orbax_io
from moe_jax.checkpoints import torch_bin
from moe_jax.models import switch

from tests.checkpoint_helpers import (  # noqa: F401  (untied: a fixture)
    REPO, SPARSE_WI, assert_trees_equal, save_hf, tiny_config, untied)


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
  family, config, loaded = models.load_checkpoint(str(tmp_path))  # no missing/unexpected keys
  assert family is switch
  assert config.tie_word_embeddings == tie and config.sparse_blocks("encoder") == (1,)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  for key, spec in switch.hf_key_map(config).specs.items():
    leaf = np.asarray(layout.flatten(loaded)[spec.path])
    np.testing.assert_array_equal(hf_io.hf_tensor(leaf, spec), state[key], err_msg=key)


def test_transformers_loads_our_export(untied, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  config, params = untied
  save_hf(params, config, str(tmp_path), max_shard_bytes=4000)
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
    models.from_pretrained(str(src))
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
  _, config, loaded = models.load_checkpoint(str(dst))
  loaded = layout.flatten(loaded)
  for key, spec in switch.hf_key_map(config).specs.items():
    want = state[key].to(torch.float32).numpy()
    np.testing.assert_array_equal(hf_io.hf_tensor(np.asarray(loaded[spec.path]), spec), want,
                                  err_msg=key)


def test_convert_bin_to_orbax(tmp_path):
  torch = pytest.importorskip("torch")
  model = _tiny_hf_model(False)
  torch.save(model.state_dict(), str(tmp_path / "pytorch_model.bin"))  # tied storages inside
  model.config.to_json_file(str(tmp_path / "config.json"))
  out = tmp_path / "orbax"
  result = subprocess.run(  # the launch script resolves the family from config.json's model_type
      [sys.executable, os.path.join(REPO, "launch", "convert_hf.py"), f"--src={tmp_path}",
       f"--dst={out}", "--format=orbax"], capture_output=True, text=True, timeout=180,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  restored = orbax_io.restore_params(str(out))
  assert orbax_io.load_family(str(out)) == "switch"
  config = switch.Config.from_hf_dict(orbax_io.load_config(str(out)))
  key_map = switch.hf_key_map(config)
  flat = layout.flatten(restored)
  for key, spec in key_map.specs.items():
    np.testing.assert_array_equal(hf_io.hf_tensor(np.asarray(flat[spec.path]), spec),
                                  model.state_dict()[key].numpy(), err_msg=key)
  # Re-mapping the file before every tensor reads the same values.
  source = torch_bin.BinSource.open(str(tmp_path), reopen_bytes=1)
  assert_trees_equal(restored, hf_io.assemble_params(source, key_map))


class _RunsCode:
  """Unpickling this calls os.system: what a malicious checkpoint does."""

  def __reduce__(self):
    return (os.system, ("echo unpickled",))


class _NotATensor:
  pass


def _bins(directory, torch):
  """(name -> a .bin file moe_jax must refuse, the one-line reason it gives)."""
  good = directory / "good.bin"
  torch.save({"w": torch.ones(3)}, str(good))
  truncated = directory / "truncated.bin"
  truncated.write_bytes(good.read_bytes()[:200])
  torch.save({"w": _RunsCode()}, str(directory / "runs_code.bin"))
  torch.save({"w": _NotATensor()}, str(directory / "custom_class.bin"))
  torch.save([torch.ones(3)], str(directory / "a_list.bin"))
  return {"runs_code.bin": "refused on purpose: it needs posix.system",
          "custom_class.bin": "refused on purpose: it needs tests.test_checkpoints_peers",
          "a_list.bin": "holds a list, not a state dict",
          "truncated.bin": "is not a readable torch checkpoint"}


def test_refused_and_unreadable_bins_are_one_line_naming_the_file(tmp_path, capfd):
  torch = pytest.importorskip("torch")
  for name, reason in _bins(tmp_path, torch).items():
    with pytest.raises(layout.CheckpointError) as error:
      torch_bin.load_state_dict(str(tmp_path / name))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / name} ") and reason in message, message
    assert "\n" not in message and "weights_only=False" not in message
  assert "unpickled" not in capfd.readouterr().out


def test_failed_conversion_is_one_line_and_leaves_nothing(tmp_path):
  torch = pytest.importorskip("torch")
  src, dst = tmp_path / "bin", tmp_path / "st"
  src.mkdir()
  _bins(src, torch)
  os.rename(src / "runs_code.bin", src / "pytorch_model.bin")
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "convert_hf.py"), f"--src={src}",
       f"--dst={dst}"], capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  assert errors[0].startswith(f"error: {src / 'pytorch_model.bin'} is refused on purpose")
  assert "weights_only=False" not in result.stderr and not dst.exists()
