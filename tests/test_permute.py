"""Slot assignment and the all-to-all size/offset arithmetic, on hand-built and random cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import permute
from moe_jax import placement

HAND_COUNTS = np.array([[1, 2, 0, 3],    # source 0 -> global slots (dev0: 0,1 | dev1: 2,3)
                        [2, 0, 1, 1]])   # source 1


def _plan(counts, index, s):
  p = permute.exchange_plan(jnp.asarray(counts), index, s)
  return {k: np.asarray(v).tolist() for k, v in [
      ("in", p.dispatch.input_offsets), ("send", p.dispatch.send_sizes),
      ("out", p.dispatch.output_offsets), ("recv", p.dispatch.recv_sizes),
      ("c_in", p.combine.input_offsets), ("c_send", p.combine.send_sizes),
      ("c_out", p.combine.output_offsets), ("c_recv", p.combine.recv_sizes),
      ("groups", p.group_sizes)]}


def test_exchange_plan_hand_built_device0():
  p = _plan(HAND_COUNTS, 0, 2)
  assert p["in"] == [0, 1, 3, 3] and p["send"] == [1, 2, 0, 3]
  # Receiver 0 lays slot 0 out as [src0 x1, src1 x2] then slot 1 as [src0 x2]; receiver 1 lays
  # slot 0 as [src1 x1], slot 1 as [src0 x3, src1 x1].
  assert p["out"] == [0, 3, 0, 1]
  assert p["recv"] == [1, 2, 2, 0]
  assert p["groups"] == [3, 2]
  assert p["c_in"] == [0, 3, 1, 5] and p["c_send"] == [1, 2, 2, 0]
  assert p["c_out"] == [0, 1, 0, 2] and p["c_recv"] == [1, 2, 0, 3]


def test_exchange_plan_hand_built_device1():
  p = _plan(HAND_COUNTS, 1, 2)
  assert p["in"] == [0, 2, 2, 3] and p["send"] == [2, 0, 1, 1]
  assert p["out"] == [1, 5, 0, 4]
  assert p["recv"] == [0, 3, 1, 1]
  assert p["groups"] == [1, 4]


def _simulate_ragged(operands, outputs, params):
  """numpy model of lax.ragged_all_to_all's documented semantics."""
  n_dev = len(operands)
  results = [o.copy() for o in outputs]
  for src in range(n_dev):
    ins, sizes, outs = params[src]
    per = len(ins) // n_dev
    for entry in range(len(ins)):
      dst = entry // per
      rows = operands[src][ins[entry]:ins[entry] + sizes[entry]]
      results[dst][outs[entry]:outs[entry] + sizes[entry]] = rows
  return results


@pytest.mark.parametrize("seed", range(5))
def test_dispatch_is_slot_major_and_combine_inverts_it(seed):
  rng = np.random.default_rng(seed)
  n_dev, s, n = 4, 3, 12
  counts = np.stack([np.bincount(rng.integers(0, n_dev * s, size=rng.integers(0, n + 1)),
                                 minlength=n_dev * s) for _ in range(n_dev)])
  # Row value = (source, global slot, rank) so every row is identifiable.
  operands = []
  for src in range(n_dev):
    rows = [(src, g, r) for g in range(n_dev * s) for r in range(counts[src, g])]
    operands.append(np.array(rows + [(-1, -1, -1)] * (n - len(rows))))
  plans = [permute.exchange_plan(jnp.asarray(counts), i, s) for i in range(n_dev)]
  as_np = lambda r: (np.asarray(r.input_offsets), np.asarray(r.send_sizes),
                     np.asarray(r.output_offsets))
  received = _simulate_ragged(operands, [np.full((n_dev * n, 3), -9)] * n_dev,
                              [as_np(p.dispatch) for p in plans])
  for i in range(n_dev):
    want = [(src, i * s + l, r) for l in range(s) for src in range(n_dev)
            for r in range(counts[src, i * s + l])]
    got = received[i][:len(want)]
    np.testing.assert_array_equal(got, np.array(want).reshape(-1, 3))
    assert np.asarray(plans[i].group_sizes).tolist() == counts[:, i * s:(i + 1) * s].sum(0).tolist()
    # The padded receive layout maps to the same slot-major rows.
    dest = np.asarray(permute.padded_receive_rows(plans[i], jnp.asarray(counts), i, s, n))
    padded = np.full((n_dev * n, 3), -9)
    for src in range(n_dev):
      block = operands[src][plans[i].sender_offsets[src, i * s]:][:n]
      padded[src * n:src * n + len(block)] = block
    slot_major = np.full((n_dev * n, 3), -9)
    ok = dest < n_dev * n
    slot_major[dest[ok]] = padded[ok]
    np.testing.assert_array_equal(slot_major[:len(want)], np.array(want).reshape(-1, 3))
  returned = _simulate_ragged(received, [np.full((n, 3), -9)] * n_dev,
                              [as_np(p.combine) for p in plans])
  for src in range(n_dev):
    sent = counts[src].sum()
    np.testing.assert_array_equal(returned[src][:sent], operands[src][:sent])


def test_assign_slots_round_robin_over_copies():
  # E=4 over D=2 devices (h=2), r=1: expert 0 (home dev 0) also replicated on dev 1.
  table = jnp.array([[0, 1, -1], [2, 3, 0]])
  ids = jnp.array([[0], [0], [0], [0], [0], [1], [3]])
  mask = jnp.ones((7, 1), bool)
  a = permute.assign_slots(ids, mask, table, num_experts=4, source_index=0)
  # copies of expert 0: global slots 0 (dev0 col0) and 5 (dev1 col2), alternating from copy 0.
  assert np.asarray(a.slot).tolist() == [0, 5, 0, 5, 0, 1, 4]
  assert np.asarray(a.position).tolist() == [0, 0, 1, 1, 2, 0, 0]
  b = permute.assign_slots(ids, mask, table, num_experts=4, source_index=1)
  assert np.asarray(b.slot).tolist()[:5] == [5, 0, 5, 0, 5]
  c = permute.assign_slots(ids, mask, table, num_experts=4, source_index=0, capacity=2)
  assert np.asarray(c.slot).tolist() == [0, 5, 0, 5, -1, 1, 4]
  assert np.asarray(c.dropped).tolist() == [False] * 4 + [True, False, False]


def test_assign_slots_k_major_priority_and_mask():
  table = placement.home_slot_table(2, 1)
  ids = jnp.array([[1, 0], [0, 1], [0, 1]])
  mask = jnp.array([[True, True], [False, True], [True, True]])
  a = permute.assign_slots(ids, mask, table, num_experts=2, source_index=0, capacity=1)
  # k-major order: (t0,j0)=1, (t1,j0) masked, (t2,j0)=0, (t0,j1)=0, (t1,j1)=1, (t2,j1)=1
  assert np.asarray(a.slot).tolist() == [1, -1, 0, -1, -1, -1]
  assert np.asarray(a.dropped).tolist() == [False, False, False, True, True, True]
