"""The report's policy columns: how early each policy's prefetch can start, and the quality the
approximate mode keeps (no compilation)."""

import math

import pytest

from moe_jax import predictor
from moe_jax.bench import programs, report


@pytest.mark.parametrize("policy,label,lead", [
    ("seed", "emb 2.5L", 2.5),           # layers 1, 2 of a 3-layer stack: l + 1 = 2, 3
    (programs.APPROX, "emb 2.5L", 2.5),
    ("pregate", "1L", 1.0), ("learned_load", "1L", 1.0), ("hybrid", "1L", 1.0),
    ("history", "batch", math.inf), ("eplb", "batch", math.inf),
    ("reactive", "in layer", 0.0), ("oracle", "-", math.nan), ("none", "-", math.nan)])
def test_prefetch_lead(policy, label, lead):
  got_label, got_lead = report.prefetch_lead(policy, [3, 3])
  assert got_label == label
  assert got_lead == lead or (math.isnan(lead) and math.isnan(got_lead))


def test_every_kind_has_a_lead():
  for kind in predictor.KINDS:
    report.prefetch_lead(kind, [4])


def test_quality_kept_is_accuracy_over_the_exact_models():
  exact = {"quality": [{"ce": 2.0, "accuracy": 0.5}, {"ce": 4.0, "accuracy": 0.3}]}
  approx = {"quality": [{"ce": 3.0, "accuracy": 0.4}, {"ce": 5.0, "accuracy": 0.2}]}
  q = report.quality(approx, exact)
  assert q["kept"] == pytest.approx(0.3 / 0.4)
  assert q["ce"] == pytest.approx(4.0) and q["exact_ce"] == pytest.approx(3.0)
  assert report.quality({"quality": []}, exact) == {"kept": 1.0}     # an exact policy
  assert programs.APPROX == report.APPROX
