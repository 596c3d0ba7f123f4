"""A tiny random OLMoE (family `olmoe`): 4 layers, hidden 64, 16 experts of width 128, top-2;
a CPU runs it in seconds.

  python launch/infer.py --config=configs/olmoe_tiny.py \
      --config.checkpoint=tests/fixtures/decoder/olmoe --ids=3,14,15 --max_new_tokens=8
  python launch/train.py --config=configs/olmoe_tiny.py --config.train.out_dir=/tmp/olmoe_tiny
  python launch/infer.py --config=configs/olmoe_tiny.py --config.checkpoint=/tmp/olmoe_tiny \
      --text="The assert statement"

No checkpoint ships with it: point --config.checkpoint at an olmoe checkpoint (a Hugging Face
dir or a moe_jax orbax dir; its own config wins over `model`), or train one on the pydoc text
(a 2048-piece vocabulary, eos 1, pad 0). The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("olmoe_tiny")
