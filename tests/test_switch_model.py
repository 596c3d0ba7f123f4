"""The JAX Switch Transformer against Hugging Face references recorded by make_switch_fixtures.py.

The fixtures (tests/fixtures/switch/<name>/) are tiny random HF models saved with `save_pretrained`
plus reference outputs; torch is not needed here. Floats must agree to 1e-4 relative to their scale,
integers (expert ids, dispatch masks, greedy tokens) exactly.
"""

import functools
import importlib.util
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import moe_jax
from moe_jax import models
from moe_jax.models import switch
from moe_jax.models.switch import layers as t5_layers
from moe_jax.models.switch import SwitchConfig, sparse_block_indices
from tests import helpers

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "switch")
FIXTURES = ["tied_step2", "capacity_drops", "step3_explicit", "untied"]
TOLERANCE = 1e-4


# --- fixture loading (a private safetensors reader, independent of moe_jax.checkpoints) ---


def _read_params(path: str, cfg: SwitchConfig) -> dict:
  """HF state dict -> the params tree of models/switch/config.py (Dense kernels transposed)."""
  sd = load_file(os.path.join(path, "model.safetensors"))
  kernel = lambda key: sd[key].T

  def attention(prefix):
    return {n: kernel(f"{prefix}.{n}.weight") for n in ("q", "k", "v", "o")}

  def stack(name):
    ff_layer = 1 if name == "encoder" else 2
    blocks = []
    for i in range(cfg.num_blocks(name)):
      layer = f"{name}.block.{i}.layer"
      mlp = f"{layer}.{ff_layer}.mlp"
      block = {"attn_norm": sd[f"{layer}.0.layer_norm.weight"],
               "attn": attention(f"{layer}.0.SelfAttention"),
               "ff_norm": sd[f"{layer}.{ff_layer}.layer_norm.weight"]}
      if name == "decoder":
        block["cross_norm"] = sd[f"{layer}.1.layer_norm.weight"]
        block["cross"] = attention(f"{layer}.1.EncDecAttention")
      if i in cfg.sparse_blocks(name):
        experts = range(cfg.num_experts)
        block["ff"] = {
            "router": kernel(f"{mlp}.router.classifier.weight"),
            "wi": np.stack([kernel(f"{mlp}.experts.expert_{e}.wi.weight") for e in experts]),
            "wo": np.stack([kernel(f"{mlp}.experts.expert_{e}.wo.weight") for e in experts])}
      else:
        block["ff"] = {"wi": kernel(f"{mlp}.wi.weight"), "wo": kernel(f"{mlp}.wo.weight")}
      blocks.append(block)
    return {"relative_attention_bias":
                sd[f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
            "final_norm": sd[f"{name}.final_layer_norm.weight"], "blocks": blocks}

  params = {"shared": sd["shared.weight"], "encoder": stack("encoder"),
            "decoder": stack("decoder")}
  if not cfg.tie_word_embeddings:
    params.update(encoder_embed=sd["encoder.embed_tokens.weight"],
                  decoder_embed=sd["decoder.embed_tokens.weight"],
                  lm_head=kernel("lm_head.weight"))
  return jax.tree_util.tree_map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def _fixture(name):
  path = os.path.join(FIXTURE_DIR, name)
  cfg = SwitchConfig.from_hf_dir(path)
  with np.load(os.path.join(path, "reference.npz")) as data:
    ref = dict(data)
  return cfg, _read_params(path, cfg), ref


@functools.lru_cache(maxsize=None)
def _mesh(shape):
  return None if shape is None else moe_jax.make_mesh(*shape)


def _model(name, mesh_shape=None, **kwargs):
  cfg, params, ref = _fixture(name)
  return switch.SwitchModel(cfg, params, mesh=_mesh(mesh_shape), **kwargs), ref


def _close(got, want, what):
  err = helpers.rel_err(got, want)
  assert err <= TOLERANCE, f"{what}: relative error {err:.2e} > {TOLERANCE}"


def _check_forward(out, ref):
  _close(out.logits, ref["logits"], "logits")
  _close(out.encoder_last_hidden_state, ref["encoder_hidden"], "encoder hidden")
  _close(out.decoder_last_hidden_state, ref["decoder_hidden"], "decoder hidden")
  for tag, layers in (("enc", out.router.encoder), ("dec", out.router.decoder)):
    assert len(layers) == sum(k.startswith(tag) and k.endswith("_expert_index") for k in ref)
    for i, layer in enumerate(layers):
      key = f"{tag}{i}_"
      np.testing.assert_array_equal(layer.expert_index, ref[key + "expert_index"], key)
      np.testing.assert_array_equal(layer.dispatched, ref[key + "dispatched"], key)
      _close(layer.router_prob, ref[key + "router_prob"], key + "router_prob")
      _close(layer.router_logits, ref[key + "router_logits"], key + "router_logits")
  for loss in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
    got, want = float(getattr(out.router, loss)), float(ref[loss])
    assert abs(got - want) <= TOLERANCE * max(abs(want), 1.0), (loss, got, want)


def _forward(model, ref, **kwargs):
  return model(ref["input_ids"], attention_mask=ref["attention_mask"],
               decoder_input_ids=ref["decoder_input_ids"], output_router=True, **kwargs)


def _generate(model, ref, use_cache, **kwargs):
  return model.generate(ref["input_ids"], attention_mask=ref["attention_mask"],
                        max_new_tokens=int(ref["max_new_tokens"]), use_cache=use_cache,
                        eos_token_id=int(ref["eos_token_id"]), **kwargs)


# --- parity with transformers ---


# Every fixture without a mesh; on each mesh two fixtures, so both meshes see drops, step 3,
# untied heads and the plain case between them (each pair is a separate compilation).
@pytest.mark.parametrize("name,mesh_shape", [(name, None) for name in FIXTURES] + [
    ("capacity_drops", (1, 8)), ("untied", (1, 8)),
    ("tied_step2", (2, 4)), ("step3_explicit", (2, 4))])
def test_forward_matches_hf(name, mesh_shape):
  model, ref = _model(name, mesh_shape)
  _check_forward(_forward(model, ref), ref)


def test_fixtures_exercise_drops_and_eos():
  """Guards the fixtures themselves: capacity must bind and eos must end some rows early."""
  _, _, ref = _fixture("capacity_drops")
  assert sum(int((~v).sum()) for k, v in ref.items() if k.endswith("dispatched")) > 20
  assert (ref["gen_cached"] != ref["gen_uncached"]).any(), "capacity should split the modes"
  _, _, ref = _fixture("tied_step2")
  assert (ref["gen_cached"][:, 1:] == int(ref["eos_token_id"])).any()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_matches_hf(name, use_cache):
  model, ref = _model(name)
  want = ref["gen_cached" if use_cache else "gen_uncached"]
  np.testing.assert_array_equal(_generate(model, ref, use_cache), want)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_greedy_matches_hf_on_mesh(mesh_shape, use_cache):
  model, ref = _model("capacity_drops", mesh_shape)
  want = ref["gen_cached" if use_cache else "gen_uncached"]
  np.testing.assert_array_equal(_generate(model, ref, use_cache), want)


def test_replicas_do_not_change_outputs():
  """A hook that runs every sparse layer with its own replica placement changes nothing."""
  mesh_shape = (2, 4)
  mesh = _mesh(mesh_shape)
  model, ref = _model("tied_step2", mesh_shape)
  num_experts = model.config.num_experts
  columns = {}
  for stack in ("encoder", "decoder"):
    for index in range(len(model.config.sparse_blocks(stack))):
      load = np.roll(np.arange(num_experts, 0, -1) ** 2, index + 3 * (stack == "decoder"))
      columns[stack, index] = moe_jax.place(jnp.asarray(load, jnp.float32), model.moe_config,
                                            num_replica_slots=1, mesh=mesh)
  assert all(np.any(np.asarray(c) >= 0) for c in columns.values())

  def replicated(stack, sparse_index, ff_params, x_normed, routing):
    held = moe_jax.prefetch(ff_params, columns[stack, sparse_index], model.moe_config, mesh=mesh,
                            execution=model.execution)
    return moe_jax.moe_apply(ff_params, x_normed, model.moe_config, execution=model.execution,
                             mesh=mesh, routing=routing, replicas=held)

  out = _forward(model, ref, moe_fn=replicated)
  _check_forward(out, ref)
  h = num_experts // mesh_shape[1]
  replica_rows = sum(int(np.sum(layer.stats.tokens_per_slot[..., h:]))
                     for layer in out.router.encoder + out.router.decoder)
  assert replica_rows > 0, "the replica slots should have computed some tokens"
  plain = _forward(model, ref)
  assert helpers.rel_err(out.logits, plain.logits) <= 1e-6
  np.testing.assert_array_equal(_generate(model, ref, True, moe_fn=replicated), ref["gen_cached"])


def test_bfloat16_runs_close_to_float32():
  cfg, params, ref = _fixture("tied_step2")
  model = switch.SwitchModel(cfg, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))
  out = _forward(model, ref)
  assert out.logits.dtype == jnp.float32 and out.encoder_last_hidden_state.dtype == jnp.bfloat16
  assert helpers.rel_err(out.logits, ref["logits"]) <= 5e-2
  tokens = _generate(model, ref, True)                  # the loop carry keeps its bf16 cache
  assert tokens.shape == ref["gen_cached"].shape and tokens.dtype == jnp.int32


def test_from_pretrained_matches_private_reader():
  cfg, params, ref = _fixture("untied")
  model = switch.from_pretrained(os.path.join(FIXTURE_DIR, "untied"), mesh=_mesh((2, 4)))
  assert model.config == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, model.params, params)
  _check_forward(_forward(model, ref), ref)
  # The registry picks the family from config.json's model_type and loads the same model.
  generic = models.from_pretrained(os.path.join(FIXTURE_DIR, "untied"), mesh=_mesh((2, 4)))
  assert isinstance(generic, switch.Model) and generic.config == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, generic.params, params)


# --- relative position buckets ---


def _bucket_formula(relative, bidirectional, num_buckets, max_distance):
  """A direct transcription of Mesh-TF's `_relative_position_bucket`, one position at a time."""
  out = []
  for rel in relative:
    nb, bucket = num_buckets, 0
    if bidirectional:
      nb //= 2
      bucket += nb if rel > 0 else 0
      n = abs(rel)
    else:
      n = max(-rel, 0)
    max_exact = nb // 2
    if n < max_exact:
      out.append(bucket + n)
      continue
    val = np.log(np.float32(n) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)) * np.float32(nb - max_exact)
    out.append(bucket + min(max_exact + int(np.float32(val)), nb - 1))
  return np.asarray(out)


def test_relative_position_buckets_match_hf_and_formula():
  with np.load(os.path.join(FIXTURE_DIR, "buckets.npz")) as tables:
    relative = tables["relative_position"]
    for key in tables.files:
      if key == "relative_position":
        continue
      kind, num_buckets, max_distance = key.split("_")
      args = dict(bidirectional=kind == "bi", num_buckets=int(num_buckets),
                  max_distance=int(max_distance))
      got = np.asarray(t5_layers.relative_position_bucket(jnp.asarray(relative), **args))
      np.testing.assert_array_equal(got, tables[key], key)
      np.testing.assert_array_equal(got, _bucket_formula(relative, **args), key)


def test_position_bias_layout():
  table = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)               # [buckets, H]
  bias = t5_layers.position_bias(table, jnp.arange(2) + 4, jnp.arange(6), bidirectional=False,
                                 max_distance=20)
  assert bias.shape == (1, 3, 2, 6)
  buckets = t5_layers.relative_position_bucket(
      jnp.arange(6)[None, :] - (jnp.arange(2) + 4)[:, None], bidirectional=False, num_buckets=8,
      max_distance=20)
  np.testing.assert_array_equal(bias[0, 1], table[buckets, 1])


# --- sparse-block rule and configs ---


@pytest.mark.parametrize("step,want", [(0, ()), (1, tuple(range(7))), (2, (1, 3, 5)),
                                       (3, (1, 4)), (7, (1,)), (8, (1,))])
def test_sparse_block_rule(step, want):
  assert sparse_block_indices(7, step) == want


def test_sparse_step_quirks():
  base = SwitchConfig(num_layers=12, num_decoder_layers=12)
  assert base.replace(num_sparse_encoder_layers=5).sparse_blocks("encoder") == (1, 3, 5, 7, 9, 11)
  # num_sparse = 0 gives step = num_layers, which still makes block 1 sparse.
  assert base.replace(num_sparse_encoder_layers=0).sparse_blocks("encoder") == (1,)
  # ... and with a single layer the step is 1, so that one block is sparse (HF's documented quirk).
  assert SwitchConfig(num_layers=1, num_sparse_encoder_layers=0).sparse_blocks("encoder") == (0,)
  assert SwitchConfig(num_layers=4, num_sparse_encoder_layers=8).sparse_blocks("encoder") == ()
  # An explicit step wins over num_layers // num_sparse.
  explicit = base.replace(num_sparse_decoder_layers=1, decoder_sparse_step=3)
  assert explicit.sparse_blocks("decoder") == (1, 4, 7, 10)
  # num_decoder_layers defaults to 12, not num_layers.
  assert SwitchConfig.from_hf_dict({"num_layers": 4}).num_decoder_layers == 12
  cfg, _, _ = _fixture("step3_explicit")
  assert cfg.sparse_blocks("encoder") == (1, 4) and cfg.sparse_blocks("decoder") == (0, 1, 2)


@pytest.mark.parametrize("num_experts", [8, 16, 32, 64, 128, 256])
def test_released_configs(num_experts):
  spec = importlib.util.spec_from_file_location(
      "cfg", os.path.join(os.path.dirname(__file__), "..", "configs",
                          f"switch_base_{num_experts}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model_tree = dict(config.model)
  assert model_tree.pop("family") == switch.NAME
  cfg = switch.config_from_dict(model_tree)
  assert cfg.num_experts == num_experts and cfg.expert_capacity == 64
  assert (cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads) == (768, 3072, 64, 12)
  assert cfg.sparse_blocks("encoder") == cfg.sparse_blocks("decoder") == (1, 3, 5, 7, 9, 11)
  assert cfg.tie_word_embeddings and cfg.vocab_size == 32128
  moe_cfg = switch.moe_config(cfg, jnp.float32)
  assert moe_cfg.top_k == 1 and moe_cfg.activation == "relu" and moe_cfg.d_ff == 3072
  assert config.execution.capacity_mode == "dropless"
  assert (config.mesh.data, config.mesh.expert) == (1, -1)


def test_generate_eos_default_none_and_explicit():
  """As transformers: eos omitted stops at the checkpoint's eos, an id at that id, None never."""
  cfg, params, ref = _fixture("tied_step2")
  eos = int(ref["eos_token_id"])
  model = switch.SwitchModel(cfg.replace(eos_token_id=eos), params)   # "the checkpoint's" eos
  args = (ref["input_ids"], ref["attention_mask"])
  steps = int(ref["max_new_tokens"])
  np.testing.assert_array_equal(model.generate(*args, max_new_tokens=steps), ref["gen_cached"])
  np.testing.assert_array_equal(model.generate(*args, max_new_tokens=steps, eos_token_id=eos),
                                ref["gen_cached"])
  free = np.asarray(model.generate(*args, max_new_tokens=steps, eos_token_id=None))
  stopped = ref["gen_cached"][:, 1:] == eos
  assert stopped.any()                            # some rows did stop at eos ...
  assert (free[:, 1:] != cfg.pad_token_id).all()  # ... but without eos every row runs on
  first = np.argmax(stopped, axis=1)
  for row in np.nonzero(stopped.any(axis=1))[0]:  # identical up to and including the first eos
    upto = first[row] + 2                         # the start token, then through the eos
    np.testing.assert_array_equal(free[row, :upto], ref["gen_cached"][row, :upto])


# --- errors at the boundary ---


def test_errors_name_the_fix():
  cfg, params, ref = _fixture("tied_step2")
  with pytest.raises(ValueError, match="sparse-step rule"):
    switch.SwitchModel(cfg.replace(encoder_sparse_step=1), params)
  with pytest.raises(ValueError, match="execution must be an ExecutionConfig"):
    switch.SwitchModel(cfg, params, execution=dict(capacity_mode="capacity"))
  with pytest.raises(ValueError, match="unknown SwitchConfig"):
    switch.config_from_dict({"num_expert": 8})
  model = switch.SwitchModel(cfg, params, mesh=_mesh((2, 4)))
  with pytest.raises(ValueError, match="data axis"):
    model.generate(ref["input_ids"][:3], max_new_tokens=2)
  with pytest.raises(ValueError, match="decoder_input_ids is required"):
    model(ref["input_ids"])
  with pytest.raises(ValueError, match="attention_mask"):
    model.generate(ref["input_ids"], attention_mask=ref["attention_mask"][:, :3],
                   max_new_tokens=2)


# --- the family interface and the registry ---


INTERFACE = ("NAME", "MODEL_TYPES", "Config", "Model", "config_from_dict", "moe_config",
             "moe_layers", "forward_batch", "batch_tokens", "text_windows", "loss", "init_params",
             "hf_key_map", "random_params", "from_pretrained", "prompt_pass", "prompt_ids",
             "generated_ids")


def test_registry_finds_the_family():
  assert [name for name in INTERFACE if not hasattr(switch, name)] == []
  assert models.get_family("switch") is switch
  assert models.family_for_model_type("switch_transformers") is switch
  assert isinstance(switch, types.ModuleType) and switch.Config is SwitchConfig
  with pytest.raises(ValueError, match=r"unknown model family 'gpt9'; supported: \[.*'switch'"):
    models.get_family("gpt9")
  with pytest.raises(ValueError, match=r"model_type 'gpt9' .* supported: \[.*'switch_transf"):
    models.family_for_model_type("gpt9")


def test_task_batches_and_the_prompt_side():
  cfg, params, ref = _fixture("tied_step2")
  windows = switch.text_windows(np.arange(2, 40, dtype=np.int32), encoder_len=5, decoder_len=3,
                                stride=4)
  assert windows["input_ids"].shape == (8, 5) and windows["labels"].shape == (8, 3)
  np.testing.assert_array_equal(windows["decoder_input_ids"][1], [0, 11, 12])   # start + shift
  batch = {k: jnp.asarray(v[:4]) for k, v in windows.items()}
  assert switch.batch_tokens(batch) == 4 * (5 + 3)
  model = switch.SwitchModel(cfg, params)
  logits = switch.forward_batch(params, cfg, batch, model.moe_fn)
  want = model(batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
  assert helpers.rel_err(logits, want) <= 1e-5             # unjitted vs jitted: fp32 rounding
  total, metrics = switch.loss(params, cfg, {**batch, "labels": batch["labels"]}, model.moe_fn)
  assert np.isfinite(float(total)) and float(total) >= float(metrics["ce"])
  hidden = switch.prompt_pass(params, cfg, ref["input_ids"], ref["attention_mask"], model.moe_fn)
  _close(hidden, ref["encoder_hidden"], "prompt pass")
  layers = switch.moe_layers(params, cfg)
  assert {s: len(v) for s, v in layers.items()} == {"encoder": 2, "decoder": 2}
  assert layers["decoder"][1] is params["decoder"]["blocks"][3]["ff"]
  tokenizer = types.SimpleNamespace(encode=lambda text: [7, 8])
  assert switch.prompt_ids(tokenizer, "hi", cfg) == [7, 8, cfg.eos_token_id]
  assert switch.generated_ids(np.array([0, 5, 6, cfg.eos_token_id, 0, 0]), cfg) == [5, 6]
  fresh = switch.init_params(cfg, seed=0)
  assert np.all(fresh["encoder"]["final_norm"] == 1) and fresh["encoder"]["blocks"][1]["ff"][
      "wi"].shape == (cfg.num_experts, cfg.d_model, cfg.d_ff)
