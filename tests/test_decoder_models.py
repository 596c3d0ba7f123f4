"""Decoder-only MoE families against Hugging Face references recorded by make_decoder_fixtures.py.

The fixtures (tests/fixtures/decoder/<name>/) are tiny random HF models saved with
`save_pretrained` (one in the fused expert layout, the others per expert) plus reference outputs;
torch is not needed here. Logits must agree to 1e-4 relative to their scale at real (unpadded)
positions, expert ids and greedy tokens exactly, expert weights to 1e-4.
"""

import functools
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import moe_jax
from moe_jax import models, replication
from moe_jax.checkpoints import hf_io
from moe_jax.config import ExecutionConfig
from moe_jax.models import decoder
from moe_jax.models.decoder import model as decoder_model
from moe_jax.models.decoder import task
from tests import helpers

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "decoder")
# One fixture per family, named after it.
FAMILIES = ("mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe")
MESHES = ((1, 8), (2, 4))
TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def _mesh(shape):
  return None if shape is None else moe_jax.make_mesh(*shape)


@functools.lru_cache(maxsize=None)
def _model(name, mesh_shape=None):
  """(the model loaded by the registry from the HF directory, reference arrays)."""
  path = os.path.join(FIXTURE_DIR, name)
  model = models.from_pretrained(path, mesh=_mesh(mesh_shape))
  with np.load(os.path.join(path, "reference.npz")) as data:
    return model, dict(data)


@functools.lru_cache(maxsize=None)
def _forward(name, mesh_shape=None):
  model, ref = _model(name, mesh_shape)
  return model(ref["input_ids"], attention_mask=ref["attention_mask"], output_router=True)


def _generate(model, ref, use_cache, **kwargs):
  return np.asarray(model.generate(ref["input_ids"], attention_mask=ref["attention_mask"],
                                   max_new_tokens=int(ref["max_new_tokens"]),
                                   use_cache=use_cache, **kwargs))


def _real(array, ref):
  """The entries of <[B, L, ...]> at unpadded positions."""
  return np.asarray(array)[ref["attention_mask"] == 1]


def _by_expert(index, weight):
  """(index, weight) <[T, k]> with each row's choices in expert order: HF's sigmoid routers
  return their top-k unsorted, so only the set of (expert, weight) pairs is the contract."""
  order = np.argsort(index, axis=-1)
  return np.take_along_axis(index, order, -1), np.take_along_axis(weight, order, -1)


def _check_forward(out, ref):
  err = helpers.rel_err(_real(out.logits, ref), _real(ref["logits"], ref))
  assert err <= TOLERANCE, f"logits: relative error {err:.2e}"
  assert len(out.router) == sum(k.endswith("_expert_index") for k in ref)
  for j, layer in enumerate(out.router):
    key = f"moe{j}_"
    index, weight = _by_expert(_real(layer.expert_index, ref), _real(layer.expert_weight, ref))
    want_index, want_weight = _by_expert(_real(ref[key + "expert_index"], ref),
                                         _real(ref[key + "expert_weight"], ref))
    np.testing.assert_array_equal(index, want_index, key)
    assert helpers.rel_err(weight, want_weight) <= TOLERANCE, key
    assert helpers.rel_err(_real(layer.router_logits, ref),
                           _real(ref[key + "router_logits"], ref)) <= TOLERANCE, key
  if "aux_loss" in ref:                # HF computes none for the sigmoid-routed families
    assert abs(float(out.aux_loss) - float(ref["aux_loss"])) <= TOLERANCE * float(ref["aux_loss"])


# --- parity with transformers ---


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_matches_hf(name):
  _, ref = _model(name)
  _check_forward(_forward(name), ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_cached_and_uncached_match_hf(name):
  model, ref = _model(name)
  # The dense grouped-matmul backend compiles faster; the layer's backends agree (their tests).
  model = type(model)(model.config, model.params, execution=ExecutionConfig(gmm_backend="dense"))
  np.testing.assert_array_equal(ref["gen_cached"], ref["gen_uncached"])
  np.testing.assert_array_equal(_generate(model, ref, True), ref["gen_cached"])
  np.testing.assert_array_equal(_generate(model, ref, False), ref["gen_cached"])
  # eos_token_id=None never stops; an explicit id equals the checkpoint's.
  np.testing.assert_array_equal(_generate(model, ref, True, eos_token_id=None), ref["gen_no_eos"])
  np.testing.assert_array_equal(
      _generate(model, ref, True, eos_token_id=[int(ref["eos_token_id"])]), ref["gen_cached"])


def test_fixtures_exercise_every_rule():
  """Guards the fixtures: some rows stop early, prompts are left-padded, both layouts and both
  norm_topk_prob settings occur, and each family's own rules are switched on."""
  configs = {name: _model(name)[0].config for name in FAMILIES}
  for name in FAMILIES:
    _, ref = _model(name)
    assert (ref["gen_cached"] != ref["gen_no_eos"]).any(), name
    assert (ref["attention_mask"][:, 0] == 0).any(), name
  qwen = configs["qwen3_moe"]
  assert qwen.sparse_layers == (0, 2) and qwen.head_width * qwen.num_attention_heads != 32
  assert {c.norm_topk_prob for c in configs.values()} == {True, False}
  assert configs["mixtral"].tie_word_embeddings and configs["olmoe"].clip_qkv == 2.0
  qwen2 = configs["qwen2_moe"]
  assert qwen2.sparse_layers == (1, 2) and qwen2.qkv_bias and qwen2.shared_width == 12
  deepseek, glm = configs["deepseek_v3"], configs["glm4_moe"]
  assert deepseek.sparse_layers == glm.sparse_layers == (1, 2)
  assert deepseek.q_lora_rank and deepseek.rope_interleave and deepseek.n_shared_experts == 2
  assert (deepseek.n_group, deepseek.topk_group, deepseek.routed_scaling_factor) == (4, 2, 2.5)
  assert glm.rotary_width == glm.head_width // 2 and glm.qkv_bias and glm.qk_norm == "per_head"
  assert glm.routed_scaling_factor == 1.5
  for name in ("deepseek_v3", "glm4_moe"):
    bias = _model(name)[0].params["layers"][1]["mlp"]["router_bias"]
    assert float(np.std(np.asarray(bias))) > 0.05, name      # the bias steers selection
  with open(os.path.join(FIXTURE_DIR, "glm4_moe", "model.safetensors"), "rb") as f:
    assert b"experts.gate_up_proj" in f.read(20000)           # fused layout on disk


# Each family runs replicated on one of the two meshes (every mesh sees softmax and sigmoid
# routers, MLA and shared experts), with a predictor that places from this pass's hidden states
# (pregate) or from the loads of earlier passes (history, resident replicas with stickiness).
_REPLICATED = {"mixtral": ((1, 8), "pregate"), "olmoe": ((2, 4), "history"),
               "qwen3_moe": ((2, 4), "pregate"), "qwen2_moe": ((1, 8), "history"),
               "deepseek_v3": ((2, 4), "pregate"), "glm4_moe": ((1, 8), "pregate")}


@pytest.mark.parametrize("name", FAMILIES)
def test_replicas_do_not_change_outputs(name):
  """Replicas placed one MoE layer ahead, in the forward and in the prefill and every decode step
  of generation: the same logits (to fp32 rounding), routing and greedy tokens as the same mesh
  without replicas (and as HF), with some token-choices computed in replica slots."""
  mesh_shape, kind = _REPLICATED[name]
  model, ref = _model(name, mesh_shape)
  model = type(model)(model.config, model.params, mesh=model.mesh,
                      execution=ExecutionConfig(gmm_backend="dense"))   # compiles faster
  rcfg = replication.ReplicationConfig(predictor=kind, num_replica_slots=2,
                                       resident=kind == "history",
                                       stickiness=0.1 if kind == "history" else 0.0)
  out = model(ref["input_ids"], attention_mask=ref["attention_mask"], output_router=True,
              replication=rcfg)
  plain = model(ref["input_ids"], attention_mask=ref["attention_mask"], output_router=True)
  _check_forward(out, ref)
  assert helpers.rel_err(_real(out.logits, ref), _real(plain.logits, ref)) <= 1e-6
  for layer, want in zip(out.router, plain.router):
    np.testing.assert_array_equal(layer.expert_index, want.expert_index)
  tokens, stats = model.generate(ref["input_ids"], attention_mask=ref["attention_mask"],
                                 max_new_tokens=int(ref["max_new_tokens"]), replication=rcfg,
                                 eos_token_id=None, return_stats=True)
  np.testing.assert_array_equal(np.asarray(tokens), ref["gen_no_eos"])
  assert int(stats.passes) == 1 + int(ref["max_new_tokens"])    # prefill + every step
  assert int(stats.replica_rows) > 0, "the replica slots should have computed some tokens"
  assert float(jnp.sum(stats.state.history["layers"])) > 0      # loads carried between passes
  # One summary per pass and MoE layer: every step routes B tokens x k choices per layer.
  summaries = stats.layers["layers"]
  per_pass = np.asarray(summaries.tokens_per_expert).sum(-1)    # [passes, n layers]
  batch, k = ref["input_ids"].shape[0], model.config.num_experts_per_tok
  np.testing.assert_array_equal(per_pass[1:], batch * k)
  assert int(np.asarray(summaries.replica_rows).sum()) == int(stats.replica_rows)
  # Placement is re-issued inside the one compiled loop: another prompt compiles nothing.
  compiled = decoder_model._generate_jit._cache_size()   # pylint: disable=protected-access
  model.generate(ref["input_ids"][::-1], attention_mask=ref["attention_mask"][::-1],
                 max_new_tokens=int(ref["max_new_tokens"]), replication=rcfg, eos_token_id=None)
  assert decoder_model._generate_jit._cache_size() == compiled   # pylint: disable=protected-access


# --- checkpoints: both layouts, sharded import, export ---


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_import_equals_single_device(name):
  model, _ = _model(name)
  sharded = models.from_pretrained(os.path.join(FIXTURE_DIR, name), mesh=_mesh((2, 4)))
  jax.tree.map(np.testing.assert_array_equal, sharded.params, model.params)
  wi = sharded.params["layers"][model.config.sparse_layers[0]]["mlp"]["wi"]
  assert wi.sharding.spec[0] == "expert" and len(wi.addressable_shards) == 8


@pytest.mark.parametrize("layout_name", ["per-expert", "fused"])
def test_export_round_trips_in_both_layouts(layout_name, tmp_path):
  model, _ = _model("qwen3_moe")
  family = models.get_family("qwen3_moe")
  key_map = family.hf_key_map(model.config).variant(layout_name)
  hf_io.save_hf_safetensors(model.params, key_map, str(tmp_path),
                            config_json=model.config.to_hf_dict())
  keys = set(safetensors.numpy.load_file(tmp_path / hf_io.WEIGHTS_NAME))
  assert ("model.layers.0.mlp.experts.gate_up_proj" in keys) == (layout_name == "fused")
  assert ("model.layers.0.mlp.experts.7.up_proj.weight" in keys) == (layout_name != "fused")
  family_, config, params = models.load_checkpoint(str(tmp_path))
  assert family_ is family and config == model.config
  jax.tree.map(np.testing.assert_array_equal, params, model.params)
  if layout_name == "fused":          # gate rows first, then up; [E, 2f, d] as transformers
    gate_up = safetensors.numpy.load_file(tmp_path / hf_io.WEIGHTS_NAME)[
        "model.layers.2.mlp.experts.gate_up_proj"]
    mlp = model.params["layers"][2]["mlp"]
    np.testing.assert_array_equal(gate_up[3, :8], np.asarray(mlp["wi_gate"][3]).T)
    np.testing.assert_array_equal(gate_up[3, 8:], np.asarray(mlp["wi"][3]).T)


def _per_expert_copy(tmp_path, name="olmoe"):
  """A float32 per-expert copy of a fixture: (directory, {key: array})."""
  model, _ = _model(name)
  key_map = models.get_family(name).hf_key_map(model.config)
  hf_io.save_hf_safetensors(model.params, key_map, str(tmp_path),
                            config_json=model.config.to_hf_dict())
  return str(tmp_path), safetensors.numpy.load_file(tmp_path / hf_io.WEIGHTS_NAME)


def _rewrite(directory, tensors):
  safetensors.numpy.save_file(tensors, os.path.join(directory, hf_io.WEIGHTS_NAME))


_EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("problem,match", [
    ("missing expert", f"missing {_EXPERT}: expected shape \\[8, 32\\]"),
    ("wrong expert shape", f"wrong shape {_EXPERT}: expected shape \\[8, 32\\], found \\[8, 31\\]"),
    ("layouts mixed", "mixes checkpoint layouts: per-expert keys \\(e.g. model.layers.0.mlp.experts"
                      ".0.gate_proj.weight\\) and fused keys \\(e.g. model.layers.1.mlp.experts"
                      ".gate_up_proj\\)"),
])
def test_bad_checkpoints_name_the_problem(problem, match, tmp_path):
  directory, tensors = _per_expert_copy(tmp_path)
  if problem == "missing expert":
    del tensors[_EXPERT]
  elif problem == "wrong expert shape":
    tensors[_EXPERT] = tensors[_EXPERT][:, :31].copy()
  else:                                # layer 1 re-saved fused, layer 0 left per expert
    prefix = "model.layers.1.mlp.experts."
    for e in range(8):
      for name in ("gate_proj", "up_proj", "down_proj"):
        tensors.pop(f"{prefix}{e}.{name}.weight")
    tensors[prefix + "gate_up_proj"] = np.zeros((8, 16, 32), np.float32)
    tensors[prefix + "down_proj"] = np.zeros((8, 32, 8), np.float32)
  _rewrite(directory, tensors)
  with pytest.raises(ValueError, match=match):
    models.from_pretrained(directory)


def test_unknown_model_type_is_one_line(tmp_path):
  shutil.copy(os.path.join(FIXTURE_DIR, "mixtral", "config.json"), tmp_path / "config.json")
  config = (tmp_path / "config.json").read_text().replace('"mixtral"', '"deepseek_v2"')
  (tmp_path / "config.json").write_text(config)
  with pytest.raises(ValueError, match=r"^model_type 'deepseek_v2' has no moe_jax model family; "
                     r"supported: \[.*'deepseek_v3', 'glm4_moe', 'mixtral', 'olmoe', 'qwen2_moe', "
                     r"'qwen3_moe'.*\]\.$"):
    models.from_pretrained(str(tmp_path))


# --- config.json parsing ---


def _hf_dict(name):
  return models.get_family(name).Config.from_hf_dir(
      os.path.join(FIXTURE_DIR, name)).to_hf_dict()


@pytest.mark.parametrize("name", FAMILIES)
def test_config_round_trips_through_hf_dict(name):
  model, ref = _model(name)
  family = models.get_family(name)
  assert family.Config.from_hf_dict(model.config.to_hf_dict()) == model.config
  assert model.config.eos_token_id == (int(ref["eos_token_id"]),)     # generation_config.json
  tree = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
              num_experts_per_tok=2, vocab_size=8,
              **({"n_group": 2, "topk_group": 1} if name == "deepseek_v3" else {}))
  assert family.config_from_dict(tree) == family.Config(**tree)


def test_config_spellings_transformers_and_the_hub_use():
  from moe_jax.models import qwen3_moe, olmoe   # pylint: disable=import-outside-toplevel
  d = _hf_dict("qwen3_moe")
  hub = {k: v for k, v in d.items() if k not in ("num_local_experts", "rope_parameters")}
  hub.update(num_experts=8, rope_theta=1000.0, eos_token_id=[5, 6])   # older hub spellings
  assert qwen3_moe.Config.from_hf_dict(hub) == qwen3_moe.Config.from_hf_dict(d).replace(
      eos_token_id=(5, 6))
  assert qwen3_moe.Config.from_hf_dict({**d, "head_dim": None}).head_width == 8
  null_kv = olmoe.Config.from_hf_dict({**_hf_dict("olmoe"), "num_key_value_heads": None})
  assert null_kv.num_key_value_heads == null_kv.num_attention_heads


@pytest.mark.parametrize("name,changes,match", [
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     r"rope_parameters has rope_type='yarn'; only the default rotary embedding"),
    ("mixtral", {"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"rope_scaling has rope_type='linear'"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 64}, r"sliding-window attention"),
    ("mixtral", {"sliding_window": 4096}, r"sliding_window=4096\); only full causal"),
    ("olmoe", {"hidden_act": "gelu"}, r"hidden_act='gelu'; only 'silu'"),
    ("olmoe", {"attention_bias": True}, r"attention_bias=true"),
    ("olmoe", {"head_dim": 16}, r"head_dim=16: OLMoE's q/k norms assume"),
    ("qwen3_moe", {"mlp_only_layers": [0, 1, 2]}, r"no layer is MoE"),
    ("qwen3_moe", {"model_type": "mixtral"}, r"model_type='mixtral', not 'qwen3_moe'"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 64}, r"sliding-window"),
    ("deepseek_v3", {"attention_bias": True}, r"attention_bias=true"),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40}},
     r"rope_type='yarn'; only the default rotary embedding"),
    ("deepseek_v3", {"n_group": 3}, r"n_group=3 must divide n_routed_experts=8"),
    ("deepseek_v3", {"head_dim": 6}, r"head_dim=6: DeepSeek's head_dim is the rope width"),
    ("glm4_moe", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.3}},
     r"partial_rotary_factor=0.3: head_dim=12 times it must be a positive even width"),
    ("mixtral", {"partial_rotary_factor": 0.5}, r"the mixtral family rotates whole heads"),
])
def test_unsupported_config_values_are_one_line_errors(name, changes, match):
  family = models.get_family(name)
  with pytest.raises(ValueError, match=match) as info:
    family.Config.from_hf_dict({**_hf_dict(name), **changes})
  assert "\n" not in str(info.value)


def test_pinned_fields_say_what_the_family_fixes():
  from moe_jax.models import mixtral   # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"norm_topk_prob=False is not supported by the mixtral "
                     r"family \(it is always True\)"):
    mixtral.config_from_dict({"norm_topk_prob": False})
  with pytest.raises(ValueError, match=r"unknown MixtralConfig fields \['num_local_experts'\]"):
    mixtral.config_from_dict({"num_local_experts": 4})


# --- the family interface, the task and the boundary ---


INTERFACE = ("NAME", "MODEL_TYPES", "Config", "Model", "config_from_dict", "moe_config",
             "moe_layers", "forward_batch", "batch_tokens", "text_windows", "loss", "init_params",
             "hf_key_map", "random_params", "from_pretrained", "prompt_pass", "prompt_ids",
             "generated_ids")


@pytest.mark.parametrize("name", FAMILIES)
def test_registry_finds_the_family(name):
  family = models.get_family(name)
  assert [attr for attr in INTERFACE if not hasattr(family, attr)] == []
  assert family.NAME == name and models.family_for_model_type(family.MODEL_TYPES[0]) is family
  model, _ = _model(name)
  assert type(model) is family.Model and isinstance(model.config, family.Config)
  assert family.moe_config(model.config, jnp.float32) == model.moe_config
  assert model.moe_config.activation == "silu" and model.moe_config.top_k == 2
  assert model.moe_config.renormalize == model.config.norm_topk_prob
  assert model.moe_config.router == model.config.router_options["router"]
  layers = family.moe_layers(model.params, model.config)
  assert list(layers) == ["layers"] and len(layers["layers"]) == len(model.config.sparse_layers)


def test_task_batches_loss_and_the_prompt_side():
  from moe_jax.models import mixtral   # pylint: disable=import-outside-toplevel
  model, ref = _model("mixtral")
  cfg, params = model.config, model.params
  windows = mixtral.text_windows(np.arange(3, 60, dtype=np.int32), length=9, stride=5)
  np.testing.assert_array_equal(windows["labels"][1], windows["input_ids"][1] + 1)
  batch = {k: jnp.asarray(v[:4]) for k, v in windows.items()}
  assert mixtral.batch_tokens(batch) == 36

  want = model(batch["input_ids"], output_router=True)        # mask of ones, as the loss's
  labels = np.asarray(batch["labels"]).copy()
  labels[0, :4] = -100                                         # ignored positions
  total, metrics = task.loss_terms(want.logits, want.aux_loss, jnp.asarray(labels), cfg)
  logp = np.asarray(jax.nn.log_softmax(want.logits, axis=-1))
  nll = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
  ce = nll[labels != -100].mean()
  assert abs(float(metrics["ce"]) - ce) <= 1e-5 * ce and metrics["aux_loss"] == want.aux_loss
  assert float(total) == pytest.approx(ce + cfg.router_aux_loss_coef * float(want.aux_loss), 1e-5)
  # The batch-level functions are `forward` / `loss_terms` wired up: their shapes, uncompiled.
  shapes = jax.eval_shape(lambda p, b: (
      mixtral.forward_batch(p, cfg, b, model.moe_fn), mixtral.loss(p, cfg, b, model.moe_fn),
      mixtral.prompt_pass(p, cfg, b["input_ids"], jnp.ones_like(b["input_ids"]), model.moe_fn)),
                          params, batch)
  assert shapes[0].shape == (4, 9, cfg.vocab_size) and shapes[1][0].shape == ()
  assert shapes[2].shape == (4, 9, cfg.hidden_size)
  tokenizer = types.SimpleNamespace(encode=lambda text: [7, 8])
  assert mixtral.prompt_ids(tokenizer, "hi", cfg) == [cfg.bos_token_id, 7, 8]
  row = np.array([0, 0, 5, 6, 9, cfg.eos_token_id[0], 0])
  assert mixtral.generated_ids(row, cfg, prompt_length=3) == [6, 9]
  fresh, drawn = mixtral.init_params(cfg, seed=0), mixtral.random_params(cfg, seed=0)
  assert np.all(fresh["final_norm"] == 1) and not np.all(drawn["final_norm"] == 1)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), fresh, model.params)


def test_boundary_errors_name_the_fix():
  model, ref = _model("olmoe")
  ids, mask = ref["input_ids"], ref["attention_mask"]
  with pytest.raises(ValueError, match="row 1 has padding after a real token; left-pad"):
    model.generate(ids, attention_mask=np.flip(mask, axis=1), max_new_tokens=2)
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model(ids, attention_mask=mask[:, :3])
  with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
    model.generate(ids, max_new_tokens=0)
  with pytest.raises(ValueError, match="prompt_length=input_ids.shape"):
    models.get_family("olmoe").generated_ids(ids[0], model.config)
  with pytest.raises(ValueError, match="layer 0 has 8 experts but the config says num_experts=4"):
    type(model)(model.config.replace(num_experts=4, num_experts_per_tok=2), model.params)
  with pytest.raises(ValueError, match="MixtralModel needs a MixtralConfig, got OlmoeConfig"):
    models.get_family("mixtral").Model(model.config, model.params)
  sharded, _ = _model("olmoe", (2, 4))
  with pytest.raises(ValueError, match="data axis"):
    sharded.generate(ids[:3], attention_mask=mask[:3], max_new_tokens=2)


def test_mla_latent_space_decode_equals_expanded_attention():
  """DeepSeek's one-token decode step attends in the latent space; a prompt expands the cache
  into keys and values. Both are the same attention (fp32 rounding)."""
  from moe_jax.models.decoder import attention   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  draw = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
  nope, rope, value, rank, heads, slots = 6, 4, 5, 12, 3, 7
  q_nope, q_rot = draw(2, 1, heads, nope), draw(2, 1, heads, rope)
  latents, rope_keys, kv_b = draw(2, slots, 1, rank), draw(2, slots, 1, rope), draw(rank, heads,
                                                                                     nope + value)
  bias = jnp.where(jnp.arange(slots) < 5, 0.0, -1e30)[None, None].repeat(2, 0)   # 2 slots unused
  args = (q_nope, q_rot, latents, rope_keys, kv_b, bias, nope)
  assert helpers.rel_err(attention._absorbed(*args),    # pylint: disable=protected-access
                         attention._expanded(*args)) <= 1e-5   # pylint: disable=protected-access


@pytest.mark.parametrize("name,fmt", [("deepseek_v3", "hf"), ("glm4_moe", "hf"),
                                      ("qwen3_moe", "hf"), ("deepseek_v3", "orbax")])
def test_bf16_import_keeps_the_sigmoid_router_in_f32(name, fmt, tmp_path):
  """As HF (`_keep_in_fp32_modules_strict`): a bf16 load keeps the sigmoid routers' kernel and
  selection bias in f32 (a bf16 bias would move selections); other leaves are bf16. The same
  from a moe_jax orbax checkpoint."""
  path = os.path.join(FIXTURE_DIR, name)
  if fmt == "orbax":
    from moe_jax.checkpoints import orbax_io   # pylint: disable=import-outside-toplevel
    model, _ = _model(name)
    path = orbax_io.save_params(str(tmp_path / "orbax"), model.params,
                                config_json=model.config.to_hf_dict(), family=name,
                                key_map=models.get_family(name).hf_key_map(model.config))
  model = models.from_pretrained(path, dtype=jnp.bfloat16)
  mlp = model.params["layers"][model.config.sparse_layers[0]]["mlp"]
  sigmoid = name != "qwen3_moe"
  assert mlp["router"].dtype == (jnp.float32 if sigmoid else jnp.bfloat16)
  assert ("router_bias" in mlp) == sigmoid and mlp["wi"].dtype == jnp.bfloat16
  if sigmoid:
    assert mlp["router_bias"].dtype == jnp.float32
