"""Choosing the next byte (or BPE token) from logits: greedy, temperature, top-k, top-p;
and the checks of those options. Pure JAX, one row per sequence; the options are traced
values, so one compiled program serves every setting."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blt_jax.errors import UserError


def check_options(*, max_bytes: int, temperature: float, top_k: int, top_p: float,
                  prefix: str = ""):
  """One-line errors (exit 2) for generation options out of range; `prefix` names their
  config section in the message."""
  if not isinstance(max_bytes, int) or max_bytes < 1:
    raise UserError(f"{prefix}max_bytes must be an integer >= 1, got {max_bytes!r}")
  if not temperature >= 0:
    raise UserError(f"{prefix}temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if not isinstance(top_k, int) or top_k < 0:
    raise UserError(f"{prefix}top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
  if not 0 < top_p <= 1:
    raise UserError(f"{prefix}top_p must be in (0, 1] (1 = all bytes), got {top_p!r}")


def filtered_logits(logits_BxV, temperature, top_k, top_p):
  """Logits scaled by 1/temperature with the bytes outside the top k (when top_k > 0) and
  outside the top-p nucleus (the likeliest bytes whose probabilities first sum to at least
  top_p) set to -inf. Bytes tied with the last one kept are kept too."""
  V = logits_BxV.shape[-1]
  x_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  desc_BxV = -jnp.sort(-x_BxV, axis=-1)
  kth_Bx1 = jnp.take(desc_BxV, jnp.clip(top_k - 1, 0, V - 1), axis=-1)[:, None]
  x_BxV = jnp.where((top_k > 0) & (x_BxV < kth_Bx1), -jnp.inf, x_BxV)
  desc_BxV = -jnp.sort(-x_BxV, axis=-1)
  p_BxV = jax.nn.softmax(desc_BxV, axis=-1)
  before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass of the likelier bytes
  kept_B = jnp.where(top_p >= 1, V, jnp.maximum(jnp.sum(before_BxV < top_p, axis=-1), 1))
  cutoff_Bx1 = jnp.take_along_axis(desc_BxV, kept_B[:, None] - 1, axis=-1)
  return jnp.where(x_BxV < cutoff_Bx1, -jnp.inf, x_BxV)


def choose(logits_BxV, keys_Bx2, index_B, temperature, top_k, top_p):
  """int32 [B]: the next byte (token) of each row: the argmax when temperature is 0, else a
  draw from the filtered distribution with row b's key folded with index_B[b] (the position
  of the byte in its text), so a row's draws depend on its own seed and text only."""
  def draw(logits_BxV):
    x_BxV = filtered_logits(logits_BxV, temperature, top_k, top_p)
    one = lambda key, index, x: jax.random.categorical(jax.random.fold_in(key, index), x)
    return jax.vmap(one)(keys_Bx2, index_B, x_BxV).astype(jnp.int32)

  greedy = lambda logits_BxV: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature == 0, greedy, draw, logits_BxV)


def row_keys(seed: int, n_rows: int):
  """[n, 2] uint32: the PRNG key of each row; row i draws with seed + i."""
  return jnp.stack([jax.random.PRNGKey(seed + i) for i in range(n_rows)])
