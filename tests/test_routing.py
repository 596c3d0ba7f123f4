"""Router against numpy, and the router-stage sequence capacity rule against a loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing


def _numpy_route(x, kernel, k):
  logits = x.astype(np.float64) @ kernel.astype(np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
  return logits, probs, ids


@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_route_matches_numpy(top_k, renormalize):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 12)).astype(np.float32)
  kernel = rng.normal(size=(12, 6)).astype(np.float32)
  mask = np.ones(40, bool)
  mask[-5:] = False
  r = routing.top_k_route(jnp.asarray(x), jnp.asarray(kernel), top_k=top_k,
                          renormalize=renormalize, token_mask=jnp.asarray(mask))
  logits, probs, ids = _numpy_route(x, kernel, top_k)
  np.testing.assert_array_equal(r.expert_ids, ids)
  w = np.take_along_axis(probs, ids, 1)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  np.testing.assert_allclose(r.combine_weights, w, rtol=1e-5)
  np.testing.assert_array_equal(r.dispatch_mask, np.broadcast_to(mask[:, None], (40, top_k)))
  v = mask
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(r.z_loss, (lse[v] ** 2).mean(), rtol=1e-5)
  counts = np.bincount(ids[v].ravel(), minlength=6)
  np.testing.assert_array_equal(r.tokens_per_expert, counts)
  aux = 6 * np.sum(counts / (v.sum() * top_k) * probs[v].mean(0))
  np.testing.assert_allclose(r.aux_loss, aux, rtol=1e-5)
  assert r.expert_ids.dtype == jnp.int32 and r.combine_weights.dtype == jnp.float32


def test_router_runs_in_float32_for_bf16_inputs():
  x = jax.random.normal(jax.random.key(0), (8, 16), jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(1), (16, 4), jnp.bfloat16)
  r = routing.top_k_route(x, kernel, top_k=1)
  assert r.logits.dtype == jnp.float32 and r.probs.dtype == jnp.float32


def test_ties_pick_lowest_index():
  x = jnp.ones((3, 4))
  kernel = jnp.zeros((4, 5))
  r = routing.top_k_route(x, kernel, top_k=2)
  np.testing.assert_array_equal(r.expert_ids, [[0, 1]] * 3)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_select_top_k_equals_lax_top_k_with_ties(k):
  # Small integers make many ties; -inf entries must come last, in index order.
  values = jax.random.randint(jax.random.key(k), (64, 8), 0, 4).astype(jnp.float32)
  values = values.at[::7, 3].set(-jnp.inf)
  got_values, got_ids = routing.select_top_k(values, k)
  want_values, want_ids = jax.lax.top_k(values, k)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(got_values, want_values)
  batched = routing.select_top_k(values.reshape(4, 16, 8), k)[1]            # leading axes kept
  np.testing.assert_array_equal(batched.reshape(64, k), want_ids)


def test_sequence_capacity_mask_matches_loop():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 4, size=(3, 20, 2))
  mask = rng.random((3, 20, 2)) > 0.1
  got = np.asarray(routing.sequence_capacity_mask(jnp.asarray(ids), jnp.asarray(mask), 4, 3))
  want = np.zeros_like(mask)
  for b in range(3):
    seen = np.zeros(4, int)
    for j in range(2):
      for t in range(20):
        if mask[b, t, j]:
          seen[ids[b, t, j]] += 1
          want[b, t, j] = seen[ids[b, t, j]] <= 3
  np.testing.assert_array_equal(got, want)


def _loop_sigmoid_route(logits, bias, k, groups, top_groups, renormalize, scaling):
  """DeepSeek-V3's router written as a per-token loop over Python lists."""
  ids, weights = [], []
  for row in logits.astype(np.float64):
    scores = [1 / (1 + np.exp(-v)) for v in row]
    choice = [s + b for s, b in zip(scores, bias)]
    size = len(row) // groups
    group_score = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(groups)]
    kept = sorted(range(groups), key=lambda g: -group_score[g])[:top_groups]
    eligible = [e for e in range(len(row)) if e // size in kept]
    chosen = sorted(eligible, key=lambda e: -choice[e])[:k]
    w = [scores[e] for e in chosen]
    if renormalize:
      w = [v / (sum(w) + 1e-20) for v in w]
    ids.append(chosen)
    weights.append([v * scaling for v in w])
  return np.array(ids), np.array(weights)


@pytest.mark.parametrize("groups,top_groups,renormalize", [(1, 1, False), (4, 2, True),
                                                          (8, 3, True)])
def test_sigmoid_rule_matches_a_loop(groups, top_groups, renormalize):
  """Selection by biased sigmoid scores within the best groups, weights from unbiased scores."""
  from moe_jax.config import MoEConfig   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(groups)
  x = rng.normal(size=(30, 12)).astype(np.float32)
  params = {"router": jnp.asarray(rng.normal(size=(12, 16)).astype(np.float32)),
            "router_bias": jnp.asarray(0.3 * rng.normal(size=16).astype(np.float32))}
  cfg = MoEConfig(num_experts=16, d_model=12, d_ff=4, top_k=3, router="sigmoid",
                  num_groups=groups, top_groups=top_groups, renormalize=renormalize,
                  routed_scaling=2.5)
  r = routing.route(jnp.asarray(x), params, cfg)
  ids, weights = _loop_sigmoid_route(np.asarray(r.logits), np.asarray(params["router_bias"]), 3,
                                     groups, top_groups, renormalize, 2.5)
  np.testing.assert_array_equal(r.expert_ids, ids)
  np.testing.assert_allclose(r.combine_weights, weights, rtol=1e-5)
  np.testing.assert_allclose(r.probs, 1 / (1 + np.exp(-np.asarray(r.logits))), rtol=1e-5)
  # The bias changes the choice but never a weight: without it, other experts win.
  unbiased = routing.route(jnp.asarray(x), {"router": params["router"]}, cfg)
  assert (np.asarray(unbiased.expert_ids) != ids).any()


def test_predictors_select_by_the_layers_rule():
  """pregate under a sigmoid router counts the experts that router would choose (bias and
  groups included), not a softmax top-k of the same logits."""
  from moe_jax import predictor   # pylint: disable=import-outside-toplevel
  from moe_jax.config import MoEConfig   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(50, 12)).astype(np.float32))
  router = jnp.asarray(rng.normal(size=(12, 16)).astype(np.float32))
  bias = jnp.asarray(0.5 * rng.normal(size=16).astype(np.float32))
  cfg = MoEConfig(num_experts=16, d_model=12, d_ff=4, top_k=2, router="sigmoid", num_groups=4,
                  top_groups=2)
  inputs = predictor.LayerInputs(x=x, next_router=router, history=jnp.zeros(16), next_bias=bias,
                                 top_k=2, moe_cfg=cfg)
  load, top1 = predictor.PREDICTORS["pregate"].estimate(inputs)
  want = routing.route(x, {"router": router, "router_bias": bias}, cfg)
  np.testing.assert_array_equal(load, want.tokens_per_expert)
  np.testing.assert_array_equal(top1, want.expert_ids[:, 0])
  softmax_load, _ = predictor.PREDICTORS["pregate"].estimate(inputs.replace(moe_cfg=None))
  assert (np.asarray(softmax_load) != np.asarray(load)).any()


@pytest.mark.parametrize("changes,match", [
    (dict(num_groups=3), r"num_groups=3 does not divide num_experts=16"),
    (dict(num_groups=4, top_groups=5), r"top_groups=5 exceeds num_groups=4"),
    (dict(num_groups=4, router="softmax"), r"group-limited selection is a rule of the 'sigmoid'"),
    (dict(num_groups=8, top_groups=1, top_k=3), r"top_k=3 exceeds the 2 experts"),
    (dict(routed_scaling=0.0), r"routed_scaling must be > 0"),
    (dict(router="argmax"), r"router='argmax' is not one of"),
])
def test_router_config_errors_name_the_field(changes, match):
  from moe_jax.config import MoEConfig   # pylint: disable=import-outside-toplevel
  base = dict(num_experts=16, d_model=8, d_ff=4, top_k=2, router="sigmoid")
  with pytest.raises(ValueError, match=match):
    MoEConfig(**{**base, **changes})
