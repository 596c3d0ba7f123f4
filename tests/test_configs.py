"""Every file in configs/ loads, and the tree becomes valid typed configs at the launch boundary."""

import glob
import importlib.util
import os

import jax.numpy as jnp
import pytest

from moe_jax import predictor
from moe_jax.app import config as config_lib
from moe_jax.app import presets, runtime

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
  assert job.mesh == config_lib.MeshConfig(data=1, expert=-1)


def test_missing_checkpoint():
  config = presets.switch_tiny()
  config.checkpoint = "/nonexistent/dir"
  with pytest.raises(config_lib.UsageError, match="is not a directory"):
    runtime.load_model(config_lib.from_tree(config))
