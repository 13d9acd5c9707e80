"""Per-byte entropies -> dynamic patches: start rules, lengths, threshold calibration.

Pure JAX, jitted, batched over any leading axes; the last axis is the sequence (T bytes).
Rules (h[t] = entropy of byte t given the bytes before it; byte 0 always starts a patch):
  global     t >= 1 starts iff h[t] > threshold
  monotonic  t >= 1 starts iff h[t] - h[t-1] > threshold
  static     t starts iff t % patch_size == 0
  space      t >= 1 starts iff byte t-1 is space-like and (t == 1 or byte t-2 is not);
             space-like = not an ASCII letter or digit and not a UTF-8 continuation byte
  max_patch_len m (any rule): a patch longer than m is cut every m bytes.

The rules themselves are elementwise. The two sequential steps (cutting long patches,
compacting starts into lengths) have two implementations, picked per platform:
  CPU     loops over t (a `lax.scan`) and over patches (a `lax.while_loop`) with every
          sequence of the batch in the vector lanes: XLA's CPU prefix ops (cummax,
          associative_scan, cumsum + scatter) are slower than these loops
          (benchmarks/patching.py times both; figures in docs/benchmarks.md).
  others  the parallel form: associative scan for the last start, cumsum + segment_sum
          for lengths. The CPU tests check both against one reference.

Lengths fold: a sequence with more patches than slots puts the surplus in the last slot,
so lengths always sum to T.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MODES = ("global", "monotonic", "static", "space")
THRESHOLD_MODES = ("global", "monotonic")


def space_like(data):
  """bool: bytes that are not ASCII letters/digits and not UTF-8 continuation bytes."""
  b = jnp.asarray(data).astype(jnp.int32)
  alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
  return ~alnum & ~((b >= 0x80) & (b <= 0xBF))


def _prev(x, fill):
  """x[..., t-1] at position t, `fill` at t = 0."""
  pad = jnp.full(x.shape[:-1] + (1,), fill, x.dtype)
  return jnp.concatenate([pad, x[..., :-1]], axis=-1)


def _statistic(h, mode):
  """What the threshold is compared with: h (global) or h[t] - h[t-1] (monotonic)."""
  return h if mode == "global" else h - _prev(h, 0)


def _rule(h, data, threshold, *, mode, patch_size, shape):
  """bool [..., T]: the rule's starts before any cut (elementwise)."""
  t = jnp.arange(shape[-1])
  if mode in THRESHOLD_MODES:
    starts = _statistic(h, mode) > threshold
  elif mode == "static":
    starts = jnp.broadcast_to(t % patch_size == 0, shape)
  else:
    sl = space_like(data)
    prev = _prev(sl, False)
    starts = prev & ~_prev(prev, False)  # at t = 1, prev2 is the fill (False)
  return starts | (t == 0)


# --- CPU: loops with the sequences in the vector lanes ---------------------------------

def _cut_loop(starts_NxT, m: int):
  """Cuts patches longer than m every m bytes: a start m bytes after each start, natural or
  cut, unless another came sooner."""
  N = starts_NxT.shape[0]

  def step(since_N, s_N):
    s_N = s_N | (since_N + 1 == m)
    return jnp.where(s_N, 0, since_N + 1), s_N

  _, starts_TxN = lax.scan(step, jnp.full((N,), m - 1, jnp.int32), starts_NxT.T)
  return starts_TxN.T


def _lengths_loop(starts_NxT, P: int):
  """Patch lengths [N, P]: gap to the next start, then a hop from patch to patch."""
  N, T = starts_NxT.shape
  dtype = jnp.int16 if T < 2 ** 15 else jnp.int32  # half the bytes to gather

  def back(next_N, x):  # right to left: distance from t to the first start after t
    s_N, t = x
    return jnp.where(s_N, t, next_N), (next_N - t).astype(dtype)

  t_T = jnp.arange(T, dtype=jnp.int32)
  _, gap_TxN = lax.scan(back, jnp.full((N,), T, jnp.int32), (starts_NxT.T, t_T), reverse=True)
  gap_TxN = jnp.concatenate([gap_TxN, jnp.zeros((1, N), dtype)])  # row T: a finished lane stays
  lane_N = jnp.arange(N, dtype=jnp.int32)

  def more(carry):
    k, cur_N, _ = carry
    return (k < P - 1) & jnp.any(cur_N < T)

  def hop(carry):
    k, cur_N, out_PxN = carry
    len_N = gap_TxN[cur_N, lane_N].astype(jnp.int32)
    return k + 1, cur_N + len_N, out_PxN.at[k].set(len_N)

  init = (0, jnp.zeros((N,), jnp.int32), jnp.zeros((P, N), jnp.int32))
  _, cur_N, out_PxN = lax.while_loop(more, hop, init)
  return out_PxN.at[P - 1].set(T - cur_N).T  # the last slot takes the rest (fold)


# --- other platforms: the parallel form ------------------------------------------------

def _cut_parallel(starts_NxT, m: int):
  """The cut from the distance to the last start (an associative max scan)."""
  t = jnp.arange(starts_NxT.shape[-1], dtype=jnp.int32)
  last_NxT = lax.associative_scan(jnp.maximum, jnp.where(starts_NxT, t, 0), axis=1)
  return starts_NxT | ((t - last_NxT) % m == 0)


def _lengths_parallel(starts_NxT, P: int):
  """Patch lengths [N, P] as a histogram of folded patch ids."""
  N, T = starts_NxT.shape
  ids_NxT = _ids(starts_NxT, P) + (jnp.arange(N, dtype=jnp.int32) * P)[:, None]
  lengths = jax.ops.segment_sum(jnp.ones((N * T,), jnp.int32), ids_NxT.reshape(-1),
                                num_segments=N * P, indices_are_sorted=True)
  return lengths.reshape(N, P)


def _ids(starts, P: int | None):
  ids = jnp.cumsum(starts.at[..., 0].set(True), axis=-1, dtype=jnp.int32) - 1
  return ids if P is None else jnp.minimum(ids, P - 1)


def _per_platform(cpu, default, starts, arg):
  """Applies `cpu` or `default` to starts flattened to [N, T]; restores the shape."""
  flat = starts.reshape(-1, starts.shape[-1])
  out = lax.platform_dependent(flat, cpu=lambda x: cpu(x, arg),
                               default=lambda x: default(x, arg))
  return out.reshape(*starts.shape[:-1], out.shape[-1])


# --- public API ------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("mode", "patch_size", "max_patch_len", "shape"))
def _starts(h, data, threshold, *, mode, patch_size, max_patch_len, shape):
  starts = _rule(h, data, threshold, mode=mode, patch_size=patch_size, shape=shape)
  if max_patch_len and max_patch_len < shape[-1]:  # else no patch can be too long
    starts = _per_platform(_cut_loop, _cut_parallel, starts, max_patch_len)
  return starts


def patch_starts(entropies=None, *, mode: str, threshold=None, patch_size: int | None = None,
                 data=None, max_patch_len: int | None = None):
  """bool [..., T]: True where a patch starts; byte 0 of every sequence always starts one.

  `global` / `monotonic` need `entropies` (float [..., T], nats) and `threshold`;
  `space` needs `data` (the bytes, uint8 [..., T]); `static` needs `patch_size` and takes
  its shape from `entropies` or `data`. Arguments a rule does not use are ignored, so one
  call site can pass all of them. `threshold` may be a traced value; `mode`,
  `patch_size` and `max_patch_len` are static.
  """
  if mode not in MODES:
    raise ValueError(f"unknown patching mode {mode!r} (known: {', '.join(MODES)})")
  if mode in THRESHOLD_MODES and (entropies is None or threshold is None):
    raise ValueError(f"patching mode {mode!r} needs entropies and a threshold")
  if mode == "space" and data is None:
    raise ValueError("patching mode 'space' needs the bytes (data=)")
  if mode == "static" and (patch_size is None or patch_size < 1):
    raise ValueError(f"patching mode 'static' needs patch_size >= 1, got {patch_size}")
  if mode == "static" and entropies is None and data is None:
    raise ValueError("patching mode 'static' needs entropies or data for the shape")
  if max_patch_len is not None and max_patch_len < 1:
    raise ValueError(f"max_patch_len must be >= 1 or None, got {max_patch_len}")
  shape = tuple(jnp.shape(data if entropies is None or mode == "space" else entropies))
  if not shape or shape[-1] < 1:
    raise ValueError(f"patching needs arrays [..., T] with T >= 1, got shape {shape}")
  h = d = None
  theta = jnp.float32(0.0)
  if mode in THRESHOLD_MODES:
    h = jnp.asarray(entropies)
    h = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    theta = jnp.asarray(threshold, h.dtype)
  elif mode == "space":
    d = jnp.asarray(data)
  return _starts(h, d, theta, mode=mode, patch_size=patch_size, max_patch_len=max_patch_len,
                 shape=shape)


@functools.partial(jax.jit, static_argnames=("max_patches",))
def patch_lengths(starts, max_patches: int):
  """int32 [..., max_patches]: lengths of the patches in order, zero-padded.

  Byte 0 is taken as a start whatever `starts[..., 0]` says. A sequence with more than
  `max_patches` patches has the surplus folded into the last slot, so the lengths always
  sum to T. Slot k depends only on the starts up to patch k's own, so folding keeps a
  causal model causal. `patch_ids(starts, max_patches)` is the matching byte -> slot map.
  """
  if max_patches < 1:
    raise ValueError(f"max_patches must be >= 1, got {max_patches}")
  return _per_platform(_lengths_loop, _lengths_parallel, jnp.asarray(starts, bool),
                       max_patches)


@functools.partial(jax.jit, static_argnames=("max_patches",))
def patch_ids(starts, max_patches: int | None = None):
  """int32 [..., T]: the patch (slot) of every byte; with `max_patches`, folded as
  `patch_lengths` folds, so slot k holds exactly lengths[..., k] bytes."""
  return _ids(jnp.asarray(starts, bool), max_patches)


def next_start(pos_B, *, mode: str, threshold=0.0, patch_size: int = 1,
               max_patch_len: int | None = None, h_B=None, prev_h_B=None, prev_byte_B=None,
               prev2_byte_B=None, since_B=None):
  """One position at a time (decoding): whether the byte at position pos_B of each row's
  window starts a patch, as `patch_starts` decides it over the whole window, from what
  precedes it only: its entropy h_B and the previous one prev_h_B (threshold modes), the
  two bytes before it (`space`), and since_B, the bytes since the last start (the
  `max_patch_len` cut). Returns (starts bool [B], since_B for the next position)."""
  if mode in THRESHOLD_MODES:
    starts_B = (h_B if mode == "global" else h_B - prev_h_B) > threshold
  elif mode == "static":
    starts_B = pos_B % patch_size == 0
  elif mode == "space":
    starts_B = (pos_B >= 1) & space_like(prev_byte_B) & ~((pos_B >= 2) & space_like(prev2_byte_B))
  else:
    raise ValueError(f"unknown patching mode {mode!r} (known: {', '.join(MODES)})")
  starts_B |= pos_B == 0
  if max_patch_len:
    starts_B |= since_B + 1 == max_patch_len
  return starts_B, jnp.where(starts_B, 0, since_B + 1)


def max_patches(seq_len: int, expected_patch_size: float, slack: float = 1.5) -> int:
  """Patch slots per window: the expected count with slack; surplus patches fold."""
  return min(seq_len, int(math.ceil(slack * seq_len / expected_patch_size)))


def mean_patch_size(starts) -> float:
  """Bytes per patch over the whole batch (byte 0 of each sequence counts as a start)."""
  starts = np.asarray(starts, bool)
  n_seq = starts.size // starts.shape[-1]
  return starts.size / (n_seq + int(starts[..., 1:].sum()))


@functools.partial(jax.jit, static_argnames=("mode",))
def _stat_values(h, *, mode):
  """The values compared with the threshold at t >= 1, as `patch_starts` computes them."""
  return _statistic(h, mode)[..., 1:]


@functools.partial(jax.jit, static_argnames=("mode", "max_patch_len"))
def _count(h, threshold, *, mode, max_patch_len):
  starts = _starts(h, None, threshold, mode=mode, patch_size=None,
                   max_patch_len=max_patch_len, shape=h.shape)
  return jnp.sum(starts, dtype=jnp.int32)


def calibrate_threshold(entropies, *, target_patch_size: float, mode: str = "global",
                        max_patch_len: int | None = None, rtol: float = 0.01) -> float:
  """The threshold whose mean patch size (bytes / patches) on `entropies` ([..., T]) is
  `target_patch_size` within `rtol`.

  The patch count only falls as the threshold rises, so this bisects over the sorted
  distinct values of the statistic and keeps the closer of the two values around the
  target, returned as the midpoint of its gap (a float32 value, robust to rounding).
  Raises ValueError when even the closest size misses by more than `rtol` (ties in the
  entropies, a target below 1, or above what T and `max_patch_len` allow); pass
  rtol=float("inf") to accept the closest.
  """
  if mode not in THRESHOLD_MODES:
    raise ValueError(f"only {' and '.join(THRESHOLD_MODES)} patching have a threshold, "
                     f"not {mode!r}")
  h = jnp.asarray(entropies)
  h = h.astype(jnp.promote_types(h.dtype, jnp.float32)).reshape(-1, h.shape[-1])
  stat = np.asarray(_stat_values(h, mode=mode)).ravel()
  n_seq, n_bytes = h.shape[0], h.size
  if max_patch_len and max_patch_len < h.shape[-1]:
    count = lambda theta: int(_count(h, jnp.asarray(theta, h.dtype), mode=mode,
                                     max_patch_len=max_patch_len))
  else:
    ascending = np.sort(stat)
    count = lambda theta: n_seq + len(stat) - int(np.searchsorted(ascending, theta, "right"))
  values = np.unique(stat)
  if not len(values):  # T == 1: one patch per sequence whatever the threshold
    values = np.zeros(1, stat.dtype)
  below = np.nextafter(values[0], -np.inf) if np.isfinite(values[0]) else values[0]
  cands = np.concatenate([[below], values])  # index i: threshold cands[i]
  size = lambda i: n_bytes / count(cands[i])
  lo, hi = 0, len(cands) - 1  # size grows with i; find size(lo) < target <= size(hi)
  if size(hi) < target_patch_size:
    lo = hi
  elif size(lo) >= target_patch_size:
    hi = lo
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if size(mid) < target_patch_size else (lo, mid)
  best = min((lo, hi), key=lambda i: abs(size(i) - target_patch_size))
  theta = cands[best]
  if best + 1 < len(cands):  # the middle of the gap, if float32 can tell it apart
    mid = cands.dtype.type((float(theta) + float(cands[best + 1])) / 2)
    if theta < mid < cands[best + 1]:
      theta = mid
  got = n_bytes / count(theta)
  if not abs(got - target_patch_size) <= rtol * target_patch_size:
    raise ValueError(f"no {mode} threshold gives mean patch size {target_patch_size} on this "
                     f"sample within {rtol:.0%}: the closest is {got:.4g} (threshold "
                     f"{float(theta):.6g})")
  return float(theta)
