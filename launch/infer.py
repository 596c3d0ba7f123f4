"""Generate with a Switch model: text (or token ids) in, text/ids out, with per-layer balance.

  python launch/infer.py --text="The assert statement"              # the shipped tiny model
  python launch/infer.py --config=configs/switch_base_8.py \
      --config.checkpoint=/path/to/switch-base-8 --text="translate English to German: Hello"
  python launch/infer.py --ids=37,423,5 --max_new_tokens=16
  python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
      python launch/infer.py --text="The assert statement" --config.cpu_devices=4

Prints the continuation, then, per MoE layer of the encoder pass over the input, tokens per
device and balancedness under config.replication.predictor (with r replica slots).
"""

import _setup

_setup.simulate_cpu_devices()

import jax  # noqa: E402
from absl import flags  # noqa: E402

from moe_jax import distributed, runtime, workflows  # noqa: E402

_CONFIG = _setup.define_config("configs/switch_tiny.py")
flags.DEFINE_multi_string("text", [], "input text (repeat for a batch)")
flags.DEFINE_string("ids", "", "comma-separated input token ids (instead of --text)")
flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate")
flags.DEFINE_bool("use_cache", True, "KV-cached decoding")


def main(argv):
  del argv
  config = _CONFIG.value
  f = flags.FLAGS
  mesh = runtime.make_mesh(config.mesh)
  model, tokenizer = workflows.load_switch_model(config, mesh)
  if f.ids:
    rows = [[int(t) for t in f.ids.split(",")]]
  elif f.text:
    if tokenizer is None:
      raise runtime.UsageError("this checkpoint has no spiece.model; pass --ids instead of --text.")
    rows = [tokenizer.encode(t) + [model.config.eos_token_id] for t in f.text]
  else:
    raise runtime.UsageError("give --text=... or --ids=...")
  input_ids, mask = workflows.pad_batch(rows, mesh.shape["data"], model.config.pad_token_id)
  tokens = distributed.gather(model.generate(input_ids, attention_mask=mask,
                                            max_new_tokens=f.max_new_tokens,
                                            use_cache=f.use_cache))
  lines = workflows.balance_lines(config, model, input_ids, mask, mesh)   # every process runs it
  if jax.process_index() != 0:
    return
  for i, row in enumerate(tokens[:len(rows)]):
    ids = [int(t) for t in row[1:] if t not in (model.config.pad_token_id,)]
    eos = model.config.eos_token_id
    ids = ids[:ids.index(eos)] if eos in ids else ids
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    print(f"[{i}] ids: {ids}")
    if text:
      print(f"[{i}] text: {text}")
  for line in lines:
    print(line)


if __name__ == "__main__":
  _setup.run(main)
