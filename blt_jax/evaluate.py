"""Held-out metrics per real byte: bits per byte, loss, accuracy, perplexity."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from blt_jax.sharding import replicated

def apply(model, batch, packed: bool = False, shards: int = 1):
  """Logits of a batch; `packed` (BLT) runs the global transformer on packed slots, kept
  within each of the batch's `shards` (devices)."""
  if packed:
    return model(batch["inputs"], batch["patch_lengths"], packed=True, shards=shards)
  return model(batch["inputs"], batch.get("patch_lengths"))


def token_stats(logits_BxTxV, batch, axis=None):
  """Sums over real target bytes only: (nll in nats, correct predictions, count), over
  `axis` (default: all; `()`: per byte, zero at padding)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  targets_BxT = batch["targets"]
  nll_BxT = -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  mask_BxT = batch["mask"].astype(jnp.float32)
  correct_BxT = (jnp.argmax(logp_BxTxV, axis=-1) == targets_BxT).astype(jnp.float32)
  return (jnp.sum(nll_BxT * mask_BxT, axis), jnp.sum(correct_BxT * mask_BxT, axis),
          jnp.sum(mask_BxT, axis))


def summarize(nll: float, correct: float, count: float) -> dict:
  if count == 0:
    return {"bpb": float("nan"), "loss": float("nan"), "accuracy": float("nan"),
            "perplexity": float("nan"), "bytes": 0}
  loss = nll / count
  return {"bpb": loss / math.log(2), "loss": loss, "accuracy": correct / count,
          "perplexity": math.exp(loss), "bytes": int(count)}


class Evaluator:
  """Jit-compiles one eval step for a model's graph and reuses it for every call. Sums
  per-byte values on the host in float64, so long evals keep their digits; on a `mesh`,
  the per-byte values come back whole to every process."""

  def __init__(self, graphdef, mesh=None):
    def step(state, batch):
      model = nnx.merge(graphdef, state)
      return token_stats(apply(model, batch), batch, axis=())
    self._step = jax.jit(step, out_shardings=None if mesh is None else replicated(mesh))

  def __call__(self, state, batches, *, total: int | None = None, desc: str = "eval",
               progress: bool = True) -> dict:
    sums = np.zeros(3, np.float64)
    for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress,
                      unit="batch", dynamic_ncols=True):
      sums += [np.sum(np.asarray(s, np.float64)) for s in self._step(state, batch)]
    return summarize(*sums)
