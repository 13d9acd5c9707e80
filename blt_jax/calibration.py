"""The entropy threshold and mean patch size of a patching rule, measured on a fixed
random sample of full training windows (never on held-out documents)."""
from __future__ import annotations

import numpy as np

from blt_jax import data, patching
from blt_jax.errors import UserError

CALIBRATION_BYTES = 1 << 21  # training bytes the threshold is calibrated on


def calibration_windows(splits, seq_len: int, seed: int) -> np.ndarray:
  """int64 [N, T] corpus offsets of a fixed random sample of full training windows."""
  table = data.window_table(splits.corpus, splits.train_ids, seq_len)
  table = table[table[:, 1] == seq_len]
  table = table[np.random.default_rng(seed).permutation(len(table))]
  return table[:max(1, CALIBRATION_BYTES // seq_len), :1] + np.arange(seq_len)


def calibrate(splits, h_all: np.ndarray, *, seq_len: int, seed: int, mode: str,
              target_patch_size: float, max_patch_len: int | None) -> float:
  """The threshold giving `target_patch_size` as the mean patch size on training windows."""
  h_NxT = np.asarray(h_all[calibration_windows(splits, seq_len, seed)], np.float32)
  try:
    return patching.calibrate_threshold(h_NxT, target_patch_size=target_patch_size,
                                        mode=mode, max_patch_len=max_patch_len)
  except ValueError as e:
    raise UserError(f"threshold calibration: {e}")


def training_patch_size(splits, h_all: np.ndarray | None, *, seq_len: int, seed: int,
                        mode: str, threshold: float | None, patch_size: int,
                        max_patch_len: int | None) -> float:
  """Mean patch size of a rule on the calibration windows."""
  idx_NxT = calibration_windows(splits, seq_len, seed)
  starts = patching.patch_starts(
      None if h_all is None else np.asarray(h_all[idx_NxT], np.float32), mode=mode,
      threshold=threshold, patch_size=patch_size,
      data=np.asarray(splits.corpus.data[idx_NxT]), max_patch_len=max_patch_len)
  return patching.mean_patch_size(starts)
