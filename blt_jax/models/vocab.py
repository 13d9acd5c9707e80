"""Model vocabularies over the input ids every blt-jax model is fed (bytes 0..255 and BOS;
`PAD_ID` marks positions before a window's start, for hash n-grams).

  bytes  blt-jax's own: the ids themselves (257 input rows), 256 next-byte logits.
  blt    the released BLT's 260 tokens (facebookresearch/blt, transformers' BltForCausalLM):
         0 boe/pad, 1 BOS, 2 EOS, 3 BPE, byte b at b + 4; 260 logits.

A model's logits are [..., V] with the byte logits the last 256 (`byte_logprobs`); an
entropy model's entropy is over all V (as the released patcher's is).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blt_jax.constants import BOS, BYTES, INPUT_VOCAB

VOCABS = ("bytes", "blt")
PAD_ID = INPUT_VOCAB    # an input id for "before the window's start": one past every id
BLT_OFFSET = 4          # released BLT: byte b is token b + 4 ...
BLT_BOS = 1             # ... BOS is token 1 ...
BLT_PAD = 0             # ... and token 0 pads before the sequence (its hash n-grams)


def check(vocab: str):
  if vocab not in VOCABS:
    raise ValueError(f"vocab must be one of {VOCABS}, got {vocab!r}")


def input_rows(vocab: str) -> int:
  """Rows of the input embedding."""
  return INPUT_VOCAB if vocab == "bytes" else BYTES + BLT_OFFSET


def output_columns(vocab: str) -> int:
  """Logits per position (the bytes are the last 256)."""
  return BYTES if vocab == "bytes" else BYTES + BLT_OFFSET


def tokens(ids, vocab: str):
  """The model's token ids of input ids (`PAD_ID` included)."""
  if vocab == "bytes":
    return ids
  ids = jnp.asarray(ids, jnp.int32)
  return jnp.where(ids == BOS, BLT_BOS, jnp.where(ids == PAD_ID, BLT_PAD, ids + BLT_OFFSET))


def byte_logprobs(logits_xV):
  """log p(byte) [..., 256]: the log-softmax over the byte logits (the last 256) alone."""
  return jax.nn.log_softmax(logits_xV[..., -BYTES:].astype(jnp.float32), axis=-1)


def logprobs(logits_xV):
  """log p [..., V] over all V tokens (a BPE-token model's)."""
  return jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)


def entropy(logits_xV):
  """Entropy (nats) [...] of the distribution over all V tokens."""
  logp_xV = jax.nn.log_softmax(logits_xV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp_xV) * logp_xV, axis=-1)
