"""Model registry: each kind's shape dataclass, its module (a `ByteModel`), and how its
shape is resolved before a run starts (a pretrained model's shape comes from its files).

Fields are plain dicts (`{"kind": ..., **shape}`), as configs and run records hold them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from blt_jax.models import blt_hf
from blt_jax.models.blt import BLT, BLTConfig
from blt_jax.models.byte_lm import ByteLM, ByteLMConfig
from blt_jax.models.interface import ByteModel
from blt_jax.models.qwen3 import ByteQwen3, ByteQwen3Config
from blt_jax.models.token_lm import TokenLM, TokenLMConfig


@dataclasses.dataclass(frozen=True)
class Kind:
  config: type                                   # frozen dataclass of the model's shape
  module: type                                   # a ByteModel built from that dataclass
  resolve: Callable = lambda cfg: cfg            # shape as run: cfg -> cfg (reads no weights)
  load: Callable = lambda model: model.load_pretrained()  # pretrained weights, at a run's start


KINDS = {
    "byte_lm": Kind(ByteLMConfig, ByteLM),
    "blt": Kind(BLTConfig, BLT, blt_hf.resolve, blt_hf.load_into),
    "qwen3": Kind(ByteQwen3Config, ByteQwen3, ByteQwen3Config.resolve),
    "token_lm": Kind(TokenLMConfig, TokenLM),
}


def config_for(fields: dict):
  """The shape dataclass of `fields` (`kind` names the model; unknown fields are errors)."""
  kind = fields.get("kind")
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
  cfg_cls = KINDS[kind].config
  names = {f.name for f in dataclasses.fields(cfg_cls)}
  unknown = sorted(set(fields) - names - {"kind"})
  if unknown:
    raise ValueError(f"model kind {kind!r} has no field(s) {unknown}")
  return cfg_cls(**{k: v for k, v in fields.items() if k in names})


def default_fields(kind: str) -> dict:
  """The shape fields of a model kind at their defaults ({} for a kind not built here)."""
  return dataclasses.asdict(KINDS[kind].config()) if kind in KINDS else {}


def resolve(fields: dict) -> dict:
  """The fields as the run builds the model (e.g. a pretrained Qwen3's shape filled in)."""
  cfg = KINDS[fields["kind"]].resolve(config_for(fields))
  return {"kind": fields["kind"], **dataclasses.asdict(cfg)}


def load_pretrained(fields: dict, model: ByteModel) -> None:
  """Reads the pretrained weights `fields` name (if any) into a freshly built `model`."""
  KINDS[fields["kind"]].load(model)


def build(fields: dict, seed: int = 0) -> ByteModel:
  """A freshly initialised model of `fields` (no pretrained weights are read)."""
  return KINDS[fields["kind"]].module(config_for(fields), rngs=nnx.Rngs(seed))


__all__ = ["ByteModel", "KINDS", "build", "config_for", "default_fields", "load_pretrained",
           "resolve"]
