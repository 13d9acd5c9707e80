"""Understanding BLT: what its global transformer contributes, how the entropy model's
size moves patching and BLT, and monotonic against global patching at one mean patch.

  python launch.py --config=configs/sweeps/understanding.py[:size=tiny]
  # a trained BLT with its global output zeroed at eval (writes eval_zero_global-True.json):
  python launch.py --config=configs/patch3.py --workdir=RUN --config.mode=eval \\
      --config.model.zero_global=True

Rows, all BLT patch3 (mean patch 3) unless said: `base`; `global_layers_0`, the global
transformer without layers (each patch's vector reaches the decoder unmixed with other
patches); `zero_global`, trained with the global path zeroed (the local encoder and
decoder alone); `patcher_large`, patched by the entropy model of configs/entropy_model.py
(0.86M parameters at size=small) instead of the default patcher's (0.13M); `monotonic`,
monotonic entropy patching calibrated to the same mean patch size.
"""
from configs import common


def get_config(arg=None):
  size = common.parse_arg(arg)["size"]
  changes = {
      "base": {},
      "global_layers_0": {"model.global_layers": 0},
      "zero_global": {"model.zero_global": True},
      "patcher_large": {"patching.entropy_config": f"configs.entropy_model:size={size}"},
      "monotonic": {"patching.mode": "monotonic"},
  }
  c = common.sweep_config(
      arg, title="Understanding BLT (patch3)",
      description="The global transformer's part, the entropy model's size, and monotonic "
                  "against global patching, each one change from BLT patch3.",
      variants={name: ("configs.patch3", o) for name, o in changes.items()})
  c.sweep.connect = False
  return c
