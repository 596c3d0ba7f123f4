"""Every file in configs/ loads, and the tree becomes valid typed configs at the launch boundary."""

import glob
import importlib.util
import os

import jax.numpy as jnp
import pytest

from moe_jax import predictor
from moe_jax.app import config as config_lib
from moe_jax.app import presets, runtime, workflows
from moe_jax.models import switch

from tests.checkpoint_helpers import save_hf, tiny_config

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def _load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_there_are_configs():
  names = {os.path.basename(f) for f in FILES}
  assert {"bench.py", "switch_tiny.py"} <= names
  assert {f"switch_base_{e}.py" for e in (8, 16, 32, 64, 128, 256)} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_builds_typed_objects(path):
  job = config_lib.from_tree(_load(path))
  moe_cfg = job.family.moe_config(job.model, jnp.float32)
  assert moe_cfg.num_experts == job.model.num_experts and moe_cfg.top_k == 1
  assert job.replication.predictor in predictor.KINDS
  assert job.replication.num_replica_slots >= 0
  assert job.mesh.data >= 1 and (job.mesh.expert == -1 or job.mesh.expert >= 1)
  assert set(job.bench.capacity_modes) <= {"dropless", "capacity"}
  assert dict(job.data.window) == {"encoder_len": 64, "decoder_len": 64}


def test_bench_options():
  config = _load(os.path.join(CONFIG_DIR, "bench.py"), "model=switch_base_128,policy=learned")
  assert config.model.num_experts == 128
  assert config.bench.policies == "none,learned,oracle"
  with pytest.raises(ValueError, match="unknown options"):
    _load(os.path.join(CONFIG_DIR, "bench.py"), "modle=switch_tiny")


@pytest.mark.parametrize("section, key, value, message", [
    ("execution", "capacity_mode", "sometimes",
     r"--config.execution: ExecutionConfig.capacity_mode='sometimes' is not one of"),
    ("replication", "predictor", "crystal_ball", r"--config.replication: .*crystal_ball"),
    ("replication", "num_replica_slots", -1, r"--config.replication: num_replica_slots=-1"),
    ("model", "family", "gpt9", r"--config.model.family: .*gpt9"),
    ("model", "d_model", 0, r"--config.model: "),
])
def test_typed_config_errors_name_the_flag(section, key, value, message):
  config = presets.switch_tiny()
  config[section][key] = value
  with pytest.raises(config_lib.UsageError, match=message):
    config_lib.from_tree(config)


def test_unknown_key_lists_the_closest_valid_ones():
  config = presets.switch_tiny().to_dict()
  config["execution"]["capacity_mod"] = "dropless"
  with pytest.raises(config_lib.UsageError, match=r"did you mean --config.execution.capacity_mode"):
    config_lib.from_tree(config)


def test_mesh_that_does_not_fit():
  job = config_lib.from_tree(presets.switch_tiny())
  with pytest.raises(config_lib.UsageError, match="does not fit the 8 visible"):
    runtime.make_mesh(config_lib.MeshConfig(data=4, expert=4))
  assert dict(runtime.make_mesh(config_lib.MeshConfig(data=2, expert=-1)).shape) == {
      "data": 2, "expert": 4}
  assert job.mesh == config_lib.MeshConfig(data=1, expert=-1, allow_idle_devices=False)


def test_missing_checkpoint():
  config = presets.switch_tiny()
  config.checkpoint = "/nonexistent/dir"
  with pytest.raises(config_lib.UsageError, match="is not a directory"):
    runtime.load_model(config_lib.from_tree(config))


@pytest.mark.parametrize("section, key, value, message", [
    ("bench", "policies", "histroy,none", r"--config.bench.policies='histroy,none' has unknown"),
    ("bench", "policies", "history", r"--config.bench.policies='history' lacks 'none'"),
    ("bench", "capacity_modes", "sometimes", r"--config.bench.capacity_modes='sometimes': "),
    ("bench", "warmup_batches", -1, r"--config.bench.warmup_batches=-1 must be an integer >= 0"),
    ("data", "batch_size", 0, r"--config.data.batch_size=0 must be an integer >= 1"),
    ("data", "encoder_len", 0, r"--config.data.encoder_len=0 must be an integer >= 1"),
    ("data", "max_input_tokens", 0, r"--config.data.max_input_tokens=0 must be an integer >= 1"),
    ("train", "steps", 0, r"--config.train.steps=0 must be an integer >= 1"),
    ("train", "learning_rate", 0.0, r"--config.train.learning_rate=0.0 must be a number > 0"),
])
def test_values_the_harness_cannot_run_name_the_flag(section, key, value, message):
  config = presets.switch_tiny()
  config[section][key] = value
  with pytest.raises(config_lib.UsageError, match=message):
    config_lib.from_tree(config)


def test_prompt_length_limit_per_config():
  assert config_lib.from_tree(presets.switch_tiny()).data.max_input_tokens == 4096
  assert config_lib.from_tree(presets.switch_base(8)).data.max_input_tokens == 512
  assert "max_input_tokens" not in dict(config_lib.from_tree(presets.switch_tiny()).data.window)


def test_a_mesh_must_use_every_device_unless_allowed():
  with pytest.raises(config_lib.UsageError) as error:
    runtime.make_mesh(config_lib.MeshConfig(data=3))      # expert = 8 // 3 = 2: 6 devices
  message = str(error.value)
  assert "uses 6 of the 8 visible cpu devices and would leave 2 idle" in message
  assert "--config.mesh.allow_idle_devices=True" in message
  mesh = runtime.make_mesh(config_lib.MeshConfig(data=3, allow_idle_devices=True))
  assert dict(mesh.shape) == {"data": 3, "expert": 2}


def test_experts_that_do_not_split_over_the_mesh_name_the_flags():
  mesh = runtime.make_mesh(config_lib.MeshConfig(data=2, expert=3, allow_idle_devices=True))
  with pytest.raises(config_lib.UsageError) as error:
    runtime.check_experts_fit(16, mesh, config_lib.MeshConfig(data=2, expert=3))
  message = str(error.value)
  assert "16 experts do not split over the mesh's expert axis of 3" in message
  assert "e.g. --config.mesh.data=1 --config.mesh.expert=8" in message
  assert "--config.cpu_devices=8" in message


@pytest.mark.parametrize("texts, ids, message", [
    ([""], "", r"--text is empty"),
    (["  "], "", r"--text is empty"),
    ([], "", r"give --text=\.\.\. or --ids=\.\.\."),
    ([], "3,x", r"--ids='3,x' must be comma-separated token ids"),
    ([], "3,99999", r"--ids has ids \[99999\] outside the vocabulary \[0, 2048\)"),
    (["word " * 4200], "", r"the prompt is 4201 tokens long, more than "
     r"--config.data.max_input_tokens=4096 .* raise --config.data.max_input_tokens"),
])
def test_prompts_launch_infer_refuses(texts, ids, message):
  job = config_lib.from_tree(presets.switch_tiny())
  _, cfg = runtime.checkpoint_config(job)
  with pytest.raises(config_lib.UsageError, match=message):
    workflows.prompt_rows(job, cfg, runtime.load_tokenizer(job), texts=texts, ids=ids)
  if ids == "" and texts and texts[0].startswith("word"):   # the same prompt, a raised limit
    config = presets.switch_tiny()
    config.data.max_input_tokens = 4201
    job = config_lib.from_tree(config)
    rows = workflows.prompt_rows(job, cfg, runtime.load_tokenizer(job), texts=texts, ids=ids)
    assert len(rows[0]) == 4201 and rows[0][-1] == cfg.eos_token_id


def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path):
  config = tiny_config()
  save_hf(switch.random_params(config, seed=0), config, tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
  tree = presets.switch_tiny()
  tree.checkpoint = str(tmp_path)
  with pytest.raises(config_lib.UsageError) as error:
    runtime.load_model(config_lib.from_tree(tree))
  message = str(error.value)
  assert f"{tmp_path}/model.safetensors is not a readable safetensors file" in message
  assert "\n" not in message and message.endswith(f"(--config.checkpoint={tmp_path})")


def test_windows_longer_than_the_text_name_the_flags():
  config = presets.switch_tiny()
  config.data.encoder_len = 100000
  job = config_lib.from_tree(config)
  with pytest.raises(config_lib.UsageError, match=r"shorter than one window of 100064; .*"
                     r"\(held_out text; --config.data.decoder_len=64, "
                     r"--config.data.encoder_len=100000\)"):
    workflows.pydoc_windows(job, runtime.load_tokenizer(job), "held_out")
