"""Entropy-threshold sweep: explicit thresholds (nats) for global (h[t] > θ) and
monotonic (h[t] - h[t-1] > θ) patching with the default entropy patcher.

  python launch.py --config=configs/sweeps/threshold.py[:size=tiny]

Patch slots are sized from each threshold's mean patch size on training data
(`model.max_patches=None`). The thresholds suit the small patcher (size=small); at the
global thresholds below it gives mean patches of about 1.9 to 6.6 bytes, and at the
monotonic ones about 2.1 to 7.4.
"""
from configs import common

GLOBAL = (2.0, 2.25, 2.5, 2.75, 3.0)
MONOTONIC = (0.0, 0.25, 0.5, 0.75, 1.0)


def get_config(arg=None):
  variants = {}
  for mode, thresholds in (("global", GLOBAL), ("monotonic", MONOTONIC)):
    for t in thresholds:
      variants[f"{mode}_{t:g}".replace(".", "p")] = ("configs.patch3", {  # global_2p25
          "patching.mode": mode, "patching.threshold": t,
          "patching.target_patch_size": 0.0, "model.max_patches": None})
  return common.sweep_config(
      arg, title="Entropy threshold",
      description="Global and monotonic entropy patching at fixed thresholds; "
                  "same BLT shape, patch slots sized from each rule's mean patch size.",
      variants=variants)
