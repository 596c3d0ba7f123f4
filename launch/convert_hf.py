r"""Convert a Hugging Face checkpoint once, so moe_jax never unpickles anything at load time.

  python launch/convert_hf.py --src=switch-base-128 --dst=switch-base-128-st
      pytorch_model*.bin (single or sharded) -> model*.safetensors with the same keys (needs torch;
      torch.load(weights_only=True), shard by shard)
  python launch/convert_hf.py --src=switch-base-8 --dst=/ckpt/switch8 --format=orbax \
      [--dtype=bfloat16]
      .bin or safetensors -> orbax params + config (restore with orbax_io.restore_params)

A refused, truncated or corrupt input is one `error:` line naming the file (exit 2), and a failed
conversion removes what it created under --dst.
"""

import _setup  # noqa: F401  (process set-up, before anything imports jax)

import jax.numpy as jnp  # noqa: E402
from absl import flags, logging  # noqa: E402

from moe_jax import models  # noqa: E402
from moe_jax.app import config as config_lib  # noqa: E402
from moe_jax.checkpoints import convert  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "HF checkpoint directory (or its weights file / index)")
flags.DEFINE_string("dst", None, "output directory")
flags.DEFINE_enum("format", "safetensors", ["safetensors", "orbax"], "output format")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "dtype of the orbax params (--format=orbax)")
flags.DEFINE_bool("force", False, "replace an existing orbax checkpoint at --dst")
flags.mark_flags_as_required(["src", "dst"])


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step at INFO
  try:
    if FLAGS.format == "safetensors":
      written = convert.to_safetensors(FLAGS.src, FLAGS.dst)
      print(f"wrote {len(written)} files to {FLAGS.dst}")
    else:
      family, config = models.hf_config(convert.checkpoint_dir(FLAGS.src))
      out = convert.to_orbax(FLAGS.src, FLAGS.dst, family.hf_key_map(config),
                             config_json=config.to_hf_dict(), family=family.NAME,
                             dtype=jnp.dtype(FLAGS.dtype), force=FLAGS.force)
      print(f"wrote orbax params to {out}")
  except (ImportError, ValueError) as e:   # one line; what the conversion created is removed
    raise config_lib.UsageError(str(e)) from None


if __name__ == "__main__":
  _setup.run(main, multi_process=False)
