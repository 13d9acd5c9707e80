"""Hash n-gram embeddings for the BLT local encoder, in two styles.

For each n, the n-gram ending at input position i (ids i-n+1..i, oldest first; positions
before 0 are padding) is hashed and reduced mod `buckets`; each (hash function, n) has
its own rows. The hash at i reads only positions <= i, so the embeddings are causal.

  mix32  blt-jax's own: on the input ids (pad `PAD_ID`), a rolling polynomial in uint32
         (wrap-around), mixed by a 32-bit finaliser; one table per n.
  blt    the released BLT's: on its tokens (`vocab.tokens`, pad 0), sum_j tok_j * p^j
         (j = 0 the oldest) wrapped to a signed 64-bit integer, then its floor-mod by
         `buckets`; one fused table of (function, n) blocks, function f with prime
         BLT_PRIMES[f]. JAX has no 64-bit integers by default, so the arithmetic runs on
         32-bit halves.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from blt_jax.models import vocab
from blt_jax.models.vocab import PAD_ID

HASH_MULT = 1000000007  # mix32 polynomial base (odd, fits in uint32)
# The released BLT's primes, one per hash function (facebookresearch/blt).
BLT_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
              9576890767, 3628273133, 2860486313, 5463458053, 3367900313)
STYLES = ("mix32", "blt")
MAX_BLT_BUCKETS = 1 << 20  # the 32-bit modular arithmetic below needs buckets < 2^20


def _mix32(h):
  """A 32-bit avalanche finaliser (xorshift-multiply), so low bits depend on all bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def _ngrams(ids_BxT, n: int, pad: int):
  """The n windows ids[i-n+1+j] (j = 0 oldest) as uint32 [B, T] each, padded before 0."""
  ids_BxT = jnp.asarray(ids_BxT).astype(jnp.uint32)
  T = ids_BxT.shape[-1]
  padded = jnp.concatenate(
      [jnp.full(ids_BxT.shape[:-1] + (n - 1,), pad, jnp.uint32), ids_BxT], axis=-1)
  return [padded[..., j:j + T] for j in range(n)]


def ngram_hash(ids_BxT, n: int, buckets: int):
  """mix32: int32 [B, T] bucket ids, h = mix32(sum_j ids[i-n+1+j] * M^(n-1-j) mod 2^32)
  mod buckets, with M = HASH_MULT and PAD_ID before position 0."""
  h_BxT = None
  for g_BxT in _ngrams(ids_BxT, n, PAD_ID):  # oldest to newest: Horner's rule
    h_BxT = g_BxT if h_BxT is None else h_BxT * jnp.uint32(HASH_MULT) + g_BxT
  return (_mix32(h_BxT) % jnp.uint32(buckets)).astype(jnp.int32)


def _times(tok, p: int):
  """(hi, lo) uint32 halves of tok * p mod 2^64, for tok < 2^16 and a Python int p."""
  a, b = (p >> 32) & 0xFFFFFFFF, p & 0xFFFFFFFF
  m1, m0 = tok * jnp.uint32(b >> 16), tok * jnp.uint32(b & 0xFFFF)  # each < 2^32
  shifted = m1 << 16
  lo = shifted + m0
  hi = tok * jnp.uint32(a) + (m1 >> 16) + (lo < shifted).astype(jnp.uint32)
  return hi, lo


def _plus(x, y):
  """x + y mod 2^64 on (hi, lo) uint32 halves."""
  lo = x[1] + y[1]
  return x[0] + y[0] + (lo < x[1]).astype(jnp.uint32), lo


def _signed_mod(hi, lo, m: int):
  """int32: the 64-bit two's-complement integer (hi, lo) floor-mod m (0 < m < 2^20)."""
  M = jnp.uint32(m)
  c32, c42 = (1 << 32) % m, ((1 << 32) % m << 10) % m
  h = hi % M                        # h * 2^32 mod m, as (h1 * 2^10 + h0) * 2^32 mod m:
  h1, h0 = h >> 10, h & jnp.uint32(1023)  # each product < 2^30
  w = ((h1 * jnp.uint32(c42)) % M + (h0 * jnp.uint32(c32)) % M + lo % M) % M
  neg = hi >= jnp.uint32(1 << 31)   # a negative value is the unsigned one minus 2^64
  w = jnp.where(neg, (w + M - jnp.uint32((1 << 64) % m)) % M, w)
  return w.astype(jnp.int32)


def blt_hash(tokens_BxT, n: int, prime: int, buckets: int, pad: int = vocab.BLT_PAD):
  """blt: int32 [B, T] bucket ids of the released BLT's n-gram hash with `prime` (tokens
  already mapped, `pad` before position 0)."""
  acc = None
  for j, g_BxT in enumerate(_ngrams(tokens_BxT, n, pad)):
    term = _times(g_BxT, pow(prime, j, 1 << 64))
    acc = term if acc is None else _plus(acc, term)
  return _signed_mod(*acc, buckets)


class HashEmbed(nnx.Module):
  """Sum over the hash functions and each n in `ngrams` of the embedding of the hashed
  n-gram ending at each position."""

  def __init__(self, ngrams: Sequence[int], buckets: int, dim: int, *, style: str = "mix32",
               functions: int = 1, vocab_name: str = "bytes", dtype=jnp.float32,
               rngs: nnx.Rngs):
    if style not in STYLES:
      raise ValueError(f"hash_style must be one of {STYLES}, got {style!r}")
    self.ngrams = tuple(int(n) for n in ngrams)
    self.buckets, self.style, self.vocab = buckets, style, vocab_name
    self.functions = functions if style == "blt" else 1
    embed = lambda rows: nnx.Embed(rows, dim, dtype=dtype, param_dtype=jnp.float32,
                                   embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    if style == "mix32":
      self.tables = nnx.List([embed(buckets) for _ in self.ngrams])
    else:
      if not 0 < buckets < MAX_BLT_BUCKETS:
        raise ValueError(f"hash_buckets must be in 1..{MAX_BLT_BUCKETS - 1} for 'blt' "
                         f"hashing, got {buckets}")
      if not 1 <= functions <= len(BLT_PRIMES):
        raise ValueError(f"hash_functions must be in 1..{len(BLT_PRIMES)}, got {functions}")
      self.fused = embed(self.functions * len(self.ngrams) * buckets)

  @property
  def n_tables(self) -> int:
    return self.functions * len(self.ngrams)

  def bucket_ids(self, ids_BxT) -> list:
    """int32 [B, T] per table (functions, then n): rows of its own table (mix32) or of
    the fused one (blt: block i of `buckets` rows)."""
    if self.style == "mix32":
      return [ngram_hash(ids_BxT, n, self.buckets) for n in self.ngrams]
    tokens_BxT = vocab.tokens(ids_BxT, self.vocab)
    pad = vocab.BLT_PAD if self.vocab == "blt" else PAD_ID  # the token of PAD_ID
    return [blt_hash(tokens_BxT, n, BLT_PRIMES[f], self.buckets, pad)
            for f in range(self.functions) for n in self.ngrams]

  def __call__(self, ids_BxT):
    out_BxTxD = None
    for i, b_BxT in enumerate(self.bucket_ids(ids_BxT)):
      e_BxTxD = (self.tables[i](b_BxT) if self.style == "mix32"
                 else self.fused(b_BxT + i * self.buckets))
      out_BxTxD = e_BxTxD if out_BxTxD is None else out_BxTxD + e_BxTxD
    return out_BxTxD
