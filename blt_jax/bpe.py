"""The BPE-token baseline's tokenizer: a byte-level BPE vocabulary trained (with the
`tokenizers` library) on a run's training documents only, and the transform that turns
batches of byte windows into batches of token windows.

Bytes are read as Latin-1, one character per byte, so every byte string tokenizes and a
token's character offsets are its byte offsets. The base alphabet is all 256 bytes; the
merges are learnt within pre-tokens split as GPT-2 splits text (words, numbers,
punctuation runs, whitespace runs). Each window of T bytes is tokenized on its own: a
token model sees the same bytes of context as the byte models do.

A token batch carries `inputs` [B, S] (the vocabulary size V is BOS), `targets` [B, S],
`mask` (real tokens) and `target_bytes` (the bytes each target token covers), from which
the loss gives bits per byte (`loss.token_stats`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from blt_jax import data, files

FORMAT_VERSION = 1
PRE_TOKENS = (r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
TOKENIZER_FILE = "tokenizer.json"


class BPE:
  """A trained byte-level BPE vocabulary: bytes -> token ids and the bytes each covers."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()

  @classmethod
  def train(cls, documents, vocab_size: int, length: int | None = None) -> BPE:
    """A vocabulary of `vocab_size` tokens (the 256 bytes and the merges) learnt from
    `documents` (an iterable of bytes)."""
    if vocab_size < 257:
      raise ValueError(f"a BPE vocabulary needs more than the 256 bytes, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKENS), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=[chr(b) for b in range(256)])
    tokenizer.train_from_iterator((d.decode("latin-1") for d in documents), trainer,
                                  length=length)
    return cls(tokenizer)

  @classmethod
  def load(cls, path: str | Path) -> BPE:
    return cls(Tokenizer.from_file(str(path)))

  def save(self, path: str | Path):
    files.write_text(Path(path), self.tokenizer.to_str())

  def encode_batch(self, texts: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: (token ids int32 [n], bytes each token covers int32 [n], summing to the
    text's length)."""
    out = []
    for raw, enc in zip(texts, self.tokenizer.encode_batch(
        [t.decode("latin-1") for t in texts], add_special_tokens=False)):
      ends = np.array([0] + [end for _, end in enc.offsets], np.int64)
      if ends[-1] != len(raw) or np.any(np.diff(ends) <= 0):
        raise ValueError("BPE tokens do not tile the text")  # the vocabulary is not ours
      out.append((np.asarray(enc.ids, np.int32), np.diff(ends).astype(np.int32)))
    return out

  def decode(self, ids) -> bytes:
    return self.tokenizer.decode([int(i) for i in ids]).encode("latin-1")

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes token `token_id` spells."""
    return self.tokenizer.id_to_token(int(token_id)).encode("latin-1")


def cache_path(corpus: data.Corpus, split_key: str, vocab_size: int, cache_dir: str) -> Path:
  """Where the vocabulary of a corpus's training documents (by its split) is cached."""
  key = hashlib.blake2b(json.dumps([FORMAT_VERSION, corpus.fingerprint, split_key,
                                    vocab_size]).encode(), digest_size=8).hexdigest()
  return data.cache_root(cache_dir) / "tokenizers" / f"{key}.json"


def for_training(corpus: data.Corpus, train_ids: np.ndarray, split_key: str,
                 vocab_size: int, cache_dir: str = "") -> BPE:
  """The vocabulary trained on the documents `train_ids` (the training split only), from
  the cache or trained now (seconds)."""
  path = cache_path(corpus, split_key, vocab_size, cache_dir)
  if path.exists():
    return BPE.load(path)
  bpe = BPE.train((corpus.doc(int(d)) for d in train_ids), vocab_size, len(train_ids))
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise files.cannot_write(path.parent, e) from None
  bpe.save(path)
  return bpe


def window_texts(batch: dict) -> list[bytes]:
  """The real bytes of each window of a byte batch (its targets where `mask` is set)."""
  return [row[:int(n)].astype(np.uint8).tobytes()
          for row, n in zip(batch["targets"], batch["mask"].sum(1))]


class TokenWindows:
  """Maps a batch of byte windows (`targets`, `mask`) to a batch of `n_slots`-token windows
  of the same bytes. Tokens past the slots are dropped (training only: eval uses as many
  slots as a window has bytes, which no window's tokens exceed)."""

  def __init__(self, bpe: BPE, n_slots: int):
    self.bpe, self.n_slots = bpe, n_slots

  def __call__(self, batch: dict) -> dict:
    B, S = batch["targets"].shape[0], self.n_slots
    texts = window_texts(batch)
    targets_BxS = np.zeros((B, S), np.int32)
    bytes_BxS = np.zeros((B, S), np.int32)
    for b, (ids, lengths) in enumerate(self.bpe.encode_batch(texts)):
      k = min(len(ids), S)
      targets_BxS[b, :k], bytes_BxS[b, :k] = ids[:k], lengths[:k]
    inputs_BxS = np.concatenate([np.full((B, 1), self.bpe.vocab_size, np.int32),
                                 targets_BxS[:, :-1]], axis=1)
    return {"inputs": inputs_BxS, "targets": targets_BxS,
            "mask": (bytes_BxS > 0).astype(np.float32), "target_bytes": bytes_BxS}


def bytes_per_token(bpe: BPE, texts: list[bytes]) -> float:
  """Real bytes per token over texts (windows), each tokenized on its own."""
  texts = [t for t in texts if t]
  n_tokens = sum(len(ids) for ids, _ in bpe.encode_batch(texts))
  return sum(len(t) for t in texts) / max(n_tokens, 1)
