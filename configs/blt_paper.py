"""The released BLT's architecture (facebookresearch/blt, transformers' BltForCausalLM),
trained from scratch on the built-in corpus, or fine-tuned from a released folder:

  python launch.py --config=configs/blt_paper.py[:size=tiny|small|gpu]
  python launch.py --config=configs/blt_paper.py:size=gpu --config.model.init_from=/path/to/blt-1b

Every choice where blt-jax's own BLT differs is set to the released one (README: "The
released BLT"); its entropy model is configs/blt_paper_patcher.py, so a run saves as a
BltForCausalLM folder (`blt_jax.load(workdir).save_pretrained(folder)`). With
`model.init_from`, the shape comes from the folder and the weights start the run; the
split, entropy model and threshold are this project's.

gpu: the BLT-1B shapes (encoder 1024 x 1 layer, global 2048 x 25, decoder 1024 x 9, 16
heads, windows 512), with 131072 hash buckets per n-gram table instead of the released
500002, so that fp32 parameters and AdamW state (16 bytes per parameter) fit one 80 GB GPU.
"""
from configs import common

SHAPES = {
    "tiny": dict(enc_dim=32, enc_layers=1, enc_heads=2, enc_window=64, global_dim=64,
                 global_layers=2, global_heads=2, dec_dim=32, dec_layers=2, dec_heads=2,
                 dec_window=64, cross_heads=2, hash_buckets=1021),
    "small": dict(enc_dim=128, enc_layers=1, enc_heads=4, enc_window=256, global_dim=256,
                  global_layers=4, global_heads=4, dec_dim=128, dec_layers=2, dec_heads=4,
                  dec_window=256, cross_heads=4, hash_buckets=8191),
    "gpu": dict(enc_dim=1024, enc_layers=1, enc_heads=16, enc_window=512, global_dim=2048,
                global_layers=25, global_heads=16, dec_dim=1024, dec_layers=9, dec_heads=16,
                dec_window=512, cross_heads=16, hash_buckets=131072, enc_mlp_dim=2816,
                global_mlp_dim=5632, dec_mlp_dim=2816),
}


def get_config(arg=None):
  c = common.blt_config(arg, mode="global", target_patch_size=4.0)
  c.model.update(SHAPES[c.size])
  c.model.cross_attn_k = 2
  c.model.pooling = "max"
  c.model.hash_ngrams = (3, 4, 5, 6, 7, 8)
  c.model.hash_functions = 1
  c.model.vocab = "blt"
  c.model.hash_style = "blt"
  c.model.cross_style = "blt"
  c.model.dec_cross_all_layers = True
  c.model.inner_norms = False
  c.model.norm_eps = 1e-5
  c.model.rope_theta = 500000.0
  c.model.init_from = ""         # a BltForCausalLM folder to start from ('' = from scratch)
  c.patching.entropy_config = f"configs.blt_paper_patcher:size={c.size}"
  return c
