"""Patching schemes at matched training FLOPs per byte: entropy (global, monotonic),
static and space patching at one mean patch size, and a plain byte transformer whose
shape is chosen to match their FLOPs per byte.

  python launch.py --config=configs/sweeps/scheme.py[:size=tiny]

Space patching has no knob: on Python source it gives about 8 bytes per patch (runs of
indentation are one boundary), so the other BLT rows are set to 8 as well.
"""
from configs import common, flops_match

PATCH = 8


def get_config(arg=None):
  size = common.parse_arg(arg)["size"]
  blt = common.blt_config(f"size={size}", mode="static", patch_size=PATCH)
  target = flops_match.blt_flops(blt.model.to_dict(), blt.data.seq_len, PATCH)
  byte_lm = flops_match.byte_lm(target, blt.data.seq_len, common.BYTE_LM[size]["n_heads"],
                                common.BYTE_LM[size]["n_layers"])
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
          "byte_transformer": ("configs.byte_baseline",  # on the BLT rows' bytes
                               {**{f"model.{k}": v for k, v in byte_lm.items()},
                                "train.steps": blt.train.steps}),
      })
  c.sweep.connect = False  # one point per scheme
  return c
