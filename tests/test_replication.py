"""The stack runner: every predictor gives identical outputs; prefetch never waits on the
previous MoE layer's output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_jax
from moe_jax import placement, predictor, replication, seed_predictor
from moe_jax.models import moe_stack
from tests import helpers

LAYERS = 3
R = 2                                  # replica slots per device (ReplicationConfig's r)
KINDS = replication.DYNAMIC_KINDS


def _rcfg(predictor_kind="none", **kw):
  return replication.ReplicationConfig(predictor=predictor_kind, num_replica_slots=R, **kw)


def _stack(mesh_shape=(2, 4), top_k=1):
  cfg = moe_jax.MoEConfig(num_experts=8, top_k=top_k, d_model=16, d_ff=32)
  params = moe_stack.init(jax.random.key(0), cfg, LAYERS)
  for layer in params["layers"]:   # skew every router towards low expert ids
    layer["moe"]["router"] = helpers.skewed_params(cfg)["router"]
  h = helpers.skewed_tokens(cfg, 4, 16)
  return cfg, params, h, moe_jax.make_mesh(*mesh_shape)


def _run(cfg, params, h, mesh, rcfg, state, **kw):
  runner = replication.StackRunner(rcfg, cfg, mesh, moe_stack.moe_layers(params), state, **kw)
  out, _ = moe_stack.forward(params, h, runner.moe_fn)
  return out, runner.records(), runner.next_state()


def _jit_run(cfg, mesh, rcfg):
  """One compilation per predictor kind; predictor params and oracle loads are arguments."""
  return jax.jit(lambda params, h, state, kw: _run(cfg, params, h, mesh, rcfg, state, **kw))


def _learned(cfg, params, reverse=False):
  routers = [l["moe"]["router"] for l in params["layers"]]
  pairs = [predictor.init_learned(jax.random.key(i), cfg.d_model, cfg.num_experts,
                                  next_router=routers[i + 1]) for i in range(LAYERS - 1)]
  if reverse:  # a deliberately wrong predictor: prefers the coldest experts
    pairs = [{"w": -p["w"], "b": p["b"]} for p in pairs]
  return {moe_stack.STACK: [dict(p, load=predictor.init_load_head(p)) for p in pairs]}


def _seed(cfg, h, adversarial=False, key=3):
  """A `SeedPrediction` of every layer: random experts, or (adversarial) every token on the
  coldest expert (the routers prefer low ids)."""
  tokens = h.shape[0] * h.shape[1]
  ids = jax.random.randint(jax.random.key(key), (LAYERS, tokens, cfg.top_k), 0, cfg.num_experts)
  if adversarial:
    ids = (cfg.num_experts - 1 - jnp.arange(cfg.top_k))[None, None, :] + jnp.zeros_like(ids)
  load = jax.vmap(lambda i: jnp.zeros(cfg.num_experts).at[i.reshape(-1)].add(1.0))(ids)
  return {moe_stack.STACK: seed_predictor.SeedPrediction(ids=ids.astype(jnp.int32), load=load,
                                                         top1=ids[:, :, 0].astype(jnp.int32))}


def _calibrated(state, cfg, adversarial=False):
  """`state` calibrated for eplb: skewed counts, or (adversarial) all on the coldest expert."""
  counts = np.tile(np.linspace(8.0, 1.0, cfg.num_experts, dtype=np.float32), (LAYERS, 1))
  if adversarial:
    counts = np.zeros_like(counts)
    counts[:, -1] = 100.0
  return replication.calibrate(state, {moe_stack.STACK: counts})


@pytest.mark.parametrize("top_k", [1, 2])
def test_every_predictor_gives_the_same_output(top_k):
  """One dynamic program runs every ahead-of-layer kind (test_dynamic_policy_matches_each_static_
  policy holds it to the static ones), including deliberately wrong learned, oracle, seed and
  eplb inputs; reactive runs its own program."""
  cfg, params, h, mesh = _stack(top_k=top_k)
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  reference, none_records, state = _jit_run(cfg, mesh, _rcfg())(params, h, state, {})
  true = jnp.stack([r.stats.tokens_per_expert for r in none_records[moe_stack.STACK]])
  oracle = {moe_stack.STACK: true.astype(jnp.float32)}
  reversed_oracle = {moe_stack.STACK: true.max() - oracle[moe_stack.STACK]}
  dynamic = _jit_run(cfg, mesh, _rcfg("dynamic"))
  good = lambda kind: (kind, _learned(cfg, params), oracle, _seed(cfg, h), _calibrated(state, cfg))
  variants = [good(kind) for kind in KINDS] + [
      ("learned", _learned(cfg, params, reverse=True), oracle, _seed(cfg, h), state),
      ("learned_load", _learned(cfg, params, reverse=True), oracle, _seed(cfg, h), state),
      ("oracle", _learned(cfg, params), reversed_oracle, _seed(cfg, h), state),
      ("seed", _learned(cfg, params), oracle, _seed(cfg, h, adversarial=True), state),
      ("eplb", _learned(cfg, params), oracle, _seed(cfg, h), _calibrated(state, cfg, True))]
  for kind, learned, loads, seed, start in variants:
    out, records, _ = dynamic(params, h, start, dict(
        learned=learned, oracle_loads=loads, seed=seed,
        policy=jnp.int32(replication.policy_index(kind))))
    _check_exact(out, reference, records, kind)
  out, records, _ = _jit_run(cfg, mesh, _rcfg("reactive"))(params, h, state, {})
  _check_exact(out, reference, records, "reactive")
  np.testing.assert_array_equal(np.stack([r.predicted_load for r in records[moe_stack.STACK]]),
                                true, "reactive places from the layer's own true loads")


def _check_exact(out, reference, records, kind):
  assert helpers.rel_err(out, reference) <= 1e-6, kind
  tables = [np.asarray(r.slot_table) for r in records[moe_stack.STACK]]
  assert all(t.shape == (4, 2 + R) for t in tables), "h = 2 home + R replica slots"
  assert any((t[:, 2:] >= 0).any() for t in tables), f"{kind} placed no replica at all"
  rows = sum(int(np.sum(np.asarray(r.stats.tokens_per_slot)[..., 2:]))
             for r in records[moe_stack.STACK])
  assert rows > 0, f"{kind}: no token-choice ran in a replica slot"


def test_approximate_mode_routes_by_the_seed_prediction():
  """route_by='prediction' (the paper's approximate mode): every layer dispatches the predicted
  experts, so the output is not the model's; it needs predictor='seed'."""
  cfg, params, h, mesh = _stack(top_k=2)
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  reference, _, _ = _jit_run(cfg, mesh, _rcfg())(params, h, state, {})
  seed = _seed(cfg, h)
  out, records, _ = _jit_run(cfg, mesh, _rcfg("seed", route_by="prediction"))(
      params, h, state, {"seed": seed})
  assert helpers.rel_err(out, reference) > 1e-3
  for layer, record in enumerate(records[moe_stack.STACK]):
    np.testing.assert_array_equal(record.stats.tokens_per_expert,
                                  seed[moe_stack.STACK].load[layer])
    np.testing.assert_array_equal(record.stats.routing.expert_ids,
                                  seed[moe_stack.STACK].ids[layer])
  with pytest.raises(ValueError, match="needs predictor='seed'"):
    _rcfg("pregate", route_by="prediction")


def test_eplb_calibration_refreshes_every_n_batches():
  cfg, params, h, mesh = _stack()
  state = _calibrated(replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts), cfg)
  first = np.asarray(state.calibration[moe_stack.STACK])
  run = _jit_run(cfg, mesh, _rcfg("eplb", eplb_refresh=2))
  _, records, state1 = run(params, h, state, {})
  true = np.stack([np.asarray(r.stats.tokens_per_expert) for r in records[moe_stack.STACK]])
  np.testing.assert_array_equal(records[moe_stack.STACK][0].predicted_load, first[0])
  np.testing.assert_array_equal(state1.calibration[moe_stack.STACK], first)     # 1 of 2 batches
  _, _, state2 = run(params, h, state1, {})
  np.testing.assert_array_equal(state2.calibration[moe_stack.STACK], 2 * true)  # refreshed
  np.testing.assert_array_equal(state2.window[moe_stack.STACK], 0 * true)
  with pytest.raises(ValueError, match="shape"):
    replication.calibrate(state, {moe_stack.STACK: np.ones((LAYERS, 3))})


def test_oracle_and_pregate_balance_better_than_none():
  cfg, params, h, mesh = _stack(mesh_shape=(1, 8))
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  run = lambda kind, **kw: _jit_run(cfg, mesh, _rcfg(kind))(params, h, state, kw)[1]
  none_records = run("none")
  true = jnp.stack([r.stats.tokens_per_expert for r in none_records[moe_stack.STACK]])
  oracle_records = run("oracle", oracle_loads={moe_stack.STACK: true.astype(jnp.float32)})
  pregate_records = run("pregate")
  for l in range(LAYERS):
    none_b = float(none_records[moe_stack.STACK][l].stats.balancedness)
    oracle_b = float(oracle_records[moe_stack.STACK][l].stats.balancedness)
    assert oracle_b > none_b
    if l > 0:
      assert float(pregate_records[moe_stack.STACK][l].stats.balancedness) > none_b


def test_history_state_is_an_ema_of_true_loads():
  cfg, params, h, mesh = _stack()
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  run = _jit_run(cfg, mesh, _rcfg("history", history_decay=0.5))
  _, records, state1 = run(params, h, state, {})
  true = np.stack([np.asarray(r.stats.tokens_per_expert) for r in records[moe_stack.STACK]])
  np.testing.assert_allclose(state1.history[moe_stack.STACK], true)
  _, records2, state2 = run(params, h * 0.5, state1, {})
  true2 = np.stack([np.asarray(r.stats.tokens_per_expert) for r in records2[moe_stack.STACK]])
  np.testing.assert_allclose(state2.history[moe_stack.STACK], 0.5 * true + 0.5 * true2)
  # The second pass's first layer used the history of the first pass.
  np.testing.assert_allclose(records2[moe_stack.STACK][0].predicted_load, true[0])


def test_prefetch_of_each_layer_does_not_depend_on_the_previous_layer_output():
  cfg, params, h, mesh = _stack()
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  rcfg = _rcfg("pregate")
  fn = lambda params, h: _run(cfg, params, h, mesh, rcfg, state)[0]
  jaxpr = jax.make_jaxpr(fn)(params, h).jaxpr
  # Top-level shard_maps in program order: per layer, the next layer's prefetch (inputs: weights +
  # table) and the layer itself. Walk them, tracking what depends on each MoE layer's output.
  calls = [e for e in jaxpr.eqns if _calls_shard_map(e)]
  layer_calls = [e for e in calls if _has_input(e, (4, 16, 16))]
  # (the placements themselves are shard_maps too, over the load and table only)
  prefetch_calls = [e for e in calls if not _has_input(e, (4, 16, 16))
                    and _has_input(e, (cfg.num_experts, cfg.d_model, cfg.d_ff))]
  assert len(layer_calls) == LAYERS
  assert len(prefetch_calls) == LAYERS, "layer 0 from history, then one per later layer"
  for l in range(LAYERS - 1):
    tainted = _forward_taint(jaxpr, set(layer_calls[l].outvars))
    prefetch_next = prefetch_calls[l + 1]
    assert not any(v in tainted for v in prefetch_next.invars if type(v).__name__ != "Literal"), (
        f"prefetch for MoE layer {l + 1} waits on MoE layer {l}'s output")


def _calls_shard_map(eqn):
  if eqn.primitive.name == "shard_map":
    return True
  for value in eqn.params.values():
    inner = getattr(value, "jaxpr", value)
    if hasattr(inner, "eqns") and any(_calls_shard_map(e) for e in inner.eqns):
      return True
  return False


def _has_input(eqn, shape):
  # The layer call takes the [B, L, d] activations; the prefetch call only weights and a table.
  return any(getattr(v.aval, "shape", ()) == shape for v in eqn.invars
             if type(v).__name__ != "Literal")


def _forward_taint(jaxpr, tainted):
  tainted = set(tainted)
  for eqn in jaxpr.eqns:
    if any(type(v).__name__ != "Literal" and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return tainted


def test_dynamic_policy_matches_each_static_policy():
  cfg, params, h, mesh = _stack(mesh_shape=(1, 8))
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  _, none_records, state = _jit_run(cfg, mesh, _rcfg())(params, h, state, {})
  true = jnp.stack([r.stats.tokens_per_expert for r in none_records[moe_stack.STACK]])
  oracle = {moe_stack.STACK: true.astype(jnp.float32)}
  learned = _learned(cfg, params)
  dynamic = _jit_run(cfg, mesh, _rcfg("dynamic"))
  seed = _seed(cfg, h)
  state = _calibrated(state, cfg)
  for kind in replication.DYNAMIC_KINDS:
    kw = {"learned": learned, "oracle_loads": oracle, "seed": seed}
    policy = jnp.int32(replication.policy_index(kind))
    _, got, _ = dynamic(params, h, state, dict(kw, policy=policy))
    static_kw = {"learned": {"learned": learned}, "learned_load": {"learned": learned},
                 "oracle": {"oracle_loads": oracle},
                 "seed": {"seed": seed},
                 "hybrid": {"learned": learned, "seed": seed}}.get(kind, {})
    _, want, _ = _jit_run(cfg, mesh, _rcfg(kind))(params, h, state, static_kw)
    for a, b in zip(got[moe_stack.STACK], want[moe_stack.STACK]):
      np.testing.assert_array_equal(a.slot_table, b.slot_table)
      np.testing.assert_allclose(a.predicted_load, b.predicted_load)


def _held_replicas_match_home(state, params, cfg, mesh):
  """Every held replica slot holds exactly its table's expert's home weights (zeros if empty)."""
  num_devices = mesh.shape["expert"]
  h = cfg.num_experts // num_devices
  for layer, held in zip(params["layers"], state.replicas[moe_stack.STACK]):
    table = np.asarray(held.slot_table)
    r = placement.num_replica_slots(table, cfg.num_experts)
    assert r == R and held.num_replica_slots == R, "the held replicas are R slots wide"
    for name, weights in held.weights.items():
      home, weights = np.asarray(layer["moe"][name]), np.asarray(weights)
      assert weights.shape == (num_devices * r,) + home.shape[1:]
      for dev in range(num_devices):
        for c in range(r):
          expert = table[dev, h + c]
          want = home[expert] if expert >= 0 else np.zeros_like(home[0])
          np.testing.assert_array_equal(weights[dev * r + c], want)


@pytest.mark.parametrize("kind,stickiness", [("history", 0.0), ("pregate", 0.3)])
def test_resident_replicas_keep_outputs_and_fetch_only_changed_slots(kind, stickiness):
  """Across drifting batches, resident replicas give the none policy's output at every step, hold
  the right weights, and count as fetched only the slots whose expert changed."""
  cfg, params, _, mesh = _stack()
  rcfg = _rcfg(kind, resident=True, stickiness=stickiness)
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  state = replication.with_resident_replicas(state, moe_stack.moe_layers(params), cfg, R, mesh)
  structure = jax.tree.structure(state)
  none, run = _jit_run(cfg, mesh, _rcfg()), _jit_run(cfg, mesh, rcfg)
  expert_bytes = 2 * cfg.d_model * cfg.d_ff * 4 * mesh.shape["data"]
  fetched_any = False
  for step in range(4):
    h = helpers.skewed_tokens(cfg, 4, 16, seed=10 + step % 2)   # batches alternate: loads drift
    held_tables = np.asarray(state.tables[moe_stack.STACK])
    out, records, state = run(params, h, state, {})
    assert jax.tree.structure(state) == structure
    assert helpers.rel_err(out, none(params, h, replication.init_state(
        {moe_stack.STACK: LAYERS}, cfg.num_experts), {})[0]) <= 1e-6, step
    _held_replicas_match_home(state, params, cfg, mesh)
    for l, record in enumerate(records[moe_stack.STACK]):
      new, old = np.asarray(record.slot_table)[:, 2:], held_tables[l][:, 2:]
      changed = np.sum((new != old) & (new >= 0))
      assert float(record.fetched_bytes) == changed * expert_bytes, (step, l)
      fetched_any |= changed > 0
  assert fetched_any, "no replica was ever placed: the test shows nothing"


def test_sticky_resident_tables_move_nothing_on_a_repeated_batch():
  cfg, params, h, mesh = _stack()
  rcfg = _rcfg("pregate", resident=True, stickiness=0.5)
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)  # filled lazily
  run = _jit_run(cfg, mesh, rcfg)
  _, first, state = run(params, h, state, {})
  _, _, state = run(params, h, state, {})    # the first layer's history now knows the loads
  _, second, _ = run(params, h, state, {})
  assert sum(float(r.fetched_bytes) for r in first[moe_stack.STACK]) > 0
  assert [float(r.fetched_bytes) for r in second[moe_stack.STACK]] == [0.0] * LAYERS
  for a, b in zip(first[moe_stack.STACK][1:], second[moe_stack.STACK][1:]):
    np.testing.assert_array_equal(a.slot_table, b.slot_table)


def test_stickiness_needs_resident_replicas():
  with pytest.raises(ValueError, match="resident=True"):
    replication.ReplicationConfig(predictor="history", stickiness=0.2)
  with pytest.raises(ValueError, match=r"stickiness=1.5 must be in \[0, 1\)"):
    replication.ReplicationConfig(predictor="history", resident=True, stickiness=1.5)


def test_zero_replica_slots_place_nothing():
  """r = 0 in the ReplicationConfig: a replicating predictor runs home slots only, its records
  hold home-only tables (width h), and the output is the none policy's."""
  cfg, params, h, mesh = _stack()
  state = replication.init_state({moe_stack.STACK: LAYERS}, cfg.num_experts)
  rcfg = replication.ReplicationConfig(predictor="pregate", num_replica_slots=0)
  out, records, _ = _jit_run(cfg, mesh, rcfg)(params, h, state, {})
  reference, _, _ = _jit_run(cfg, mesh, _rcfg())(params, h, state, {})
  np.testing.assert_array_equal(out, reference)
  for record in records[moe_stack.STACK]:
    np.testing.assert_array_equal(record.slot_table, moe_jax.home_slot_table(8, 4))
    assert float(record.fetched_bytes) == 0.0
