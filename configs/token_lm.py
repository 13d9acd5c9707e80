"""The BPE-token baseline: the byte baseline's transformer over byte-level BPE tokens,
the vocabulary trained on the training documents only. bpb is its token NLL in bits
over the held-out bytes the tokens cover.

  python launch.py --config=configs/token_lm.py --config.model.vocab_size=1024
"""
from configs import common


def get_config(arg=None):
  c = common.base_config(arg)
  c.model.kind = "token_lm"
  c.model.update({"tiny": dict(dim=48, n_layers=2, n_heads=2),
                  "small": dict(dim=256, n_layers=4, n_heads=4),
                  "gpu": dict(dim=1024, n_layers=16, n_heads=16)}[c.size])
  c.model.vocab_size = 4096   # BPE tokens: the 256 bytes and the learnt merges
  c.model.max_tokens = None   # token slots per training window; None = from the bytes per
                              # token on training data, with slack (a longer window's tail
                              # is not trained on); eval windows always fit
  return c
