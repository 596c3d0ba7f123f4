"""Every file in configs/ loads, and its sub-trees become valid typed configs."""

import glob
import importlib.util
import os

import jax.numpy as jnp
import pytest

from moe_jax import presets, runtime

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
  config = _load(path)
  model_cfg = runtime.switch_config(config)
  moe_cfg = runtime.moe_config(config, model_cfg, jnp.float32)
  rcfg = runtime.replication_config(config)
  assert moe_cfg.num_experts == model_cfg.num_experts and moe_cfg.top_k == 1
  assert rcfg.predictor in ("none", "history", "pregate", "learned", "oracle")
  assert config.mesh.data >= 1 and (config.mesh.expert == -1 or config.mesh.expert >= 1)
  assert set(config.bench.dispatch_modes.split(",")) <= {"dropless", "capacity"}


def test_bench_options():
  config = _load(os.path.join(CONFIG_DIR, "bench.py"), "model=switch_base_128,policy=learned")
  assert config.model.num_experts == 128
  assert config.bench.policies == "none,learned,oracle"
  with pytest.raises(ValueError, match="unknown options"):
    _load(os.path.join(CONFIG_DIR, "bench.py"), "modle=switch_tiny")


def test_typed_config_errors_name_the_field():
  config = presets.switch_tiny()
  config.moe.dispatch = "sometimes"
  with pytest.raises(runtime.UsageError, match="config.moe: .*dispatch='sometimes'"):
    runtime.moe_config(config, runtime.switch_config(config))
  config = presets.switch_tiny()
  config.replication.predictor = "crystal_ball"
  with pytest.raises(runtime.UsageError, match="config.replication"):
    runtime.replication_config(config)


def test_mesh_that_does_not_fit():
  config = presets.switch_tiny()
  config.mesh.data, config.mesh.expert = 4, 4
  with pytest.raises(runtime.UsageError, match="does not fit the 8 visible"):
    runtime.make_mesh(config.mesh)
  config.mesh.data, config.mesh.expert = 2, -1
  assert dict(runtime.make_mesh(config.mesh).shape) == {"data": 2, "expert": 4}


def test_missing_checkpoint():
  config = presets.switch_tiny()
  config.checkpoint = "/nonexistent/dir"
  with pytest.raises(runtime.UsageError, match="is not a directory"):
    runtime.load_model(config)
