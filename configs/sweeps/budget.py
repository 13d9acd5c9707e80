"""The fixed-inference-budget test (BLT paper, Figure 1): as the mean patch size grows
(3, 5, 8, 12), the global transformer grows so that inference FLOPs per byte stay equal
(within 5%) to BLT patch3's at its own shape.

  python launch.py --config=configs/sweeps/budget.py[:size=tiny]
  # share the rows it has in common with the tokens-vs-patches sweep:
  python launch.py --config=configs/sweeps/budget.py \
      --config.sweep.runs_dir=runs/sweeps/tokens_vs_patches
"""
from configs import common, flops_match

PATCHES = (3, 5, 8, 12)
TOLERANCE = 0.05


def target_flops(size: str) -> float:
  """Training FLOPs per byte of BLT patch3 (its own shape) at mean patch size 3."""
  c = common.blt_config(f"size={size}", mode="global", target_patch_size=3.0)
  return flops_match.blt_flops(c.model.to_dict(), c.data.seq_len, 3.0)


def blt_row(size: str, patch: int, *, static: bool = False) -> tuple[str, dict]:
  """(config module, overrides) of BLT at mean patch size `patch` with the global width
  that meets `target_flops`: entropy patching calibrated to `patch`, or static."""
  module = "configs.static4" if static else f"configs.patch{3 if patch == 8 else patch}"
  c = common.blt_config(f"size={size}", mode="global")
  shape = flops_match.blt_global(c.model.to_dict(), target_flops(size), c.data.seq_len, patch)
  overrides = {"model.global_dim": shape["global_dim"], "model.max_patches": None}
  overrides.update({"patching.patch_size": patch} if static else
                   {"patching.target_patch_size": float(patch)})
  return module, overrides


def get_config(arg=None):
  size = common.parse_arg(arg)["size"]
  return common.sweep_config(
      arg, title="Fixed inference budget",
      description="BLT at mean patch sizes 3 to 12, the global transformer widened so that "
                  "inference FLOPs per byte equal patch3's (within 5%).",
      variants={f"patch{p}": blt_row(size, p) for p in PATCHES})
