"""Patch lengths for model inputs, by a run's `PatchRule`: `BatchPatcher` adds them to
batches of corpus windows from the corpus's cached entropies; `DocumentPatcher` to the
windows of one byte string, scored by a live entropy model (the API)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from blt_jax import entropy, patching
from blt_jax.resolved import PatchRule


@functools.partial(jax.jit, static_argnames=("mode", "patch_size", "max_patch_len",
                                              "max_patches"))
def _lengths(h_BxT, bytes_BxT, valid_BxT, *, mode, threshold, patch_size, max_patch_len,
             max_patches):
  starts_BxT = patching.patch_starts(h_BxT, mode=mode, threshold=threshold,
                                     patch_size=patch_size, data=bytes_BxT,
                                     max_patch_len=max_patch_len)
  starts_BxT = starts_BxT & valid_BxT  # padding joins the last real patch
  return patching.patch_lengths(starts_BxT, max_patches), jnp.sum(starts_BxT, axis=-1)


def window_lengths(rule: PatchRule, h_BxT, targets_BxT, mask_BxT):
  """(patch lengths int32 [B, P], patch starts per window int32 [B]) as numpy; `h_BxT`
  is ignored by rules without entropies."""
  lengths, n_starts = _lengths(
      jnp.asarray(h_BxT, jnp.float32), jnp.asarray(targets_BxT, jnp.uint8),
      jnp.asarray(mask_BxT > 0), mode=rule.mode,
      threshold=rule.threshold if rule.uses_entropy else 0.0, patch_size=rule.patch_size,
      max_patch_len=rule.max_patch_len, max_patches=rule.max_patches)
  return np.asarray(lengths), np.asarray(n_starts)


class BatchPatcher:
  """Adds `patch_lengths` [B, P] to batches of corpus windows (which carry their corpus
  offset `start`), reading entropies from the corpus's cache aligned with its bytes."""

  def __init__(self, rule: PatchRule, entropies: np.ndarray | None = None):
    self.rule, self.entropies = rule, entropies

  def window_entropies(self, batch) -> np.ndarray:
    if not self.rule.uses_entropy:
      return np.zeros(batch["targets"].shape, np.float32)
    idx_BxT = batch["start"][:, None] + np.arange(batch["targets"].shape[1])
    h_BxT = self.entropies[np.minimum(idx_BxT, len(self.entropies) - 1)]
    return np.where(batch["mask"] > 0, h_BxT, 0.0).astype(np.float32)

  def __call__(self, batch: dict) -> dict:
    lengths, _ = window_lengths(self.rule, self.window_entropies(batch), batch["targets"],
                                batch["mask"])
    return {**batch, "patch_lengths": lengths}


class DocumentPatcher:
  """Adds `patch_lengths` to the windows of one byte string, its entropies scored by `lm`
  (the run's entropy model) as the corpus cache scores a document."""

  def __init__(self, rule: PatchRule, lm=None):
    self.rule, self.lm = rule, lm

  def __call__(self, raw: bytes, windows: dict) -> dict:
    h = np.zeros(windows["targets"].size, np.float32)
    if self.rule.uses_entropy:
      h[:len(raw)] = entropy.document_entropies(self.lm, raw)
    lengths, _ = window_lengths(self.rule, h.reshape(windows["targets"].shape),
                                windows["targets"], windows["mask"])
    return {**windows, "patch_lengths": lengths}


def patch_stats(patcher: BatchPatcher, batches) -> dict:
  """Mean patch size over real bytes, and the share of windows whose patches overflowed
  the slots (their last slot holds the rest of the window)."""
  n_bytes = n_patches = n_windows = n_folded = 0
  for batch in batches:
    h = patcher.window_entropies(batch)
    _, n_starts = window_lengths(patcher.rule, h, batch["targets"], batch["mask"])
    real = batch["mask"].sum(1) > 0
    n_bytes += batch["mask"].sum()
    n_patches += n_starts[real].sum()
    n_windows += real.sum()
    n_folded += (n_starts[real] > patcher.rule.max_patches).sum()
  return {"mean_patch_size": float(n_bytes / max(n_patches, 1)),
          "folded_windows": float(n_folded / max(n_windows, 1))}
