"""The loss and held-out metrics, per real byte: padding, BOS and filler never count."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from blt_jax.constants import BYTES
from blt_jax.models import vocab


def token_stats(logits_BxTxV, batch, axis=None, all_tokens: bool = False):
  """Sums over real target bytes only: (nll in nats, correct predictions, count), over
  `axis` (default: all; `()`: per position, zero at padding). The byte log-probabilities are
  the log-softmax over the byte logits (a model's last 256), or with `all_tokens` over
  all V (the training objective: a model with tokens besides the bytes, the released BLT
  vocabulary's, learns to leave them out).

  A token batch (`bpe`: it has `target_bytes`) has targets over all V logits: its nll is
  the targets' token nll, its count the bytes they cover, and a correct token counts its
  bytes as correct."""
  V = logits_BxTxV.shape[-1]
  targets_BxT = batch["targets"]
  mask_BxT = batch["mask"].astype(jnp.float32)
  if "target_bytes" in batch:
    logp_BxTxV, target_BxT = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), -1), targets_BxT
    bytes_BxT = batch["target_bytes"].astype(jnp.float32) * mask_BxT
    predicted_BxT = jnp.argmax(logits_BxTxV, axis=-1)
  else:
    if all_tokens:
      logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
      target_BxT = targets_BxT + (V - BYTES)
    else:
      logp_BxTxV, target_BxT = vocab.byte_logprobs(logits_BxTxV), targets_BxT
    bytes_BxT = mask_BxT
    predicted_BxT = jnp.argmax(logits_BxTxV[..., -BYTES:], axis=-1)
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, target_BxT[..., None], axis=-1)[..., 0]
  correct_BxT = (predicted_BxT == targets_BxT).astype(jnp.float32)
  return (jnp.sum(nll_BxT * mask_BxT, axis), jnp.sum(correct_BxT * bytes_BxT, axis),
          jnp.sum(bytes_BxT, axis))


def summed_loss(model, batch, *, packed: bool = False, shards: int = 1):
  """(summed nll in nats, (correct predictions, real bytes)) of a batch: the training loss
  before it is divided by the byte count (so micro-batches add up exactly)."""
  nll, correct, count = token_stats(model.logits(batch, packed=packed, shards=shards), batch,
                                    all_tokens=True)
  return nll, (correct, count)


def summarize(nll: float, correct: float, count: float) -> dict:
  """bpb, loss (nats per byte), accuracy, perplexity and the byte count of summed stats."""
  if count == 0:
    return {"bpb": float("nan"), "loss": float("nan"), "accuracy": float("nan"),
            "perplexity": float("nan"), "bytes": 0}
  loss = nll / count
  return {"bpb": loss / math.log(2), "loss": loss, "accuracy": correct / count,
          "perplexity": math.exp(loss), "bytes": int(count)}
