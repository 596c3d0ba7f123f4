"""Every file in configs/ loads, and the tree becomes valid typed configs at the launch boundary."""

import glob
import importlib.util
import inspect
import os

import jax.numpy as jnp
import numpy as np
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
  names = {os.path.basename(f)[:-3] for f in FILES}
  assert {"bench", "switch_tiny"} <= names
  assert {f"switch_base_{e}" for e in (8, 16, 32, 64, 128, 256)} <= names
  assert set(presets.DECODERS) <= names                 # every decoder preset has its file
  for family in ("qwen3_moe", "mixtral", "olmoe"):
    assert f"{family}_tiny" in names


@pytest.mark.parametrize("path", [f for f in FILES if not f.endswith("bench.py")],
                         ids=os.path.basename)
def test_config_file_is_its_named_preset(path):
  """configs/<name>.py is presets.named(name), so bench.py's model=<name> runs the same tree."""
  name = os.path.basename(path)[:-3]
  assert _load(path).to_dict() == presets.named(name).to_dict()


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_builds_typed_objects(path):
  """Every config: typed objects, the MoE layer the family's Config implies, and windows that are
  exactly the keyword arguments of the family's `text_windows`. Cheap: nothing is compiled."""
  job = config_lib.from_tree(_load(path))
  cfg = job.model
  moe_cfg = job.family.moe_config(cfg, jnp.float32)
  assert moe_cfg.num_experts == cfg.num_experts
  if job.family.NAME == "switch":
    assert moe_cfg.top_k == 1
  else:
    assert moe_cfg.top_k == cfg.num_experts_per_tok <= cfg.num_experts
  assert job.replication.predictor in predictor.KINDS
  assert job.replication.num_replica_slots >= 0
  assert job.mesh.data >= 1 and (job.mesh.expert == -1 or job.mesh.expert >= 1)
  assert set(job.bench.capacity_modes) <= {"dropless", "capacity"}
  window = dict(job.data.window)
  keywords = [p.name for p in inspect.signature(job.family.text_windows).parameters.values()
              if p.kind == p.KEYWORD_ONLY and p.name != "stride"]
  assert sorted(window) == sorted(keywords)
  stream = np.arange(4 * sum(window.values()) + 8, dtype=np.int32) % cfg.vocab_size
  batch = job.family.text_windows(stream, stride=None, **window)
  assert len(batch["input_ids"]) >= 3


# MixtralConfig.from_hf_dict reads "bos_token_id": null as absent (its default, 1); transformers
# reads it as None. Remove the mark when decoder/config.py keeps explicit nulls.
@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_config_model_survives_its_config_json(path):
  """`model` is what the family's config.json says: to_hf_dict -> from_hf_dict gives it back
  (a checkpoint trained from the config, or converted, reloads as the same model)."""
  job = config_lib.from_tree(_load(path))
  assert job.family.Config.from_hf_dict(job.model.to_hf_dict()) == job.model


# Released sizes (model cards, in billions of parameters: total, active per token).
RELEASED = {
    "qwen3_moe_30b_a3b": (30.5, 3.3),     # Qwen/Qwen3-30B-A3B
    "mixtral_8x7b": (46.7, 12.9),         # mistralai/Mixtral-8x7B-v0.1
    "olmoe_1b_7b": (6.9, 1.3),            # allenai/OLMoE-1B-7B-0924
    "qwen1_5_moe_a2_7b": (14.3, 2.7),     # Qwen/Qwen1.5-MoE-A2.7B
    "deepseek_v3": (671.0, 37.0),         # deepseek-ai/DeepSeek-V3 (without its MTP layer)
    "glm4_5_air": (106.0, 12.0),          # zai-org/GLM-4.5-Air (without its MTP layer)
}
# The model card counts active parameters without the embedding and the LM head.
ACTIVE_WITHOUT_EMBEDDINGS = ("glm4_5_air",)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_shapes_have_the_released_parameter_counts(name):
  """The checkpoint's tensor shapes (the family's key map, nothing allocated) add up to the
  released model's size, and the experts of one token to its active size."""
  job = config_lib.from_tree(presets.named(name))
  key_map = job.family.hf_key_map(job.model)
  sizes = {path: int(np.prod(shape)) for path, shape in key_map.leaf_shapes().items()}
  experts = sum(sizes[path] for path in key_map.expert_paths())
  total = sum(sizes.values())
  active = total - experts * (1 - job.model.num_experts_per_tok / job.model.num_experts)
  if name in ACTIVE_WITHOUT_EMBEDDINGS:
    active -= sizes[("embed",)] + sizes.get(("lm_head",), 0)
  # Cards round (671B, 37B, 12B): within 2%, or 0.06B for the small ones.
  total_b, active_b = RELEASED[name]
  assert total / 1e9 == pytest.approx(total_b, rel=0.02, abs=0.06)
  assert active / 1e9 == pytest.approx(active_b, rel=0.02, abs=0.06)
  assert job.checkpoint == ""           # the user points it at the download


def test_bench_options():
  config = _load(os.path.join(CONFIG_DIR, "bench.py"), "model=switch_base_128,policy=learned")
  assert config.model.num_experts == 128
  assert config.bench.policies == "none,learned,oracle"
  config = _load(os.path.join(CONFIG_DIR, "bench.py"), "model=olmoe_tiny,mode=dropless")
  assert config.model.family == "olmoe" and config.bench.capacity_modes == "dropless"
  with pytest.raises(ValueError, match="unknown options"):
    _load(os.path.join(CONFIG_DIR, "bench.py"), "modle=switch_tiny")
  with pytest.raises(ValueError, match=r"model=: no preset named 'gpt9'; use switch_tiny, "
                     r"switch_base_<E> or one of qwen3_moe_tiny, "):
    _load(os.path.join(CONFIG_DIR, "bench.py"), "model=gpt9")


def test_decoder_fields_left_unset_can_be_set_from_the_command_line():
  """A None field (bos_token_id, clip_qkv, ...) is a placeholder: config_flags refuses to
  override a plain None, so --config.model.bos_token_id=5 would otherwise fail."""
  config = presets.named("olmoe_1b_7b")
  assert config.model.bos_token_id is None and config.model.clip_qkv is None
  config.model.bos_token_id, config.model.clip_qkv = 5, 8.0
  job = config_lib.from_tree(config)
  assert job.model.bos_token_id == 5 and job.model.clip_qkv == 8.0


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
