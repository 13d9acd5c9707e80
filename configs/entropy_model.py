"""The byte-level entropy model alone: a small causal byte transformer LM.

  python launch.py --config=configs/entropy_model.py[:size=tiny|small|gpu]
"""
from configs import common


def get_config(arg=None):
  return common.base_config(arg)
