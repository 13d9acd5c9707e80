"""The small entropy model that BLT runs train once and patch with (cheap to score).

  python launch.py --config=configs/entropy_patcher.py[:size=tiny|small|gpu]
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(arg)
  c.model.update(common.ENTROPY_PATCHER[c.size])
  c.train.steps = {"tiny": 40, "small": 500, "gpu": 10000}[c.size]
  c.eval.max_bytes = {"tiny": 16384, "small": 131072, "gpu": 0}[c.size]
  return c
