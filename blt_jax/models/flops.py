"""Analytic training FLOPs per byte for every model kind (matched-compute comparisons).

Conventions (one multiply-add = 2 FLOPs; training = 3 x forward, i.e. backward = 2 x forward):
- a dense layer din -> dout costs 2 * din * dout per row it is applied to;
- a transformer block of width d and SwiGLU hidden h costs 2 * (4 d^2 + 3 d h) per row, plus
  attention 4 * d * c (scores q.k and the weighted sum of v), where c is the mean number of
  keys a query may see: for causal attention with span w over n rows,
  c = mean_{i < n} min(i + 1, w) (w = n when unwindowed). Masked-out keys are not counted
  (model FLOPs, not the FLOPs the dense masked kernels execute);
- embedding lookups (bytes and hash n-grams), norms, RoPE, softmax, pooling are not counted.
Inference FLOPs per byte are the forward's: training / TRAIN_PER_FORWARD.
"""
from __future__ import annotations

from blt_jax.constants import BYTES
from blt_jax.models import layers, vocab

TRAIN_PER_FORWARD = 3.0  # forward + backward (2 x forward)


def mean_context(n: int, window: int = 0) -> float:
  """Mean number of visible keys per query in causal attention over n rows with span `window`."""
  w = min(window, n) if window else n
  # sum_{i=0}^{n-1} min(i+1, w) = w(w+1)/2 + (n - w) w
  return (w * (w + 1) / 2 + (n - w) * w) / n


def block_flops(dim: int, mlp_ratio: float, context: float, mlp_dim: int = 0) -> float:
  """Forward FLOPs per row of one pre-norm block (attention projections, SwiGLU, attention);
  the SwiGLU width is `mlp_dim`, or from `mlp_ratio` when 0."""
  hidden = mlp_dim or layers.mlp_hidden(dim, mlp_ratio)
  return 2 * (4 * dim * dim + 3 * dim * hidden) + 4 * dim * context


def lm_forward_flops(cfg, n_rows: int, columns: int) -> float:
  """Forward FLOPs per row of a ByteLM-shaped transformer over `n_rows` rows with a
  `columns`-way head."""
  ctx = mean_context(n_rows, cfg.window)
  return (cfg.n_layers * block_flops(cfg.dim, cfg.mlp_ratio, ctx, cfg.mlp_dim)
          + 2 * cfg.dim * columns)


def byte_lm_flops_per_byte(cfg, seq_len: int) -> float:
  """Training FLOPs per byte of ByteLM at sequence length `seq_len`."""
  return TRAIN_PER_FORWARD * lm_forward_flops(cfg, seq_len, vocab.output_columns(cfg.vocab))


def token_lm_flops_per_byte(cfg, seq_len: int, bytes_per_token: float) -> float:
  """Training FLOPs per byte of TokenLM over windows of `seq_len` bytes, each tokenized
  into seq_len / bytes_per_token tokens (its attention context)."""
  n_tokens = max(1, round(seq_len / bytes_per_token))
  return TRAIN_PER_FORWARD * lm_forward_flops(cfg, n_tokens, cfg.vocab_size) / bytes_per_token


def blt_flops_per_byte(cfg, seq_len: int, mean_patch_size: float | None = None) -> float:
  """Training FLOPs per byte of BLT; n_p = seq_len / mean_patch_size global slots; S is the
  slot width (`cfg.slot_dim`), c the number of decoder cross-attentions (1, or dec_layers).

  Per byte: encoder blocks; k/v projections of the encoder cross-attention (2 * 2 * E * S);
  encoder -> decoder projection (if E != D); per decoder cross-attention, q/o projections
  (2 * 2 * D^2) and attention over its patch's k slots (4 * D * k); decoder blocks; head.
  Per patch (divided by the mean patch size m): slot projection (2 * E * k * S); encoder
  cross-attention q/o projections (k * 2 * 2 * S^2) and attention of k slots over the
  patch's m bytes (4 * k * S * m); the projection into the global width (2 * k * S * G, if
  k * S != G); global blocks with causal context over n_p patches; decoder slot projection
  (2 * G * k * D) and, per decoder cross-attention, its k/v projections (k * 2 * 2 * D^2).
  mean_patch_size None uses seq_len / cfg.max_patches (the slots actually executed).
  With `cfg.zero_global` nothing from the patches reaches the decoder: only the encoder and
  decoder blocks, the projection between them and the head count.
  """
  T = seq_len
  E, G, D, k, S = cfg.enc_dim, cfg.global_dim, cfg.dec_dim, cfg.cross_attn_k, cfg.slot_dim
  c = cfg.dec_layers if cfg.dec_cross_all_layers else 1
  m = float(mean_patch_size) if mean_patch_size else T / cfg.max_patches
  n_p = max(1, round(T / m))
  enc = block_flops(E, cfg.mlp_ratio, mean_context(T, cfg.enc_window), cfg.enc_mlp_dim)
  dec = block_flops(D, cfg.mlp_ratio, mean_context(T, cfg.dec_window), cfg.dec_mlp_dim)
  glob = block_flops(G, cfg.mlp_ratio, mean_context(n_p), cfg.global_mlp_dim)
  local = (cfg.enc_layers * enc + (2 * E * D if E != D else 0) + cfg.dec_layers * dec
           + 2 * D * vocab.output_columns(cfg.vocab))
  if cfg.zero_global:
    return TRAIN_PER_FORWARD * local
  per_byte = local + 2 * 2 * E * S + c * (2 * 2 * D * D + 4 * D * k)
  per_patch = (2 * E * k * S
               + k * 2 * 2 * S * S + 4 * k * S * m
               + (2 * k * S * G if k * S != G else 0)
               + cfg.global_layers * glob
               + 2 * G * k * D + c * k * 2 * 2 * D * D)
  return TRAIN_PER_FORWARD * (per_byte + per_patch / m)


def qwen3_flops_per_byte(cfg, seq_len: int) -> float:
  """Training FLOPs per byte of a byte-adapted Qwen3 (`Qwen3Config`, 256-way head)."""
  q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  d = cfg.hidden_size
  block = 2 * (d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size)
  block += 4 * q * mean_context(seq_len)
  return TRAIN_PER_FORWARD * (cfg.num_hidden_layers * block + 2 * d * BYTES)
