"""What gets lowered: the ragged collective on request, the padded fallback on CPU by default."""

import re

import jax
import jax.numpy as jnp

import moe_jax
from moe_jax import replication
from moe_jax.models import moe_stack
from tests import helpers


def _lowered_text(cfg, mesh, execution=None, jaxpr=False):
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 8)
  fn = jax.jit(lambda p, x: moe_jax.moe_apply(p, x, cfg, execution=execution, mesh=mesh)[0])
  if jaxpr:
    return str(jax.make_jaxpr(fn)(params, x))
  return fn.lower(params, x).as_text()


def test_ragged_all_to_all_is_lowered_when_selected():
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32)
  execution = moe_jax.ExecutionConfig(all_to_all="ragged", gmm_backend="ragged_dot")
  mesh = moe_jax.make_mesh(2, 4)
  assert "ragged_all_to_all" in _lowered_text(cfg, mesh, execution)
  # XLA:CPU's lowering expands ragged_dot into dense ops, so look for it one level up.
  assert "ragged_dot" in _lowered_text(cfg, mesh, execution, jaxpr=True)


def test_cpu_default_uses_padded_all_to_all_and_no_ragged_ops():
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32)
  text = _lowered_text(cfg, moe_jax.make_mesh(2, 4))
  assert jax.default_backend() == "cpu"
  assert "all_to_all" in text
  assert "ragged_all_to_all" not in text
  assert "ragged_dot" not in _lowered_text(cfg, moe_jax.make_mesh(2, 4), jaxpr=True)


def _collectives(compiled_text):
  """Counts of all-gather and all-reduce ops in compiled HLO (all-to-alls excluded: the replica
  prefetch adds its own, inside its `cond`)."""
  ops = re.findall(r"\ball-(gather|reduce)(?:-start)?\(", compiled_text)
  return {kind: ops.count(kind) for kind in ("gather", "reduce")}


def test_replica_placement_adds_no_collective_to_the_stack():
  """History placement with resident replicas runs on every device whole (`on_every_device`):
  left to sharding propagation, its [De, h + r] tables were split over 'expert' and gathered back:
  15 all-gathers and 4 all-reduces for these 3 layers against none's 6 and 1 (when the router's
  top-k still gathered its input too), each a device-wide sync point."""
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32)
  mesh = moe_jax.make_mesh(1, 2)
  params = moe_stack.init(jax.random.key(0), cfg, 3)
  h = helpers.skewed_tokens(cfg, 4, 8)

  def compiled(rcfg):
    state = replication.init_state({moe_stack.STACK: 3}, cfg.num_experts)
    if rcfg.resident:
      state = replication.with_resident_replicas(state, moe_stack.moe_layers(params), cfg,
                                                 rcfg.num_replica_slots, mesh)

    def step(params, h, state):
      runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(params), state)
      return moe_stack.forward(params, h, runner.moe_fn)[0], runner.next_state()
    return jax.jit(step).lower(params, h, state).compile().as_text()

  none = _collectives(compiled(replication.ReplicationConfig()))
  history = _collectives(compiled(replication.ReplicationConfig(
      predictor="history", num_replica_slots=2, resident=True, stickiness=0.1)))
  assert none["gather"] > 0, none        # the layers' own count all-gathers are seen
  assert history == none


def test_refresh_updates_held_replicas_in_place():
  """A padded refresh rewrites the changed replica column inside its `cond`, in place: no copy of
  a whole held replica buffer (the global masked scatter it replaced copied each weight's buffer
  into and out of the branch: 8 copies here), and every exchange stays inside a `cond`."""
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32)
  mesh = moe_jax.make_mesh(1, 2)
  params = moe_jax.init_moe_params(jax.random.key(0), cfg)
  held = moe_jax.empty_replicas(params, 2, mesh=mesh)
  new = jnp.array([[4, -1], [0, 1]], jnp.int32)

  def refresh(params, new, held):
    return moe_jax.refresh(params, new, held, cfg, mesh=mesh)
  text = jax.jit(refresh, donate_argnums=2).lower(params, new, held).compile().as_text()
  buffers = {f"f32[2,{a},{b}]" for a, b in ((16, 32), (32, 16))}   # one device's [r, ...] weights
  copies = [line for line in text.splitlines()
            if " copy(" in line and line.split("= ")[1].split("{")[0] in buffers]
  assert not copies, copies
  entry = text[text.index("\nENTRY"):]
  assert "all-to-all(" not in entry.split("\n}\n")[0]         # exchanges only in the branches
  assert "all-to-all(" in text


def test_routing_keeps_tokens_sharded():
  """A layer's only all-gather is its own count exchange: the router's top-k runs on the sharded
  tokens (`lax.top_k` made the SPMD partitioner gather the whole [T, E] router output first)."""
  cfg = moe_jax.MoEConfig(num_experts=8, d_model=16, d_ff=32, top_k=2)
  mesh = moe_jax.make_mesh(1, 2)
  params = helpers.skewed_params(cfg)
  x = helpers.skewed_tokens(cfg, 4, 8)
  text = jax.jit(lambda p, x: moe_jax.moe_apply(p, x, cfg, mesh=mesh)[0]).lower(
      params, x).compile().as_text()
  assert _collectives(text)["gather"] == 1, _collectives(text)
