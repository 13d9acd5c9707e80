"""BLT with entropy patching, threshold calibrated to a mean patch size of 5 bytes."""
from configs import common


def get_config(arg=None):
  return common.blt_config(arg, mode="global", target_patch_size=5.0)
