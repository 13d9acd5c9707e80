"""Held-out evaluation: one jitted eval step per model graph, reused over every batch."""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from blt_jax.loss import summarize, token_stats
from blt_jax.sharding import replicated


class Evaluator:
  """Jit-compiles one eval step for a model's graph and reuses it for every call. Sums
  per-byte values on the host in float64, so long evals keep their digits; on a `mesh`,
  the per-byte values come back whole to every process."""

  def __init__(self, graphdef, mesh=None):
    def step(state, batch):
      return token_stats(nnx.merge(graphdef, state).logits(batch), batch, axis=())
    self._step = jax.jit(step, out_shardings=None if mesh is None else replicated(mesh))

  def __call__(self, state, batches, *, total: int | None = None, desc: str = "eval",
               progress: bool = True) -> dict:
    sums = np.zeros(3, np.float64)
    for batch in tqdm(batches, total=total, desc=desc, leave=False, disable=not progress,
                      unit="batch", dynamic_ncols=True):
      sums += [np.sum(np.asarray(s, np.float64)) for s in self._step(state, batch)]
    return summarize(*sums)
