"""A tiny random DeepSeek-V3 (family `deepseek_v3`): 4 layers (layer 0 dense), hidden 64, MLA
(q rank 32, kv rank 16, nope 16 / rope 8 / value 16 per head), 16 experts of width 32 in 4
groups (best 2 eligible), top-2, x2.5, one shared expert; a CPU runs it in seconds.

  python launch/infer.py --config=configs/deepseek_v3_tiny.py \
      --config.checkpoint=tests/fixtures/decoder/deepseek_v3 --ids=3,14,15 --max_new_tokens=8
  python launch/train.py --config=configs/deepseek_v3_tiny.py --config.train.out_dir=/tmp/deepseek_v3_tiny
  python launch/infer.py --config=configs/deepseek_v3_tiny.py --config.checkpoint=/tmp/deepseek_v3_tiny \
      --text="The assert statement"

No checkpoint ships with it: point --config.checkpoint at a deepseek_v3 checkpoint (a Hugging Face
dir or a moe_jax orbax dir; its own config wins over `model`), or train one on the pydoc text
(a 2048-piece vocabulary, eos 1, pad 0). The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("deepseek_v3_tiny")
