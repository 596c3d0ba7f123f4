"""The simulator's cost model on hand-computed cases."""

import os

import numpy as np
import pytest

from moe_jax import sim
from moe_jax.sim import cost, policies, traces

# d=2, f=4, two matrices: 2 * 2 * 4 * 2 = 32 FLOPs per choice; 2 * 4 * 2 * 2 = 32 weight bytes per
# expert; 2 * 2 = 4 bytes per token row.
SHAPE = sim.ExpertShape("tiny", d_model=2, d_ff=4, num_experts=4, top_k=1, param_bytes=2,
                        act_bytes=2)
CLUSTER = sim.Cluster("unit", flops_per_s=32.0, hbm_bytes_per_s=32.0, a2a_bytes_per_s=2.0,
                      latency_s=1.0, padded_all_to_all=False, overlap_prefetch=True)
# 2 devices x (2 home + 1 replica slot); expert 2 (home: device 1) is copied onto device 0.
TABLE = np.array([[0, 1, 2], [2, 3, -1]])
TOKENS = np.array([10.0, 0.0, 6.0, 4.0])


def test_shape_arithmetic():
  assert SHAPE.flops_per_choice == 32 and SHAPE.expert_bytes == 32 and SHAPE.token_bytes == 4
  gated = SHAPE.replace(gated=True)
  assert gated.flops_per_choice == 48 and gated.expert_bytes == 48


def test_tokens_split_evenly_over_copies():
  np.testing.assert_allclose(cost.device_tokens(TOKENS, TABLE), [10 + 0 + 3, 3 + 4])


def test_gemm_is_the_slower_of_compute_and_weight_reads():
  # Compute: 13 and 7 choices * 32 FLOPs / 32 FLOP/s. Weights: 2 active slots each (expert 1 has
  # no tokens) * 32 bytes / 32 B/s = 2 s.
  np.testing.assert_allclose(cost.gemm_seconds(TOKENS, TABLE, SHAPE, CLUSTER), [13.0, 7.0])
  slow_memory = CLUSTER.replace(hbm_bytes_per_s=1.0)
  np.testing.assert_allclose(cost.gemm_seconds(TOKENS, TABLE, SHAPE, slow_memory), [64.0, 64.0])


def test_ragged_all_to_all_moves_what_leaves_and_arrives():
  # Each device is the source of 10 choices. Device 0 computes 13 of 20 (share 0.65): it sends
  # 10 * 0.35 = 3.5 rows and receives 13 * (1 - 1/2) = 6.5; device 1 sends 6.5, receives 3.5.
  # 6.5 rows * 4 B / 2 B/s + 1 s latency = 14 s.
  np.testing.assert_allclose(cost.all_to_all_seconds(TOKENS, TABLE, 10, SHAPE, CLUSTER),
                             [14.0, 14.0])


def test_padded_all_to_all_sends_worst_case_buffers():
  # (De - 1) * 10 rows * 4 B / 2 B/s + 1 s, whatever the routing.
  padded = CLUSTER.replace(padded_all_to_all=True)
  np.testing.assert_allclose(cost.all_to_all_seconds(TOKENS, TABLE, 10, SHAPE, padded),
                             [21.0, 21.0])
  assert cost.all_to_all_seconds(TOKENS, np.array([[0, 1, 2, 3]]), 10, SHAPE, CLUSTER)[0] == 0


def test_prefetch_seconds():
  # One replica (expert 2: device 1 -> device 0): 32 B / 2 B/s + 1 s.
  assert cost.prefetch_seconds(TABLE, SHAPE, CLUSTER) == pytest.approx(17.0)
  # Two replicas of device 0's experts onto device 1: device 0 sends 64 B -> 32 s + 1 s.
  two = np.array([[0, 1, -1, -1], [2, 3, 0, 1]])
  assert cost.prefetch_seconds(two, SHAPE, CLUSTER) == pytest.approx(33.0)
  # Padded: every device sends r = 2 cells to its one peer, filled or not: 64 B -> 33 s.
  empty = np.array([[0, 1, -1, -1], [2, 3, -1, -1]])
  padded = CLUSTER.replace(padded_all_to_all=True)
  assert cost.prefetch_seconds(empty, SHAPE, padded) == pytest.approx(33.0)
  assert cost.prefetch_seconds(empty, SHAPE, CLUSTER) == 0.0
  assert cost.prefetch_seconds(TABLE, SHAPE, CLUSTER, replicating=False) == 0.0


def test_layer_cost_adds_the_phases_and_takes_the_slowest_row():
  shape = SHAPE.replace(dense_flops_per_token=16.0)
  rows = np.stack([TOKENS, TOKENS[[1, 0, 2, 3]]])      # row 1: expert 1 is the hot one
  layer = cost.layer_cost(rows, TABLE, 10, shape, CLUSTER, assemble_weights=True)
  # dense 10 * 16 / 32 = 5 s; dispatch = combine = 14 s; gemm: max over rows and devices = 13 s;
  # assembling 3 slots' weights: read + write 2 * 3 * 32 B / 32 B/s = 6 s.
  assert layer.dense_s == pytest.approx(5.0)
  assert layer.dispatch_s == pytest.approx(14.0) and layer.combine_s == pytest.approx(14.0)
  assert layer.gemm_s == pytest.approx(13.0) and layer.assemble_s == pytest.approx(6.0)
  assert layer.time_s == pytest.approx(5 + 14 + 13 + 6 + 14)
  in_place = cost.layer_cost(rows, TABLE, 10, shape, CLUSTER)        # the default: in place
  assert in_place.assemble_s == 0 and in_place.time_s == pytest.approx(5 + 14 + 13 + 14)
  assert layer.prefetch_s == pytest.approx(17.0)
  np.testing.assert_allclose(layer.device_tokens, [[13, 7], [13, 7]])


def test_step_cost_hides_prefetch_behind_the_previous_layer():
  layers = [cost.LayerCost(10.0, 0, 0, 10.0, 0, 0, 3.0, np.array([[1.0]])),
            cost.LayerCost(5.0, 0, 0, 5.0, 0, 0, 12.0, np.array([[2.0]]))]
  overlapped = cost.step_cost(layers, CLUSTER)
  # Layer 0's prefetch has nothing to hide behind (3 s); layer 1's hides 10 of its 12 s.
  assert overlapped.time_s == pytest.approx(10 + 5 + 3 + 2)
  np.testing.assert_allclose(overlapped.exposed_prefetch_s, [3.0, 2.0])
  serial = cost.step_cost(layers, CLUSTER.replace(overlap_prefetch=False))
  assert serial.time_s == pytest.approx(10 + 5 + 3 + 12)


def test_mesh_axes():
  assert sim.mesh_axes(8, 128) == (1, 8)
  assert sim.mesh_axes(256, 128) == (2, 128)
  assert sim.mesh_axes(256, 256) == (1, 256)
  with pytest.raises(ValueError, match="power-of-two"):
    sim.mesh_axes(6, 128)


def test_history_is_an_ema_of_previous_steps():
  true = np.array([[[2.0, 0.0]], [[4.0, 2.0]], [[0.0, 0.0]]])         # [S=3, L=1, E=2]
  est = policies.history_estimates(true, decay=0.5)
  np.testing.assert_allclose(est[:, 0], [[0, 0], [2, 0], [3, 1]])


def test_pregate_uses_history_for_the_first_layer():
  true = np.ones((3, 2, 4))
  predicted = {"pregate": np.full((3, 2, 4), 7.0)}
  est = policies.estimates("pregate", true, predicted)
  np.testing.assert_allclose(est[:, 1], 7.0)
  np.testing.assert_allclose(est[:, 0], policies.history_estimates(true, 0.8)[:, 0])
  assert policies.estimates("none", true, predicted) is None
  with pytest.raises(ValueError, match=r"no recorded 'learned'.*moe_jax\.bench\.record"):
    policies.estimates("learned", true, predicted)


def test_simulate_unscaled_trace_matches_the_hand_sum():
  # 2 steps, 1 layer, E = 4 on 2 devices with 1 replica slot each; experts 0 and 1 (device 0) hot.
  true = np.array([[[12.0, 4.0, 2.0, 2.0]], [[12.0, 4.0, 2.0, 2.0]]])
  trace = traces.Trace(true_load=true, predicted={}, tokens_per_step=20, top_k=1)
  shape = SHAPE.replace(num_experts=4)
  out = sim.simulate(trace, shape, CLUSTER, 2, policies=("none", "oracle"), num_replica_slots=1,
                     warmup_steps=0)
  # none: device loads 16 / 4; T_dev = 10; device 0 sends 10 * (1 - 0.8) = 2, receives 8 rows.
  a2a = 8 * 4 / 2 + 1
  assert out["none"].mean_step_s == pytest.approx(2 * a2a + 16 * 32 / 32)
  # oracle: expert 0 copied to device 1 -> loads 6 + 4 = 10 and 6 + 2 + 2 = 10: ideal speedup 1.6.
  assert out["oracle"].ideal_speedup == pytest.approx(16 / 10)
  assert out["none"].ideal_speedup == pytest.approx(1.0) and out["none"].speedup == 1.0
  oracle_a2a = 5 * 4 / 2 + 1           # + 17 s prefetch (weights read in place: no assembly)
  assert out["oracle"].mean_step_s == pytest.approx(2 * oracle_a2a + 10 + 17.0)


def test_resampled_rows_keep_the_mix_and_the_count():
  true = np.array([[[30.0, 10.0, 0.0, 60.0]]])
  rows = traces.resample_rows(true, 100_000, 3, np.random.default_rng(0))
  assert rows.shape == (1, 1, 3, 4)
  np.testing.assert_array_equal(rows.sum(-1), 100_000)
  np.testing.assert_allclose(rows[0, 0] / 100_000, np.tile([0.3, 0.1, 0.0, 0.6], (3, 1)),
                             atol=0.01)


def test_trace_round_trip(tmp_path):
  trace = traces.Trace(true_load=np.arange(24.0).reshape(2, 3, 4),
                       predicted={"pregate": np.ones((2, 3, 4))}, tokens_per_step=8, top_k=2,
                       meta={"source": "test"})
  traces.save(tmp_path / "t.npz", trace)
  back = traces.load(tmp_path / "t.npz")
  np.testing.assert_array_equal(back.true_load, trace.true_load)
  np.testing.assert_array_equal(back.predicted["pregate"], 1.0)
  assert (back.tokens_per_step, back.top_k, back.meta) == (8, 2, {"source": "test"})
  with pytest.raises(ValueError, match="like true_load"):
    traces.Trace(true_load=np.ones((2, 3, 4)), predicted={"x": np.ones((2, 3))},
                 tokens_per_step=1, top_k=1)


def test_validation_recosts_measured_runs_with_their_own_tables():
  from moe_jax.sim import validate
  loads = np.array([[[12.0, 4.0, 2.0, 2.0]]])                       # [N=1, L=1, E]
  home = np.array([[[[0, 1, -1], [2, 3, -1]]]])                     # [N, L, De, h + r]
  copied = np.array([[[[0, 1, -1], [2, 3, 0]]]])
  runs = {"none": {"seconds": np.array([40.0]), "tokens_per_expert": loads, "slot_table": home},
          "oracle": {"seconds": np.array([40.0]), "tokens_per_expert": loads,
                     "slot_table": copied}}
  modelled = validate.simulate_runs(runs, SHAPE, CLUSTER, tokens_per_device=10)
  assert modelled["none"][0] == pytest.approx(2 * (8 * 4 / 2 + 1) + 16)
  assert modelled["oracle"][0] == pytest.approx(2 * (5 * 4 / 2 + 1) + 10 + 17)
  rows = validate.compare(runs, modelled)
  assert rows["none"]["error"] == pytest.approx(modelled["none"][0] / 40 - 1)
  assert rows["none"]["error_vs_min"] == rows["none"]["error"]
  assert rows["oracle"]["simulated_speedup"] == pytest.approx(modelled["none"][0]
                                                              / modelled["oracle"][0])


def test_validation_of_a_resident_run_moves_only_changed_slots():
  from moe_jax.sim import validate
  loads = np.array([[[12.0, 4.0, 2.0, 2.0]]] * 2)                   # two identical steps
  copied = np.array([[[[0, 1, -1], [2, 3, 0]]]] * 2)
  runs = {"oracle": {"seconds": np.array([40.0, 40.0]), "tokens_per_expert": loads,
                     "slot_table": copied}}
  refetch = validate.simulate_runs(runs, SHAPE, CLUSTER, tokens_per_device=10)["oracle"]
  resident = validate.simulate_runs(runs, SHAPE, CLUSTER, tokens_per_device=10,
                                    resident=True)["oracle"]
  np.testing.assert_allclose(refetch, [49.0, 49.0])
  np.testing.assert_allclose(resident, [49.0, 49.0 - 17.0])    # step 2 holds expert 0 already


def test_resident_replicas_move_only_changed_slots():
  two = np.array([[0, 1, -1, -1], [2, 3, 0, 1]])
  same_first = np.array([[0, 1, -1, -1], [2, 3, 0, -1]])
  # Expert 0 is already on device 1: only expert 1 moves (32 B / 2 B/s + 1 s).
  assert cost.prefetch_seconds(two, SHAPE, CLUSTER, previous_table=same_first) == pytest.approx(17)
  assert cost.prefetch_seconds(two, SHAPE, CLUSTER, previous_table=two) == 0.0


def test_a_replica_moved_to_another_column_of_the_same_device_does_not_move():
  before = np.array([[0, 1, -1, -1], [2, 3, 1, 0]])
  after = np.array([[0, 1, -1, -1], [2, 3, 0, 1]])
  assert cost.prefetch_seconds(after, SHAPE, CLUSTER, previous_table=before) == 0.0


def test_sticky_tables_keep_a_table_unless_the_new_one_gains_enough():
  from moe_jax import placement
  held = np.array([[0, 1, 2], [2, 3, 0]])                 # replicas of experts 2 and 0
  fresh = np.array([[0, 1, -1], [2, 3, 0]])               # only expert 0 copied
  tables = np.stack([held, fresh])[:, None]               # [S=2, L=1, De, h + r]
  estimate = np.array([[[4.0, 4.0, 1.0, 1.0]], [[6.0, 2.0, 1.0, 1.0]]])
  # Step 1: held -> device loads 3 + 2 + 0.5 and 0.5 + 1 + 3 (max 5.5); fresh -> 5 and 5: a 9% gain.
  loads = lambda t: np.asarray(placement.device_load(estimate[1, 0].astype(np.float32), t))
  assert loads(held).max() == pytest.approx(5.5) and loads(fresh).max() == pytest.approx(5.0)
  np.testing.assert_array_equal(policies.sticky_tables(tables, estimate, 0.0), tables)
  np.testing.assert_array_equal(policies.sticky_tables(tables, estimate, 0.05)[1, 0], fresh)
  np.testing.assert_array_equal(policies.sticky_tables(tables, estimate, 0.2)[1, 0], held)
  trace = traces.Trace(true_load=estimate, predicted={}, tokens_per_step=20, top_k=1)
  with pytest.raises(ValueError, match="resident_replicas=True"):
    sim.simulate(trace, SHAPE.replace(num_experts=4), CLUSTER, 2, stickiness=0.1)


# --- decode: weight reads of the slots that got rows + per-row compute -------------------------
# With CLUSTER's defaults (decode rates = hbm / flops): one read 32 B / 32 B/s = 1 s, one row
# 32 FLOPs / 32 FLOP/s = 1 s.


def test_slot_rows_deal_whole_rows_over_copies_in_table_order():
  # Expert 2's 6 choices: 3 to device 0's replica slot (first in row-major order), 3 home.
  np.testing.assert_array_equal(cost.slot_rows(TOKENS, TABLE), [[10, 0, 3], [3, 4, 0]])
  # One choice of a copied expert goes to its first copy only; leading axes broadcast.
  one = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
  np.testing.assert_array_equal(cost.slot_rows(one, TABLE),
                                [[[0, 0, 1], [0, 0, 0]], [[0, 0, 2], [1, 0, 0]]])


def test_decode_charges_a_replica_read_to_its_holder_and_no_read_to_an_idle_expert():
  rows = cost.slot_rows(TOKENS, TABLE)
  # Device 0: reads experts 0 and its replica of 2 (expert 1 has no rows: no read) + 13 rows.
  # Device 1: reads experts 2 and 3 + 7 rows.
  np.testing.assert_allclose(cost.decode_seconds(rows, SHAPE, CLUSTER), [2 + 13, 2 + 7])
  # The replica's single row: device 0 pays the read, device 1 (home of expert 2) reads nothing.
  lone = cost.slot_rows(np.array([0.0, 0.0, 1.0, 0.0]), TABLE)
  np.testing.assert_allclose(cost.decode_seconds(lone, SHAPE, CLUSTER), [1 + 1, 0])
  # Fitted decode rates: 16 B/s (2 s per read), 64 FLOP/s (0.5 s per row).
  fitted = CLUSTER.replace(decode_bytes_per_s=16.0, decode_flops_per_s=64.0)
  np.testing.assert_allclose(cost.decode_seconds(rows, SHAPE, fitted), [4 + 6.5, 4 + 3.5])
  with pytest.raises(ValueError, match="decode_bytes_per_s must be > 0 or None"):
    CLUSTER.replace(decode_bytes_per_s=0.0)


def test_decode_layer_cost_uses_measured_rows_per_slot_when_given():
  layer = cost.layer_cost(TOKENS[None], TABLE, 10, SHAPE, CLUSTER, phase="decode")
  # gemm = slowest device 15 s; dispatch = combine = 14 s (as in prefill).
  assert layer.gemm_s == pytest.approx(15.0) and layer.time_s == pytest.approx(14 + 15 + 14)
  np.testing.assert_allclose(layer.device_tokens, [[13, 7]])
  measured = np.array([[[10, 0, 6], [0, 4, 0]]])      # the replica took all 6 rows of expert 2
  layer = cost.layer_cost(TOKENS[None], TABLE, 10, SHAPE, CLUSTER, phase="decode",
                          rows_per_slot=measured)
  assert layer.gemm_s == pytest.approx(2 + 16)           # device 1 reads only expert 3
  with pytest.raises(ValueError, match="decode input"):
    cost.layer_cost(TOKENS[None], TABLE, 10, SHAPE, CLUSTER, rows_per_slot=measured)
  with pytest.raises(ValueError, match="phase='train'"):
    cost.layer_cost(TOKENS[None], TABLE, 10, SHAPE, CLUSTER, phase="train")


def test_simulate_decode_pays_the_replica_read_that_prefill_hides():
  true = np.array([[[12.0, 4.0, 2.0, 2.0]], [[12.0, 4.0, 2.0, 2.0]]])
  trace = traces.Trace(true_load=true, predicted={}, tokens_per_step=20, top_k=1)
  out = sim.simulate(trace, SHAPE, CLUSTER, 2, policies=("none", "oracle"), num_replica_slots=1,
                     warmup_steps=0, phase="decode")
  # none: device 0 reads experts 0 and 1 and computes 16 rows; a2a 17 s each way.
  assert out["none"].mean_step_s == pytest.approx(2 * 17 + 2 + 16)
  # oracle: expert 0 copied to device 1 (6 + 6 rows): device 1 reads 3 experts + 10 rows = 13 s;
  # a2a 11 s each way, 17 s prefetch: the balance the ideal promises (1.6x) is spent on reads.
  assert out["oracle"].ideal_speedup == pytest.approx(1.6)
  assert out["oracle"].mean_step_s == pytest.approx(2 * 11 + 13 + 17)
  assert out["oracle"].speedup == pytest.approx(52 / 52)


def test_padded_resident_prefetch_moves_only_the_changed_columns():
  padded = CLUSTER.replace(padded_all_to_all=True)
  before = np.array([[0, 1, -1, -1], [2, 3, 0, -1]])
  after = np.array([[0, 1, -1, -1], [2, 3, 0, 1]])        # only column 1 changed
  # One column exchanged: (De - 1) * 32 B / 2 B/s + 1 s latency.
  assert cost.prefetch_seconds(after, SHAPE, padded, previous_table=before) == pytest.approx(17)
  assert cost.prefetch_seconds(after, SHAPE, padded, previous_table=after) == 0.0
  assert cost.prefetch_seconds(after, SHAPE, padded) == pytest.approx(33)   # refetch: both


def test_validation_of_a_decode_run_uses_its_measured_rows_and_states_speedup_errors():
  from moe_jax.sim import validate
  loads = np.array([[[12.0, 4.0, 2.0, 2.0]]])
  home = np.array([[[[0, 1, -1], [2, 3, -1]]]])
  copied = np.array([[[[0, 1, -1], [2, 3, 0]]]])
  runs = {"none": {"seconds": np.array([60.0]), "tokens_per_expert": loads, "slot_table": home,
                   "tokens_per_slot": np.array([[[[[12, 4, 0], [2, 2, 0]]]]])},
          "oracle": {"seconds": np.array([40.0]), "tokens_per_expert": loads,
                     "slot_table": copied,
                     "tokens_per_slot": np.array([[[[[2, 4, 0], [2, 2, 10]]]]])}}
  modelled = validate.simulate_runs(runs, SHAPE, CLUSTER, tokens_per_device=10, phase="decode")
  assert modelled["none"][0] == pytest.approx(2 * 17 + 2 + 16)
  # Measured rows: device 1 reads 3 experts + 14 rows = 17 s; a2a from the loads: 11 s each way.
  assert modelled["oracle"][0] == pytest.approx(2 * 11 + 17 + 17)
  rows = validate.compare(runs, modelled)
  assert rows["oracle"]["measured_paired_speedup"] == pytest.approx(1.5)
  assert rows["oracle"]["speedup_error"] == pytest.approx((52 / 56) / 1.5 - 1)


def test_decode_fit_returns_positive_rates():
  from moe_jax.sim import fit
  read, row = fit.decode_fit(8, 16, rows=(1, 4), min_bytes=1 << 12, repeats=1)
  assert read > 0 and row > 0 and np.isfinite(read) and np.isfinite(row)


def test_decoder_traces_of_generation_have_one_step_per_prompt_pass_and_decode_pass():
  import moe_jax
  from moe_jax import models
  from moe_jax.sim import decoder_traces
  path = os.path.join(os.path.dirname(__file__), "fixtures", "decoder", "qwen3_moe")
  model = models.from_pretrained(path, mesh=moe_jax.make_mesh(data=1, expert=2))
  num_layers, experts, k = 2, model.config.num_experts, model.moe_config.top_k
  rng = np.random.default_rng(0)
  batches = [(rng.integers(3, 60, (2, 4)).astype(np.int32), np.ones((2, 4), np.int32))
             for _ in range(2)]
  prefill, decode = decoder_traces.record(model, batches, max_new_tokens=3, meta={"x": 1})
  assert prefill.true_load.shape == (2, num_layers, experts)           # one step per batch
  assert decode.true_load.shape == (2 * 3, num_layers, experts)        # 3 decode passes each
  np.testing.assert_array_equal(prefill.true_load.sum(-1), 2 * 4 * k)  # B * P tokens x top-k
  np.testing.assert_array_equal(decode.true_load.sum(-1), 2 * k)       # B tokens x top-k
  assert (prefill.tokens_per_step, decode.tokens_per_step, decode.top_k) == (8, 2, k)
  assert decode.predicted["pregate"].shape == decode.true_load.shape
  np.testing.assert_allclose(decode.predicted["pregate"][:, 1].sum(-1), 2 * k)   # layer 1
  assert (prefill.meta["phase"], decode.meta["phase"], decode.meta["x"]) == ("prefill", "decode",
                                                                             1)
  with pytest.raises(ValueError, match="at least one predictor"):
    decoder_traces.record(model, batches, max_new_tokens=3, predictors=())


def test_a_fitted_layer_overhead_is_added_to_every_layer_in_both_phases():
  slow = CLUSTER.replace(layer_overhead_s=2.0)
  for phase in ("prefill", "decode"):
    base = cost.layer_cost(TOKENS[None], TABLE, 10, SHAPE, CLUSTER, phase=phase)
    layer = cost.layer_cost(TOKENS[None], TABLE, 10, SHAPE, slow, phase=phase)
    assert layer.time_s == pytest.approx(base.time_s + 2.0) and layer.overhead_s == 2.0
  with pytest.raises(ValueError, match="layer_overhead_s must be >= 0"):
    CLUSTER.replace(layer_overhead_s=-1.0)
