"""Non-finite tokens: routed to no expert, NaN out, counted; clean tokens never notice them.

Probe (c): a token with NaN in its hidden state was routed to expert 0 (argmax over NaN logits);
in capacity mode it took expert 0's capacity, so a clean token was dropped instead (clean outputs
moved by 0.89), and the z/aux losses became NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import moe_jax
from moe_jax import predictor, replication, routing
from moe_jax.models import moe_stack
from tests import helpers

BAD_VALUES = (np.nan, np.inf, -np.inf)


def _poison(x, bad, values, columns):
  """x <f>[B, L, d] with x[b, l, columns[i]] = values[i] for the i-th True entry of bad [B, L]."""
  x = np.array(x)
  for (b, l), value, col in zip(np.argwhere(bad), values, columns):
    x[b, l, col] = value
  return jnp.asarray(x)


def test_top_k_route_sends_non_finite_tokens_nowhere():
  """A NaN or inf input row, or logits that overflow to inf, route like a padding token; the
  losses and loads are those of the finite tokens alone."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 8)).astype(np.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))
  x[1, 3], x[4, 0], x[7] = np.nan, -np.inf, 1e38          # row 7: finite input, inf logits
  bad = np.zeros(12, bool)
  bad[[1, 4, 7]] = True
  got = routing.top_k_route(jnp.asarray(x), kernel, top_k=2)
  masked = routing.top_k_route(jnp.asarray(np.where(bad[:, None], 0.0, x)), kernel, top_k=2,
                               token_mask=jnp.asarray(~bad))
  np.testing.assert_array_equal(routing.finite_tokens(jnp.asarray(x), got.logits), ~bad)
  np.testing.assert_array_equal(got.dispatch_mask, np.broadcast_to(~bad[:, None], (12, 2)))
  np.testing.assert_array_equal(got.tokens_per_expert, masked.tokens_per_expert)
  assert int(np.sum(got.tokens_per_expert)) == 9 * 2
  for loss in ("z_loss", "aux_loss"):
    assert np.isfinite(float(getattr(got, loss))), loss
    np.testing.assert_allclose(getattr(got, loss), getattr(masked, loss), rtol=1e-6)


@pytest.mark.parametrize("kind", ["pregate", "learned"])
def test_predicted_loads_ignore_non_finite_tokens(kind):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 8)).astype(np.float32)
  router = jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32))
  clean = predictor.LayerInputs(x=jnp.asarray(x[2:]), next_router=router, history=jnp.zeros(4),
                                learned=predictor.init_learned(None, 8, 4, next_router=router),
                                top_k=2)
  x[0, 5], x[1, 2] = np.nan, np.inf
  dirty = clean.replace(x=jnp.asarray(x))
  load, top1 = predictor.PREDICTORS[kind].estimate(dirty)
  want_load, want_top1 = predictor.PREDICTORS[kind].estimate(clean)
  np.testing.assert_array_equal(load, want_load)
  np.testing.assert_array_equal(top1, np.concatenate([[-1, -1], want_top1]))
  assert float(jnp.sum(load)) == 8 * 2


E, K, D, B, L = 8, 2, 8, 4, 8
_MESH = (2, 4)


def _layer_setup():
  """Jitted layers per capacity mode, replicas held on a (2, 4) mesh, tiny shapes."""
  cfg = moe_jax.MoEConfig(num_experts=E, top_k=K, d_model=D, d_ff=16)
  params = helpers.skewed_params(cfg)
  mesh = moe_jax.make_mesh(*_MESH)
  columns = helpers.random_columns(np.random.default_rng(2), E, _MESH[1], 2, fill=1.0)
  held = moe_jax.prefetch(params, columns, cfg, mesh=mesh)
  layers = {}
  for mode in ("dropless", "capacity"):
    execution = moe_jax.ExecutionConfig(capacity_mode=mode, capacity_factor=1.0)
    layers[mode] = jax.jit(lambda x, mask, execution=execution: moe_jax.moe_apply(
        params, x, cfg, execution=execution, mesh=mesh, replicas=held, token_mask=mask))
  return cfg, layers, helpers.skewed_tokens(cfg, B, L)


_SETUP = _layer_setup()


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(st.booleans(), min_size=B * L, max_size=B * L).filter(any),
       values=st.lists(st.sampled_from(BAD_VALUES), min_size=B * L, max_size=B * L),
       columns=st.lists(st.integers(0, D - 1), min_size=B * L, max_size=B * L))
def test_property_clean_tokens_do_not_see_bad_tokens(mode, bad, values, columns):
  """With replicas on a (2, 4) mesh, in dropless and capacity mode: every clean token's output,
  the drops, loads and losses equal those of the same batch with the bad tokens masked out as
  padding; bad tokens' rows are NaN and counted. In dropless mode the clean outputs also equal
  those of the batch without any bad value."""
  _, layers, x = _SETUP
  bad = np.asarray(bad).reshape(B, L)
  dirty = _poison(x, bad, values, columns)
  all_valid = jnp.ones((B, L), bool)
  y, stats = layers[mode](dirty, all_valid)
  y_masked, stats_masked = layers[mode](dirty, jnp.asarray(~bad))
  y, y_masked = np.asarray(y), np.asarray(y_masked)
  assert np.all(np.isnan(y[bad])) and np.all(y_masked[bad] == 0)
  np.testing.assert_array_equal(y[~bad], y_masked[~bad])
  assert int(stats.non_finite_tokens) == int(bad.sum())
  assert int(stats_masked.non_finite_tokens) == 0
  for field in ("dropped_choices", "total_choices", "tokens_per_expert", "tokens_per_slot"):
    np.testing.assert_array_equal(getattr(stats, field), getattr(stats_masked, field), field)
  for loss in ("z_loss", "aux_loss"):
    assert np.isfinite(float(getattr(stats.routing, loss)))
    np.testing.assert_allclose(getattr(stats.routing, loss), getattr(stats_masked.routing, loss),
                               rtol=1e-6)
  if mode == "dropless":
    y_clean, _ = layers[mode](x, all_valid)
    assert helpers.rel_err(y[~bad], np.asarray(y_clean)[~bad]) <= 1e-6


def test_a_given_routing_cannot_dispatch_a_non_finite_token():
  """`moe_apply(routing=...)` with a routing that dispatches a NaN token (e.g. built by hand):
  the layer still routes it nowhere and returns NaN for it."""
  cfg, _, x = _SETUP
  params = helpers.skewed_params(cfg)
  mesh = moe_jax.make_mesh(*_MESH)
  dirty = x.at[1, 2, 0].set(jnp.nan)
  given_routing = routing.top_k_route(dirty.reshape(-1, D), params["router"], top_k=K)
  given_routing = given_routing.replace(dispatch_mask=jnp.ones_like(given_routing.dispatch_mask))
  y, stats = moe_jax.moe_apply(params, dirty, cfg, mesh=mesh, routing=given_routing)
  want, _ = moe_jax.moe_apply(params, x, cfg, mesh=mesh)
  assert int(stats.non_finite_tokens) == 1 and int(stats.total_choices) == (B * L - 1) * K
  assert np.all(np.isnan(np.asarray(y)[1, 2]))
  clean = np.ones((B, L), bool)
  clean[1, 2] = False
  assert helpers.rel_err(np.asarray(y)[clean], np.asarray(want)[clean]) <= 1e-6


def test_stack_runner_records_count_non_finite_tokens_per_layer():
  """A NaN token (token-wise blocks keep it NaN through the stack) is counted in every layer's
  record, predicts no load for the next layer, and leaves the clean tokens' outputs alone."""
  cfg = moe_jax.MoEConfig(num_experts=E, top_k=1, d_model=D, d_ff=16)
  params = moe_stack.init(jax.random.key(0), cfg, 3)
  mesh = moe_jax.make_mesh(*_MESH)
  h = helpers.skewed_tokens(cfg, B, L)
  state = replication.init_state({moe_stack.STACK: 3}, E)
  rcfg = replication.ReplicationConfig(predictor="pregate", num_replica_slots=2)

  @jax.jit
  def run(h):
    runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(params), state)
    out, _ = moe_stack.forward(params, h, runner.moe_fn)
    return out, runner.records()[moe_stack.STACK], runner.next_state()

  out, records, next_state = run(h.at[0, 3, 1].set(jnp.nan))
  want, _, _ = run(h)
  assert [int(r.non_finite_tokens) for r in records] == [1, 1, 1]
  for record in records[1:]:        # pregate from the previous layer's input
    assert float(jnp.sum(record.predicted_load)) == B * L - 1
    assert int(record.predicted_top1[3]) == -1
  assert np.all(np.isfinite(next_state.history[moe_stack.STACK]))
  out, want = np.asarray(out), np.asarray(want)
  assert np.all(np.isnan(out[0, 3]))
  clean = np.ones((B, L), bool)
  clean[0, 3] = False
  assert helpers.rel_err(out[clean], want[clean]) <= 1e-6


def test_switch_router_losses_leave_out_non_finite_tokens():
  """Switch's HF-style z/aux losses: a NaN token row is left out (not NaN), and with every row
  finite they are unchanged."""
  from moe_jax.models.switch import stack  # pylint: disable=import-outside-toplevel
  logits = np.asarray(jax.random.normal(jax.random.key(3), (2, 6, 4)), np.float32)
  bad = logits.copy()
  bad[0, 2] = np.nan
  z_bad, aux_bad = stack.router_z_loss(bad), stack.load_balancing_loss(bad)
  assert np.isfinite(float(z_bad)) and np.isfinite(float(aux_bad))
  # z: the mean over the 11 finite tokens.
  z_rows = [jax.nn.logsumexp(logits[b, t]) ** 2
            for b in range(2) for t in range(6) if (b, t) != (0, 2)]
  np.testing.assert_allclose(float(z_bad), float(np.mean(z_rows)), rtol=1e-6)
  # aux: sequence 0 over its 5 finite tokens, sequence 1 over all 6.
  def aux_of(rows):
    probs = [jax.nn.softmax(r, axis=-1) for r in rows]
    routed = [jax.nn.one_hot(jnp.argmax(r, axis=-1), 4) for r in rows]
    per = [jnp.mean(a, 0) * jnp.mean(p, 0) for a, p in zip(routed, probs)]
    return float(jnp.mean(jnp.stack(per)) * 16)
  np.testing.assert_allclose(float(aux_bad), aux_of([logits[0, [0, 1, 3, 4, 5]], logits[1]]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(stack.load_balancing_loss(logits)), aux_of(list(logits)),
                             rtol=1e-6)
