"""Packed global slots: the row maps, their gradients, and that BLT's logits, gradients and
training steps are the same packed and unpacked (including a batch that must fall back)."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from blt_jax import train as train_lib
from blt_jax.models import blt, slot_packing
from tests.test_blt_model import TINY, lengths_from_starts, random_inputs


def packing_of(needed, n_slots, capacity):
  return slot_packing.plan(jnp.asarray(needed, jnp.int32), n_slots, capacity)


def test_rows_hold_needed_slots_in_order_and_unpack_inverts():
  needed, P = [3, 1, 5, 2], 6            # one group of 4 windows, 11 needed slots
  packing = packing_of(needed, P, capacity=0.5)  # 12 rows
  assert packing.rows_NxC.shape == (1, 12) and bool(packing.fits)
  x_BxPx2 = jnp.arange(4 * P * 2, dtype=jnp.float32).reshape(4, P, 2) + 1
  packed = np.asarray(packing.pack(x_BxPx2))[0]
  expected = [np.asarray(x_BxPx2[b, p]) for b, n in enumerate(needed) for p in range(n)]
  np.testing.assert_array_equal(packed[:11], np.stack(expected))
  np.testing.assert_array_equal(packed[11], 0)  # padding row
  back = np.asarray(packing.unpack(packing.pack(x_BxPx2)))
  keep = np.arange(P)[None, :] < np.array(needed)[:, None]
  np.testing.assert_array_equal(back[keep], np.asarray(x_BxPx2)[keep])
  np.testing.assert_array_equal(back[~keep], 0)


def test_fits_is_per_group_and_exact_at_the_boundary():
  P = 4  # groups of 8 windows, capacity 0.5 -> 16 rows per group
  assert bool(packing_of([2] * 8 + [2] * 8, P, 0.5).fits)          # 16 and 16
  assert not bool(packing_of([2] * 8 + [3] + [2] * 7, P, 0.5).fits)  # 16 and 17
  assert slot_packing.packed_rows(12, P, 0.5) == (3, 8)            # gcd(12, 8) = 4 windows


def test_groups_never_span_the_shards_of_a_batch():
  P = 4
  assert slot_packing.packed_rows(16, P, 0.5) == (2, 16)            # 2 groups of 8 windows
  assert slot_packing.packed_rows(16, P, 0.5, shards=8) == (8, 4)   # 2 windows per device
  assert slot_packing.packed_rows(48, P, 0.5, shards=2) == (6, 16)  # gcd(24, 8) = 8
  # One device's two windows need 5 slots, 1 more than its 4 rows: on one shard the same
  # needs fit a group of 8 windows (16 rows).
  needed = [3, 2] + [1] * 14
  assert bool(slot_packing.plan(jnp.asarray(needed), P, 0.5).fits)
  assert not bool(slot_packing.plan(jnp.asarray(needed), P, 0.5, shards=8).fits)
  with pytest.raises(ValueError, match="does not split into 3 shards"):
    slot_packing.packed_rows(16, P, 0.5, shards=3)


def test_gradients_are_the_transposed_row_maps():
  """The custom backward (a gather) equals the transpose of the linear map it inverts."""
  needed, P = [4, 2, 1, 3], 5
  packing = packing_of(needed, P, capacity=0.6)
  rng = np.random.default_rng(0)
  x_BxPx3 = jnp.asarray(rng.normal(size=(4, P, 3)), jnp.float32)
  d_NxCx3 = jnp.asarray(rng.normal(size=(1, 12, 3)), jnp.float32)
  # The same maps as dense 0/1 matrices, differentiated by JAX itself.
  rows = np.asarray(packing.rows_NxC[0])
  M_CxS = np.zeros((12, 4 * P), np.float32)
  for c, s in enumerate(rows):
    if s < 4 * P:
      M_CxS[c, s] = 1
  dense_pack = lambda x: (M_CxS @ x.reshape(4 * P, 3))[None]
  np.testing.assert_allclose(packing.pack(x_BxPx3), dense_pack(x_BxPx3))
  _, vjp = jax.vjp(packing.pack, x_BxPx3)
  _, vjp_ref = jax.vjp(dense_pack, x_BxPx3)
  np.testing.assert_allclose(vjp(d_NxCx3)[0], vjp_ref(d_NxCx3)[0], atol=1e-6)
  dense_unpack = lambda y: (M_CxS.T @ y[0]).reshape(4, P, 3)
  _, vjp = jax.vjp(packing.unpack, d_NxCx3)
  _, vjp_ref = jax.vjp(dense_unpack, d_NxCx3)
  np.testing.assert_allclose(vjp(x_BxPx3)[0], vjp_ref(x_BxPx3)[0], atol=1e-6)


def batch_of(seed, B, T, P, p_start):
  rng = np.random.default_rng(seed)
  inputs = random_inputs(seed, batch=B, seq_len=T)
  starts = rng.random((B, T)) < p_start
  starts[:, 0] = True
  lengths = lengths_from_starts(starts, P)
  targets = np.concatenate([inputs[:, 1:], rng.integers(0, 256, (B, 1))], 1).astype(np.int32)
  return dict(inputs=inputs, targets=targets, mask=np.ones((B, T), np.float32),
              patch_lengths=lengths)


@pytest.mark.parametrize("B,p_start", [(16, 0.2), (1, 0.2)])  # two groups; one window
def test_blt_packed_logits_and_gradients_equal_unpacked(B, p_start):
  T, P = 48, 20
  model = blt.BLT(blt.BLTConfig(**{**TINY, "max_patches": P, "global_capacity": 0.75}),
                  rngs=nnx.Rngs(3))
  batch = batch_of(B, B, T, P, p_start)
  assert model.packs(B, P)
  assert bool(model.packing_fits(jnp.asarray(batch["patch_lengths"]), T))

  def loss(m, packed):
    logits = m(batch["inputs"], batch["patch_lengths"], packed=packed)
    return jnp.sum(jnp.sin(logits)), logits  # weights every logit

  grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, plain), g_plain = grads(model, False)
  (_, packed), g_packed = grads(model, True)
  np.testing.assert_allclose(packed, plain, atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(g_packed)), jax.tree.leaves(nnx.state(g_plain))):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  assert any(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(
      nnx.state(g_packed.global_tf)))


def test_train_step_packs_when_it_fits_and_falls_back_when_not():
  """Same losses and parameters as the unpacked model; `packed` metric says which ran."""
  T, P, B = 48, 20, 8
  fits = batch_of(1, B, T, P, 0.2)
  full = batch_of(2, B, T, P, 1.0)  # every byte a patch: all P slots needed, cannot fit
  runs = {}
  for capacity in (1.0, 0.75):
    model = blt.BLT(blt.BLTConfig(**{**TINY, "max_patches": P, "global_capacity": capacity}),
                    rngs=nnx.Rngs(5))
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)  # linear in the gradients
    graphdef, state = nnx.split((model, opt))
    step = train_lib.make_train_step(graphdef)
    metrics = []
    for batch in (fits, full, fits):
      state, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
      metrics.append(m)
    runs[capacity] = (state, metrics)
  (s_plain, m_plain), (s_packed, m_packed) = runs[1.0], runs[0.75]
  assert "packed" not in m_plain[0]
  assert [float(m["packed"]) for m in m_packed] == [1.0, 0.0, 1.0]
  for a, b in zip(m_packed, m_plain):
    np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_packed), jax.tree.leaves(s_plain)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_capacity_in_configs_and_validation():
  small = importlib.import_module("configs.patch3").get_config("size=small")
  assert small.model.global_capacity == pytest.approx(0.8)  # 1.2 x 85.3 of 128 slots
  assert importlib.import_module("configs.patch3").get_config(
      "size=tiny").model.global_capacity == 1.0
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="global_capacity"):
      blt.BLTConfig(**{**TINY, "global_capacity": bad})
