"""A tiny random Qwen2-MoE (family `qwen2_moe`): 4 layers, hidden 64, 16 experts of width 32,
top-2, a gated shared expert of width 64, q/k/v biases; a CPU runs it in seconds.

  python launch/infer.py --config=configs/qwen2_moe_tiny.py \
      --config.checkpoint=tests/fixtures/decoder/qwen2_moe --ids=3,14,15 --max_new_tokens=8
  python launch/train.py --config=configs/qwen2_moe_tiny.py --config.train.out_dir=/tmp/qwen2_moe_tiny
  python launch/infer.py --config=configs/qwen2_moe_tiny.py --config.checkpoint=/tmp/qwen2_moe_tiny \
      --text="The assert statement"

No checkpoint ships with it: point --config.checkpoint at a qwen2_moe checkpoint (a Hugging Face
dir or a moe_jax orbax dir; its own config wins over `model`), or train one on the pydoc text
(a 2048-piece vocabulary, eos 1, pad 0). The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("qwen2_moe_tiny")
