r"""Convert a checkpoint once, so moe_jax never unpickles anything at load time; any model family.

  python launch/convert_hf.py --src=switch-base-128 --dst=switch-base-128-st
      pytorch_model*.bin (single or sharded) -> model*.safetensors with the same keys (needs torch;
      torch.load(weights_only=True), shard by shard)
  python launch/convert_hf.py --src=Qwen3-30B-A3B --dst=/ckpt/qwen3 --format=orbax \
      [--dtype=bfloat16]
      a Hugging Face dir (.bin or safetensors) -> orbax params + config (moe_jax.json + params/),
      loaded by moe_jax.models.from_pretrained and the launch scripts' --config.checkpoint
  python launch/convert_hf.py --src=/ckpt/qwen3 --dst=/ckpt/qwen3-hf --format=hf [--dtype=...]
      a moe_jax orbax dir (e.g. launch/train.py's output) -> config.json + model.safetensors in the
      family's Hugging Face layout (what transformers' from_pretrained reads)

The family comes from the checkpoint (config.json's model_type, or the orbax manifest). A
refused, truncated or corrupt input is one `error:` line naming the file (exit 2), and a failed
conversion removes what it created under --dst.
"""

import _setup  # noqa: F401  (process set-up, before anything imports jax)

import os  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from absl import flags, logging  # noqa: E402

from moe_jax import models  # noqa: E402
from moe_jax.app import config as config_lib  # noqa: E402
from moe_jax.checkpoints import convert, hf_io, layout, orbax_io  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "checkpoint directory (or its weights file / index)")
flags.DEFINE_string("dst", None, "output directory")
flags.DEFINE_enum("format", "safetensors", ["safetensors", "orbax", "hf"],
                  "output: safetensors (from torch .bin), orbax (from HF), hf (from orbax)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "dtype of the written params (--format=orbax or hf)")
flags.DEFINE_bool("force", False, "replace an existing orbax checkpoint at --dst")
flags.mark_flags_as_required(["src", "dst"])


def to_orbax(src: str, dst: str, dtype) -> str:
  """A Hugging Face checkpoint -> a moe_jax orbax dir; returns the dir."""
  family, config = models.hf_config(convert.checkpoint_dir(src))
  return convert.to_orbax(src, dst, family.hf_key_map(config), config_json=config.to_hf_dict(),
                          family=family.NAME, dtype=dtype, force=FLAGS.force)


def to_hf(src: str, dst: str, dtype) -> list[str]:
  """A moe_jax orbax dir -> config.json + safetensors in the family's HF layout; the files."""
  if not os.path.exists(os.path.join(src, orbax_io.MANIFEST_NAME)):
    raise ValueError(f"--format=hf reads a moe_jax orbax dir ({orbax_io.MANIFEST_NAME} + "
                     f"{orbax_io.PARAMS_DIR}/), and {src!r} has no {orbax_io.MANIFEST_NAME}.")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise ValueError("--dst must differ from --src.")
  family, config, params = models.load_checkpoint(src)      # float32: lossless
  key_map = family.hf_key_map(config)
  with convert.removed_on_failure(dst):
    return hf_io.save_hf_safetensors(_cast(params, key_map, dtype), key_map, dst,
                                     config_json=config.to_hf_dict())


def _cast(params, key_map: layout.KeyMap, dtype):
  """`params` in `dtype`, but the leaves HF keeps float32 (`TensorSpec.float32`, e.g. DeepSeek's
  router) stay float32."""
  keep = {spec.path for _, spec in key_map.entries() if spec.float32}
  return layout.build_tree({path: leaf if path in keep else leaf.astype(dtype)
                            for path, leaf in layout.flatten(params).items()})


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  dtype = jnp.dtype(FLAGS.dtype)
  try:
    if FLAGS.format == "safetensors":
      written = convert.to_safetensors(FLAGS.src, FLAGS.dst)
      print(f"wrote {len(written)} files to {FLAGS.dst}")
    elif FLAGS.format == "orbax":
      print(f"wrote orbax params to {to_orbax(FLAGS.src, FLAGS.dst, dtype)}")
    else:
      written = to_hf(FLAGS.src, FLAGS.dst, dtype)
      print(f"wrote config.json and {len(written)} weight files to {FLAGS.dst}")
  except (ImportError, ValueError) as e:   # one line; what the conversion created is removed
    raise config_lib.UsageError(str(e)) from None


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
