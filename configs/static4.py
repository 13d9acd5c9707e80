"""BLT with static patching: a new patch every 4 bytes."""
from configs import common


def get_config(arg=None):
  return common.blt_config(arg, mode="static", patch_size=4)
