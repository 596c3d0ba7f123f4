"""Gradients of the expert-parallel MoE layer on every fast path vs jax.grad of the dense oracle.

The loss is sum(y * ct) + 0.1 z_loss + 0.1 aux_loss, differentiated w.r.t. the params (router,
wi, wo, wi_gate, router_bias) and the input x, on the (2, 4) mesh with r = 2 replica slots per
device whose weights come from `moe_jax.prefetch` inside the differentiated function (so replica
gradients must find their way home). The oracle routes the same tokens with `routing.route` and
runs every expert over every token (`reference.dense_moe`), with capacity drops from
`reference.capacity_keep` (a constant mask: which choices are dropped is not differentiable).

Compiles little: one program per (MoEConfig, ExecutionConfig); the replica columns are a traced
argument, so each program runs every placement ("none" = every replica slot empty, "random",
"adversarial" = every replica slot holds one of the two coldest experts). Pruned from the full
cross-product of backend x capacity mode x collective x placement:
  * capacity mode runs one program (windowed, padded): its path never reaches the grouped-matmul
    backend or the ragged exchange (fixed [G, C, d] buffers, `lax.all_to_all`, a batched einsum);
  * the sigmoid router (relu FFN, groups, scaling, bias) runs one dropless program (windowed,
    padded): routing rules and activations are independent of the exchange and backend;
  * r = 0 (`replicas=None`) and `refresh` run windowed + padded only.
The pieces are checked on their own too: the windowed VJP (weight segments, bulk pass on/off,
whole and tail windows, empty groups, padding rows) vs the dense backend's autodiff, and the
ragged exchange's VJP vs plain autodiff of its all_gather emulation with rows sent twice.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import moe_jax
from moe_jax import collectives, experts_cpu, grouped_matmul, reference, routing
from tests import helpers

MESH_SHAPE = (2, 4)
BATCH, LENGTH = 4, 8
NUM_REPLICA_SLOTS = 2
TOLERANCE = 1e-5
SOFTMAX = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=24, top_k=2, activation="silu",
                            renormalize=True)
SIGMOID = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=24, top_k=2, activation="relu",
                            router="sigmoid", num_groups=2, top_groups=1, renormalize=True,
                            routed_scaling=2.5)
LOSS_WEIGHTS = (0.1, 0.1)                     # z_loss, aux_loss
PLACEMENTS = ("none", "random", "adversarial")
_PROGRAMS = {}


@pytest.fixture(scope="module")
def mesh():
  return moe_jax.make_mesh(*MESH_SHAPE)


def _params(cfg):
  params = helpers.skewed_params(cfg, seed=3)
  if cfg.router == "sigmoid":
    params["router_bias"] = jnp.linspace(-0.1, 0.1, cfg.num_experts)
  return params


def _inputs(cfg):
  x = helpers.skewed_tokens(cfg, BATCH, LENGTH, seed=4)
  ct = jax.random.normal(jax.random.key(5), x.shape)
  return x, ct


def _columns(kind, cfg, load):
  """<int32>[De, r] replica columns of one placement kind."""
  num_devices = MESH_SHAPE[1]
  if kind == "none":
    return np.full((num_devices, NUM_REPLICA_SLOTS), -1, np.int32)
  if kind == "random":
    return helpers.random_columns(np.random.default_rng(7), cfg.num_experts, num_devices,
                                  NUM_REPLICA_SLOTS, fill=1.0)
  coldest = np.argsort(load, kind="stable")[:NUM_REPLICA_SLOTS]   # adversarial
  h = cfg.num_experts // num_devices
  columns = np.stack([np.where(np.arange(num_devices) == e // h, -1, e) for e in coldest], axis=1)
  return columns.astype(np.int32)


def _layer_loss(params, x, ct, columns, *, cfg, execution, mesh):
  replicas = moe_jax.prefetch(params, columns, cfg, mesh=mesh, execution=execution)
  y, stats = moe_jax.moe_apply(params, x, cfg, execution=execution, mesh=mesh, replicas=replicas)
  z, aux = LOSS_WEIGHTS
  loss = jnp.sum(y * ct) + z * stats.routing.z_loss + aux * stats.routing.aux_loss
  return loss, stats.dropped_choices


def _oracle_loss(params, x, ct, keep, *, cfg):
  tokens = x.reshape(-1, cfg.d_model)
  routed = routing.route(tokens, params, cfg)
  y = reference.dense_moe(params, tokens, routed.expert_ids, routed.combine_weights, keep,
                          activation=cfg.activation)
  z, aux = LOSS_WEIGHTS
  return jnp.sum(y.reshape(x.shape) * ct) + z * routed.z_loss + aux * routed.aux_loss


def _program(name, make):
  if name not in _PROGRAMS:
    _PROGRAMS[name] = make()
  return _PROGRAMS[name]


def _layer_grad(cfg, execution, mesh):
  return _program(("layer", cfg, execution), lambda: jax.jit(jax.grad(
      lambda p, x, ct, c: _layer_loss(p, x, ct, c, cfg=cfg, execution=execution, mesh=mesh),
      argnums=(0, 1), has_aux=True)))


def _oracle_grad(cfg):
  return _program(("oracle", cfg), lambda: jax.jit(jax.grad(
      lambda p, x, ct, keep: _oracle_loss(p, x, ct, keep, cfg=cfg), argnums=(0, 1))))


def _keep(params, x, cfg, execution, columns):
  """<bool>[T, k] choices the layer computes: all (dropless) or the capacity rule's survivors."""
  routed = routing.route(x.reshape(-1, cfg.d_model), params, cfg)
  if execution.dropless:
    return np.asarray(routed.dispatch_mask)
  num_data, num_devices = MESH_SHAPE
  groups = reference.routing_groups(BATCH, LENGTH, num_data, num_devices)
  copies = 1 + np.bincount(columns[columns >= 0], minlength=cfg.num_experts)
  capacity = execution.group_capacity(cfg, len(groups[0]))
  return reference.capacity_keep(routed.expert_ids, routed.dispatch_mask, groups,
                                 capacity=capacity, copies=copies)


def _check_grads(cfg, execution, mesh, placements=PLACEMENTS):
  params = _params(cfg)
  x, ct = _inputs(cfg)
  load = np.asarray(routing.route(x.reshape(-1, cfg.d_model), params, cfg).tokens_per_expert)
  dropped = []
  for kind in placements:
    columns = _columns(kind, cfg, load)
    (grads, grad_x), drops = _layer_grad(cfg, execution, mesh)(params, x, ct, columns)
    keep = _keep(params, x, cfg, execution, columns)
    want, want_x = _oracle_grad(cfg)(params, x, ct, keep)
    assert sorted(grads) == sorted(params)
    for name in params:
      err = helpers.rel_err(grads[name], want[name])
      assert err <= TOLERANCE, (kind, name, err)
    assert helpers.rel_err(grad_x, want_x) <= TOLERANCE, kind
    assert int(drops) == int(np.sum(~keep)), (kind, int(drops), int(np.sum(~keep)))
    dropped.append(int(drops))
  return dropped


@pytest.mark.parametrize("backend", ["windowed", "ragged_dot", "dense"])
@pytest.mark.parametrize("collective", ["padded", "emulated_ragged"])
def test_dropless_grads_match_dense_oracle(mesh, backend, collective):
  execution = moe_jax.ExecutionConfig(gmm_backend=backend, all_to_all=collective)
  _check_grads(SOFTMAX, execution, mesh)


def test_capacity_grads_match_dense_oracle_with_drops(mesh):
  execution = moe_jax.ExecutionConfig(capacity_mode="capacity", capacity_factor=0.75,
                                      gmm_backend="windowed", all_to_all="padded")
  dropped = _check_grads(SOFTMAX, execution, mesh)
  assert min(dropped) > 0, dropped              # the rule under test: dropped choices, grad 0
  assert len(set(dropped)) > 1, dropped         # replicas change which choices overflow


def test_sigmoid_router_grads_match_dense_oracle(mesh):
  execution = moe_jax.ExecutionConfig(gmm_backend="windowed", all_to_all="padded")
  _check_grads(SIGMOID, execution, mesh, placements=("random",))


def test_replica_grads_return_home(mesh):
  """d(loss)/d(params) is the same for every placement (the replica slots' gradients go home)."""
  execution = moe_jax.ExecutionConfig(gmm_backend="windowed", all_to_all="emulated_ragged")
  params = _params(SOFTMAX)
  x, ct = _inputs(SOFTMAX)
  load = np.asarray(routing.route(x.reshape(-1, SOFTMAX.d_model), params, SOFTMAX)
                    .tokens_per_expert)
  grad = _layer_grad(SOFTMAX, execution, mesh)
  base, _ = grad(params, x, ct, _columns("none", SOFTMAX, load))
  adversarial = _columns("adversarial", SOFTMAX, load)
  assert np.sum(adversarial >= 0) == 2 * (MESH_SHAPE[1] - 1)     # 3 replicas of each coldest
  replicated, _ = grad(params, x, ct, adversarial)
  for name in ("wi", "wo", "wi_gate"):
    assert helpers.rel_err(replicated[0][name], base[0][name]) <= TOLERANCE, name
  # the coldest experts' gradients are not zero: their replicas' share had to come home
  coldest = adversarial[adversarial >= 0]
  assert np.all(np.abs(np.asarray(replicated[0]["wi"])[coldest]).max(axis=(1, 2)) > 0)


def test_grads_without_replicas_match_dense_oracle(mesh):
  """r = 0 (`replicas=None`: no replica segment, no prefetch), the usual training call."""
  execution = moe_jax.ExecutionConfig(gmm_backend="windowed", all_to_all="padded")
  params = _params(SOFTMAX)
  x, ct = _inputs(SOFTMAX)

  def loss(params, x):
    y, stats = moe_jax.moe_apply(params, x, SOFTMAX, execution=execution, mesh=mesh)
    z, aux = LOSS_WEIGHTS
    return jnp.sum(y * ct) + z * stats.routing.z_loss + aux * stats.routing.aux_loss

  grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  keep = _keep(params, x, SOFTMAX, execution, _columns("none", SOFTMAX, None))
  want, want_x = _oracle_grad(SOFTMAX)(params, x, ct, keep)
  for name in params:
    assert helpers.rel_err(grads[name], want[name]) <= TOLERANCE, name
  assert helpers.rel_err(grad_x, want_x) <= TOLERANCE


# --- the pieces ---


def _segments(activation, counts, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3 * len(counts))
  names = ("wi", "wo", "wi_gate") if activation == "silu" else ("wi", "wo")
  shapes = {"wi": (16, 24), "wo": (24, 16), "wi_gate": (16, 24)}
  return [{k: jax.random.normal(keys[3 * i + j], (n,) + shapes[k]) for j, k in enumerate(names)}
          for i, n in enumerate(counts)]


@pytest.mark.parametrize("bulk", [True, False])
def test_windowed_vjp_matches_dense_backend(bulk):
  """Both weight segments get their gradients; whole windows, tiles, empty groups, padding rows."""
  segments = _segments("silu", (4, 2))
  sizes = jnp.array([9, 0, 3, 14, 1, 5], jnp.int32)                # 32 of 40 rows
  x = jax.random.normal(jax.random.key(1), (40, 16))
  ct = jax.random.normal(jax.random.key(2), (40, 16))

  def loss(x, segments, backend):
    y = grouped_matmul.grouped_ffn(x, sizes, segments, activation="silu", backend=backend,
                                   window=8, tail_window=2, bulk=bulk)
    return jnp.sum(y * ct)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  got, want = grad(x, segments, "windowed"), grad(x, segments, "dense")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert helpers.rel_err(a, b) <= TOLERANCE
  assert not np.any(np.asarray(got[0])[32:])                       # padding rows: no gradient


def test_windowed_forward_unchanged():
  """The differentiable backend's forward is the existing windowed code, bit for bit."""
  segments = _segments("relu", (4, 2))
  sizes = jnp.array([9, 0, 3, 14, 1, 5], jnp.int32)
  x = jax.random.normal(jax.random.key(1), (40, 16))
  new = jax.jit(lambda x, w: grouped_matmul.grouped_ffn(x, sizes, w, activation="relu",
                                                        backend="windowed"))(x, segments)
  old = jax.jit(lambda x, w: experts_cpu.windowed_ffn(x, sizes, w, "relu"))(x, segments)
  np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_ragged_exchange_vjp_matches_autodiff_of_emulation(mesh):
  """The custom VJP (reverse exchange + staging) vs plain autodiff of the all_gather emulation,
  with rows sent to several places (a replica prefetch where one expert fills many slots)."""
  columns = jnp.array([[2, 5], [0, 5], [5, -1], [2, 0]], jnp.int32)   # expert 5: 3 copies
  home = jax.random.normal(jax.random.key(3), (8, 3))
  ct = jax.random.normal(jax.random.key(4), (8, 3))
  spec = jax.sharding.PartitionSpec("expert")

  def loss(home, custom):
    def body(home, ct):
      index = jax.lax.axis_index("expert")
      params = collectives.prefetch_params(columns, 2, index)
      out = jnp.zeros((2, 3), home.dtype)
      if custom:
        out = collectives.ragged_exchange(home, out, params, mode="emulated_ragged", send_rows=8)
      else:
        out = collectives._emulated_ragged_all_to_all(   # pylint: disable=protected-access
            home, out, params.input_offsets, params.send_sizes, params.output_offsets,
            params.recv_sizes, axis_name="expert")
      return jax.lax.psum(jnp.sum(out * ct), "expert")
    sub = jax.sharding.Mesh(np.array(mesh.devices)[0], ("expert",))
    return jax.shard_map(body, mesh=sub, in_specs=(spec, spec), out_specs=jax.sharding.PartitionSpec())(
        home, ct)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  got, want = grad(home, True), grad(home, False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert np.any(np.asarray(got)[5] != 0)


def test_refresh_grads_return_home(mesh):
  """Through `refresh` (held replicas fetched from the same params, some slots re-fetched under
  its per-column `cond`), the params' gradient is still the unreplicated one."""
  execution = moe_jax.ExecutionConfig(gmm_backend="windowed", all_to_all="padded")
  params = _params(SOFTMAX)
  x, ct = _inputs(SOFTMAX)
  load = np.asarray(routing.route(x.reshape(-1, SOFTMAX.d_model), params, SOFTMAX)
                    .tokens_per_expert)
  held_columns = _columns("random", SOFTMAX, load)
  new_columns = _columns("adversarial", SOFTMAX, load)
  new_columns[:, 1] = held_columns[:, 1]                  # column 1 unchanged, column 0 fetched

  def loss(params, held, new):
    held = moe_jax.prefetch(params, held, SOFTMAX, mesh=mesh, execution=execution)
    replicas, _ = moe_jax.refresh(params, new, held, SOFTMAX, mesh=mesh, execution=execution)
    y, stats = moe_jax.moe_apply(params, x, SOFTMAX, execution=execution, mesh=mesh,
                                 replicas=replicas)
    z, aux = LOSS_WEIGHTS
    return jnp.sum(y * ct) + z * stats.routing.z_loss + aux * stats.routing.aux_loss

  got = jax.jit(jax.grad(loss))(params, held_columns, new_columns)
  keep = _keep(params, x, SOFTMAX, execution, new_columns)
  want, _ = _oracle_grad(SOFTMAX)(params, x, ct, keep)
  for name in ("wi", "wo", "wi_gate", "router"):
    assert helpers.rel_err(got[name], want[name]) <= TOLERANCE, name
