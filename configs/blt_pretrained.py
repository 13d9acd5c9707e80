"""A released BLT (a transformers BltForCausalLM folder, such as BLT-1B) in eval, patch and
sample modes, read without torch; its own patcher and threshold patch it.

  python launch.py --config=configs/blt_pretrained.py --config.model.path=/path/to/blt-1b
  python launch.py --config=configs/blt_pretrained.py --config.model.path=... --config.mode=sample

mode=eval scores the held-out documents of data.corpus by this config's split (or all of
eval.corpus) and writes <workdir>/eval.json. To fine-tune, use configs/blt_paper.py with
model.init_from.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  c = common.base_config(arg)
  c.mode = "eval"
  c.model = ml_collections.ConfigDict()
  c.model.kind = "blt_pretrained"
  c.model.path = ""              # the BltForCausalLM folder
  c.data.seq_len = 0             # bytes per window; 0 = the folder's max_position_embeddings
  c.eval.batch_size = 4
  return c
