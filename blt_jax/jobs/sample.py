"""Mode `sample`: continue `sample.prompt` with a trained run's model."""
from __future__ import annotations

from pathlib import Path

import ml_collections

from blt_jax import api, sample
from blt_jax.constants import BYTES
from blt_jax.errors import UserError


def run(config: ml_collections.ConfigDict, workdir: Path):
  s = config.sample
  if s.max_bytes < 1:
    raise UserError(f"sample.max_bytes must be >= 1, got {s.max_bytes}")
  if s.temperature < 0 or not 0 <= s.top_k <= BYTES:
    raise UserError(f"sample.temperature must be >= 0 and sample.top_k in 0..{BYTES}, got "
                    f"{s.temperature} and {s.top_k}")
  lm = api.load(workdir, config.eval.step)
  prompt = s.prompt.encode("utf-8")
  out = sample.generate(lm, prompt, max_bytes=s.max_bytes, temperature=s.temperature,
                        top_k=s.top_k, seed=s.seed)
  print((prompt + out).decode("utf-8", errors="replace"))
