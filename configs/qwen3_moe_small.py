"""The small Qwen3-MoE (family `qwen3_moe`) trained on pydoc text, shipped in
moe_jax/assets/qwen3_moe_small: 4 layers (all MoE), hidden 64, GQA 4:2 heads of 16 with per-head
q/k norm, 32 experts of width 32, top-2 renormalised, untied embeddings, the 2048-piece
SentencePiece vocabulary of the pydoc training topics.

  python launch/train.py --config=configs/qwen3_moe_small.py \\
      --config.train.out_dir=moe_jax/assets/qwen3_moe_small            # how it was made
  python launch/train_predictor.py --config=configs/qwen3_moe_small.py
  python launch/infer.py --config=configs/qwen3_moe_small.py --text="The assert statement"
  python launch/bench.py --config=configs/bench.py:model=qwen3_moe_small

The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("qwen3_moe_small")
