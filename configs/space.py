"""BLT with space patching (SpaceByte / BLT rule): a patch starts after a run of
non-alphanumeric bytes. Patch slots are sized from the rule's mean patch size on the
training data (about 8 bytes on Python source)."""
from configs import common


def get_config(arg=None):
  c = common.blt_config(arg, mode="space")
  c.model.max_patches = None  # derived from training data: space patching has no knob
  return c
