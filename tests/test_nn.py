"""moe_jax.nn: the Flax NNX and linen MoE modules and the stack replication context.

Each module's params are `init_moe_params`'s for the key it draws and its output is `moe_apply`'s
on them, bit for bit; the sharding rules place the params; a model's MoE layers run through a
`StackReplication` give the forward and gradients of the same model without replicas, while
replica slots really compute rows; the README's "Train with Flax" example runs and learns.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.sharding import PartitionSpec as P

import moe_jax
import moe_jax.nn

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
MESH = moe_jax.make_mesh(data=2, expert=4)
X = jax.random.normal(jax.random.key(1), (4, 8, 16))
CONFIGS = {
    "relu_top1": moe_jax.MoEConfig(num_experts=8, top_k=1, d_model=16, d_ff=32),
    "silu_sigmoid_top2": moe_jax.MoEConfig(num_experts=8, top_k=2, d_model=16, d_ff=32,
                                           activation="silu", router="sigmoid", num_groups=2),
}


def _assert_same_params(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nnx_layer_is_init_moe_params_and_moe_apply(name):
  cfg = CONFIGS[name]
  layer = moe_jax.nn.MoELayer(cfg, mesh=MESH, rngs=nnx.Rngs(0))
  params = moe_jax.init_moe_params(nnx.Rngs(0).params(), cfg)
  _assert_same_params(layer.moe_params(), params)
  assert layer.wi[...].sharding.spec == P("expert", None, None)       # DEFAULT_RULES
  assert layer.router[...].sharding.spec == P(None, None)
  y, stats = layer(X)
  want, want_stats = moe_jax.moe_apply(params, X, cfg, mesh=MESH)
  np.testing.assert_array_equal(y, want)
  np.testing.assert_array_equal(stats.tokens_per_expert, want_stats.tokens_per_expert)


def test_linen_layer_is_init_moe_params_and_sows_stats():
  cfg = CONFIGS["relu_top1"]

  class Key(linen.Module):        # the first key a top-level module draws from "params"
    def __call__(self):
      return self.make_rng("params")

  key, _ = Key().init_with_output(jax.random.key(0))
  layer = moe_jax.nn.LinenMoELayer(cfg, MESH)
  variables = layer.init(jax.random.key(0), X)
  params = moe_jax.init_moe_params(key, cfg)
  _assert_same_params(linen.meta.unbox(variables)["params"], params)
  assert linen.get_partition_spec(variables)["params"]["wo"] == P("exp", "mlp", "embed")
  y, state = layer.apply(variables, X, mutable=["intermediates"])
  want, want_stats = moe_jax.moe_apply(params, X, cfg, mesh=MESH)
  np.testing.assert_array_equal(y, want)
  (stats,) = state["intermediates"]["moe_stats"]
  np.testing.assert_array_equal(stats.tokens_per_expert, want_stats.tokens_per_expert)


def test_rules_place_params_and_bad_rules_name_the_fix():
  cfg = CONFIGS["relu_top1"]
  rules = (("exp", None), ("embed", None), ("mlp", "expert"), ("router_exp", None))
  layer = moe_jax.nn.MoELayer(cfg, mesh=MESH, rngs=nnx.Rngs(0), rules=rules)
  assert layer.wi[...].sharding.spec == P(None, None, "expert")
  specs = nnx.get_partition_spec(nnx.state(layer))
  assert specs["wo"].get_value() == P(None, "expert", None)
  with pytest.raises(ValueError, match="no entry for logical axes"):
    moe_jax.nn.MoELayer(cfg, mesh=MESH, rngs=nnx.Rngs(0), rules=rules[:3])
  with pytest.raises(ValueError, match="mesh axis"):
    moe_jax.nn.MoELayer(cfg, mesh=MESH, rngs=nnx.Rngs(0), rules=(("exp", "model"),) + rules[1:])


def test_stack_replication_runs_layers_in_order():
  cfg = CONFIGS["relu_top1"]
  layers = [moe_jax.init_moe_params(jax.random.key(i), cfg) for i in range(2)]
  ctx = moe_jax.nn.StackReplication(
      layers, replication=moe_jax.replication.ReplicationConfig(predictor="history"),
      moe_config=cfg, mesh=MESH)
  with pytest.raises(ValueError, match="layer 0 is next"):
    ctx(1, layers[1], X)


class _LinenModel(linen.Module):
  """Two LinenMoELayers; with a state, run through a StackReplication built from the params."""

  @linen.compact
  def __call__(self, x, state=None):
    cfg = CONFIGS["relu_top1"]
    layers = [moe_jax.nn.LinenMoELayer(cfg, MESH, name=f"moe{i}") for i in range(2)]
    ctx = None
    if state is not None and not self.is_initializing():
      params = linen.meta.unbox(self.variables["params"])
      ctx = moe_jax.nn.StackReplication(
          [params[f"moe{i}"] for i in range(2)], state, moe_config=cfg, mesh=MESH,
          replication=moe_jax.replication.ReplicationConfig(predictor="history"))
    for index, layer in enumerate(layers):
      x = x + layer(x, replication=ctx, index=index if ctx else None)
    return x, (ctx.runner.replica_rows() if ctx else jnp.zeros((), jnp.int32))


def test_linen_model_with_stack_replication_keeps_its_output():
  model = _LinenModel()
  variables = model.init(jax.random.key(0), X)
  state = moe_jax.nn.StackReplication.init_state(2, CONFIGS["relu_top1"].num_experts)
  hot_first = jnp.tile(jnp.arange(8.0, 0.0, -1.0), (2, 1))        # a history: 0 hottest
  state = state.replace(history={moe_jax.nn.stack.STACK: hot_first})
  run = jax.jit(lambda v, s: model.apply(v, X, s))
  (y, rows), (plain, _) = run(variables, state), run(variables, None)
  assert int(rows) > 0                                  # replica slots computed rows
  np.testing.assert_allclose(y, plain, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def readme():
  """The README's "Train with Flax" example, run as written (5 training steps)."""
  text = open(README, encoding="utf-8").read()
  section = text.split("## Train with Flax", 1)[1].split("\n## ", 1)[0]
  (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_readme_flax_example_trains(readme):
  losses = readme["losses"]
  assert len(losses) == 5 and np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]


def _forward(model, x, ctx):
  """The README model's forward, with its MoE layers run through `ctx` (None: home slots)."""
  h = model.embed(x)
  y1, stats1 = model.moe1(h, replication=ctx)
  h = h + y1
  y2, stats2 = model.moe2(h, replication=ctx)
  h = h + y2
  return model.head(h)[..., 0], stats1.routing.aux_loss + stats2.routing.aux_loss


def test_replicas_leave_forward_and_gradients(readme):
  """The README model after training (its load history carried): with and without replicas."""
  model, state, x, target = readme["model"], readme["state"], readme["x"], readme["target"]

  @nnx.jit(static_argnums=1)
  def loss_and_grads(model, replicate):
    def loss_fn(model):
      ctx = (moe_jax.nn.StackReplication.of([model.moe1, model.moe2], state) if replicate
             else None)
      prediction, aux = _forward(model, x, ctx)
      rows = ctx.runner.replica_rows() if replicate else jnp.zeros((), jnp.int32)
      return jnp.mean((prediction - target) ** 2) + 0.01 * aux, (prediction, rows)
    return nnx.value_and_grad(loss_fn, has_aux=True)(model)

  (loss, (prediction, rows)), grads = loss_and_grads(model, True)
  (plain_loss, (plain_prediction, _)), plain_grads = loss_and_grads(model, False)
  assert int(rows) > 0                                  # replica slots computed rows
  np.testing.assert_allclose(prediction, plain_prediction, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(prediction, model(x, state)[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
