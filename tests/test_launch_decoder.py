"""launch/infer.py and launch/convert_hf.py on the decoder-only families' committed HF fixtures
(tests/fixtures/decoder/<family>/: config.json + model.safetensors, vocabulary 64, no tokenizer),
run as a user runs them (subprocesses sharing the persistent compilation cache, as
tests/test_launch.py does).

Generated ids are checked against the fixture's reference.npz, the greedy tokens transformers
produced, which `family.from_pretrained(fixture).generate(...)` reproduces
(tests/test_decoder_models.py checks that equality).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from moe_jax import models
from moe_jax.checkpoints import orbax_io

from tests.test_launch import REPO, _run as run_script

FIXTURES = os.path.join(REPO, "tests", "fixtures", "decoder")
# Every family with a fixture and a configs/<family>_tiny.py (adding the config adds its tests).
FAMILIES = sorted(name for name in os.listdir(FIXTURES)
                  if os.path.exists(os.path.join(REPO, "configs", f"{name}_tiny.py")))
SPIECE = os.path.join(REPO, "moe_jax", "assets", "switch_tiny", "spiece.model")


def test_every_decoder_family_with_a_tiny_config_is_covered():
  assert {"mixtral", "olmoe", "qwen3_moe"} <= set(FAMILIES)


def _reference(name):
  with np.load(os.path.join(FIXTURES, name, "reference.npz")) as data:
    return dict(data)


def _row_stopping_at_eos(ref):
  """(prompt ids without padding, the reference's generated row) of the first prompt whose
  reference continuation stops at eos (so the printed ids must be cut there)."""
  eos, prompt_length = np.asarray(ref["eos_token_id"]), ref["input_ids"].shape[1]
  for i, row in enumerate(ref["gen_cached"]):
    if np.isin(row[prompt_length:], eos).any():
      return ref["input_ids"][i][ref["attention_mask"][i] == 1].tolist(), row
  raise AssertionError("the fixture has no row that stops at eos")


def _printed_ids(stdout):
  lines = [line for line in stdout.splitlines() if line.startswith("[0] ids: ")]
  assert len(lines) == 1, stdout
  return [int(t) for t in lines[0][len("[0] ids: "):].strip("[]").split(",") if t.strip()]


@pytest.mark.parametrize("name", FAMILIES)
def test_infer_generates_what_the_model_generates(name):
  """infer.py --config=configs/<family>_tiny.py --config.checkpoint=<fixture> --ids=...: the
  printed ids are the greedy continuation up to eos, and the balance lines cover every MoE
  layer."""
  ref = _reference(name)
  prompt, row = _row_stopping_at_eos(ref)
  family = models.get_family(name)
  config = family.Config.from_hf_dir(os.path.join(FIXTURES, name))
  want = family.generated_ids(row, config, prompt_length=ref["input_ids"].shape[1])
  proc = run_script("infer.py", f"--config=configs/{name}_tiny.py",
                    f"--config.checkpoint={os.path.join(FIXTURES, name)}",
                    f"--ids={','.join(map(str, prompt))}",
                    f"--max_new_tokens={int(ref['max_new_tokens'])}",
                    "--config.replication.predictor=none")      # one balance pass
  assert want and _printed_ids(proc.stdout) == want
  balance = [line for line in proc.stdout.splitlines() if line.startswith("  none ")]
  assert len(balance) == len(config.sparse_layers), proc.stdout


@pytest.mark.parametrize("config, checkpoint, args, message", [
    # The family is checked before the prompt is read (a Switch tokenizer would mis-encode it).
    ("configs/switch_tiny.py", "qwen3_moe+spiece", ["--text=The assert statement"],
     "holds a 'qwen3_moe' model but --config.model.family='switch'; pass a --config of that "
     "family (configs/qwen3_moe_*.py)"),
    ("configs/mixtral_tiny.py", "mixtral", ["--text=The assert statement"],
     "this checkpoint has no spiece.model; pass --ids instead of --text."),
])
def test_infer_refuses_in_one_line(config, checkpoint, args, message, tmp_path):
  directory = os.path.join(FIXTURES, checkpoint.split("+")[0])
  if checkpoint.endswith("+spiece"):       # a decoder checkpoint with a SentencePiece model
    directory = shutil.copytree(directory, tmp_path / "ckpt")
    shutil.copy(SPIECE, directory)
  proc = run_script("infer.py", f"--config={config}", f"--config.checkpoint={directory}", *args,
                    check=False)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def orbax_dirs(tmp_path_factory):
  """{family: the orbax dir `convert_hf.py --format=orbax` wrote from its fixture}, on demand."""
  root, made = tmp_path_factory.mktemp("orbax"), {}

  def convert(name):
    if name not in made:
      dst = str(root / name)
      proc = run_script("convert_hf.py", f"--src={os.path.join(FIXTURES, name)}", f"--dst={dst}",
                        "--format=orbax")
      assert f"wrote orbax params to {dst}" in proc.stdout
      made[name] = dst
    return made[name]

  return convert


def _assert_same_model(got, want):
  assert type(got) is type(want) and got.config == want.config
  jax.tree.map(np.testing.assert_array_equal, got.params, want.params)


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_to_orbax_loads_back(name, orbax_dirs):
  """HF fixture -> orbax (the script): the registry loads the same family, config and params
  from it (so the same logits: the forward reads nothing else)."""
  path = orbax_dirs(name)
  assert orbax_io.load_family(path) == name
  _assert_same_model(models.from_pretrained(path),
                     models.from_pretrained(os.path.join(FIXTURES, name)))


def test_convert_orbax_back_to_hf(orbax_dirs, tmp_path):
  """orbax -> HF (--format=hf, bf16 as the fixture): config.json + safetensors in the family's
  HF key layout (Mixtral's block_sparse_moe.experts.{e}.w1/w3/w2) that load as the fixture."""
  dst = tmp_path / "hf"
  proc = run_script("convert_hf.py", f"--src={orbax_dirs('mixtral')}", f"--dst={dst}",
                    "--format=hf", "--dtype=bfloat16")
  assert "wrote config.json and 1 weight files" in proc.stdout
  assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
  with safetensors.safe_open(dst / "model.safetensors", "flax") as f:
    key = "model.layers.1.block_sparse_moe.experts.7.w3.weight"
    assert key in f.keys() and f.get_tensor(key).dtype == jnp.bfloat16
  _assert_same_model(models.from_pretrained(str(dst)),
                     models.from_pretrained(os.path.join(FIXTURES, "mixtral")))


def test_convert_to_hf_needs_an_orbax_dir(tmp_path):
  proc = run_script("convert_hf.py", f"--src={os.path.join(FIXTURES, 'olmoe')}",
                    f"--dst={tmp_path / 'out'}", "--format=hf", check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "error: --format=hf reads a moe_jax orbax dir (moe_jax.json + params/)" in proc.stderr
  assert not (tmp_path / "out").exists()
