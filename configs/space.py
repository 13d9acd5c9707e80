"""BLT with space patching (SpaceByte / BLT rule): a patch starts after a run of
non-alphanumeric bytes."""
from configs import common


def get_config(arg=None):
  return common.blt_config(arg, mode="space", expected_patch_size=3.0)
