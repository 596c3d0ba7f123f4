"""zai-org/GLM-4.5-Air (family `glm4_moe`): 46 layers (1 dense), hidden 4096, 96 query / 8 kv
heads of 128 (half rotary), q/k/v biases, 128 experts of width 1408, top-8, one shared expert;
106B parameters, 12B active.

  python launch/infer.py --config=configs/glm4_5_air.py \
      --config.checkpoint=/path/to/GLM-4.5-Air --ids=$IDS
  python launch/convert_hf.py --src=/path/to/GLM-4.5-Air --dst=/path/to/glm4-5-air-orbax \
      --format=orbax --dtype=bfloat16

`model` holds the Config fields of the released checkpoint (its config.json, with the bos / eos /
pad ids of its generation_config.json). Point config.checkpoint at the downloaded dir
(config.json + *.safetensors); its own config wins when it is loaded. moe_jax reads no
tokenizer.json: give a prompt as token ids ($IDS: comma-separated, from the model's tokenizer).
The tree is described in moe_jax/app/presets.py.
"""

from moe_jax.app import presets


def get_config(arg=None):
  del arg
  return presets.named("glm4_5_air")
