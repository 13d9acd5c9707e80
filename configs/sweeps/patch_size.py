"""Patch-size sweep: BLT with global entropy patching calibrated to mean patch sizes
3, 5, 7, 10 and 12 (the prototype's table, on held-out documents).

  python launch.py --config=configs/sweeps/patch_size.py[:size=tiny]
  # compare entropy models (each entropy-patched row runs once per model):
  python launch.py --config=configs/sweeps/patch_size.py \
      --config.sweep.entropy_models=default,runs/entropy_qwen3_gpu
"""
from configs import common


def get_config(arg=None):
  return common.sweep_config(
      arg, title="Patch size",
      description="Same BLT shape; the entropy threshold is calibrated on training "
                  "windows to each target mean patch size. Larger patches mean fewer "
                  "global-transformer steps, so fewer FLOPs per byte.",
      variants={f"patch{n}": (f"configs.patch{n}", {}) for n in (3, 5, 7, 10, 12)})
