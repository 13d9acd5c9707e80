"""A pretrained Qwen3 fine-tuned into a next-byte entropy model.

  python launch.py --config=configs/entropy_qwen3.py:size=gpu --config.model.path=/ckpt/Qwen3-0.6B

`model.path` is a local Hugging Face directory (config.json, model.safetensors or a sharded
index, tokenizer.json); its single-byte tokens become the 256-byte input/output vocabulary
(BOS = <|endoftext|>) and the shape fields below are ignored. With `model.path=''` the
model is a random Qwen3 of the shape below (tiny/small: CPU smoke runs).
"""
from configs import common

SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16),
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gpu": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128),
}


def get_config(arg=None):
  c = common.base_config(arg)
  size = c.size
  c.model = common.ml_collections.ConfigDict(dict(kind="qwen3", **SHAPES[size]))
  c.model.path = ""              # HF Qwen3 directory to start from; '' = random init
  c.model.rms_norm_eps = 1e-6
  c.model.rope_theta = 1000000.0
  c.model.tie_word_embeddings = True
  c.model.dtype = "bfloat16" if size == "gpu" else "float32"
  c.model.remat = False          # recompute each layer in the backward pass (saves memory)
  if size == "gpu":              # fine-tuning a pretrained model: gentler schedule
    c.train.lr = 1e-4
    c.train.batch_size = 16
  return c
