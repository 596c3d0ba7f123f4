"""A tiny random Qwen3-MoE (family `qwen3_moe`): 4 layers, hidden 64, head_dim 16, 16 experts of
width 32, top-2; a CPU runs it in seconds.

  python launch/infer.py --config=configs/qwen3_moe_tiny.py \
      --config.checkpoint=tests/fixtures/decoder/qwen3_moe --ids=3,14,15 --max_new_tokens=8
  python launch/train.py --config=configs/qwen3_moe_tiny.py --config.train.out_dir=/tmp/q3tiny
  python launch/infer.py --config=configs/qwen3_moe_tiny.py --config.checkpoint=/tmp/q3tiny \
      --text="The assert statement"

No checkpoint ships with it: point --config.checkpoint at a qwen3_moe checkpoint (a Hugging Face
dir or a moe_jax orbax dir; its own config wins over `model`), or train one on the pydoc text
(a 2048-piece vocabulary, eos 1, pad 0). The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("qwen3_moe_tiny")
