"""Real English text that ships with every Python install, a SentencePiece vocabulary trained on
it, and batches of fixed-shape windows (each family cuts its own windows: `text_windows`).

The corpus is `pydoc_data.topics` (the Python reference manual's help topics, ~465 kB). Topics
are split deterministically into train and held-out sets by name, so benchmarks never score text
the model was trained on.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import sentencepiece as spm

PAD, EOS, UNK = 0, 1, 2


def topics() -> dict[str, str]:
  """name -> text of every pydoc help topic."""
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  return dict(sorted(pydoc_data.topics.topics.items()))


def split_topics(held_out_every: int = 8) -> tuple[dict[str, str], dict[str, str]]:
  """(train, held_out): every `held_out_every`-th topic by a stable hash of its name is held out."""
  train, held_out = {}, {}
  for name, text in topics().items():
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % held_out_every
    (held_out if bucket == 0 else train)[name] = text
  return train, held_out


def train_tokenizer(texts: list[str], model_path: str, *, vocab_size: int = 2048) -> str:
  """Trains a unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2).

  Returns:
    The path of the written `.model` file (`model_path`, which should end in `spiece.model`).
  """
  model = io.BytesIO()
  sentences = [line for text in texts for line in text.splitlines() if line.strip()]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
      character_coverage=1.0, input_sentence_size=len(sentences), shuffle_input_sentence=False,
      num_threads=2, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  with open(model_path, "wb") as f:
    f.write(model.getvalue())
  return model_path


def load_tokenizer(path: str) -> spm.SentencePieceProcessor | None:
  """The SentencePiece processor of a checkpoint directory (`path/spiece.model`; None if it has
  none), or of a `.model` file (FileNotFoundError naming the fix if it is missing)."""
  if os.path.isdir(path):
    model_file = os.path.join(path, "spiece.model")
    if not os.path.exists(model_file):
      return None
  else:
    model_file = path
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"no SentencePiece model at {model_file!r}; train one with "
                              "launch/train.py or point at a checkpoint dir holding spiece.model.")
  return spm.SentencePieceProcessor(model_file=model_file)


def token_stream(texts: list[str], tokenizer) -> np.ndarray:
  """<int32>[N] all texts tokenised and joined with eos."""
  ids = []
  for text in texts:
    ids.extend(tokenizer.encode(text))
    ids.append(EOS)
  return np.asarray(ids, np.int32)


def batches(data: dict[str, np.ndarray], batch_size: int, *, seed: int | None = None,
            drop_remainder: bool = True):
  """Yields dicts of `batch_size` windows (shuffled when `seed` is given)."""
  n = len(next(iter(data.values())))
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    pick = order[start:start + batch_size]
    yield {k: v[pick] for k, v in data.items()}
