"""Hash n-gram embeddings for the BLT local encoder.

For each n, the n-gram ending at input position i (ids i-n+1..i; ids before position 0
are the fixed pad id 257) is hashed with a rolling polynomial in uint32 (wrap-around),
then mixed and reduced mod `buckets`. Each n has its own embedding table. The hash at i
reads only positions <= i, so the embeddings are causal.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from blt_jax.constants import INPUT_VOCAB

PAD_ID = INPUT_VOCAB    # stands for "before the sequence start": one past every input id
HASH_MULT = 1000000007  # polynomial base (odd, fits in uint32)


def _mix32(h):
  """A 32-bit avalanche finaliser (xorshift-multiply), so low bits depend on all bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def ngram_hash(ids_BxT, n: int, buckets: int):
  """int32 [B, T] bucket ids: hash of ids[i-n+1 .. i] (oldest first), pad before 0.

  h = mix32(sum_j ids[i-n+1+j] * M^(n-1-j) mod 2^32) mod buckets, with M = HASH_MULT.
  """
  ids_BxT = ids_BxT.astype(jnp.uint32)
  T = ids_BxT.shape[-1]
  pad = jnp.full(ids_BxT.shape[:-1] + (n - 1,), PAD_ID, jnp.uint32)
  padded = jnp.concatenate([pad, ids_BxT], axis=-1)
  h_BxT = jnp.zeros_like(ids_BxT)
  for j in range(n):  # oldest to newest: Horner's rule
    h_BxT = h_BxT * jnp.uint32(HASH_MULT) + padded[..., j:j + T]
  return (_mix32(h_BxT) % jnp.uint32(buckets)).astype(jnp.int32)


class HashEmbed(nnx.Module):
  """Sum over n in `ngrams` of a per-n embedding of the hashed n-gram ending at each position."""

  def __init__(self, ngrams: Sequence[int], buckets: int, dim: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.ngrams = tuple(int(n) for n in ngrams)
    self.buckets = buckets
    self.tables = nnx.List([
        nnx.Embed(buckets, dim, dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        for _ in self.ngrams])

  def __call__(self, ids_BxT):
    out_BxTxD = None
    for n, table in zip(self.ngrams, self.tables):
      e_BxTxD = table(ngram_hash(ids_BxT, n, self.buckets))
      out_BxTxD = e_BxTxD if out_BxTxD is None else out_BxTxD + e_BxTxD
    return out_BxTxD
