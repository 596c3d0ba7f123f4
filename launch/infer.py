"""Generate with a model of any family: text or token ids in, text/ids out, per-layer balance.

  python launch/infer.py --text="The assert statement"              # the shipped tiny model
  python launch/infer.py --config=configs/switch_base_8.py \
      --config.checkpoint=/path/to/switch-base-8 --text="translate English to German: Hello"
  python launch/infer.py --ids=37,423,5 --max_new_tokens=16
  python launch/infer.py --config=configs/qwen3_moe_tiny.py \
      --config.checkpoint=tests/fixtures/decoder/qwen3_moe --ids=3,14,15   # decoder-only families
  python launch/local_cluster.py --num_processes=2 --devices_per_process=4 -- \
      python launch/infer.py --text="The assert statement" --config.cpu_devices=4

Prints the continuation, the replica bytes the model's own MoE calls moved (0: generation runs
without replication), then, per MoE layer of the pass over the prompt (Switch: the encoder),
tokens per device and balancedness under config.replication.predictor (with r replica slots).
Progress (load, compile + generate, balance passes) is logged to stderr. A prompt longer than
--config.data.max_input_tokens (default 4096 for the shipped model; memory grows with the square
of the length) or an empty one is refused with one line. --text needs a SentencePiece model in
the checkpoint dir (spiece.model); for a Hugging Face decoder checkpoint (tokenizer.json, which
moe_jax does not read) pass the prompt's token ids with --ids. A checkpoint of another family
than --config's is one line.
"""

import _setup

_setup.simulate_cpu_devices()

import time  # noqa: E402

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402

from moe_jax import distributed  # noqa: E402
from moe_jax.app import config as config_lib, runtime, workflows  # noqa: E402

_CONFIG = _setup.define_config("configs/switch_tiny.py")
flags.DEFINE_multi_string("text", [], "input text (repeat for a batch)")
flags.DEFINE_string("ids", "", "comma-separated input token ids (instead of --text)")
flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate")
flags.DEFINE_bool("use_cache", True, "KV-cached decoding")


def main(argv):
  del argv
  job = config_lib.from_tree(_CONFIG.value)
  f = flags.FLAGS
  if f.max_new_tokens < 1:
    raise config_lib.UsageError(f"--max_new_tokens={f.max_new_tokens} must be >= 1.")
  mesh = runtime.make_mesh(job.mesh)
  family, cfg = runtime.checkpoint_config(job)
  rows = workflows.prompt_rows(job, cfg, runtime.load_tokenizer(job), texts=f.text, ids=f.ids)
  logging.info("loading %s onto a data=%d x expert=%d mesh", job.checkpoint, mesh.shape["data"],
               mesh.shape["expert"])
  start = time.perf_counter()
  model, tokenizer = runtime.load_model(job, mesh=mesh)
  cfg = model.config
  logging.info("loaded in %.1f s; generating up to %d tokens for %d prompt(s) of up to %d tokens "
               "(the first call compiles)",
               time.perf_counter() - start, f.max_new_tokens, len(rows), max(map(len, rows)))
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0   # masked: any id will do
  input_ids, mask = workflows.pad_batch(rows, mesh.shape["data"], pad_id,
                                       side=family.PADDING_SIDE)
  start = time.perf_counter()
  tokens = distributed.gather(model.generate(input_ids, attention_mask=mask,
                                            max_new_tokens=f.max_new_tokens,
                                            use_cache=f.use_cache))
  logging.info("generated in %.1f s; measuring the prompt pass's per-layer balance (%s, each "
               "compiled once)", time.perf_counter() - start,
               " and ".join(dict.fromkeys(("none", job.replication.predictor))))
  # Every process runs these passes over the prompt.
  start = time.perf_counter()
  moved = workflows.replica_bytes_of(job, model, input_ids, mask)
  lines = workflows.balance_lines(job, model, input_ids, mask, mesh)
  logging.info("balance measured in %.1f s", time.perf_counter() - start)
  if jax.process_index() != 0:
    return
  for i, row in enumerate(tokens[:len(rows)]):
    ids = family.generated_ids(row, cfg, prompt_length=input_ids.shape[1])
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    print(f"[{i}] ids: {ids}")
    if text:
      print(f"[{i}] text: {text}")
  print(f"replica bytes moved by the model's own MoE calls over the prompt (no replication): "
        f"{moved:.0f}")
  for line in lines:
    print(line)


if __name__ == "__main__":
  _setup.run(main)
