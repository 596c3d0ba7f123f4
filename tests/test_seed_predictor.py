"""The seed predictor: causal and bidirectional LSTM logits, selection by the layer's rule, masks,
the families' token_embeddings hook, training, scoring and the shipped checkpoints."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import models, seed_predictor
from moe_jax.app import presets, seed_training
from moe_jax.checkpoints import orbax_io
from moe_jax.models.common import rms_norm

D, HIDDEN, LAYERS, EXPERTS = 8, 16, 3, 8


@pytest.fixture(scope="module")
def params():
  return seed_predictor.init(jax.random.key(0), d_model=D, hidden=HIDDEN, num_layers=LAYERS,
                             num_experts=EXPERTS)


@pytest.fixture(scope="module")
def bidi_params():
  return seed_predictor.init(jax.random.key(0), d_model=D, hidden=HIDDEN, num_layers=LAYERS,
                             num_experts=EXPERTS, bidirectional=True)


def _embeddings(batch=2, length=6, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, D))


def test_logits_are_causal(params):
  emb = _embeddings()
  full = seed_predictor.logits(params, emb, None)
  assert full.shape == (LAYERS, 2, 6, EXPERTS) and full.dtype == jnp.float32
  for t in (0, 2, 4):
    changed = seed_predictor.logits(params, emb.at[:, t + 1].add(1.0), None)
    np.testing.assert_array_equal(changed[:, :, :t + 1], full[:, :, :t + 1])
    assert not np.allclose(changed[:, :, t + 1], full[:, :, t + 1])
  # Decoding: the state carried over from the first four tokens continues the row.
  first, state = seed_predictor.logits_and_state(params, emb[:, :4], None)
  rest, _ = seed_predictor.logits_and_state(params, emb[:, 4:], None, state)
  np.testing.assert_allclose(jnp.concatenate([first, rest], axis=2), full, atol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_right_context_reaches_only_a_bidirectional_predictor(params, bidi_params, bidirectional):
  chosen = bidi_params if bidirectional else params
  assert seed_predictor.is_bidirectional(chosen) == bidirectional
  assert chosen["head_w"].shape == (LAYERS, (2 if bidirectional else 1) * HIDDEN, EXPERTS)
  emb = _embeddings()
  full = np.asarray(seed_predictor.logits(chosen, emb, None))
  for t in (0, 2, 4):
    changed = np.asarray(seed_predictor.logits(chosen, emb.at[:, t + 1].add(1.0), None))
    # Token t + 1 steers the prediction at t (and before) only through the backward direction.
    assert (not np.allclose(changed[:, :, :t + 1], full[:, :, :t + 1])) == bidirectional
    assert not np.allclose(changed[:, :, t + 1:], full[:, :, t + 1:])


def test_a_bidirectional_predictor_cannot_decode(bidi_params):
  with pytest.raises(ValueError, match=r"bidirectional.*logits\(\) on whole rows"):
    seed_predictor.logits_and_state(bidi_params, _embeddings(), None)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_masked_tokens_count_nowhere(params, bidi_params, bidirectional):
  params = bidi_params if bidirectional else params
  emb = _embeddings(batch=3, length=6)
  mask = np.ones((3, 6), bool)
  mask[0, :2] = False                                    # left padding
  mask[1, 4:] = False                                    # right padding
  pred = seed_predictor.predict(params, emb, jnp.asarray(mask), top_k=2)
  keep = mask.reshape(-1)
  for layer in range(LAYERS):
    ids = np.asarray(pred.ids[layer])
    expected = np.bincount(ids[keep].reshape(-1), minlength=EXPERTS)
    np.testing.assert_array_equal(pred.load[layer], expected)
    np.testing.assert_array_equal(pred.top1[layer], np.where(keep, ids[:, 0], -1))
  assert float(pred.load.sum()) == LAYERS * 2 * keep.sum()
  # Padding is invisible to the real tokens (from either direction): their logits are those of
  # the row without it.
  scores = seed_predictor.logits(params, emb, jnp.asarray(mask))
  alone = seed_predictor.logits(params, emb[:1, 2:], None)
  np.testing.assert_allclose(scores[:, 0, 2:], alone[:, 0], atol=1e-5)
  alone = seed_predictor.logits(params, emb[1:2, :4], None)
  np.testing.assert_allclose(scores[:, 1, :4], alone[:, 0], atol=1e-5)
  noisy = seed_predictor.logits(params, jnp.where(mask[..., None], emb, 100.0), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(noisy)[:, mask], np.asarray(scores)[:, mask], atol=1e-5)


def _rule_oracle(logits, k, cfg, bias):
  """Slow numpy selection: softmax top-k, or sigmoid + bias within the best groups."""
  logits = np.asarray(logits, np.float64)
  if cfg is None or cfg.router == "softmax":
    return np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  biased = 1.0 / (1.0 + np.exp(-logits)) + (0.0 if bias is None else np.asarray(bias))
  size = cfg.num_experts // cfg.num_groups
  out = []
  for row in biased:
    groups = [np.sort(row[g * size:(g + 1) * size])[-2:].sum() for g in range(cfg.num_groups)]
    best = np.argsort(-np.asarray(groups), kind="stable")[:cfg.top_groups]
    allowed = np.where(np.repeat(np.isin(np.arange(cfg.num_groups), best), size), row, -np.inf)
    out.append(np.argsort(-allowed, kind="stable")[:k])
  return np.asarray(out)


RULES = {
    "plain": None,
    "softmax": moe_jax.MoEConfig(num_experts=EXPERTS, d_model=D, d_ff=4, top_k=2),
    "sigmoid": moe_jax.MoEConfig(num_experts=EXPERTS, d_model=D, d_ff=4, top_k=2,
                                 router="sigmoid"),
    "sigmoid_groups": moe_jax.MoEConfig(num_experts=EXPERTS, d_model=D, d_ff=4, top_k=2,
                                        router="sigmoid", num_groups=4, top_groups=2),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_ids_follow_the_layer_rule(params, rule):
  cfg = RULES[rule]
  emb = _embeddings(batch=4, length=8, seed=3)
  sigmoid = cfg is not None and cfg.router == "sigmoid"
  biases = (jax.random.normal(jax.random.key(4), (LAYERS, EXPERTS)) * 0.3 if sigmoid else None)
  pred = seed_predictor.predict(params, emb, None, top_k=2, moe_cfg=cfg, biases=biases)
  scores = np.asarray(seed_predictor.logits(params, emb, None)).reshape(LAYERS, -1, EXPERTS)
  assert pred.ids.shape == (LAYERS, 32, 2) and pred.ids.dtype == jnp.int32
  for layer in range(LAYERS):
    bias = None if biases is None else biases[layer]
    np.testing.assert_array_equal(pred.ids[layer], _rule_oracle(scores[layer], 2, cfg, bias))
  if sigmoid:   # the bias really steers the choice
    unbiased = seed_predictor.predict(params, emb, None, top_k=2, moe_cfg=cfg)
    assert not np.array_equal(unbiased.ids, pred.ids)


# --- the families' hook ----------------------------------------------------------------------


def _zero(tree, *path):
  node = tree
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = np.zeros_like(node[path[-1]])


def _switch():
  family = models.get_family("switch")
  cfg = family.config_from_dict(dict(presets.SWITCH_TINY, num_layers=2, num_decoder_layers=2,
                                     num_sparse_encoder_layers=1, num_sparse_decoder_layers=1))
  params = family.random_params(cfg, seed=0)
  # Blocks 0 and 1 add nothing before the first MoE layer's norm: its input is the embedding.
  for stack in ("encoder", "decoder"):
    blocks = params[stack]["blocks"]
    _zero(blocks[0], "ff", "wo")
    for block in blocks[:2]:
      _zero(block, "attn", "o")
      if stack == "decoder":
        _zero(block, "cross", "o")
  norms = {s: params[s]["blocks"][1]["ff_norm"] for s in ("encoder", "decoder")}
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(2, 2048, (2, 5)).astype(np.int32),
           "decoder_input_ids": rng.integers(2, 2048, (2, 7)).astype(np.int32)}
  return family, cfg, params, norms, batch


def _qwen3_moe():
  family = models.get_family("qwen3_moe")
  cfg = family.config_from_dict(dict(presets.DECODERS["qwen3_moe_tiny"][1], num_hidden_layers=2))
  params = family.random_params(cfg, seed=0)
  _zero(params["layers"][0], "attn", "o")
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(2, 2048, (2, 6)).astype(np.int32)}
  return family, cfg, params, {"layers": params["layers"][0]["mlp_norm"]}, batch


@pytest.mark.parametrize("make", [_switch, _qwen3_moe], ids=["switch", "qwen3_moe"])
def test_token_embeddings_are_what_the_stack_starts_from(make):
  family, cfg, params, norms, batch = make()
  moe_fn = moe_jax.DefaultMoE(family.moe_config(cfg, jnp.float32))
  traces = seed_training.record_traces(family, cfg, params, [batch], moe_fn, keep_inputs=True)
  layers = family.moe_layers(params, cfg)
  assert list(traces) == list(layers)
  embedded = family.token_embeddings(params, cfg, batch)
  for stack, trace in traces.items():
    embeddings, mask = embedded[stack]
    rows, length = mask.shape
    width, num_experts = layers[stack][0]["router"].shape
    assert embeddings.shape == (rows, length, width) and mask.dtype == jnp.bool_
    assert bool(mask.all())
    np.testing.assert_array_equal(trace["embeddings"], embeddings)
    first_input = trace["inputs"][0].reshape(rows, length, -1)      # what MoE layer 0 received
    np.testing.assert_allclose(first_input, rms_norm(embeddings, norms[stack], 1e-6), atol=1e-5)
    top_k = family.moe_config(cfg, jnp.float32).top_k
    assert trace["probs"].shape == (len(layers[stack]), rows, length, num_experts)
    assert trace["ids"].shape == (len(layers[stack]), rows * length, top_k)
  ids = batch["input_ids"]
  padded = np.broadcast_to(np.arange(ids.shape[1]) < 3, ids.shape).astype(np.int32)
  stack = next(iter(embedded))   # the stack that reads input_ids
  np.testing.assert_array_equal(
      family.token_embeddings(params, cfg, dict(batch, attention_mask=padded))[stack][1],
      padded.astype(bool))


# --- training, scoring, checkpoints ----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_trace():
  """Router scores that are a fixed function of the current and previous embedding."""
  emb = np.asarray(jax.random.normal(jax.random.key(5), (24, 10, D)))
  maps = np.asarray(jax.random.normal(jax.random.key(6), (LAYERS, 2 * D, EXPERTS)))
  pair = np.concatenate([emb, np.pad(emb, ((0, 0), (1, 0), (0, 0)))[:, :-1]], axis=-1)
  probs = np.asarray(jax.nn.softmax(np.einsum("bld,nde->nble", pair, maps), axis=-1))
  ids = np.argsort(-probs, axis=-1, kind="stable")[..., :2].reshape(LAYERS, -1, 2)
  return {"s": {"embeddings": emb, "mask": np.ones((24, 10), bool), "probs": probs,
                "ids": ids.astype(np.int32)}}


def test_training_lowers_the_loss_and_round_trips(synthetic_trace, tmp_path):
  seeds, losses = seed_training.train_seed(synthetic_trace, hidden=HIDDEN, steps=80,
                                           batch_size=8, learning_rate=1e-2, log_every=0)
  assert losses["s"]["end_loss"] < 0.8 * losses["s"]["start_loss"]
  before = seed_training.evaluate(synthetic_trace, {"s": seed_predictor.init(
      jax.random.key(0), d_model=D, hidden=HIDDEN, num_layers=LAYERS, num_experts=EXPERTS)},
                                  top_k=2)
  after = seed_training.evaluate(synthetic_trace, seeds, top_k=2)
  assert list(after) == ["s/0", "s/1", "s/2"]
  assert np.mean([m["seed"]["hit"] for m in after.values()]) > np.mean(
      [m["seed"]["hit"] for m in before.values()]) + 0.2
  path = seed_training.save_seed(str(tmp_path / "seed"), seeds, metadata={"hidden": HIDDEN})
  template = seed_training.seed_template({"s": LAYERS}, d_model=D, hidden=HIDDEN,
                                         num_experts=EXPERTS)
  restored = seed_training.restore_seed(path, template=template)
  for a, b in zip(jax.tree.leaves(seeds), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  wrong = seed_training.seed_template({"s": LAYERS}, d_model=D, hidden=HIDDEN + 1,
                                      num_experts=EXPERTS)
  with pytest.raises(ValueError, match=r"(?s)target shape \[17\].*launch/train_seed_predictor"):
    seed_training.restore_seed(path, template=wrong)


def test_bidirectional_round_trip(bidi_params, params, tmp_path):
  """A checkpoint with a bidirectional and a causal stack: restore_for_layers reads which is which
  from the metadata; a causal template does not fit the bidirectional stack."""
  seeds = {"enc": bidi_params, "dec": params}
  path = seed_training.save_seed(str(tmp_path / "seed"), seeds, metadata={
      "hidden": HIDDEN, "bidirectional": {"enc": True, "dec": False}})
  router = {"router": np.zeros((D, EXPERTS), np.float32)}
  restored = seed_training.restore_for_layers(path, {"enc": [router] * LAYERS,
                                                     "dec": [router] * LAYERS})
  assert jax.tree.structure(restored) == jax.tree.structure(seeds)
  for a, b in zip(jax.tree.leaves(seeds), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  causal = seed_training.seed_template({"enc": LAYERS, "dec": LAYERS}, d_model=D, hidden=HIDDEN,
                                       num_experts=EXPERTS)
  with pytest.raises(ValueError, match="LSTM width or direction"):
    seed_training.restore_seed(path, template=causal)
  # Training asks the family which stacks are bidirectional (default: none).
  assert seed_training.bidirectional_stacks(types.SimpleNamespace(
      BIDIRECTIONAL_STACKS=("enc",))) == ("enc",)
  assert seed_training.bidirectional_stacks(types.SimpleNamespace()) == ()


def test_scores_of_exact_predictions(params, synthetic_trace):
  """Scoring against the predictions themselves: hit and recall 1, load error 0, for seed and
  for pregate (whose routers' choices are made the truth of layers >= 1)."""
  trace = dict(synthetic_trace["s"])
  pred = seed_predictor.predict(params, trace["embeddings"], trace["mask"], top_k=2)
  inputs = np.asarray(jax.random.normal(jax.random.key(7), (LAYERS, 240, D)))
  routers = [np.asarray(jax.random.normal(jax.random.key(8 + l), (D, EXPERTS)))
             for l in range(LAYERS)]
  ids = np.asarray(pred.ids).copy()
  own = {"s": dict(trace, ids=ids, inputs=inputs)}
  scores = seed_training.evaluate(own, {"s": params}, top_k=2, routers={"s": routers})
  for layer, by_kind in scores.items():
    assert by_kind["seed"] == {"hit": 1.0, "recall": 1.0, "l1": 0.0}, layer
    assert ("pregate" in by_kind) == (layer != "s/0")
  for l in range(1, LAYERS):
    ids[l] = np.argsort(-(inputs[l - 1] @ routers[l]), axis=-1, kind="stable")[:, :2]
  scores = seed_training.evaluate({"s": dict(own["s"], ids=ids)}, {"s": params}, top_k=2,
                                  routers={"s": routers})
  assert all(scores[f"s/{l}"]["pregate"] == {"hit": 1.0, "recall": 1.0, "l1": 0.0}
             for l in range(1, LAYERS))


@pytest.mark.parametrize("name", ["switch_tiny", "qwen3_moe_small"])
def test_shipped_seed_predictors_restore(name):
  path = os.path.join(presets.ASSETS, name, "seed_predictor")
  family, cfg, model_params = models.load_checkpoint(os.path.join(presets.ASSETS, name))
  layers = family.moe_layers(model_params, cfg)
  seeds = seed_training.restore_for_layers(path, layers)
  assert set(seeds) == set(layers)
  # Each stack runs in the direction its metadata records (none recorded: causal) and the family
  # asks for (so that retraining reproduces it).
  recorded = orbax_io.load_metadata(path).get("bidirectional") or {}
  both = seed_training.bidirectional_stacks(family)
  for stack, seed in seeds.items():
    assert seed_predictor.is_bidirectional(seed) == recorded.get(stack, False) == (stack in both)
  rows = {"input_ids": np.full((1, 4), 5, np.int32), "decoder_input_ids": np.zeros((1, 4),
                                                                                   np.int32)}
  for stack, (embeddings, mask) in family.token_embeddings(model_params, cfg, rows).items():
    pred = seed_predictor.predict(seeds[stack], embeddings, mask,
                                  top_k=family.moe_config(cfg, jnp.float32).top_k)
    assert pred.ids.shape[0] == len(layers[stack])
