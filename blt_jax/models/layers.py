"""Transformer building blocks shared by every model: RMSNorm, RoPE, attention, SwiGLU.

Shapes in names: B batch, T query length, S key length, D width, H heads, K head dim.
Masks are boolean, True where attention is allowed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rope(x_BxTxHxK, positions_BxT, theta: float = 10000.0):
  """Rotary position embedding (half-split convention)."""
  half = x_BxTxHxK.shape[-1] // 2
  freq_K2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTx1xK2 = positions_BxT[..., None, None].astype(jnp.float32) * freq_K2
  sin, cos = jnp.sin(angle_BxTx1xK2), jnp.cos(angle_BxTx1xK2)
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def causal_mask(length: int, window: int | None = None):
  """[T, T] bool: query t sees keys s <= t (and t - s < window when given)."""
  t = jnp.arange(length)
  mask_TxS = t[:, None] >= t[None, :]
  if window:
    mask_TxS &= t[:, None] - t[None, :] < window
  return mask_TxS


def dense(din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, std: float | None = None):
  init = nnx.initializers.normal(std if std is not None else din ** -0.5)
  return nnx.Linear(din, dout, use_bias=False, kernel_init=init, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head attention; self-attention by default, cross-attention when `kv` is given."""

  def __init__(self, dim: int, n_heads: int, *, kv_dim: int | None = None,
               use_rope: bool = True, rope_theta: float = 10000.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % n_heads:
      raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
    kv_dim = kv_dim or dim
    self.n_heads, self.head_dim = n_heads, dim // n_heads
    self.use_rope, self.rope_theta = use_rope, rope_theta
    self.q = dense(dim, dim, rngs=rngs, dtype=dtype)
    self.k = dense(kv_dim, dim, rngs=rngs, dtype=dtype)
    self.v = dense(kv_dim, dim, rngs=rngs, dtype=dtype)
    self.o = dense(dim, dim, rngs=rngs, dtype=dtype, std=dim ** -0.5 / 2)

  def __call__(self, x_BxTxD, mask_BxTxS, *, kv_BxSxE=None, positions_BxT=None,
               kv_positions_BxS=None):
    kv_BxSxE = x_BxTxD if kv_BxSxE is None else kv_BxSxE
    B, T, _ = x_BxTxD.shape
    S = kv_BxSxE.shape[1]
    q_BxTxHxK = self.q(x_BxTxD).reshape(B, T, self.n_heads, self.head_dim)
    k_BxSxHxK = self.k(kv_BxSxE).reshape(B, S, self.n_heads, self.head_dim)
    v_BxSxHxK = self.v(kv_BxSxE).reshape(B, S, self.n_heads, self.head_dim)
    if self.use_rope:
      if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
      if kv_positions_BxS is None:
        kv_positions_BxS = positions_BxT
      q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, self.rope_theta)
      k_BxSxHxK = rope(k_BxSxHxK, kv_positions_BxS, self.rope_theta)
    logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                                preferred_element_type=jnp.float32) * self.head_dim ** -0.5
    mask_Bx1xTxS = jnp.broadcast_to(mask_BxTxS, (B, T, S))[:, None]
    logits_BxHxTxS = jnp.where(mask_Bx1xTxS, logits_BxHxTxS, -1e30)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    # A query with no visible key (fully masked row) outputs zeros, not a uniform average.
    probs_BxHxTxS = jnp.where(mask_Bx1xTxS, probs_BxHxTxS, 0.0).astype(v_BxSxHxK.dtype)
    out_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS, v_BxSxHxK)
    return self.o(out_BxTxHxK.reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.gate = dense(dim, hidden, rngs=rngs, dtype=dtype)
    self.up = dense(dim, hidden, rngs=rngs, dtype=dtype)
    self.down = dense(hidden, dim, rngs=rngs, dtype=dtype, std=hidden ** -0.5 / 2)

  def __call__(self, x_BxTxD):
    return self.down(jax.nn.silu(self.gate(x_BxTxD)) * self.up(x_BxTxD))


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
  """SwiGLU hidden width: mlp_ratio * dim * 2/3, rounded up to a multiple of 8."""
  hidden = int(mlp_ratio * dim * 2 / 3)
  return -(-hidden // 8) * 8


class Block(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU, each with a residual."""

  def __init__(self, dim: int, n_heads: int, *, mlp_ratio: float = 4.0,
               rope_theta: float = 10000.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(dim, rngs=rngs)
    self.attn = Attention(dim, n_heads, rope_theta=rope_theta, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(dim, rngs=rngs)
    self.mlp = SwiGLU(dim, mlp_hidden(dim, mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x_BxTxD, mask_BxTxS, positions_BxT=None):
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), mask_BxTxS,
                                  positions_BxT=positions_BxT)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))


class Transformer(nnx.Module):
  """A stack of blocks sharing one mask, followed by a final norm.

  With `remat`, each block's activations are recomputed in the backward pass instead of
  kept (less memory, about a third more compute).
  """

  def __init__(self, dim: int, n_layers: int, n_heads: int, *, mlp_ratio: float = 4.0,
               rope_theta: float = 10000.0, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    self.remat = remat
    self.blocks = nnx.List([
        Block(dim, n_heads, mlp_ratio=mlp_ratio, rope_theta=rope_theta, dtype=dtype, rngs=rngs)
        for _ in range(n_layers)])
    self.norm = RMSNorm(dim, rngs=rngs)

  def __call__(self, x_BxTxD, mask_BxTxS, positions_BxT=None):
    apply_block = nnx.remat(Block.__call__) if self.remat else Block.__call__
    for block in self.blocks:
      x_BxTxD = apply_block(block, x_BxTxD, mask_BxTxS, positions_BxT)
    return self.norm(x_BxTxD)
