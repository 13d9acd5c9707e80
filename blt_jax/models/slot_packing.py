"""Packing the patch slots a batch needs into fewer rows for the global transformer.

A window of T bytes gets a fixed P patch slots, with slack so that few windows overflow
(`patching.max_patches`): on real text a third of the slots are padding after the last
patch. The global transformer's dense layers (projections, SwiGLU) act row by row, so
they can run on the needed slots of several windows packed end to end, `capacity` of the
slots of each group of windows. Its attention still runs per window: q, k, v are moved back
to [B, P] first (slots after a window's patches hold zeros, and causality means no needed
slot sees them), and the result is packed again.

Nothing of the model's math changes: a batch whose patches do not fit the capacity runs
unpacked (`fits`). Moving rows is a gather both ways: the backward pass of packing is
unpacking and vice versa (the maps are inverse on the needed slots), so no scatter runs.
A batch split over `shards` devices packs each device's windows apart (groups never span
two shards), and the gathers are batched over groups: packing needs no communication.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

GROUP = 8  # windows packed together (or the largest common divisor with a shard's windows)


@jax.custom_vjp
def _move_rows(x_NxRxF, to_NxM, back_NxR):
  """[N, M, ...]: row to[n, m] of x[n] (index R gives zeros). `back` is the inverse map
  (index M where no row comes from), used as the gradient's gather."""
  x_ext = jnp.concatenate([x_NxRxF, jnp.zeros_like(x_NxRxF[:, :1])], axis=1)
  return jax.vmap(lambda rows_RxF, to_M: rows_RxF[to_M])(x_ext, to_NxM)


def _move_rows_fwd(x_NxRxF, to_NxM, back_NxR):
  return _move_rows(x_NxRxF, to_NxM, back_NxR), (to_NxM, back_NxR)


def _move_rows_bwd(res, d_NxMxF):
  to_NxM, back_NxR = res
  return _move_rows(d_NxMxF, back_NxR, to_NxM), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotPacking:
  """Where each needed slot of a [B, P] batch goes in the packed [N, C] rows (N groups of
  `B // N` windows, C rows each), and back."""
  rows_NxC: jax.Array        # packed row -> flat slot (w * P + p) of its group; W*P = padding
  slots_NxS: jax.Array       # flat slot -> packed row; C = a slot no patch needs
  fits: jax.Array            # bool: every group's needed slots fit in C rows
  n_slots: int = dataclasses.field(metadata=dict(static=True))  # P

  def pack(self, x_BxPxF):
    """[B, P, ...] -> [N, C, ...]; padding rows are zeros."""
    N, S = self.slots_NxS.shape
    return _move_rows(x_BxPxF.reshape(N, S, *x_BxPxF.shape[2:]), self.rows_NxC, self.slots_NxS)

  def unpack(self, x_NxCxF):
    """[N, C, ...] -> [B, P, ...]; slots no patch needs are zeros."""
    N, S = self.slots_NxS.shape
    out_NxSxF = _move_rows(x_NxCxF, self.slots_NxS, self.rows_NxC)
    return out_NxSxF.reshape(N * S // self.n_slots, self.n_slots, *x_NxCxF.shape[2:])


def packed_rows(batch: int, n_slots: int, capacity: float,
                shards: int = 1) -> tuple[int, int]:
  """(groups N, rows per group C) for a batch of `batch` windows of `n_slots` slots, split
  into `shards` equal parts (devices) that no group spans."""
  if batch % shards:
    raise ValueError(f"a batch of {batch} windows does not split into {shards} shards")
  windows = math.gcd(batch // shards, GROUP)
  slots = windows * n_slots
  return batch // windows, min(slots, math.ceil(capacity * slots))


def plan(needed_B, n_slots: int, capacity: float, shards: int = 1) -> SlotPacking:
  """The packing of a batch whose window b needs slots 0 .. needed[b] - 1 (needed >= 1)."""
  B, P = needed_B.shape[0], n_slots
  N, C = packed_rows(B, P, capacity, shards)
  W = B // N
  n_NxW = needed_B.astype(jnp.int32).reshape(N, W)
  start_NxW = jnp.cumsum(n_NxW, axis=1) - n_NxW
  total_Nx1 = jnp.sum(n_NxW, axis=1, keepdims=True)
  p_P = jnp.arange(P, dtype=jnp.int32)
  row_NxWxP = jnp.where(p_P < n_NxW[..., None], start_NxW[..., None] + p_P, C)
  slots_NxS = jnp.minimum(row_NxWxP, C).reshape(N, W * P)
  c_C = jnp.arange(C, dtype=jnp.int32)
  window_NxC = jnp.sum(start_NxW[:, None, :] <= c_C[None, :, None], axis=-1) - 1
  p_NxC = c_C - jnp.take_along_axis(start_NxW, window_NxC, axis=1)
  real_NxC = c_C < total_Nx1
  rows_NxC = jnp.where(real_NxC, window_NxC * P + p_NxC, W * P)
  return SlotPacking(rows_NxC=rows_NxC, slots_NxS=slots_NxS, fits=jnp.all(total_Nx1 <= C),
                     n_slots=P)
