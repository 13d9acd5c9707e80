"""The entropy model of configs/blt_paper.py: a byte LM shaped like the released BLT's
patcher (its 260-token vocabulary, RMSNorm eps 1e-5), so that the pair saves as one
BltForCausalLM folder. gpu: the released BLT-1B patcher (768 wide, 14 layers, window 512).

  python launch.py --config=configs/blt_paper_patcher.py[:size=tiny|small|gpu]
"""
from configs import common

SHAPES = {
    "tiny": dict(dim=32, n_layers=2, n_heads=2, window=0, mlp_dim=0),
    "small": dict(dim=64, n_layers=2, n_heads=2, window=0, mlp_dim=0),
    "gpu": dict(dim=768, n_layers=14, n_heads=12, window=512, mlp_dim=2048),
}


def get_config(arg=None):
  c = common.base_config(arg)
  c.model.update(SHAPES[c.size])
  c.model.vocab = "blt"          # the released 260 tokens; entropies over all of them
  c.model.norm_eps = 1e-5
  c.train.steps = {"tiny": 40, "small": 500, "gpu": 10000}[c.size]
  c.eval.max_bytes = {"tiny": 16384, "small": 131072, "gpu": 0}[c.size]
  return c
