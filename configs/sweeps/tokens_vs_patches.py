"""Patches against tokens at matched training FLOPs per byte (within 10%): BPE-token
models (1k and 4k vocabularies, trained on the training split), the byte transformer,
BLT with entropy patching at mean patch 3, 5 and 8 (the global widened to the budget, as
in the budget sweep) and static patches of 4. Every row trains on the same bytes (BLT's
steps) and is scored on the same held-out bytes.

  python launch.py --config=configs/sweeps/tokens_vs_patches.py[:size=tiny]
"""
from configs import common, flops_match
from configs.sweeps import budget

VOCABS = (1024, 4096)
TOLERANCE = 0.10


def get_config(arg=None):
  size = common.parse_arg(arg)["size"]
  blt = common.blt_config(f"size={size}", mode="global", target_patch_size=3.0)
  T, target = blt.data.seq_len, budget.target_flops(size)
  heads, layers = common.BYTE_LM[size]["n_heads"], common.BYTE_LM[size]["n_layers"]
  same_bytes = {"train.steps": common.BLT_SCHEDULE[size]["steps"],
                "eval.every_steps": common.BLT_SCHEDULE[size]["eval_every"],
                "ckpt.every_steps": common.BLT_SCHEDULE[size]["ckpt_every"]}
  variants = {}
  for vocab in VOCABS:
    shape = flops_match.token_lm(target, T, heads, layers, vocab,
                                 flops_match.STDLIB_BYTES_PER_TOKEN[vocab])
    variants[f"bpe{vocab // 1024}k"] = ("configs.token_lm", {
        "model.vocab_size": vocab, **{f"model.{k}": v for k, v in shape.items()},
        **same_bytes})
  variants["byte"] = ("configs.byte_baseline", {
      **{f"model.{k}": v for k, v in flops_match.byte_lm(target, T, heads, layers).items()},
      **same_bytes})
  for patch in (3, 5, 8):
    variants[f"patch{patch}"] = budget.blt_row(size, patch)
  variants["static4"] = budget.blt_row(size, 4, static=True)
  c = common.sweep_config(
      arg, title="Tokens vs patches at matched FLOPs",
      description="BPE-token models, the byte transformer and BLT, each sized to BLT "
                  "patch3's training FLOPs per byte (within 10%), trained on the same bytes "
                  "and scored on the same held-out bytes.",
      variants=variants)
  c.sweep.connect = False
  return c
