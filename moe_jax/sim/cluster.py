"""What the simulator is told about the hardware and the MoE layer: two small frozen dataclasses.

  shape = SHAPES["switch_base_128"]
  cluster = CLUSTERS["h100_ib"].replace(name="mine", a2a_bytes_per_s=25e9)

Preset numbers are stated assumptions, not measurements (see each preset's comment); the
`cpu_fitted` cluster is whatever `benchmarks/straggler.py` measured on this machine.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExpertShape:
  """One MoE layer's shape.

  Attributes:
    name: label for tables and plots.
    d_model, d_ff: expert widths.
    num_experts: E.
    top_k: experts per token.
    gated: three matrices (wi, wi_gate, wo; SwiGLU) instead of two.
    param_bytes: bytes per expert weight (2: bf16).
    act_bytes: bytes per activation element sent through the all-to-all.
    dense_flops_per_token: FLOPs of the layer's non-expert work per token (router, a dense
      sublayer), done data-parallel on every device; 0 models the expert part alone.
  """

  name: str
  d_model: int
  d_ff: int
  num_experts: int
  top_k: int = 1
  gated: bool = False
  param_bytes: int = 2
  act_bytes: int = 2
  dense_flops_per_token: float = 0.0

  def __post_init__(self):
    for field in ("d_model", "d_ff", "num_experts", "top_k", "param_bytes", "act_bytes"):
      if getattr(self, field) < 1:
        raise ValueError(f"ExpertShape.{field} must be >= 1, got {getattr(self, field)}.")

  @property
  def matrices(self) -> int:
    return 3 if self.gated else 2

  @property
  def flops_per_choice(self) -> float:
    """FLOPs of one token through one expert (2 per multiply-add)."""
    return 2.0 * self.d_model * self.d_ff * self.matrices

  @property
  def expert_bytes(self) -> float:
    return float(self.d_model * self.d_ff * self.matrices * self.param_bytes)

  @property
  def token_bytes(self) -> float:
    return float(self.d_model * self.act_bytes)

  def replace(self, **changes) -> "ExpertShape":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Per-device throughputs of an expert-parallel cluster.

  Attributes:
    name: label.
    flops_per_s: sustained expert-GEMM FLOP/s of one device.
    hbm_bytes_per_s: memory bandwidth at which a device reads its expert weights.
    a2a_bytes_per_s: bytes/s one device sends (and receives) in an all-to-all.
    latency_s: fixed cost of one collective.
    padded_all_to_all: the dispatch and the prefetch send fixed worst-case buffers (moe_jax's CPU
      fallback) instead of exactly the rows / weights needed (ragged, GPU/TPU).
    overlap_prefetch: replica weights for layer l + 1 move while layer l computes (async
      collectives, GPU/TPU); False adds the prefetch time to the step (CPU).
    decode_bytes_per_s: decode: bytes/s at which a device reads an expert's weights for a few
      rows (None: hbm_bytes_per_s). A grouped matmul over a handful of rows per expert often
      streams weights slower than a plain read (XLA:CPU: about half).
    decode_flops_per_s: decode: FLOP/s of the per-row work on top of the weight read (None:
      flops_per_s). Together: a decode device takes active slots * expert bytes /
      decode_bytes_per_s + rows * FLOPs per row / decode_flops_per_s (`cost.decode_seconds`).
    layer_overhead_s: fixed seconds every MoE layer costs beyond its modelled phases (routing,
      program and collective overheads; `fit.layer_overhead_fit`); 0 for the presets.
  """

  name: str
  flops_per_s: float
  hbm_bytes_per_s: float
  a2a_bytes_per_s: float
  latency_s: float = 0.0
  padded_all_to_all: bool = False
  overlap_prefetch: bool = True
  decode_bytes_per_s: float | None = None
  decode_flops_per_s: float | None = None
  layer_overhead_s: float = 0.0

  def __post_init__(self):
    for field in ("flops_per_s", "hbm_bytes_per_s", "a2a_bytes_per_s"):
      if not getattr(self, field) > 0:
        raise ValueError(f"Cluster.{field} must be > 0, got {getattr(self, field)}.")
    for field in ("decode_bytes_per_s", "decode_flops_per_s"):
      if getattr(self, field) is not None and not getattr(self, field) > 0:
        raise ValueError(f"Cluster.{field} must be > 0 or None, got {getattr(self, field)}.")
    for field in ("latency_s", "layer_overhead_s"):
      if getattr(self, field) < 0:
        raise ValueError(f"Cluster.{field} must be >= 0, got {getattr(self, field)}.")

  @property
  def weight_read_bytes_per_s(self) -> float:
    """Decode: bytes/s of reading an active slot's expert weights."""
    return self.decode_bytes_per_s or self.hbm_bytes_per_s

  @property
  def row_flops_per_s(self) -> float:
    """Decode: FLOP/s of the per-row expert work."""
    return self.decode_flops_per_s or self.flops_per_s

  def replace(self, **changes) -> "Cluster":
    return dataclasses.replace(self, **changes)


SHAPES = {
    # google/switch-base-128 and -256 expert FFNs: relu, two matrices, top-1.
    "switch_base_128": ExpertShape("switch-base-128", 768, 3072, 128, top_k=1),
    "switch_base_256": ExpertShape("switch-base-256", 768, 3072, 256, top_k=1),
    # A modern top-2 shape: Mixtral-8x7B's expert widths (d 4096, SwiGLU f 14336) with 64 experts.
    # No released model has exactly this; it stands for large gated experts with k = 2.
    "gated_64x_top2": ExpertShape("d4096-f14336-gated-E64-top2", 4096, 14336, 64, top_k=2,
                                  gated=True),
}

CLUSTERS = {
    # Assumed H100 SXM nodes on 400 Gb/s InfiniBand, one NIC per GPU: ~50% of the 989 TFLOP/s
    # dense bf16 peak in grouped GEMMs, ~80% of 3.35 TB/s HBM, ~40 GB/s per-GPU all-to-all
    # (inter-node bound once the expert axis spans nodes), 25 us per collective.
    "h100_ib": Cluster("H100 + 400G IB (assumed)", flops_per_s=500e12, hbm_bytes_per_s=2.7e12,
                       a2a_bytes_per_s=40e9, latency_s=25e-6),
    # The same GPUs in one NVLink domain (NVLink Switch System, up to 256 H100s): 450 GB/s per
    # direction per GPU (NVLink 4), ~80% of it in an all-to-all, 10 us per collective.
    "h100_nvlink": Cluster("H100 NVLink domain (assumed)", flops_per_s=500e12,
                           hbm_bytes_per_s=2.7e12, a2a_bytes_per_s=360e9, latency_s=10e-6),
}
