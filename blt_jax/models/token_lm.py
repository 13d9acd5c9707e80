"""The BPE-token baseline: the byte LM's transformer over BPE tokens (`bpe`), V-way.

Its ids are token ids (V, the vocabulary size, is BOS) and its logits [B, S, V] are over
tokens, so it is scored through token batches (`loss.token_stats`: token NLL over the
bytes the tokens cover), not next-byte probabilities.
"""
from __future__ import annotations

import dataclasses

from blt_jax.models import flops
from blt_jax.models.byte_lm import ByteLM, ByteLMConfig


@dataclasses.dataclass(frozen=True)
class TokenLMConfig(ByteLMConfig):
  vocab_size: int = 4096          # BPE tokens (the 256 bytes and the merges); BOS is one more
  max_tokens: int | None = None   # token slots per training window; None = derived by the run


class TokenLM(ByteLM):
  """Maps token ids [B, S] (BOS first) to next-token logits [B, S, V]."""

  @staticmethod
  def vocab_shape(cfg) -> tuple[int, int]:
    if cfg.vocab != "bytes":
      raise ValueError(f"a token LM's vocabulary is its BPE tokens; vocab={cfg.vocab!r}")
    return cfg.vocab_size + 1, cfg.vocab_size

  def flops_per_byte(self, seq_len: int, mean_patch_size: float | None = None) -> float:
    """At `mean_patch_size` bytes per token (default: the training slots filled)."""
    return flops.token_lm_flops_per_byte(self.cfg, seq_len,
                                         mean_patch_size or seq_len / self.cfg.max_tokens)
