"""Architecture sweep: BLT patch3 with one change per row (hash n-grams, encoder and
decoder depth, query slots per patch, pooling).

  python launch.py --config=configs/sweeps/architecture.py[:size=tiny]
"""
from configs import common


def get_config(arg=None):
  changes = {
      "base": {},
      "no_hash": {"model.hash_ngrams": []},
      "enc_layers_2": {"model.enc_layers": 2},
      "dec_layers_1": {"model.dec_layers": 1},
      "dec_layers_4": {"model.dec_layers": 4},
      "cross_attn_k_1": {"model.cross_attn_k": 1},
      "cross_attn_k_4": {"model.cross_attn_k": 4},
      "mean_pooling": {"model.pooling": "mean"},
  }
  c = common.sweep_config(
      arg, title="Architecture (BLT patch3)",
      description="One change per row from BLT patch3 (entropy patching, mean patch 3).",
      variants={name: ("configs.patch3", o) for name, o in changes.items()})
  c.sweep.connect = False  # one point per variant
  return c
