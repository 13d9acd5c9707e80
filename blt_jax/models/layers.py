"""Transformer building blocks shared by every model: RMSNorm, RoPE, attention, SwiGLU.

Shapes in names: B batch, T query length, S key length, D width, H heads, K head dim.
Masks are boolean, True where attention is allowed.

Decoding caches hold keys or values as [N, S, K] with N = B * H rows (batch-major, then
heads): no axis of size one in a batch of one, which XLA:CPU would copy at every step.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
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


def rope(x_BxTxHxK, positions_BxT=None, theta: float = 10000.0):
  """Rotary position embedding (half-split convention). Without `positions`, position t is
  t and the sin/cos tables are compile-time constants (not recomputed per head and layer)."""
  T, half = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1] // 2
  freq_K2 = theta ** (-np.arange(half, dtype=np.float32) / np.float32(half))
  if positions_BxT is None:
    angle_Tx1xK2 = np.arange(T, dtype=np.float32)[:, None, None] * freq_K2
    sin, cos = np.sin(angle_Tx1xK2), np.cos(angle_Tx1xK2)
  else:
    angle_BxTx1xK2 = positions_BxT[..., None, None].astype(jnp.float32) * freq_K2
    sin, cos = jnp.sin(angle_BxTx1xK2), jnp.cos(angle_BxTx1xK2)
  x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxK.dtype)


def causal_mask(length: int, window: int | None = None, *, kv_length: int | None = None):
  """[T, S] bool: query t sees keys s <= t (and t - s < window when given). With
  `kv_length` S > T, the queries are the last T of S positions."""
  s = jnp.arange(kv_length or length)
  t = s[-length:] if kv_length else s
  mask_TxS = t[:, None] >= s[None, :]
  if window:
    mask_TxS &= t[:, None] - s[None, :] < window
  return mask_TxS


ATTENTION_CHUNK = 128  # queries per causal-attention chunk (see `causal_attention`)


@jax.custom_vjp
def matmul(x_xK, w_KxN):
  """x @ w over the last axis of x, with the same gradients as JAX's own. Only the backward
  differs: when x is narrower than the output (K < N), the weight gradient x^T dy is
  computed from an explicit transpose of x. Left to itself, XLA:CPU transposes dy there,
  the wider operand, and the train step is slower (docs/benchmarks.md)."""
  return x_xK @ w_KxN


def _matmul_fwd(x_xK, w_KxN):
  return x_xK @ w_KxN, (x_xK, w_KxN)


def _matmul_bwd(residuals, dy_xN):
  x_xK, w_KxN = residuals
  K, N = w_KxN.shape
  x_MxK, dy_MxN = x_xK.reshape(-1, K), dy_xN.reshape(-1, N)
  dx_xK = (dy_MxN @ w_KxN.T).reshape(x_xK.shape)
  if K < N:  # the barrier keeps XLA from folding the transpose back into the dot
    dw_KxN = jax.lax.optimization_barrier(x_MxK.T) @ dy_MxN
  else:
    dw_KxN = x_MxK.T @ dy_MxN
  return dx_xK, dw_KxN.astype(w_KxN.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None,
                       **kwargs):
  """`nnx.Linear`'s product, as `matmul` on CPU (where it is faster) and as
  `lax.dot_general` elsewhere or with options `matmul` does not take."""
  (contract_x, contract_w), batch = dimension_numbers
  plain = (contract_x == (x.ndim - 1,) and contract_w == (0,) and not batch[0]
           and w.ndim == 2 and precision is None and preferred_element_type is None
           and all(v is None for v in kwargs.values()))
  if plain and jax.default_backend() == "cpu":
    return matmul(x, w)
  return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def dense(din: int, dout: int, *, rngs: nnx.Rngs, dtype=jnp.float32, std: float | None = None):
  init = nnx.initializers.normal(std if std is not None else din ** -0.5)
  return nnx.Linear(din, dout, use_bias=False, kernel_init=init, dtype=dtype,
                    param_dtype=jnp.float32, dot_general=linear_dot_general, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head attention. Self-attention (no `kv_dim`): one fused q|k|v projection, causal
  when called. Cross-attention (`kv_dim`): a q projection and a fused k|v projection of the
  other sequence, through `project` and `output`. Fused projections run as one matmul each
  (bigger and faster than one per head group)."""

  def __init__(self, dim: int, n_heads: int, *, kv_dim: int | None = None,
               use_rope: bool = True, rope_theta: float = 10000.0, window: int = 0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % n_heads:
      raise ValueError(f"width {dim} is not divisible by {n_heads} heads")
    self.n_heads, self.head_dim = n_heads, dim // n_heads
    self.use_rope, self.rope_theta, self.window = use_rope, rope_theta, window
    if kv_dim is None:
      self.qkv = dense(dim, 3 * dim, rngs=rngs, dtype=dtype)
    else:
      self.q = dense(dim, dim, rngs=rngs, dtype=dtype)
      self.kv = dense(kv_dim, 2 * dim, rngs=rngs, dtype=dtype)
    self.o = dense(dim, dim, rngs=rngs, dtype=dtype, std=dim ** -0.5 / 2)

  def project(self, x_BxTxD, kv_BxSxE=None, packing=None, positions_BxT=None):
    """Heads q [B, T, H, K] and k, v [B, S, H, K] (S = T for self-attention); with RoPE,
    q and k are rotated by positions 0 .. T-1 (or `positions`). With `packing`, x holds
    packed rows and q, k, v come out unpacked to [B, P, H, K]."""
    heads = lambda a: a.reshape(*a.shape[:2], self.n_heads, self.head_dim)
    if kv_BxSxE is None:
      qkv_BxTx3D = self.qkv(x_BxTxD)
      if packing is not None:
        qkv_BxTx3D = packing.unpack(qkv_BxTx3D)
      q_BxTxD, k_BxSxD, v_BxSxD = jnp.split(qkv_BxTx3D, 3, axis=-1)
    else:
      q_BxTxD, (k_BxSxD, v_BxSxD) = self.q(x_BxTxD), jnp.split(self.kv(kv_BxSxE), 2, axis=-1)
    q_BxTxHxK, k_BxSxHxK, v_BxSxHxK = heads(q_BxTxD), heads(k_BxSxD), heads(v_BxSxD)
    if self.use_rope:
      q_BxTxHxK = rope(q_BxTxHxK, positions_BxT, self.rope_theta)
      k_BxSxHxK = rope(k_BxSxHxK, positions_BxT, self.rope_theta)
    return q_BxTxHxK, k_BxSxHxK, v_BxSxHxK

  def output(self, out_BxTxHxK):
    """The output projection of the concatenated heads."""
    B, T = out_BxTxHxK.shape[:2]
    return self.o(out_BxTxHxK.reshape(B, T, self.n_heads * self.head_dim))

  def init_cache(self, batch_size: int, length: int, dtype) -> tuple:
    """An empty key/value cache (k, v), each [B * H, S, K], for `step`."""
    shape = (batch_size * self.n_heads, length, self.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)  # two buffers (donated apart)

  def prefill(self, x_BxTxD):
    """`__call__` over whole windows, and their keys and values as a decoding cache (each
    [B * H, T, K]) from which `step` goes on at any position."""
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = self.project(x_BxTxD)
    out_BxTxD = self.output(causal_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, self.window))
    rows = lambda a: rows_of(a.transpose(0, 2, 1, 3))
    return out_BxTxD, (rows(k_BxTxHxK), rows(v_BxTxHxK))

  def step(self, x_Bx1xD, cache: tuple, pos_B, write_B=None):
    """Causal self-attention of one new position per row (row b at position pos_B[b])
    over itself and the cached keys and values of its earlier positions (those within
    the window): `__call__`'s output [B, 1, D] at that position, and the cache with this
    position written (only in rows where `write_B`, when given). The cache is written
    first and then read, which XLA updates in place."""
    q_BxHxK, k_BxHxK, v_BxHxK = self._step_heads(x_Bx1xD, pos_B)
    cache = tuple(write_position(c, pos_B, e, write_B) for c, e in zip(cache, (k_BxHxK, v_BxHxK)))
    S = cache[0].shape[1]
    seen_BxS = self._seen(pos_B, S) | (jnp.arange(S) == pos_B[:, None])
    out_Nx1xK = masked_attention(rows_of(q_BxHxK)[:, None], cache[0], cache[1],
                                 per_head(seen_BxS, self.n_heads)[:, None])
    return self.output(out_Nx1xK.reshape(*q_BxHxK.shape)[:, None]), cache

  def step_entries(self, x_Bx1xD, cache: tuple, pos_B):
    """`step` with the cache only read: the output [B, 1, D] and this position's keys and
    values [B, H, K] for `write_caches` (inside a `lax.cond`, where returning whole caches
    would copy them)."""
    q_BxHxK, k_BxHxK, v_BxHxK = self._step_heads(x_Bx1xD, pos_B)
    seen_NxS = per_head(self._seen(pos_B, cache[0].shape[1]), self.n_heads)
    out_Nx1xK = attend_cache(rows_of(q_BxHxK)[:, None], cache[0], cache[1], seen_NxS,
                             rows_of(k_BxHxK), rows_of(v_BxHxK))
    return self.output(out_Nx1xK.reshape(*q_BxHxK.shape)[:, None]), (k_BxHxK, v_BxHxK)

  def _step_heads(self, x_Bx1xD, pos_B):
    """The new position's q (scaled), k, v, each [B, H, K]."""
    q_Bx1xHxK, k_Bx1xHxK, v_Bx1xHxK = self.project(x_Bx1xD, positions_BxT=pos_B[:, None])
    q_BxHxK = q_Bx1xHxK[:, 0] * jnp.asarray(self.head_dim ** -0.5, q_Bx1xHxK.dtype)
    return q_BxHxK, k_Bx1xHxK[:, 0], v_Bx1xHxK[:, 0]

  def _seen(self, pos_B, length: int):
    """[B, S]: the cached positions before pos_B that its query sees (window included)."""
    s_S = jnp.arange(length)
    earlier_BxS = s_S < pos_B[:, None]
    if self.window:
      earlier_BxS &= pos_B[:, None] - s_S < self.window
    return earlier_BxS

  def __call__(self, x_BxTxD, packing=None):
    """Causal self-attention (span `window` when set). With `packing` (a
    `slot_packing.SlotPacking`), x holds packed rows [N, C, D]: the projections run on them
    and the attention on the unpacked sequences."""
    if packing is None:
      q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = self.project(x_BxTxD)
      return self.output(causal_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, self.window))
    q_BxPxHxK, k_BxPxHxK, v_BxPxHxK = self.project(x_BxTxD, packing=packing)
    out_BxPxHxK = causal_attention(q_BxPxHxK, k_BxPxHxK, v_BxPxHxK, self.window)
    return self.output(packing.pack(out_BxPxHxK))


def rows_of(x_BxHx___):
  """[B, H, ...] -> [B * H, ...]: the cache rows (batch-major, then heads)."""
  return x_BxHx___.reshape(-1, *x_BxHx___.shape[2:])


def per_head(mask_Bx___, n_heads: int):
  """A per-row mask [B, ...] repeated for each head's cache row: [B * H, ...]."""
  return jnp.repeat(mask_Bx___, n_heads, axis=0)


def attend_cache(q_NxLxK, k_NxSxK, v_NxSxK, mask_NxS, k_NxK, v_NxK):
  """L queries per cache row (already scaled) over the cached keys its mask allows and over
  the row's own new key: softmax attention [N, L, K], the cache read in place (not joined
  with the new key)."""
  cached_NxLxS = jnp.einsum("nlk,nsk->nls", q_NxLxK, k_NxSxK,
                            preferred_element_type=jnp.float32)
  cached_NxLxS = jnp.where(mask_NxS[:, None], cached_NxLxS, -jnp.inf)
  own_NxL = jnp.einsum("nlk,nk->nl", q_NxLxK, k_NxK, preferred_element_type=jnp.float32)
  top_NxL = jnp.maximum(jnp.max(cached_NxLxS, axis=-1), own_NxL)
  weights_NxLxS = jnp.exp(cached_NxLxS - top_NxL[..., None])
  own_weight_NxL = jnp.exp(own_NxL - top_NxL)
  total_NxL = jnp.sum(weights_NxLxS, axis=-1) + own_weight_NxL
  out_NxLxK = (jnp.einsum("nls,nsk->nlk", weights_NxLxS.astype(v_NxSxK.dtype), v_NxSxK,
                          preferred_element_type=jnp.float32)
               + own_weight_NxL[..., None] * v_NxK[:, None].astype(jnp.float32))
  return (out_NxLxK / total_NxL[..., None]).astype(v_NxK.dtype)


def write_caches(caches: list, pos_B, entries: list, write_B=None) -> list:
  """Key/value caches with each row's new entries (from `step`) written at its position
  (only in rows where `write_B`, when given)."""
  return [tuple(write_position(c, pos_B, e, write_B) for c, e in zip(cache, entry))
          for cache, entry in zip(caches, entries)]


def write_position(cache_NxSxK, pos_B, new_BxHxK, write_B=None):
  """The cache with batch row b's entries (its H cache rows) at position pos_B[b] set to
  new_BxHxK[b] (kept as they were in rows where `write_B` is False)."""
  H = new_BxHxK.shape[1]
  rows_N, pos_N = jnp.arange(cache_NxSxK.shape[0]), jnp.repeat(pos_B, H)
  new_NxK = rows_of(new_BxHxK).astype(cache_NxSxK.dtype)
  if write_B is not None:
    new_NxK = jnp.where(per_head(write_B, H)[:, None], new_NxK, cache_NxSxK[rows_N, pos_N])
  return cache_NxSxK.at[rows_N, pos_N].set(new_NxK)


def causal_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, window: int = 0,
                     chunk: int = ATTENTION_CHUNK):
  """Causal self-attention computed per chunk of `chunk` queries, each against only the keys
  it can see (its prefix, or the last `window` positions): the masked-out upper triangle
  (and, with a window, the band's outside) is mostly never computed. Heads move in front
  once, so the chunks slice contiguous rows."""
  T, K = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
  heads_first = lambda a: a.transpose(0, 2, 1, 3)
  q_BxHxTxK = heads_first(q_BxTxHxK * jnp.asarray(K ** -0.5, q_BxTxHxK.dtype))
  k_BxHxTxK, v_BxHxTxK = heads_first(k_BxTxHxK), heads_first(v_BxTxHxK)
  outs = []
  for start in range(0, T, chunk):
    stop = min(start + chunk, T)
    lo = max(0, start - window + 1) if window else 0
    mask_CxS = causal_mask(stop - start, window, kv_length=stop - lo)
    outs.append(masked_attention(q_BxHxTxK[:, :, start:stop], k_BxHxTxK[:, :, lo:stop],
                                 v_BxHxTxK[:, :, lo:stop], mask_CxS))
  out_BxHxTxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return heads_first(out_BxHxTxK)


def masked_attention(q_xTxK, k_xSxK, v_xSxK, mask_TxS):
  """Softmax attention (q already scaled) where `mask` allows, over any leading axes
  ([B, H] in training, cache rows in decoding); every query must see at least one key.
  The softmax is normalised after the weighted sum of values (on [..., T, K], not on the
  [..., T, S] weights), which saves a pass over the weights forward and backward."""
  logits_xTxS = jnp.einsum("...tk,...sk->...ts", q_xTxK, k_xSxK,
                           preferred_element_type=jnp.float32)
  logits_xTxS = jnp.where(mask_TxS, logits_xTxS, -jnp.inf)
  top_xTx1 = jax.lax.stop_gradient(jnp.max(logits_xTxS, axis=-1, keepdims=True))
  weights_xTxS = jnp.exp(logits_xTxS - top_xTx1)
  total_xTx1 = jnp.sum(weights_xTxS, axis=-1, keepdims=True)
  out_xTxK = jnp.einsum("...ts,...sk->...tk", weights_xTxS.astype(v_xSxK.dtype), v_xSxK,
                        preferred_element_type=jnp.float32)
  return (out_xTxK / total_xTx1).astype(v_xSxK.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.gate_up = dense(dim, 2 * hidden, rngs=rngs, dtype=dtype)
    self.down = dense(hidden, dim, rngs=rngs, dtype=dtype, std=hidden ** -0.5 / 2)

  def __call__(self, x_BxTxD):
    gate_BxTxF, up_BxTxF = jnp.split(self.gate_up(x_BxTxD), 2, axis=-1)
    return self.down(jax.nn.silu(gate_BxTxF) * up_BxTxF)


def mlp_hidden(dim: int, mlp_ratio: float) -> int:
  """SwiGLU hidden width: mlp_ratio * dim * 2/3, rounded up to a multiple of 8."""
  hidden = int(mlp_ratio * dim * 2 / 3)
  return -(-hidden // 8) * 8


class Block(nnx.Module):
  """Pre-norm transformer block: causal attention then SwiGLU, each with a residual."""

  def __init__(self, dim: int, n_heads: int, *, window: int = 0, mlp_ratio: float = 4.0,
               mlp_dim: int = 0, rope_theta: float = 10000.0, norm_eps: float = 1e-6,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(dim, eps=norm_eps, rngs=rngs)
    self.attn = Attention(dim, n_heads, rope_theta=rope_theta, window=window, dtype=dtype,
                          rngs=rngs)
    self.mlp_norm = RMSNorm(dim, eps=norm_eps, rngs=rngs)
    self.mlp = SwiGLU(dim, mlp_dim or mlp_hidden(dim, mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x_BxTxD, packing=None):
    x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), packing)
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))

  def prefill(self, x_BxTxD):
    """`__call__` and the decoding cache of its attention (`Attention.prefill`)."""
    a_BxTxD, cache = self.attn.prefill(self.attn_norm(x_BxTxD))
    x_BxTxD = x_BxTxD + a_BxTxD
    return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), cache

  def step(self, x_Bx1xD, cache, pos_B, write_B=None, entries: bool = False):
    """One new position per row over a key/value cache: `Attention.step`, or with
    `entries`, `Attention.step_entries`."""
    attn_step = self.attn.step_entries if entries else functools.partial(self.attn.step,
                                                                          write_B=write_B)
    a_Bx1xD, cache = attn_step(self.attn_norm(x_Bx1xD), cache, pos_B)
    x_Bx1xD = x_Bx1xD + a_Bx1xD
    return x_Bx1xD + self.mlp(self.mlp_norm(x_Bx1xD)), cache


class Transformer(nnx.Module):
  """A stack of causal blocks (attention span `window`; 0 = full), then a final norm (unless
  `final_norm` is False). `mlp_dim`: the SwiGLU width (0: from `mlp_ratio`).

  With `remat`, each block's activations are recomputed in the backward pass instead of
  kept (less memory, about a third more compute). `before(i, x)`, where given, runs on
  the input of block i (the BLT decoder's cross-attention before its layers).
  """

  def __init__(self, dim: int, n_layers: int, n_heads: int, *, window: int = 0,
               mlp_ratio: float = 4.0, mlp_dim: int = 0, rope_theta: float = 10000.0,
               norm_eps: float = 1e-6, final_norm: bool = True, dtype=jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    self.remat = remat
    self.blocks = nnx.List([
        Block(dim, n_heads, window=window, mlp_ratio=mlp_ratio, mlp_dim=mlp_dim,
              rope_theta=rope_theta, norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        for _ in range(n_layers)])
    self.norm = RMSNorm(dim, eps=norm_eps, rngs=rngs) if final_norm else None

  def _out(self, x_BxTxD):
    return x_BxTxD if self.norm is None else self.norm(x_BxTxD)

  def __call__(self, x_BxTxD, packing=None, before=None):
    """[B, T, D] -> [B, T, D]; with `packing`, packed rows [N, C, D] (see `Attention`)."""
    apply_block = nnx.remat(Block.__call__) if self.remat else Block.__call__
    for i, block in enumerate(self.blocks):
      if before is not None:
        x_BxTxD = before(i, x_BxTxD)
      x_BxTxD = apply_block(block, x_BxTxD, packing)
    return self._out(x_BxTxD)

  def prefill(self, x_BxTxD, before=None):
    """`__call__` over whole windows, and the decoding caches of their positions, one per
    block, from which `step` goes on at any position."""
    caches = []
    for i, block in enumerate(self.blocks):
      if before is not None:
        x_BxTxD = before(i, x_BxTxD)
      x_BxTxD, cache = block.prefill(x_BxTxD)
      caches.append(cache)
    return self._out(x_BxTxD), caches

  def init_cache(self, batch_size: int, length: int, dtype=jnp.float32) -> list:
    """Empty key/value caches of `length` positions, one per block, for `step`."""
    return [block.attn.init_cache(batch_size, length, dtype) for block in self.blocks]

  def step(self, x_Bx1xD, caches: list, pos_B, write_B=None, entries: bool = False,
           before=None):
    """[B, 1, D] -> [B, 1, D]: `__call__`'s output at position pos_B[b] of each row, from
    the caches of the earlier positions; returns it and the caches with this position
    written (in rows where `write_B`, when given), or with `entries` (the caches only
    read) this position's keys and values per block, for `write_caches`."""
    out = []
    for i, (block, cache) in enumerate(zip(self.blocks, caches)):
      if before is not None:
        x_Bx1xD = before(i, x_Bx1xD)
      x_Bx1xD, cache = block.step(x_Bx1xD, cache, pos_B, write_B, entries)
      out.append(cache)
    return self._out(x_Bx1xD), out
