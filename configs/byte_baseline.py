"""A plain causal byte transformer, the baseline BLT is compared with."""
from configs import common


def get_config(arg=None):
  c = common.base_config(arg)
  c.model.update({"tiny": dict(dim=48, n_layers=2, n_heads=2),
                  "small": dict(dim=192, n_layers=5, n_heads=4),
                  "gpu": dict(dim=1024, n_layers=16, n_heads=16)}[c.size])
  return c
