"""Shared layers: chunked causal attention and fused projections against plain references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blt_jax.models import layers


def dense_causal_attention(q, k, v, window):
  """The textbook version: full [T, T] scores, mask, softmax, weighted sum."""
  T, D = q.shape[1], q.shape[-1]
  t = np.arange(T)
  mask = (t[:, None] >= t[None, :]) & ((t[:, None] - t[None, :] < window) if window else True)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(mask, logits, -1e30)), v)


@pytest.mark.parametrize("T,window,chunk", [
    (40, 0, 16),     # full causal, last chunk short
    (40, 7, 16),     # window shorter than a chunk
    (33, 20, 8),     # window spanning several chunks
    (16, 0, 128),    # one chunk
])
def test_chunked_causal_attention_matches_dense(T, window, chunk):
  rng = np.random.default_rng(T + window)
  q, k, v = (jnp.asarray(rng.normal(size=(2, T, 2, 8)).astype(np.float32)) for _ in range(3))
  w = jnp.asarray(rng.normal(size=(2, T, 2, 8)).astype(np.float32))
  chunked = jax.jit(lambda q, k, v: layers.causal_attention(q, k, v, window, chunk))
  dense = jax.jit(lambda q, k, v: dense_causal_attention(q, k, v, window))
  np.testing.assert_allclose(chunked(q, k, v), dense(q, k, v), atol=1e-5)
  loss = lambda fn: lambda q, k, v: (fn(q, k, v) * w).sum()
  grads = jax.jit(jax.grad(loss(chunked), (0, 1, 2)))
  want = jax.jit(jax.grad(loss(dense), (0, 1, 2)))
  for a, b in zip(grads(q, k, v), want(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_attention_reads_only_its_causal_window(window):
  """Output t depends on input s iff s <= t (and t - s < window), across chunk borders."""
  T = 2 * layers.ATTENTION_CHUNK + 3
  attn = layers.Attention(16, 2, window=window, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, 16)).astype(np.float32))
  grad_of_row = nnx.jit(lambda attn, x, t: jax.grad(lambda x: attn(x)[0, t].sum())(x))
  for t in (0, layers.ATTENTION_CHUNK - 1, layers.ATTENTION_CHUNK, T - 1):
    grad = np.abs(np.asarray(grad_of_row(attn, x, t)[0])).max(-1)
    lo = max(0, t - window + 1) if window else 0
    assert (grad[t + 1:] == 0).all() and (grad[:lo] == 0).all()
    assert (grad[lo:t + 1] > 0).all()


def test_attention_projections_split_heads():
  """q, k and v come from the fused projections' column blocks, in that order."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)).astype(np.float32))
  kv = jnp.asarray(rng.normal(size=(2, 7, 12)).astype(np.float32))
  cross = layers.Attention(16, 2, kv_dim=12, use_rope=False, rngs=nnx.Rngs(0))
  q, k, v = cross.project(x, kv)
  kernel = np.asarray(cross.kv.kernel[...])
  np.testing.assert_allclose(q.reshape(2, 5, 16), x @ np.asarray(cross.q.kernel[...]), atol=1e-5)
  np.testing.assert_allclose(k.reshape(2, 7, 16), kv @ kernel[:, :16], atol=1e-5)
  np.testing.assert_allclose(v.reshape(2, 7, 16), kv @ kernel[:, 16:], atol=1e-5)
  self_attn = layers.Attention(16, 2, use_rope=False, rngs=nnx.Rngs(0))
  q, k, v = self_attn.project(x)
  kernel = np.asarray(self_attn.qkv.kernel[...])
  for i, part in enumerate((q, k, v)):
    np.testing.assert_allclose(part.reshape(2, 5, 16), x @ kernel[:, 16 * i:16 * (i + 1)],
                               atol=1e-5)


@pytest.mark.parametrize("x_shape,n", [((2, 5, 8), 24), ((7, 24), 8), ((3, 1, 4), 4)])
def test_matmul_gradients_equal_jax_own(x_shape, n):
  """Both backward paths (input narrower or wider than the output) give JAX's gradients."""
  rng = np.random.default_rng(n + len(x_shape))
  x = jnp.asarray(rng.normal(size=x_shape).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(x_shape[-1], n)).astype(np.float32))
  dy = jnp.asarray(rng.normal(size=(*x_shape[:-1], n)).astype(np.float32))
  np.testing.assert_allclose(layers.matmul(x, w), x @ w, rtol=1e-6)
  got = jax.vjp(layers.matmul, x, w)[1](dy)
  want = jax.vjp(lambda x, w: x @ w, x, w)[1](dy)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_layers_use_matmul_and_keep_other_products_plain():
  """`nnx.Linear` goes through `matmul` on CPU; a product `matmul` does not cover (batch
  dims, another precision) is handed to lax.dot_general unchanged."""
  x = jnp.ones((2, 3, 4))
  w = jnp.arange(20.0).reshape(4, 5)
  lin = layers.dense(4, 5, rngs=nnx.Rngs(0))
  lin.kernel[...] = w
  jaxpr = str(jax.make_jaxpr(lambda x: lin(x))(x))
  assert "custom_vjp" in jaxpr
  np.testing.assert_allclose(lin(x), x @ w)
  dims = (((2,), (0,)), ((), ()))
  np.testing.assert_allclose(
      layers.linear_dot_general(x, w, dims, precision=jax.lax.Precision.HIGHEST), x @ w)
  assert "custom_vjp" not in str(jax.make_jaxpr(
      lambda x: layers.linear_dot_general(x, w, dims, preferred_element_type=jnp.float32))(x))
