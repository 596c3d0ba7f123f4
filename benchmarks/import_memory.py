"""Peak host memory of importing a sharded HF safetensors checkpoint, versus its size on disk.

  python benchmarks/import_memory.py [--num_layers=4 --num_experts=16 --max_shard_mb=400]
  python benchmarks/import_memory.py --mesh=1x8          # experts sharded over 8 CPU devices
  python benchmarks/import_memory.py --mesh=none,1x8     # both, one checkpoint
  python benchmarks/import_memory.py --orbax             # also: safetensors -> orbax, restore
  python benchmarks/import_memory.py --family=qwen3_moe --layout=fused --mesh=none,1x8

Builds a random checkpoint in a temporary directory, then runs each task in a fresh subprocess
and reports that child's peak RSS (VmHWM) next to its RSS just before the task (python + jax
+ moe_jax [+ orbax]) and the bytes on disk. A streaming importer should peak near baseline + 1 x
model + one leaf (one expert stack); a naive one near baseline + 2 x model.

Families (--family): `switch` (default): switch-base-shaped (d_model 768, d_ff 3072, vocab 32128;
fewer layers and experts: ~1.4 GiB fp32 by default); `qwen3_moe`: a decoder (hidden 1024, 64
experts of width 512, top-8, 16 heads of 64, 4 KV heads, vocab 32000, untied, every layer MoE;
3 layers: ~1.4 GiB fp32 by default), written in the per-expert layout (`experts.{e}.gate_proj`,
what the hub holds) or the fused one (`experts.gate_up_proj [E, 2f, d]`, `--layout=fused`).
The width flags mean the family's own: --d_model is hidden_size, --d_ff moe_intermediate_size.

With a mesh of simulated CPU devices every replicated (non-expert) leaf is held once per device,
so the bytes on "devices" (all in host RAM here) exceed the model. This is a script, not a test.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))   # moe_jax, even uninstalled
import _setup  # noqa: E402

_setup.simulate_cpu_devices(8)

import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("family", "switch", ["switch", "qwen3_moe"], "checkpoint family")
flags.DEFINE_enum("layout", "per-expert", ["per-expert", "fused"],
                  "expert tensors on disk (qwen3_moe): one per expert, or fused 3-D stacks")
flags.DEFINE_integer("d_model", None, "model width (default: the family's, see the doc)")
flags.DEFINE_integer("d_ff", None, "expert hidden width (default: the family's)")
flags.DEFINE_integer("vocab_size", None, "vocabulary (default: the family's)")
flags.DEFINE_integer("num_layers", None, "switch: encoder and decoder blocks (half of them "
                     "sparse); qwen3_moe: decoder layers (all MoE)")
flags.DEFINE_integer("num_experts", None, "experts per sparse block (default: the family's)")
flags.DEFINE_integer("max_shard_mb", 400, "largest safetensors shard, MiB")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype on disk (loaded as f32)")
flags.DEFINE_string("mesh", "none", "'none' (default device) or DATAxEXPERT, e.g. 1x8; several "
                    "comma-separated (e.g. none,1x8) run one import each")
flags.DEFINE_bool("orbax", False, "also measure safetensors -> orbax conversion and restore")
flags.DEFINE_string("dir", None, "reuse / keep the checkpoint here instead of a temp dir")
flags.DEFINE_enum("child", None, ["import", "orbax_save", "orbax_restore"], "internal: task")
flags.DEFINE_string("src", None, "internal: the child's input")
flags.DEFINE_string("dst", None, "internal: the child's output")

GiB = float(1 << 30)
DEFAULTS = {"switch": dict(d_model=768, d_ff=3072, vocab_size=32128, num_layers=4, num_experts=16),
            "qwen3_moe": dict(d_model=1024, d_ff=512, vocab_size=32000, num_layers=3,
                              num_experts=64)}


def _shape(name: str) -> int:
  """A width flag's value, or the family's default."""
  value = getattr(FLAGS, name)
  return DEFAULTS[FLAGS.family][name] if value is None else value


def _status_bytes(field: str) -> int:
  """A /proc/self/status memory field (e.g. "VmRSS:"), in bytes."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  return 0


def _rss_now() -> int:
  return _status_bytes("VmRSS:")


def _peak_rss() -> int:
  """This process's peak RSS: VmHWM, the high-water mark of its own address space.

  Not `ru_maxrss`: Linux carries that across fork + exec, so a child spawned by a parent that
  once held more (e.g. the parent that just built the checkpoint) reports the parent's peak.
  """
  return _status_bytes("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(task: str) -> None:
  """Runs one task on --src (--dst); prints {"baseline", "peak", "after", ...} as JSON."""
  # pylint: disable=import-outside-toplevel
  import jax
  import moe_jax
  from moe_jax import models
  from moe_jax.checkpoints import convert, hf_io, orbax_io
  mesh = None
  if FLAGS.mesh != "none":
    data, expert = (int(x) for x in FLAGS.mesh.split("x"))
    mesh = moe_jax.make_mesh(data, expert)
  if task != "orbax_restore":  # the family and its key map: imported before the baseline
    family, config = models.hf_config(FLAGS.src)
    key_map = family.hf_key_map(config)
  jax.block_until_ready(jax.numpy.zeros(()))  # backends up before the baseline
  baseline = _rss_now()
  start = time.perf_counter()
  if task == "import":
    params = hf_io.load_params(FLAGS.src, key_map, mesh=mesh)
  elif task == "orbax_save":
    convert.to_orbax(FLAGS.src, FLAGS.dst, key_map, config_json=config.to_hf_dict(),
                     family=family.NAME)
    params = None
  else:
    params = orbax_io.restore_params(FLAGS.src, mesh=mesh)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  leaves = jax.tree.leaves(params)
  print(json.dumps({
      "baseline": baseline, "peak": _peak_rss(), "after": _rss_now(), "seconds": seconds,
      "device_bytes": sum(s.data.nbytes for x in leaves for s in x.addressable_shards),
  }))


def switch_checkpoint():
  """(params, key map, config) of the random switch-base-shaped model."""
  from moe_jax.models import switch  # pylint: disable=import-outside-toplevel
  layers = _shape("num_layers")
  config = switch.Config(
      vocab_size=_shape("vocab_size"), d_model=_shape("d_model"), d_ff=_shape("d_ff"), d_kv=64,
      num_heads=12, num_layers=layers, num_decoder_layers=layers,
      num_sparse_encoder_layers=layers // 2, num_sparse_decoder_layers=layers // 2,
      num_experts=_shape("num_experts"))
  return switch.random_params(config, seed=0), switch.hf_key_map(config), config


def qwen3_moe_checkpoint():
  """(params, key map in --layout, config) of the random Qwen3-MoE-shaped model."""
  from moe_jax.models import qwen3_moe  # pylint: disable=import-outside-toplevel
  d = _shape("d_model")
  config = qwen3_moe.Config(
      vocab_size=_shape("vocab_size"), hidden_size=d, intermediate_size=4 * d,
      moe_intermediate_size=_shape("d_ff"), num_hidden_layers=_shape("num_layers"),
      num_attention_heads=d // 64, num_key_value_heads=max(d // 256, 1), head_dim=64,
      num_experts=_shape("num_experts"), num_experts_per_tok=8, norm_topk_prob=True)
  key_map = qwen3_moe.hf_key_map(config).variant(FLAGS.layout)
  return qwen3_moe.random_params(config, seed=0), key_map, config


def build_checkpoint(path: str) -> None:
  """Writes the random checkpoint of --family (and --layout) to `path`."""
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  from moe_jax.checkpoints import hf_io
  build = switch_checkpoint if FLAGS.family == "switch" else qwen3_moe_checkpoint
  params, key_map, config = build()
  hf_io.save_hf_safetensors(params, key_map, path, config_json=config.to_hf_dict(),
                            max_shard_bytes=FLAGS.max_shard_mb << 20, dtype=jnp.dtype(FLAGS.dtype))


def _disk_bytes(path: str) -> tuple[int, int]:
  files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
  weights = [f for f in files if f.endswith(".safetensors")]
  return sum(os.path.getsize(f) for f in files), len(weights)


def _run(task: str, mesh: str, src: str, dst: str = "") -> dict:
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--child={task}", f"--src={src}",
       f"--dst={dst}", f"--mesh={mesh}"], capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"{task} failed:\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def ratios(r: dict, disk: int) -> dict:
  """The child's peak over the bytes on disk: the growth (peak - before) and the whole peak."""
  return {"grown_over_disk": (r["peak"] - r["baseline"]) / disk, "peak_over_disk": r["peak"] / disk}


def _report(title: str, r: dict, disk: int, model_bytes: int, mesh: str) -> None:
  grown = r["peak"] - r["baseline"]
  print(f"\n{title}")
  rows = [
      ("child RSS before", f"{r['baseline'] / GiB:.3f} GiB"),
      ("child peak RSS (VmHWM)", f"{r['peak'] / GiB:.3f} GiB = "
                                     f"{ratios(r, disk)['peak_over_disk']:.2f} x on disk"),
      ("child RSS after", f"{r['after'] / GiB:.3f} GiB"),
      ("peak - before", f"{grown / GiB:.3f} GiB = {grown / model_bytes:.2f} x the f32 model, "
                        f"{grown / disk:.2f} x on disk"
                        + (f", {grown / r['device_bytes']:.2f} x the bytes on devices"
                           if r["device_bytes"] else "")),
      ("time", f"{r['seconds']:.1f} s ({disk / GiB / r['seconds']:.2f} GiB/s of disk)"),
  ]
  if r["device_bytes"]:
    rows.insert(0, ("bytes on devices", f"{r['device_bytes'] / GiB:.3f} GiB (mesh {mesh})"))
  for key, value in rows:
    print(f"  {key:<27} {value}")


def _describe() -> str:
  layout = f", {FLAGS.layout} layout" if FLAGS.family != "switch" else ""
  return (f"{FLAGS.family}{layout}: d_model {_shape('d_model')}, d_ff {_shape('d_ff')}, "
          f"{_shape('num_experts')} experts, {_shape('num_layers')} layers, vocab "
          f"{_shape('vocab_size')}")


def measure(checkpoint: str, orbax_dir: str) -> dict:
  """Runs every task on `checkpoint`, prints the reports; {task@mesh: child result + ratios}."""
  disk, shards = _disk_bytes(checkpoint)
  model_bytes = disk * (2 if FLAGS.dtype == "bfloat16" else 1)
  print(f"checkpoint on disk ({_describe()}): {disk / GiB:.3f} GiB in {shards} safetensors "
        f"shards ({FLAGS.dtype}); f32 model {model_bytes / GiB:.3f} GiB")
  out = {"disk_bytes": disk, "shards": shards}
  for mesh in FLAGS.mesh.split(","):
    imported = _run("import", mesh, checkpoint)
    _report(f"hf_io.load_params (safetensors -> jax.Array, f32), mesh {mesh}", imported, disk,
            model_bytes, mesh)
    out[f"import@{mesh}"] = {**imported, **ratios(imported, disk)}
    if FLAGS.orbax:
      saved = os.path.join(orbax_dir, f"params_{mesh}")
      _report("convert.to_orbax (safetensors -> orbax)",
              _run("orbax_save", mesh, checkpoint, saved), disk, model_bytes, mesh)
      orbax_disk, _ = _disk_bytes(saved)
      _report(f"orbax_io.restore_params ({orbax_disk / GiB:.3f} GiB on disk), mesh {mesh}",
              _run("orbax_restore", mesh, saved), orbax_disk, model_bytes, mesh)
  return out


def main(argv):
  del argv
  if FLAGS.child:
    run_child(FLAGS.child)
    return
  path = FLAGS.dir or tempfile.mkdtemp(prefix="moe_jax_import_memory_")
  orbax_dir = tempfile.mkdtemp(prefix="moe_jax_import_memory_orbax_")
  try:
    checkpoint = os.path.join(path, "hf")
    if not os.path.exists(os.path.join(checkpoint, "config.json")):
      start = time.perf_counter()
      build_checkpoint(checkpoint)
      print(f"built checkpoint in {time.perf_counter() - start:.1f} s: {checkpoint}")
    summary = measure(checkpoint, orbax_dir)
    print("\n" + json.dumps({"family": FLAGS.family, "layout": FLAGS.layout, **summary}))
  finally:
    shutil.rmtree(orbax_dir, ignore_errors=True)
    if FLAGS.dir is None:
      shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
