"""Per-byte entropies -> dynamic patches: start rules, lengths, threshold calibration.

Pure JAX, jitted, batched over leading axes; the last axis is the sequence (T bytes).
No Python loop over bytes. XLA's CPU cumulative ops are slow, so the hot path uses a
blocked triangular matmul for counts, an associative scan for the last start, and a
sorted segment sum for lengths (see benchmarks/patching.py for the figures).

Rules (h[t] = entropy of byte t given the bytes before it; byte 0 always starts):
  global     t >= 1 starts iff h[t] > threshold
  monotonic  t >= 1 starts iff h[t] - h[t-1] > threshold
  static     t starts iff t % patch_size == 0
  space      t >= 1 starts iff byte t-1 is space-like and (t == 1 or byte t-2 is not);
             space-like = not an ASCII letter or digit and not a UTF-8 continuation byte
  max_patch_len m (any rule): a patch longer than m is cut every m bytes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("global", "monotonic", "static", "space")
_BLOCK = 32  # block width of the matmul prefix count


def space_like(data):
  """True for bytes that are not ASCII letters/digits and not UTF-8 continuation bytes."""
  b = data.astype(jnp.int32)
  alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
  continuation = (b >= 0x80) & (b <= 0xBF)
  return ~alnum & ~continuation


def _shift_right(x, fill):
  """x[..., t-1] at t (fill at t = 0)."""
  pad = jnp.full(x.shape[:-1] + (1,), fill, x.dtype)
  return jnp.concatenate([pad, x[..., :-1]], axis=-1)


def prefix_count(starts):
  """int32 [..., T]: number of True in starts[..., :t+1], by blocked triangular matmuls."""
  *lead, T = starts.shape
  b = _BLOCK if T % _BLOCK == 0 else T
  x_NxKxB = starts.reshape(-1, T // b, b).astype(jnp.float32)
  within = x_NxKxB @ jnp.triu(jnp.ones((b, b), jnp.float32))
  carry_NxK = within[..., -1] @ jnp.triu(jnp.ones((T // b, T // b), jnp.float32), 1)
  return (within + carry_NxK[..., None]).reshape(*lead, T).astype(jnp.int32)


def _natural_starts(h, data, mode, threshold, patch_size, T):
  t = jnp.arange(T)
  if mode == "global":
    starts = h > threshold
  elif mode == "monotonic":
    starts = (h - _shift_right(h, 0.0)) > threshold
  elif mode == "static":
    starts = jnp.broadcast_to(t % patch_size == 0, data.shape if h is None else h.shape)
  elif mode == "space":
    sl = space_like(data)
    prev, prev2 = _shift_right(sl, False), _shift_right(_shift_right(sl, False), False)
    starts = prev & (~prev2 | (t == 1))
  else:
    raise ValueError(f"unknown patching mode {mode!r} (known: {', '.join(MODES)})")
  return starts | (t == 0)


def _cut_long(starts, m):
  """Adds a start every m bytes inside patches longer than m."""
  T = starts.shape[-1]
  t = jnp.arange(T, dtype=jnp.int32)
  last = jax.lax.associative_scan(jnp.maximum, jnp.where(starts, t, 0), axis=starts.ndim - 1)
  since = t - last
  return starts | ((since % m == 0) & (since > 0))


@functools.partial(jax.jit, static_argnames=("mode", "patch_size", "max_patch_len", "T"))
def _starts(h, data, threshold, *, mode, patch_size, max_patch_len, T):
  starts = _natural_starts(h, data, mode, threshold, patch_size, T)
  return _cut_long(starts, max_patch_len) if max_patch_len else starts


def patch_starts(entropies=None, *, mode: str, threshold=None, patch_size: int | None = None,
                 data=None, max_patch_len: int | None = None):
  """bool [..., T]: where patches start. `entropies` (float [..., T]) drive `global` and
  `monotonic` (with `threshold`); `data` (uint8 [..., T]) drives `space`; `static` takes its
  shape from either. Byte 0 of every sequence starts a patch."""
  if mode in ("global", "monotonic"):
    if entropies is None or threshold is None:
      raise ValueError(f"mode {mode!r} needs entropies and a threshold")
    entropies = jnp.asarray(entropies, jnp.float32)
  elif mode == "space":
    if data is None:
      raise ValueError("mode 'space' needs the bytes (data=)")
  elif mode == "static":
    if not patch_size or patch_size < 1:
      raise ValueError("mode 'static' needs patch_size >= 1")
    if entropies is None and data is None:
      raise ValueError("mode 'static' needs entropies or data for the shape")
  elif mode not in MODES:
    raise ValueError(f"unknown patching mode {mode!r} (known: {', '.join(MODES)})")
  if max_patch_len is not None and max_patch_len < 1:
    raise ValueError("max_patch_len must be >= 1 (or None)")
  h = entropies if mode != "space" and entropies is not None else None
  d = jnp.asarray(data, jnp.uint8) if data is not None else None
  T = (h if h is not None else d).shape[-1]
  return _starts(h, d if mode == "space" or h is None else None,
                 jnp.float32(threshold if threshold is not None else 0.0), mode=mode,
                 patch_size=int(patch_size or 1), max_patch_len=int(max_patch_len or 0), T=T)


@functools.partial(jax.jit, static_argnames=("max_patches",))
def patch_lengths(starts, max_patches: int):
  """int32 [..., max_patches]: the lengths of the patches in order, zero-padded.

  A sequence with more than `max_patches` patches has its surplus folded into the last
  slot, so the lengths always sum to T. Folding depends only on earlier starts: it keeps
  a causal model causal.
  """
  *lead, T = starts.shape
  P = max_patches
  starts = starts.reshape(-1, T).at[:, 0].set(True)
  N = starts.shape[0]
  patch = jnp.minimum(prefix_count(starts), P) - 1            # patch index of every byte
  segment = (patch + (jnp.arange(N, dtype=jnp.int32) * P)[:, None]).reshape(-1)
  lengths = jax.ops.segment_sum(jnp.ones((N * T,), jnp.int32), segment, num_segments=N * P,
                                indices_are_sorted=True)
  return lengths.reshape(*lead, P)


def mean_patch_size(starts) -> float:
  """Bytes per patch over all sequences."""
  starts = np.asarray(starts)
  return float(starts.size / max(1, starts.sum()))


@functools.partial(jax.jit, static_argnames=("mode", "max_patch_len"))
def _count(stat, threshold, *, mode, max_patch_len):
  """Patches when `stat` (h or its first difference) is thresholded."""
  T = stat.shape[-1]
  starts = (stat > threshold) | (jnp.arange(T) == 0)
  if max_patch_len:
    starts = _cut_long(starts, max_patch_len)
  return jnp.sum(starts, dtype=jnp.int32)


def calibrate_threshold(entropies, *, target_patch_size: float, mode: str = "global",
                        max_patch_len: int | None = None) -> float:
  """The threshold whose mean patch size on `entropies` ([..., T]) is `target_patch_size`.

  Searches the sorted candidate values (the mean patch size only grows with the
  threshold) and returns the closest; raises ValueError when even that misses by more
  than 1% (e.g. ties in the entropies, or a target below 1 or above what
  `max_patch_len` allows).
  """
  if mode not in ("global", "monotonic"):
    raise ValueError(f"only global and monotonic patching have a threshold, not {mode!r}")
  if target_patch_size < 1:
    raise ValueError(f"target_patch_size must be >= 1, got {target_patch_size}")
  h = jnp.asarray(entropies, jnp.float32)
  h = h.reshape(-1, h.shape[-1])
  stat = h if mode == "global" else h - _shift_right(h, 0.0)
  count = functools.partial(_count, stat, mode=mode, max_patch_len=int(max_patch_len or 0))
  candidates = np.unique(np.asarray(stat[:, 1:]).ravel())
  candidates = np.concatenate([[candidates[0] - 1.0], candidates])
  want = h.size / target_patch_size
  lo, hi = 0, len(candidates) - 1  # patches are non-increasing in the index
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if int(count(candidates[mid])) > want:
      lo = mid
    else:
      hi = mid
  best = min((lo, hi), key=lambda i: abs(h.size / int(count(candidates[i])) - target_patch_size))
  theta = float(candidates[best])
  if best + 1 < len(candidates):  # the middle of the gap is robust to rounding
    theta = float((candidates[best] + candidates[best + 1]) / 2)
  got = h.size / int(count(theta))
  if abs(got - target_patch_size) > 0.01 * target_patch_size:
    raise ValueError(f"no threshold gives mean patch size {target_patch_size} on this sample "
                     f"(closest: {got:.3f} at {theta:.4f})")
  return theta
