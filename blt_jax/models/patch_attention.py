"""Bytes and patches in BLT: which patch each byte belongs to, patch pooling, and the
cross-attention in which each query sees only its own patch (encoder: a patch's slots
query its bytes; decoder: bytes query their global patch's slots).

Shapes: B batch, T bytes, P patches, k slots per patch, H heads, K head width.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from blt_jax.models import layers


# ----------------------------------------------------------------------------- patch indexing

def byte_patch_ids(patch_lengths_BxP, seq_len: int):
  """g [B, T] int32: the patch holding target byte i (clamped to P-1)."""
  P = patch_lengths_BxP.shape[-1]
  ends_BxP = jnp.cumsum(patch_lengths_BxP.astype(jnp.int32), axis=-1)
  pos_T = jnp.arange(seq_len, dtype=jnp.int32)
  g_BxT = jnp.sum(ends_BxP[:, None, :] <= pos_T[None, :, None], axis=-1, dtype=jnp.int32)
  return jnp.minimum(g_BxT, P - 1)


def input_patch_ids(g_BxT):
  """ip [B, T]: input patch of each input position; BOS is 0, position i >= 1 is g[i-1] + 1."""
  return jnp.concatenate([jnp.zeros_like(g_BxT[:, :1]), g_BxT[:, :-1] + 1], axis=1)


def pool_patches(h_BxTxD, ip_BxT, n_patches: int, mode: str = "max"):
  """[B, P, D]: max or mean of h over each input patch 0..P-1; empty patches give zeros.
  Pools each window on its own (a batched segment reduction), so a batch split over devices
  pools without communication."""
  n_seg = n_patches + 1  # input patch P (never read) gets its own segment, then dropped

  def pool_window(h_TxD, ip_T):
    segment = dict(segment_ids=ip_T, num_segments=n_seg, indices_are_sorted=True)
    count_Px1 = jax.ops.segment_sum(jnp.ones(ip_T.shape, jnp.float32), **segment)[:n_patches, None]
    if mode == "max":
      pooled_PxD = jax.ops.segment_max(h_TxD, **segment)[:n_patches]
      return jnp.where(count_Px1 > 0, pooled_PxD, 0).astype(h_TxD.dtype)
    summed_PxD = jax.ops.segment_sum(h_TxD.astype(jnp.float32), **segment)[:n_patches]
    return (summed_PxD / jnp.maximum(count_Px1, 1)).astype(h_TxD.dtype)

  return jax.vmap(pool_window)(h_BxTxD, ip_BxT)


# ----------------------------------------------------------------------------- model

def slots_attend_own_patch(q_BxPxkxHxK, k_BxTxHxK, v_BxTxHxK, ip_BxT):
  """Encoder cross-attention: the k slots of patch p attend over the input positions of
  patch p only (softmax within the patch); a patch without positions gets zeros.

  Runs per position (its patch's k queries), so the cost grows with T * k, where a dense
  masked attention would pay T * P * k; and per window (batched segment reductions), so a
  batch split over devices needs no communication. Returns [B, P, k, H, K].
  """
  P = q_BxPxkxHxK.shape[1]
  n_seg = P + 1  # input patch P (never read) gets its own segment, then dropped
  scale = q_BxPxkxHxK.shape[-1] ** -0.5

  def attend_window(q_PxkxHxK, k_TxHxK, v_TxHxK, ip_T):
    segment = dict(segment_ids=ip_T, num_segments=n_seg, indices_are_sorted=True)
    q_TxkxHxK = q_PxkxHxK[jnp.minimum(ip_T, P - 1)]
    scores_TxkxH = jnp.einsum("tjhd,thd->tjh", q_TxkxHxK, k_TxHxK,
                              preferred_element_type=jnp.float32) * scale
    top_SxkxH = jax.lax.stop_gradient(jax.ops.segment_max(scores_TxkxH, **segment))
    weights_TxkxH = jnp.exp(scores_TxkxH - top_SxkxH[ip_T])
    total_SxkxH = jax.ops.segment_sum(weights_TxkxH, **segment)
    summed_SxkxHxK = jax.ops.segment_sum(
        weights_TxkxH[..., None] * v_TxHxK[:, None].astype(jnp.float32), **segment)
    out_SxkxHxK = summed_SxkxHxK / jnp.maximum(total_SxkxH, 1e-30)[..., None]
    return out_SxkxHxK[:P].astype(v_TxHxK.dtype)

  return jax.vmap(attend_window)(q_BxPxkxHxK, k_BxTxHxK, v_BxTxHxK, ip_BxT)


def bytes_attend_own_slots(q_BxTxHxK, k_BxPxkxHxK, v_BxPxkxHxK, g_BxT):
  """Decoder cross-attention: position i attends over the k slots of global patch g[i]
  only, gathered per position (cost T * k, not T * P * k) within each window. Returns
  [B, T, H, K]."""
  per_byte = jax.vmap(lambda slots_PxkxHxK, g_T: slots_PxkxHxK[g_T])
  k_BxTxkxHxK, v_BxTxkxHxK = per_byte(k_BxPxkxHxK, g_BxT), per_byte(v_BxPxkxHxK, g_BxT)
  scores_BxTxkxH = jnp.einsum("bthd,btjhd->btjh", q_BxTxHxK, k_BxTxkxHxK,
                              preferred_element_type=jnp.float32)
  probs_BxTxkxH = jax.nn.softmax(scores_BxTxkxH * q_BxTxHxK.shape[-1] ** -0.5, axis=2)
  return jnp.einsum("btjh,btjhd->bthd", probs_BxTxkxH.astype(v_BxTxkxHxK.dtype), v_BxTxkxHxK)


class CrossAttention(nnx.Module):
  """Pre-norm residual cross-attention without RoPE, x + attn(norm(x), kv), between bytes and
  patch slots, where each query sees only its own patch: `patch_ids_BxT` is the input patch
  of each position (encoder: slots query bytes) or the global patch it reads (decoder:
  bytes query slots). The released BLT's (`released`): kv is normalised too, and the
  output is 2x + attn(norm(x), norm(kv)) (its residual is added inside and outside)."""

  def __init__(self, dim: int, kv_dim: int, n_heads: int, k: int, *, slots_query: bool,
               released: bool = False, norm_eps: float = 1e-6, dtype, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(dim, eps=norm_eps, rngs=rngs)
    self.kv_norm = layers.RMSNorm(kv_dim, eps=norm_eps, rngs=rngs) if released else None
    self.attn = layers.Attention(dim, n_heads, kv_dim=kv_dim, use_rope=False, dtype=dtype,
                                 rngs=rngs)
    self.k, self.slots_query, self.released = k, slots_query, released

  def _residual(self, x, out):
    return (2 * x if self.released else x) + out

  def _kv(self, kv_BxMxE):
    return kv_BxMxE if self.kv_norm is None else self.kv_norm(kv_BxMxE)

  def keys_values(self, kv_BxMxE) -> tuple:
    """The projected keys and values of the other sequence, each [B * H, M, K] (cache rows,
    see `layers`), for `attend` (decoding computes them once per position or slot)."""
    B, M, _ = kv_BxMxE.shape
    H = self.attn.n_heads
    rows = lambda a: layers.rows_of(a.reshape(B, M, H, -1).transpose(0, 2, 1, 3))
    k_BxMxD, v_BxMxD = jnp.split(self.attn.kv(self._kv(kv_BxMxE)), 2, axis=-1)
    return rows(k_BxMxD), rows(v_BxMxD)

  def attend(self, x_BxLxD, kv: tuple, mask_BxLxM=None):
    """x + attn(norm(x), ...) over projected keys and values (`keys_values`), each query
    over the keys its mask allows (all by default): decoding's one patch at a time."""
    B, L, D = x_BxLxD.shape
    H = self.attn.n_heads
    q_BxLxD = self.attn.q(self.norm(x_BxLxD)) * jnp.asarray((D // H) ** -0.5, x_BxLxD.dtype)
    q_NxLxK = layers.rows_of(q_BxLxD.reshape(B, L, H, D // H).transpose(0, 2, 1, 3))
    mask = True if mask_BxLxM is None else layers.per_head(mask_BxLxM, H)
    out_NxLxK = layers.masked_attention(q_NxLxK, kv[0], kv[1], mask)
    return self._residual(x_BxLxD, self.attn.output(
        out_NxLxK.reshape(B, H, L, -1).transpose(0, 2, 1, 3)))

  def __call__(self, x_BxLxD, kv_BxMxE, patch_ids_BxT):
    q_BxLxHxK, k_BxMxHxK, v_BxMxHxK = self.attn.project(self.norm(x_BxLxD), self._kv(kv_BxMxE))
    if self.slots_query:  # L = P * k slots, M = T bytes
      B, L, H, K = q_BxLxHxK.shape
      out_BxPxkxHxK = slots_attend_own_patch(q_BxLxHxK.reshape(B, L // self.k, self.k, H, K),
                                             k_BxMxHxK, v_BxMxHxK, patch_ids_BxT)
      out_BxLxHxK = out_BxPxkxHxK.reshape(B, L, H, K)
    else:  # L = T bytes, M = P * k slots
      B, M, H, K = k_BxMxHxK.shape
      to_patches = lambda a: a.reshape(B, M // self.k, self.k, H, K)
      out_BxLxHxK = bytes_attend_own_slots(q_BxLxHxK, to_patches(k_BxMxHxK),
                                           to_patches(v_BxMxHxK), patch_ids_BxT)
    return self._residual(x_BxLxD, self.attn.output(out_BxLxHxK))
