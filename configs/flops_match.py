"""Shapes chosen to meet a FLOPs-per-byte target: the byte transformer, the BPE-token
model and BLT's global transformer (the matched-compute sweeps: scheme, tokens vs
patches, budget). Analytic FLOPs (`blt_jax.models.flops`), at the expected patch or token
size in bytes; the runs measure and report the FLOPs they actually reach.
"""
import math

from blt_jax.models import flops
from blt_jax.models.blt import BLTConfig
from blt_jax.models.byte_lm import ByteLMConfig
from blt_jax.models.token_lm import TokenLMConfig

# Held-out bytes per token of the BPE vocabularies trained on the stdlib training split
# (256-byte windows, each tokenized on its own; measured 2026-12-07, `bpe.bytes_per_token`).
STDLIB_BYTES_PER_TOKEN = {1024: 2.47, 4096: 3.24}


def closest(shapes: list[dict], cost, target: float) -> dict:
  return min(shapes, key=lambda s: abs(cost(s) - target))


def byte_lm(target: float, seq_len: int, heads: int, layers: int) -> dict:
  """The byte transformer of `layers` layers whose width (a multiple of 2 * heads) brings
  its training FLOPs per byte closest to `target`."""
  shapes = [dict(dim=d, n_layers=layers, n_heads=heads) for d in range(2 * heads, 8193, 2 * heads)]
  return closest(shapes, lambda s: flops.byte_lm_flops_per_byte(ByteLMConfig(**s), seq_len),
                 target)


def token_lm(target: float, seq_len: int, heads: int, layers: int, vocab_size: int,
             bytes_per_token: float) -> dict:
  """The BPE-token transformer of `layers` layers whose width (a multiple of 2 * heads)
  brings its training FLOPs per byte at `bytes_per_token` closest to `target`."""
  shapes = [dict(dim=d, n_layers=layers, n_heads=heads) for d in range(2 * heads, 8193, 2 * heads)]
  cost = lambda s: flops.token_lm_flops_per_byte(
      TokenLMConfig(**s, vocab_size=vocab_size), seq_len, bytes_per_token)
  return closest(shapes, cost, target)


def blt_global(shape: dict, target: float, seq_len: int, patch_size: float) -> dict:
  """`shape` (BLT fields) with the global transformer's width (at its depth) closest to
  meeting `target` training FLOPs per byte at mean patch size `patch_size`; the width
  stays divisible by its heads and the cross-attention slots (even per head)."""
  step = math.lcm(2 * shape["global_heads"], shape["cross_attn_k"] * shape["cross_heads"])
  shapes = [{**shape, "global_dim": g} for g in range(step, 8193, step)]
  return closest(shapes, lambda s: blt_flops(s, seq_len, patch_size), target)


def blt_flops(shape: dict, seq_len: int, patch_size: float) -> float:
  fields = {k: v for k, v in shape.items() if k != "kind"}
  fields["max_patches"] = fields.get("max_patches") or seq_len  # not counted: the mean is given
  return flops.blt_flops_per_byte(BLTConfig(**fields), seq_len, patch_size)
