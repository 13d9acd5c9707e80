"""A causal byte-level transformer LM: the entropy model and the plain byte baseline."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from blt_jax.models import flops, layers, vocab
from blt_jax.models.interface import ByteModel


@dataclasses.dataclass(frozen=True)
class ByteLMConfig:
  dim: int = 128
  n_layers: int = 4
  n_heads: int = 4
  mlp_ratio: float = 4.0
  window: int = 0            # sliding-window attention span in bytes; 0 = full causal
  rope_theta: float = 10000.0
  mlp_dim: int = 0           # SwiGLU width; 0 = from mlp_ratio
  norm_eps: float = 1e-6     # RMSNorm epsilon
  vocab: str = "bytes"       # 'bytes' | 'blt': the released BLT's 260 tokens (its patcher)
  dtype: str = "float32"     # compute dtype; parameters stay float32
  remat: bool = False        # recompute block activations in the backward pass


class ByteLM(ByteModel):
  """Maps input ids [B, T] (BOS first) to next-byte logits [B, T, V] (`vocab`)."""

  def __init__(self, cfg: ByteLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    rows, columns = self.vocab_shape(cfg)
    dtype = jnp.dtype(cfg.dtype)
    self.embed = nnx.Embed(rows, cfg.dim, dtype=dtype,
                           param_dtype=jnp.float32,
                           embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.trunk = layers.Transformer(cfg.dim, cfg.n_layers, cfg.n_heads, window=cfg.window,
                                    mlp_ratio=cfg.mlp_ratio, mlp_dim=cfg.mlp_dim,
                                    rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                                    dtype=dtype, remat=cfg.remat, rngs=rngs)
    self.head = layers.dense(cfg.dim, columns, rngs=rngs, dtype=dtype)

  @staticmethod
  def vocab_shape(cfg) -> tuple[int, int]:
    """(input embedding rows, logits per position)."""
    vocab.check(cfg.vocab)
    return vocab.input_rows(cfg.vocab), vocab.output_columns(cfg.vocab)

  def tokens_embedded(self, ids_BxT):
    return self.embed(vocab.tokens(ids_BxT, self.cfg.vocab))

  def __call__(self, inputs_BxT):
    x_BxTxD = self.trunk(self.tokens_embedded(inputs_BxT))
    return self.head(x_BxTxD).astype(jnp.float32)

  def init_cache(self, batch_size: int, length: int):
    return self.trunk.init_cache(batch_size, length, jnp.dtype(self.cfg.dtype))

  def prefill(self, ids_BxT, n_B, starts_BxT=None):
    del n_B, starts_BxT  # every position's keys and values are the window's
    x_BxTxD, cache = self.trunk.prefill(self.tokens_embedded(ids_BxT))
    return self.head(x_BxTxD).astype(jnp.float32), cache

  def decode_step(self, cache, ids_B, pos_B, starts_B=None):
    del starts_B  # no patches
    x_Bx1xD, cache = self.trunk.step(self.tokens_embedded(ids_B[:, None]), cache, pos_B)
    return self.head(x_Bx1xD)[:, 0].astype(jnp.float32), cache

  def flops_per_byte(self, seq_len: int, mean_patch_size: float | None = None) -> float:
    del mean_patch_size  # no patches
    return flops.byte_lm_flops_per_byte(self.cfg, seq_len)
