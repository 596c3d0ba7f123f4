"""launch/bench.py on a decoder-only family reports two phases, prefill and decode, and the
dropless invariant holds in both: prefill logits within 1e-6 (relative) of `none`'s and decode
tokens identical to `none`'s under every policy, `oracle` included (its decode loads are `none`'s
per-pass true loads fed back through `generate(oracle_loads=...)`)."""

import json
import os

import numpy as np
import pytest

from moe_jax import expert_counts, make_mesh, models, replication
from tests.test_launch import _run

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "decoder", "qwen3_moe")
STEPS = 3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """(stdout, report.json, report dir) of a smoke run on configs/qwen3_moe_tiny.py's shapes with
  random params: 8 prompts of 16 tokens, 3 decode steps, dropless, none / pregate / eplb (from a
  counts file) / oracle; the run writes its own counts file back."""
  out = str(tmp_path_factory.mktemp("bench_decoder"))
  counts = os.path.join(out, "calibration.json")    # eplb's calibration, as a counts file
  expert_counts.save(counts, {"layers": np.tile(np.arange(16.0, 0.0, -1.0), (4, 1))})
  proc = _run("bench.py", "--config=configs/bench.py:model=qwen3_moe_tiny",
              "--config.checkpoint=random", "--config.data.length=16",
              "--config.data.num_batches=1", "--config.bench.warmup_batches=0",
              "--config.bench.repeats=1", f"--config.bench.decode_steps={STEPS}",
              "--config.bench.capacity_modes=dropless", "--config.bench.policies=none,pregate,"
              "eplb,oracle", f"--config.bench.eplb_counts={counts}",
              f"--config.bench.report_dir={out}")
  with open(os.path.join(out, "report.json")) as f:
    return proc.stdout, json.load(f), out


def test_both_phases_are_reported(bench):
  stdout, report, out = bench
  assert "prefill (the prompt pass" in stdout and "decode (3 greedy steps" in stdout
  assert report["meta"]["phases"] == ["prefill", "decode"]
  assert set(report["modes"]["dropless"]) == set(report["decode"]["dropless"]) == {
      "none", "pregate", "eplb", "oracle"}
  for policy, r in report["decode"]["dropless"].items():
    o = r["overall"]
    assert len(o["replica_bytes_per_step_series"]) == STEPS, policy
    assert len(r["layers"]) == 4 and o["modelled_ep_speedup_vs_none"] > 0
    assert (o["replica_bytes_per_step"] > 0) == (policy != "none")
  written = expert_counts.load(os.path.join(out, "expert_counts.json"),
                               layer_counts={"layers": 4}, num_experts=16)["layers"]
  assert written.sum() == 8 * 16 * 2 * 4, "8 x 16 tokens, top-2, 4 MoE layers"
  for name in ("expert_load_heatmap", "device_load", "decode_expert_load_heatmap",
               "decode_device_load", "decode_bytes_per_step"):
    assert os.path.getsize(os.path.join(out, f"{name}.png")) > 1000


def test_dropless_invariant_in_both_phases(bench):
  stdout, report, _ = bench
  for policy, r in report["modes"]["dropless"].items():
    assert r["overall"]["output_rel_diff_vs_none"] <= 1e-6, policy
  for policy, r in report["decode"]["dropless"].items():
    assert r["overall"]["same_tokens_as_none"] == 1.0, policy
  # The oracle read each decode step's own true loads (the pass counter indexes them right).
  assert report["decode"]["dropless"]["oracle"]["overall"]["load_l1_error"] <= 1e-6
  assert "decode tokens identical to none's: ok, every policy" in stdout


def test_generate_oracle_needs_per_pass_loads():
  """predictor='oracle' in generate: refused without oracle_loads, or with loads of too few
  passes; the other predictors refuse them; the forward (no loads to replay) refuses the oracle.
  Nothing is compiled."""
  model = models.from_pretrained(FIXTURE, mesh=make_mesh(1, 8))
  ids = np.arange(16, dtype=np.int32).reshape(8, 2) + 3
  oracle = replication.ReplicationConfig(predictor="oracle")
  with pytest.raises(ValueError, match="needs oracle_loads=<per-pass true loads>"):
    model.generate(ids, max_new_tokens=3, replication=oracle)
  n, e = len(model.config.sparse_layers), model.config.num_experts
  with pytest.raises(ValueError, match=r"needs \[passes >= 4, "):
    model.generate(ids, max_new_tokens=3, replication=oracle,
                   oracle_loads={"layers": np.zeros((3, n, e))})
  with pytest.raises(ValueError, match="and only it reads them"):
    model.generate(ids, max_new_tokens=3, oracle_loads={"layers": np.zeros((4, n, e))},
                   replication=replication.ReplicationConfig(predictor="pregate"))
  with pytest.raises(ValueError, match=r"only generate\(\.\.\., oracle_loads=\.\.\.\) takes"):
    model(ids, replication=oracle)


def test_decode_steps_flag_is_checked():
  from moe_jax.app import config as config_lib, presets  # pylint: disable=import-outside-toplevel
  tree = presets.named("qwen3_moe_tiny")
  assert config_lib.from_tree(tree).bench.decode_steps == 16
  tree.bench.decode_steps = 1
  with pytest.raises(config_lib.UsageError, match=r"decode_steps=1: .* use 0 .* or >= 2"):
    config_lib.from_tree(tree)
