"""Patching schemes at matched training FLOPs per byte: entropy (global, monotonic),
static and space patching at one mean patch size, and a plain byte transformer whose
shape is chosen to match their FLOPs per byte.

  python launch.py --config=configs/sweeps/scheme.py[:size=tiny]

Space patching has no knob: on Python source it gives about 8 bytes per patch (runs of
indentation are one boundary), so the other BLT rows are set to 8 as well.
"""
from blt_jax.models import flops
from blt_jax.models.blt import BLTConfig
from blt_jax.models.byte_lm import ByteLMConfig
from configs import common

PATCH = 8


def matched_byte_lm(target_flops: float, seq_len: int, heads: int) -> dict:
  """The byte transformer (width a multiple of 4 * heads, 3-6 layers) whose analytic
  training FLOPs per byte are closest to `target_flops`."""
  shapes = [dict(dim=d, n_layers=n, n_heads=heads) for d in range(4 * heads, 2049, 4 * heads)
            for n in range(3, 7)]
  return min(shapes, key=lambda s: abs(
      flops.byte_lm_flops_per_byte(ByteLMConfig(**s), seq_len) - target_flops))


def get_config(arg=None):
  size = common.parse_arg(arg)["size"]
  blt = common.blt_config(f"size={size}", mode="static", patch_size=PATCH)
  shape = {k: v for k, v in blt.model.to_dict().items() if k != "kind"}
  target = flops.blt_flops_per_byte(BLTConfig(**shape), blt.data.seq_len, PATCH)
  byte_lm = matched_byte_lm(target, blt.data.seq_len, common.BYTE_LM[size]["n_heads"])
  derived = {"model.max_patches": None}  # slots from each rule's mean patch size
  c = common.sweep_config(
      arg, title="Patching scheme at matched FLOPs per byte",
      description=f"BLT rows share one shape at a mean patch size of about {PATCH}; the "
                  "byte transformer is sized to the same analytic training FLOPs per byte.",
      variants={
          "entropy_global": ("configs.patch3", {"patching.target_patch_size": PATCH,
                                                   **derived}),
          "entropy_monotonic": ("configs.patch3", {"patching.mode": "monotonic",
                                                      "patching.target_patch_size": PATCH,
                                                      **derived}),
          f"static{PATCH}": ("configs.static4", {"patching.patch_size": PATCH, **derived}),
          "space": ("configs.space", derived),
          "byte_transformer": ("configs.byte_baseline",
                               {f"model.{k}": v for k, v in byte_lm.items()}),
      })
  c.sweep.connect = False  # one point per scheme
  return c
