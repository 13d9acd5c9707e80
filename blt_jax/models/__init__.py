"""Model registry: a model kind name -> (config dataclass, nnx module).

Every model maps input ids [B, T] (BOS = 256 first) and, when it `needs_patches`, patch
lengths [B, P] over the T target bytes, to next-byte logits [B, T, 256].
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from blt_jax.models.blt import BLT, BLTConfig
from blt_jax.models.byte_lm import BOS, ByteLM, ByteLMConfig
from blt_jax.models.qwen3 import ByteQwen3, ByteQwen3Config

KINDS = {
    "byte_lm": (ByteLMConfig, ByteLM),
    "blt": (BLTConfig, BLT),
    "qwen3": (ByteQwen3Config, ByteQwen3),
}


def config_for(kind: str, fields: dict):
  """Builds the model's config dataclass from a plain dict, ignoring `kind` itself."""
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
  cfg_cls, _ = KINDS[kind]
  names = {f.name for f in dataclasses.fields(cfg_cls)}
  unknown = sorted(set(fields) - names - {"kind"})
  if unknown:
    raise ValueError(f"model kind {kind!r} has no field(s) {unknown}")
  return cfg_cls(**{k: v for k, v in fields.items() if k in names})


def build(kind: str, fields: dict, seed: int = 0) -> nnx.Module:
  cfg = config_for(kind, fields)
  return KINDS[kind][1](cfg, rngs=nnx.Rngs(seed))


__all__ = ["BOS", "KINDS", "build", "config_for"]
