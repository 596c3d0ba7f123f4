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
