"""The launch boundary: the ml_collections tree (see `presets`) -> typed configs, once.

Launch scripts call `from_tree(config)` right after parsing flags and pass the resulting `Job`
down; nothing below them sees the tree. A bad value is a `UsageError` naming the `--config.*`
flag to change.

  job = app.config.from_tree(config)       # Job(family, model, execution, replication, ...)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from typing import Any

from moe_jax import models
from moe_jax import predictor as predictor_lib
from moe_jax.app import presets
from moe_jax.config import ExecutionConfig
from moe_jax.replication import ReplicationConfig


class UsageError(ValueError):
  """A problem with the user's config or flags; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  expert: int = -1          # -1: all devices / data
  allow_idle_devices: bool = False   # else a mesh must use every device (`runtime.make_mesh`)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Text batches: `window` holds the family's window lengths (e.g. encoder_len, decoder_len).

  `max_input_tokens` caps a prompt of launch/infer.py: memory grows with its square (attention),
  so a long text fails with a one-line error instead of running out of memory.
  """

  batch_size: int = 8
  num_batches: int = 4
  window: tuple = ()        # ((name, value), ...) passed to the family's `text_windows`
  max_input_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1500
  batch_size: int = 16
  learning_rate: float = 3e-3
  warmup: int = 100
  weight_decay: float = 0.01
  vocab_size: int = 2048
  stride: int = 32
  log_every: int = 50
  eval_every: int = 0          # score the held-out text every this many steps (0: every log)
  seed: int = 0
  out_dir: str = ""
  gmm_backend: str = "auto"    # the MoE layers' grouped matmul in training (ExecutionConfig's)
  replication: str = "none"    # "history" / "pregate": train with replicas (TRAIN_REPLICATION)
  predictor_steps: int = 1500
  predictor_rank: int = 0   # 0: full-rank learned predictor
  predictor_batches: int = 64


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """config.bench.

  Attributes:
    policies: the replication policies to run (`predictor.KINDS`, with "none").
    capacity_modes: "dropless", "capacity" or both.
    repeats: interleaved timing rounds.
    warmup_batches: unscored batches first (they feed the history and calibrate eplb).
    report_dir: where report.json, expert_counts.json and the plots go.
    plots: write the PNG plots.
    decode_steps: decoder-only families: greedy steps of the decode phase (0: none).
    approximate: with "seed" among the policies, also run the source paper's approximate mode
      (`route_by="prediction"`, not exact) and measure the quality it keeps.
    eplb_counts: an expert-counts file (`moe_jax.expert_counts`) to calibrate eplb with; ""
      calibrates it from the warm-up batches.
  """

  policies: tuple = ("none", "history", "pregate", "learned", "oracle")
  capacity_modes: tuple = ("dropless", "capacity")
  repeats: int = 3
  warmup_batches: int = 2
  report_dir: str = "reports/bench"
  plots: bool = True
  decode_steps: int = 16
  approximate: bool = True
  eplb_counts: str = ""


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything a launch script needs, typed.

  Attributes:
    family: the model family's module (`moe_jax.models.<name>`).
    model: the family's `Config` built from `config.model`.
    checkpoint: config.checkpoint as given ("builtin:NAME" or a path; "" if none).
    execution, replication: the MoE layers' `ExecutionConfig` and `ReplicationConfig`.
    predictor_checkpoint: the learned predictor's directory as given ("" if none).
    seed_predictor_checkpoint: the seed predictor's directory as given ("" if none).
    mesh, data, train, bench: the other sub-trees.
    seed: config.seed.
    tree: the whole config as a plain dict (recorded in reports, never read below).
  """

  family: types.ModuleType
  model: Any
  checkpoint: str
  execution: ExecutionConfig
  replication: ReplicationConfig
  predictor_checkpoint: str
  seed_predictor_checkpoint: str
  mesh: MeshConfig
  data: DataConfig
  train: TrainConfig
  bench: BenchConfig
  seed: int
  tree: dict

  @property
  def checkpoint_path(self) -> str:
    return presets.resolve_checkpoint(self.checkpoint)

  @property
  def predictor_path(self) -> str:
    return presets.resolve_checkpoint(self.predictor_checkpoint)

  @property
  def seed_predictor_path(self) -> str:
    return presets.resolve_checkpoint(self.seed_predictor_checkpoint)

  @property
  def predictor_rank(self) -> int | None:
    return self.train.predictor_rank if self.train.predictor_rank > 0 else None


def from_tree(config) -> Job:
  """The typed `Job` of a launch config tree; UsageError naming the flag on a bad value."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  model_tree = dict(tree["model"])
  family_name = model_tree.pop("family", "switch")
  try:
    family = models.get_family(family_name)
  except ValueError as e:
    raise UsageError(f"--config.model.family: {e}") from None
  data = dict(tree["data"])
  for key, value in data.items():   # sizes and lengths: batch_size, encoder_len, ...
    if isinstance(value, int):
      _check_int(f"data.{key}", value, minimum=1)
  bench = dict(tree["bench"])
  execution = _typed("execution", ExecutionConfig, tree["execution"])
  return Job(
      family=family,
      model=_build("model", lambda: family.config_from_dict(model_tree)),
      checkpoint=str(tree.get("checkpoint", "")),
      execution=execution,
      replication=_typed("replication", ReplicationConfig, tree["replication"]),
      predictor_checkpoint=str(tree.get("predictor_checkpoint", "")),
      seed_predictor_checkpoint=str(tree.get("seed_predictor_checkpoint", "")),
      mesh=_typed("mesh", MeshConfig, tree["mesh"]),
      data=_build("data", lambda: DataConfig(
          batch_size=int(data.pop("batch_size")), num_batches=int(data.pop("num_batches")),
          max_input_tokens=int(data.pop("max_input_tokens", DataConfig.max_input_tokens)),
          window=tuple(sorted(data.items())))),
      train=_train(tree["train"]),
      bench=_bench(bench, execution),
      seed=int(tree.get("seed", 0)),
      tree=tree)


def _bench(bench: dict, execution: ExecutionConfig) -> BenchConfig:
  """config.bench, each policy and capacity mode checked (the harness compares against 'none')."""
  policies, modes = _split(bench["policies"]), _split(bench["capacity_modes"])
  unknown = [p for p in policies if p not in predictor_lib.KINDS]
  if unknown or "none" not in policies:
    problem = f"has unknown {unknown}" if unknown else "lacks 'none' (the baseline)"
    raise UsageError(f"--config.bench.policies={bench['policies']!r} {problem}; give a "
                     f"comma-separated subset of {','.join(predictor_lib.KINDS)} with none.")
  for mode in modes:
    try:
      execution.replace(capacity_mode=mode)
    except ValueError as e:
      raise UsageError(f"--config.bench.capacity_modes={bench['capacity_modes']!r}: {e}") from None
  if not modes:
    raise UsageError("--config.bench.capacity_modes is empty; give dropless, capacity or both.")
  _check_int("bench.repeats", bench["repeats"], minimum=1)
  _check_int("bench.warmup_batches", bench["warmup_batches"], minimum=0)
  steps = bench.get("decode_steps", BenchConfig.decode_steps)
  _check_int("bench.decode_steps", steps, minimum=0)
  if steps == 1:
    raise UsageError("--config.bench.decode_steps=1: decode is timed as the difference of N "
                     "steps and 1 step; use 0 (no decode phase) or >= 2.")
  return _build("bench", lambda: BenchConfig(**dict(bench, policies=policies,
                                                    capacity_modes=modes)))


def _train(train: dict) -> TrainConfig:
  """config.train, its counts and rates checked."""
  minimums = dict(steps=1, batch_size=1, warmup=0, vocab_size=2, stride=1, log_every=1,
                  eval_every=0, seed=0,
                  predictor_steps=1, predictor_rank=0, predictor_batches=1)
  for key, minimum in minimums.items():
    if key in train:
      _check_int(f"train.{key}", train[key], minimum=minimum)
  for key in ("learning_rate", "weight_decay"):
    value = train.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
        key == "learning_rate" and value == 0):
      raise UsageError(f"--config.train.{key}={value!r} must be a number "
                       f"{'> 0' if key == 'learning_rate' else '>= 0'}.")
  if train.get("replication", "none") not in TRAIN_REPLICATION:
    raise UsageError(f"--config.train.replication={train['replication']!r} is not one of "
                     f"{', '.join(TRAIN_REPLICATION)}.")
  try:
    ExecutionConfig(gmm_backend=train.get("gmm_backend", TrainConfig.gmm_backend))
  except ValueError as e:
    raise UsageError(f"--config.train.gmm_backend: {e}") from None
  return _typed("train", TrainConfig, train)


# Predictors a training run may place replicas by (the others need a trained predictor or the
# batch's own loads).
TRAIN_REPLICATION = ("none", "history", "pregate")


def _check_int(flag: str, value, *, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise UsageError(f"--config.{flag}={value!r} must be an integer >= {minimum}.")


def _split(value) -> tuple:
  return tuple(v for v in str(value).split(",") if v)


def _typed(name: str, cls, fields: dict):
  """cls(**fields) with unknown keys and bad values reported against --config.<name>.*."""
  known = [f.name for f in dataclasses.fields(cls)]
  for key in fields:
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f" (did you mean {', '.join(f'--config.{name}.{c}' for c in close)}?)" if close else ""
      raise UsageError(f"--config.{name}.{key} is not a field of {cls.__name__}{hint}; valid: "
                       f"{', '.join(known)}.")
  return _build(name, lambda: cls(**fields))


def _build(name: str, make):
  try:
    return make()
  except (TypeError, ValueError) as e:
    raise UsageError(f"--config.{name}: {e}") from None
