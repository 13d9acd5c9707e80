"""BLT model: patch indexing and masks, hash embeddings, causality, padding, overfitting."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from blt_jax.constants import BOS
from blt_jax.models import blt, build, flops, hash_embed, patch_attention
from blt_jax.models.byte_lm import ByteLM, ByteLMConfig

T, P, K = 32, 12, 2
TINY = dict(enc_dim=32, enc_layers=1, enc_heads=2, enc_window=4,
            global_dim=64, global_layers=2, global_heads=4,
            dec_dim=32, dec_layers=1, dec_heads=2, dec_window=4,
            cross_attn_k=K, cross_heads=2, hash_ngrams=(3, 4), hash_buckets=64, max_patches=P)


def tiny_model(seed=0, **overrides):
  return blt.BLT(blt.BLTConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


def causal_starts(inputs):
  """A causal patch rule: x_i starts a patch iff i == 0 or inputs[i] (= x_{i-1}) % 3 == 0."""
  starts = np.asarray(inputs) % 3 == 0
  starts[..., 0] = True
  return starts


def lengths_from_starts(starts, max_patches):
  """Patch lengths [B, P] from starts [B, T]: zero-padded, surplus folded into the last patch."""
  out = np.zeros((starts.shape[0], max_patches), np.int32)
  for b, row in enumerate(np.asarray(starts)):
    idx = list(np.flatnonzero(row)) + [row.shape[0]]
    lens = np.diff(idx)
    if len(lens) > max_patches:
      lens = np.concatenate([lens[:max_patches - 1], [lens[max_patches - 1:].sum()]])
    out[b, :len(lens)] = lens
  return out


def random_inputs(seed, batch=2, seq_len=T):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (batch, seq_len)).astype(np.int32)
  x[:, 0] = BOS
  return x


# ----------------------------------------------------------------------------- masks

def reference_indices(lengths, seq_len):
  g = []
  for p, n in enumerate(lengths):
    g += [p] * int(n)
  g = g[:seq_len]
  ip = [0] + [gi + 1 for gi in g[:-1]]
  return np.array(g), np.array(ip)


@pytest.mark.parametrize("lengths", [
    [3, 5, 1, 7, 2, 4, 6, 4, 0, 0, 0, 0],    # zero-padded
    [1] * 11 + [21],                         # surplus folded into the last patch
    [32] + [0] * 11,                         # one patch
])
def test_patch_ids_match_reference(lengths):
  L = jnp.array([lengths], jnp.int32)
  g = np.asarray(patch_attention.byte_patch_ids(L, T))[0]
  ip = np.asarray(patch_attention.input_patch_ids(jnp.asarray(g)[None]))[0]
  g_ref, ip_ref = reference_indices(lengths, T)
  np.testing.assert_array_equal(g, g_ref)
  np.testing.assert_array_equal(ip, ip_ref)



@pytest.mark.parametrize("lengths", [
    [3, 5, 1, 7, 2, 4, 6, 4, 0, 0, 0, 0],    # zero-padded (empty patches get zeros)
    [1] * 11 + [21],                         # surplus folded into the last patch
    [32] + [0] * 11,                         # one patch
])
def test_patch_cross_attention_matches_dense_masked_attention(lengths):
  """The gathered/segmented cross-attentions equal a dense softmax attention whose mask
  says, row by row, what each query may see: slot j of patch p sees the input positions of
  patch p (a slot that sees none outputs zeros); position i sees the k slots of patch g[i].
  Values and gradients."""
  g_ref, ip_ref = reference_indices(lengths, T)
  H, D = 2, 8
  enc_mask = np.array([[ip_ref[s] == row // K for s in range(T)] for row in range(P * K)])
  dec_mask = np.array([[col // K == g_ref[i] for col in range(P * K)] for i in range(T)])
  # Semantics: every input position feeding patch g[i] precedes x_i's patch start, so it
  # holds a byte strictly before x_i (input s holds x_{s-1}), and the patch is complete.
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  for i in range(T):
    seen = np.flatnonzero(ip_ref == g_ref[i])
    assert (seen <= starts[g_ref[i]]).all() and (seen <= i).all()

  def dense(q, k, v, mask):
    logits = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1) * mask
    return jnp.einsum("hts,shd->thd", probs, v)

  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
  ip, g = jnp.asarray(ip_ref)[None], jnp.asarray(g_ref)[None]
  encoder = lambda q, k, v: patch_attention.slots_attend_own_patch(
      q.reshape(1, P, K, H, D), k, v, ip)
  decoder = lambda q, k, v: patch_attention.bytes_attend_own_slots(
      q, k.reshape(1, P, K, H, D), v.reshape(1, P, K, H, D), g)
  for fn, mask, (nq, nk) in ((encoder, enc_mask, (P * K, T)), (decoder, dec_mask, (T, P * K))):
    q, k, v = normal(1, nq, H, D), normal(1, nk, H, D), normal(1, nk, H, D)
    w = normal(nq, H, D)
    got = lambda q, k, v: (fn(q, k, v).reshape(nq, H, D) * w).sum()
    want = lambda q, k, v: (dense(q[0], k[0], v[0], mask) * w).sum()
    np.testing.assert_allclose(fn(q, k, v).reshape(nq, H, D), dense(q[0], k[0], v[0], mask),
                               atol=1e-5)
    for a, b in zip(jax.grad(got, (0, 1, 2))(q, k, v), jax.grad(want, (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_pool_patches_max_mean_and_empty():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(1, T, 5)).astype(np.float32)
  lengths = [3, 5, 1, 7, 2, 4, 6, 4, 0, 0, 0, 0]
  _, ip = reference_indices(lengths, T)
  for mode, fn in (("max", np.max), ("mean", np.mean)):
    out = np.asarray(patch_attention.pool_patches(jnp.asarray(h), jnp.asarray(ip)[None], P,
                                                  mode))[0]
    for p in range(P):
      rows = h[0, ip == p]
      want = fn(rows, axis=0) if len(rows) else np.zeros(5)
      np.testing.assert_allclose(out[p], want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- hashing

def _mix32_ref(h):
  m = 0xFFFFFFFF
  h ^= h >> 16
  h = (h * 0x7FEB352D) & m
  h ^= h >> 15
  h = (h * 0x846CA68B) & m
  return h ^ (h >> 16)


def hash_ref(ids, i, n, buckets):
  h = 0
  for j in range(i - n + 1, i + 1):
    h = (h * hash_embed.HASH_MULT + (ids[j] if j >= 0 else hash_embed.PAD_ID)) & 0xFFFFFFFF
  return _mix32_ref(h) % buckets


def test_hash_known_values_and_determinism():
  ids = jnp.array([[BOS, 104, 105, 33, 104, 105]], jnp.int32)
  # By hand: the bigram (PAD, BOS) at position 0 is 257 * 1000000007 + 256 mod 2^32
  # = 257000002055 - 59 * 2^32 = 3596931591.
  assert (257 * 1000000007 + 256) % 2 ** 32 == 3596931591
  h2 = np.asarray(hash_embed.ngram_hash(ids, 2, 4096))[0]
  assert h2[0] == _mix32_ref(3596931591) % 4096
  for n in (1, 2, 3, 5):
    h = np.asarray(hash_embed.ngram_hash(ids, n, 4096))[0]
    assert list(h) == [hash_ref([int(v) for v in ids[0]], i, n, 4096) for i in range(6)]
    np.testing.assert_array_equal(h, np.asarray(hash_embed.ngram_hash(ids, n, 4096))[0])
  # The same bigram "hi" at positions 2 and 5 hashes alike; (BOS, h) vs (!, h) differ.
  assert h2[2] == h2[5] and h2[1] != h2[4]


def test_hash_only_looks_backwards():
  """Changing byte j changes exactly the n-gram ids at positions j..j+n-1 (with buckets
  enough that collisions are negligible), so every n-gram reads all of its n bytes."""
  ids = jnp.asarray(random_inputs(1, batch=1))
  for n in (3, 8):
    base = np.asarray(hash_embed.ngram_hash(ids, n, 1 << 30))[0]
    for j in (0, 7, 20, T - 1):
      changed = np.asarray(hash_embed.ngram_hash(ids.at[0, j].add(1), n, 1 << 30))[0]
      np.testing.assert_array_equal(np.flatnonzero(base != changed),
                                    np.arange(j, min(j + n, T)))


# ----------------------------------------------------------------------------- causality

@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_gradient_causality(pooling):
  model = tiny_model(pooling=pooling)
  inputs = random_inputs(2)
  lengths = jnp.asarray(lengths_from_starts(causal_starts(inputs), P))
  targets = jnp.concatenate([inputs[:, 1:], np.full((2, 1), 7, np.int32)], axis=1)
  x = model.embed_inputs(jnp.asarray(inputs))

  def loss(x_BxTxE, b, t):
    logp = jax.nn.log_softmax(model.forward_embedded(x_BxTxE, lengths)[b, t])
    return -logp[targets[b, t]]

  # One jitted grad per (b, t), not jit(jacrev): on jaxlib 0.10.2 CPU, XLA's YNNPACK reduce
  # fusion miscompiles large vmapped VJPs (even RMSNorm's jacobian comes out wrong; plain grads
  # are right; XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce avoids it).
  grad_fn = jax.jit(jax.grad(loss))
  for b in range(2):
    gnorm = np.stack([np.asarray(jnp.abs(grad_fn(x, b, t)).sum(-1)) for t in range(T)])  # [t, B, s]
    assert np.all(gnorm[:, 1 - b] == 0.0), "batch rows interact"
    gnorm = gnorm[:, b]
    assert np.all(gnorm[np.triu_indices(T, 1)] == 0.0), "a loss sees a later input"
    # Exact dependency structure: loss t sees input s through the local windows (reach
    # 3 + 3 bytes: one encoder and one decoder layer of span 4) or, through the global path,
    # iff s lies in an input patch <= g[t], i.e. s <= start of x_t's patch.
    g, _ = reference_indices(np.asarray(lengths[b]), T)
    starts = np.concatenate([[0], np.cumsum(np.asarray(lengths[b]))[:-1]])
    t_, s_ = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    expected = (s_ <= t_) & ((t_ - s_ <= 6) | (s_ <= starts[g][:, None]))
    np.testing.assert_array_equal(gnorm > 0, expected)
    assert (expected & (t_ - s_ > 6)).any()   # the global path is exercised


def test_future_bytes_do_not_change_logits():
  model = tiny_model(seed=1)
  fwd = nnx.jit(lambda m, a, b: m(a, b))
  inputs = random_inputs(3)
  base = np.asarray(fwd(model, jnp.asarray(inputs),
                        jnp.asarray(lengths_from_starts(causal_starts(inputs), P))))
  rng = np.random.default_rng(4)
  for t in (0, 5, 17, T - 2):
    changed = inputs.copy()
    changed[:, t + 1:] = rng.integers(0, 256, changed[:, t + 1:].shape)
    lengths = lengths_from_starts(causal_starts(changed), P)   # patches recomputed, causally
    out = np.asarray(fwd(model, jnp.asarray(changed), jnp.asarray(lengths)))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3


# ----------------------------------------------------------------------------- robustness

def test_padding_and_folded_patches_are_finite():
  model = tiny_model(seed=2)
  inputs = jnp.asarray(random_inputs(5, batch=4))
  lengths = jnp.array([[T] + [0] * (P - 1),
                       [1] * (P - 1) + [T - P + 1],
                       [2] * (P - 1) + [T - 2 * (P - 1)],
                       [5, 0, 7, 0, 20] + [0] * (P - 5)], jnp.int32)
  assert (lengths.sum(-1) == T).all()

  def loss(m):
    logits = m(inputs, lengths)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  assert logits.shape == (4, T, 256) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all() and np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_bf16_compute_and_no_hash():
  model = tiny_model(dtype="bfloat16", hash_ngrams=())
  assert model.hash_embed is None
  counts = model.param_counts()
  assert counts["total"] == counts["without_hash"]
  inputs = jnp.asarray(random_inputs(6))
  lengths = jnp.asarray(lengths_from_starts(causal_starts(inputs), P))
  logits = model(inputs, lengths)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_config_registry_counts_and_validation():
  model = build({**TINY, "hash_ngrams": "3,4", "kind": "blt"})
  assert model.needs_patches and model.cfg.hash_ngrams == (3, 4)
  counts = model.param_counts()
  assert counts["total"] - counts["without_hash"] == 2 * 64 * 32
  with pytest.raises(ValueError):
    blt.BLTConfig(**{**TINY, "pooling": "sum"})
  with pytest.raises(ValueError):
    blt.BLTConfig(**{**TINY, "cross_heads": 3})


def test_flops_formula():
  for n, w in ((10, 0), (10, 3), (7, 100)):
    brute = np.mean([min(i + 1, w or n) for i in range(n)])
    assert flops.mean_context(n, w) == pytest.approx(brute)
  # ByteLM by hand: 1 layer, d = 8, hidden = mlp_hidden(8, 3) = 16, T = 4 (mean context 2.5).
  lm = ByteLMConfig(dim=8, n_layers=1, mlp_ratio=3.0)
  fwd = 2 * (4 * 64 + 3 * 8 * 16) + 4 * 8 * 2.5 + 2 * 8 * 256
  assert flops.byte_lm_flops_per_byte(lm, 4) == pytest.approx(3 * fwd)
  assert ByteLM(lm, rngs=nnx.Rngs(0)).flops_per_byte(4) == pytest.approx(3 * fwd)
  model = tiny_model()
  f3, f8 = model.flops_per_byte(1024, 3.0), model.flops_per_byte(1024, 8.0)
  assert f3 > f8 > 0 and flops.blt_flops_per_byte(model.cfg, 1024, 3.0) == f3
  assert model.flops_per_byte(T) == model.flops_per_byte(T, T / P)


def test_flops_of_the_released_options():
  """By hand: E = D = 8, G = 24, k = 2, slots of width E (k * E = 16 != G: a projection in),
  SwiGLU widths 16 / 40 / 24, cross-attention before both decoder layers, a 260-way head;
  T = 12 bytes in patches of m = 3 (n_p = 4), full attention."""
  cfg = blt.BLTConfig(enc_dim=8, enc_layers=1, enc_heads=2, enc_window=0, global_dim=24,
                      global_layers=1, global_heads=2, dec_dim=8, dec_layers=2, dec_heads=2,
                      dec_window=0, cross_attn_k=2, cross_heads=2, hash_ngrams=(),
                      max_patches=4, enc_mlp_dim=16, global_mlp_dim=40, dec_mlp_dim=24,
                      cross_style="blt", dec_cross_all_layers=True, vocab="blt")
  ctx_T, ctx_p = 6.5, 2.5  # mean causal context over 12 bytes, over 4 patches
  per_byte = (2 * (4 * 64 + 3 * 8 * 16) + 4 * 8 * ctx_T          # encoder block
              + 4 * 8 * 8                                        # encoder cross k, v
              + 2 * (4 * 64 + 4 * 8 * 2)                         # 2 decoder cross q, o, attention
              + 2 * (2 * (4 * 64 + 3 * 8 * 24) + 4 * 8 * ctx_T)  # 2 decoder blocks
              + 2 * 8 * 260)                                     # head
  per_patch = (2 * 8 * 16                                        # pooled -> 2 slots of 8
               + 2 * 4 * 64 + 4 * 2 * 8 * 3                      # slots' q, o; attention
               + 2 * 16 * 24                                     # 16 -> global width 24
               + 2 * (4 * 576 + 3 * 24 * 40) + 4 * 24 * ctx_p    # global block
               + 2 * 24 * 16                                     # global -> 2 decoder slots
               + 2 * 2 * 4 * 64)                                 # their k, v, twice
  assert flops.blt_flops_per_byte(cfg, 12, 3.0) == pytest.approx(3 * (per_byte + per_patch / 3))


# ----------------------------------------------------------------------------- training

def test_tiny_blt_overfits_one_batch():
  model = tiny_model(seed=3)
  rng = np.random.default_rng(7)
  data = rng.integers(0, 256, (4, T + 1)).astype(np.int32)
  data[:, 0] = BOS
  inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
  lengths = jnp.asarray(lengths_from_starts(causal_starts(data[:, :-1]), P))
  opt = nnx.Optimizer(model, optax.adamw(3e-3, weight_decay=0.0), wrt=nnx.Param)

  @nnx.jit
  def step(m, o):
    def loss_fn(m):
      logits = m(inputs, lengths)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    o.update(m, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(150)]
  assert losses[0] > 4.5
  print("overfit losses", [round(v, 3) for v in losses[::25] + losses[-1:]])
  assert losses[-1] < losses[0] / 10, losses[::25]
