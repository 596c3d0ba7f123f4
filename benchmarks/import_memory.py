"""Peak host memory of importing a sharded HF safetensors checkpoint, versus its size on disk.

  python benchmarks/import_memory.py [--num_layers=4 --num_experts=16 --max_shard_mb=400]
  python benchmarks/import_memory.py --mesh=1x8          # experts sharded over 8 CPU devices
  python benchmarks/import_memory.py --orbax             # also: safetensors -> orbax, restore

Builds a random switch-base-shaped checkpoint (d_model 768, d_ff 3072, vocab 32128; fewer layers
and experts: ~1.4 GiB fp32 by default) in a temporary directory, then runs each task in a fresh
subprocess and reports that child's peak RSS (ru_maxrss) next to its RSS just before the task
(python + jax + moe_jax [+ orbax]) and the bytes on disk. A streaming importer should peak near
baseline + 1 x model + one leaf (one expert stack); a naive one near baseline + 2 x model.

With a mesh of simulated CPU devices every replicated (non-expert) leaf is held once per device,
so the bytes on "devices" (all in host RAM here) exceed the model. This is a script, not a test.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "launch"))
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
flags.DEFINE_integer("d_model", 768, "model width")
flags.DEFINE_integer("d_ff", 3072, "FFN / expert hidden width")
flags.DEFINE_integer("vocab_size", 32128, "vocabulary")
flags.DEFINE_integer("num_layers", 4, "encoder and decoder blocks (half of them sparse)")
flags.DEFINE_integer("num_experts", 16, "experts per sparse block")
flags.DEFINE_integer("max_shard_mb", 400, "largest safetensors shard, MiB")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype on disk (loaded as f32)")
flags.DEFINE_string("mesh", "none", "'none' (default device) or DATAxEXPERT, e.g. 1x8")
flags.DEFINE_bool("orbax", False, "also measure safetensors -> orbax conversion and restore")
flags.DEFINE_string("dir", None, "reuse / keep the checkpoint here instead of a temp dir")
flags.DEFINE_enum("child", None, ["import", "orbax_save", "orbax_restore"], "internal: task")
flags.DEFINE_string("src", None, "internal: the child's input")
flags.DEFINE_string("dst", None, "internal: the child's output")

GiB = float(1 << 30)


def _rss_now() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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


def build_checkpoint(path: str) -> None:
  """Writes the random switch-base-shaped checkpoint to `path`."""
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp
  from moe_jax.checkpoints import hf_io
  from moe_jax.models import switch
  config = switch.Config(
      vocab_size=FLAGS.vocab_size, d_model=FLAGS.d_model, d_ff=FLAGS.d_ff, d_kv=64, num_heads=12,
      num_layers=FLAGS.num_layers, num_decoder_layers=FLAGS.num_layers,
      num_sparse_encoder_layers=FLAGS.num_layers // 2,
      num_sparse_decoder_layers=FLAGS.num_layers // 2, num_experts=FLAGS.num_experts)
  params = switch.random_params(config, seed=0)
  hf_io.save_hf_safetensors(params, switch.hf_key_map(config), path,
                            config_json=config.to_hf_dict(),
                            max_shard_bytes=FLAGS.max_shard_mb << 20, dtype=jnp.dtype(FLAGS.dtype))


def _disk_bytes(path: str) -> tuple[int, int]:
  files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
  weights = [f for f in files if f.endswith(".safetensors")]
  return sum(os.path.getsize(f) for f in files), len(weights)


def _run(task: str, src: str, dst: str = "") -> dict:
  result = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f"--child={task}", f"--src={src}",
       f"--dst={dst}", f"--mesh={FLAGS.mesh}"], capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"{task} failed:\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _report(title: str, r: dict, disk: int, model_bytes: int) -> None:
  grown = r["peak"] - r["baseline"]
  print(f"\n{title}")
  rows = [
      ("child RSS before", f"{r['baseline'] / GiB:.3f} GiB"),
      ("child peak RSS (ru_maxrss)", f"{r['peak'] / GiB:.3f} GiB"),
      ("child RSS after", f"{r['after'] / GiB:.3f} GiB"),
      ("peak - before", f"{grown / GiB:.3f} GiB = {grown / model_bytes:.2f} x the f32 model, "
                        f"{grown / disk:.2f} x on disk"
                        + (f", {grown / r['device_bytes']:.2f} x the bytes on devices"
                           if r["device_bytes"] else "")),
      ("time", f"{r['seconds']:.1f} s ({disk / GiB / r['seconds']:.2f} GiB/s of disk)"),
  ]
  if r["device_bytes"]:
    rows.insert(0, ("bytes on devices", f"{r['device_bytes'] / GiB:.3f} GiB (mesh {FLAGS.mesh})"))
  for key, value in rows:
    print(f"  {key:<27} {value}")


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
    disk, shards = _disk_bytes(checkpoint)
    imported = _run("import", checkpoint)
    model_bytes = disk * (2 if FLAGS.dtype == "bfloat16" else 1)
    print(f"checkpoint on disk: {disk / GiB:.3f} GiB in {shards} safetensors shards "
          f"({FLAGS.dtype}); f32 model {model_bytes / GiB:.3f} GiB")
    _report("hf_io.load_params (safetensors -> jax.Array, f32)", imported, disk, model_bytes)
    if FLAGS.orbax:
      out = os.path.join(orbax_dir, "params")
      _report("convert.to_orbax (safetensors -> orbax)", _run("orbax_save", checkpoint, out),
              disk, model_bytes)
      orbax_disk, _ = _disk_bytes(out)
      _report(f"orbax_io.restore_params ({orbax_disk / GiB:.3f} GiB on disk)",
              _run("orbax_restore", out), orbax_disk, model_bytes)
  finally:
    shutil.rmtree(orbax_dir, ignore_errors=True)
    if FLAGS.dir is None:
      shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
