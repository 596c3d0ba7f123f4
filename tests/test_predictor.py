"""Learned predictor: recording traces, training, orbax round trip; metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import metrics, predictor, replication
from moe_jax.app import predictor_training
from moe_jax.sim import policies
from moe_jax.models import moe_stack
from tests import helpers


@pytest.fixture(scope="module")
def traces():
  return _traces()


def _traces():
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32)
  params = moe_stack.init(jax.random.key(0), cfg, 3)
  mesh = moe_jax.make_mesh(1, 8)
  recorder = predictor_training.TraceRecorder(moe_jax.DefaultMoE(cfg, mesh=mesh))

  @jax.jit
  def record(params, h):
    recorder.inputs, recorder.probs = {}, {}
    moe_stack.forward(params, h, recorder.moe_fn)
    return recorder.traces()

  batches = [record(params, helpers.skewed_tokens(cfg, 4, 32, seed=s)) for s in range(3)]
  routers = {moe_stack.STACK: [l["moe"]["router"] for l in params["layers"]]}
  return cfg, predictor_training.concat_traces(batches), routers


def test_training_lowers_the_loss_and_round_trips(tmp_path, traces):
  cfg, traces, routers = traces
  xs, probs = traces[moe_stack.STACK]
  assert len(xs) == 3 and xs[0].shape == (384, 16) and probs[1].shape == (384, 8)
  learned = predictor_training.train_learned(traces, routers, steps=60, batch_size=128,
                                             learning_rate=1e-2, top_k=2)
  pairs = learned[moe_stack.STACK]
  assert len(pairs) == 2
  for l, params in enumerate(pairs):
    start = predictor.init_learned(jax.random.key(0), 16, 8, next_router=routers[
        moe_stack.STACK][l + 1])
    before = predictor_training.soft_cross_entropy(start, xs[l], probs[l + 1])
    after = predictor_training.soft_cross_entropy(params, xs[l], probs[l + 1])
    assert float(after) < float(before)
    # The load head starts from the trained per-token map and lowers the distribution loss.
    groups = predictor_training.load_groups(xs[l], probs[l + 1], 2)
    assert groups[0].shape == (6, 64, 16) and groups[1].shape == (6, 64, 8)
    np.testing.assert_array_equal(groups[1].sum(-1), 2.0)
    head = predictor.init_load_head(params)
    before = predictor_training.load_divergence(head, *groups)
    after = predictor_training.load_divergence(params["load"], *groups)
    assert float(after) < 0.9 * float(before)
  path = predictor_training.save_learned(str(tmp_path / "pred"), learned, metadata={"d": 16})
  template = predictor_training.learned_template({moe_stack.STACK: 3}, 16, 8)
  restored = predictor_training.restore_learned(path, template=template)
  for a, b in zip(jax.tree.leaves(learned), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  wrong = predictor_training.learned_template({moe_stack.STACK: 3}, 32, 8)
  with pytest.raises(ValueError, match=r"target shape \[32, 8\], checkpoint shape \[16, 8\]"):
    predictor_training.restore_learned(path, template=wrong)


def test_low_rank_predictor_trains(traces):
  cfg, traces, routers = traces
  learned = predictor_training.train_learned(traces, routers, rank=4, steps=30, batch_size=128)
  assert learned[moe_stack.STACK][0]["u"].shape == (16, 4)
  assert learned[moe_stack.STACK][0]["load"]["w"].shape == (16, 8)
  logits = predictor.learned_logits(learned[moe_stack.STACK][0], jnp.zeros((5, 16)))
  assert logits.shape == (5, 8)


def test_metrics():
  assert metrics.hit_rate([0, 1, 2, -1], [[0], [1], [0], [3]]) == 0.5
  assert np.isnan(metrics.hit_rate([-1, -1], [[0], [1]]))
  logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
  assert metrics.recall_at(logits, [[1], [1]], 1) == 0.0
  assert metrics.recall_at(logits, [[1], [1]], 2) == 1.0
  assert metrics.load_l1_error([2.0, 2.0], [1.0, 3.0]) == pytest.approx(0.5)
  assert metrics.load_l1_error([10.0, 30.0], [1.0, 3.0]) == pytest.approx(0.0)
  table = moe_jax.home_slot_table(4, 2, 1)
  assert metrics.expected_balancedness([3.0, 1.0, 1.0, 1.0], table) == pytest.approx(3 / 4)
  assert metrics.oracle_balancedness([3.0, 1.0, 1.0, 1.0], 2, 1) == pytest.approx(1.0)
  counts = predictor.choice_counts(jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), 1)
  np.testing.assert_array_equal(counts, [2.0, 1.0])


def test_registry_is_the_one_list_of_kinds():
  """Every consumer reads `PREDICTORS`; each estimator gives (load [E], top-1 [T]) as documented."""
  assert predictor.KINDS == ("none",) + predictor.REPLICATING
  assert predictor.REPLICATING == tuple(predictor.PREDICTORS)
  assert replication.DYNAMIC_KINDS == tuple(k for k in predictor.REPLICATING if k != "reactive")
  assert set(policies.POLICIES) == set(predictor.KINDS) - {"seed", "eplb", "hybrid"}
  x = jax.random.normal(jax.random.key(0), (6, 16))
  router = jax.random.normal(jax.random.key(1), (16, 8))
  learned = predictor.init_learned(jax.random.key(2), 16, 8, rank=3)
  learned["load"] = predictor.init_load_head(learned)
  learned["load"]["b"] = jnp.linspace(-1.0, 1.0, 8)
  inputs = predictor.LayerInputs(
      x=x, next_router=router, history=jnp.arange(8.0), learned=learned,
      oracle=jnp.arange(8.0)[::-1], seed_load=jnp.full((8,), 1.5),
      seed_top1=jnp.arange(6, dtype=jnp.int32), calibration=jnp.arange(8.0) * 2, top_k=2)
  logits = {"pregate": predictor.pregate_logits(x, router), "reactive": predictor.pregate_logits(
      x, router), "learned": predictor.learned_logits(learned, x)}
  given = {"history": (inputs.history, -1), "truth": (inputs.oracle, -1),
           "embedding": (inputs.seed_load, inputs.seed_top1),
           "calibration": (inputs.calibration, -1),
           "load": (predictor.learned_load(learned, x, 2), -1),
           "hybrid": (0.5 * (predictor.learned_load(learned, x, 2) + inputs.seed_load),
                      inputs.seed_top1)}
  for name, kind in predictor.PREDICTORS.items():
    assert kind.name == name
    load, top1 = kind.estimate(inputs)
    assert load.shape == (8,) and load.dtype == jnp.float32 and top1.shape == (6,)
    if name in logits:
      assert kind.source in ("hidden_state", "in_layer")
      np.testing.assert_array_equal(load, predictor.choice_counts(logits[name], 2))
      np.testing.assert_array_equal(top1, jnp.argmax(logits[name], axis=-1))
      assert float(jnp.sum(load)) == 6 * 2
    else:
      want_load, want_top1 = given[{"learned_load": "load", "hybrid": "hybrid"}.get(
          name, kind.source)]
      np.testing.assert_allclose(load, want_load, rtol=1e-6)
      np.testing.assert_array_equal(top1, want_top1)
  with pytest.raises(ValueError, match="is not one of"):
    predictor.check_kind("psychic")


def _slow_learned_load(params, x, top_k):
  """The load estimate token by token in numpy: top_k * softmax of each finite row, summed."""
  head = params.get("load", params)
  total = np.zeros(head["b"].shape, np.float64)
  for row in np.asarray(x, np.float64):
    logits = row @ np.asarray(head["w"], np.float64) + np.asarray(head["b"], np.float64)
    if np.all(np.isfinite(logits)):
      e = np.exp(logits - logits.max())
      total += top_k * e / e.sum()
  return total


@pytest.mark.parametrize("top_k,with_head", [(1, True), (2, True), (2, False)])
def test_learned_load_estimate(top_k, with_head):
  """<f32>[E], equal to a per-token loop; rows with a non-finite value count nowhere, so the
  loads sum to top_k * finite tokens. Without a load head, the per-token map's soft counts."""
  params = predictor.init_learned(jax.random.key(0), 16, 8)
  params["b"] = jnp.linspace(0.0, 2.0, 8)
  if with_head:
    params["load"] = {"w": -params["w"], "b": jnp.linspace(2.0, 0.0, 8)}
  x = np.array(jax.random.normal(jax.random.key(1), (10, 16)), np.float32)
  x[2, 3], x[7, 0] = np.nan, np.inf
  load = jax.jit(predictor.learned_load, static_argnums=2)(params, jnp.asarray(x), top_k)
  assert load.shape == (8,) and load.dtype == jnp.float32
  np.testing.assert_allclose(load, _slow_learned_load(params, x, top_k), rtol=1e-5, atol=1e-6)
  assert float(jnp.sum(load)) == pytest.approx(top_k * 8, rel=1e-5)
  if not with_head:
    np.testing.assert_allclose(predictor.load_head_logits(params, x[:2]),
                               predictor.learned_logits(params, x[:2]))
