"""Text generation from any trained model, one byte at a time (BLT patches as it goes)."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from blt_jax.constants import BYTES
from blt_jax.errors import UserError


def next_byte_distribution(lm, data: bytes) -> np.ndarray:
  """log p(next byte | data): only the window holding the next byte is run.

  Windows are aligned at multiples of seq_len from the start of `data`, as in training;
  BLT entropies are scored over the whole text, as the cache scores a document.
  """
  T = lm.seq_len
  start = (len(data) // T) * T
  if lm.patcher is None:
    return lm.next_byte_logprobs(data[start:] + b"\0")[-1]
  return lm.next_byte_logprobs(data + b"\0")[-1]


def generate(lm, prompt: bytes, *, max_bytes: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, progress: bool = True) -> bytes:
  """Samples `max_bytes` bytes after `prompt` (greedy when temperature is 0)."""
  if temperature < 0 or not 0 <= top_k <= BYTES:
    raise UserError(f"sample.temperature must be >= 0 and sample.top_k in 0..{BYTES}")
  rng = np.random.default_rng(seed)
  out = bytearray(prompt)
  for _ in tqdm(range(max_bytes), desc="sampling", disable=not progress, leave=False,
                unit="byte"):
    logp = next_byte_distribution(lm, bytes(out)).astype(np.float64)
    if temperature == 0:
      out.append(int(np.argmax(logp)))
      continue
    logits = logp / temperature
    if top_k:
      logits[np.argsort(logits)[:-top_k]] = -np.inf
    p = np.exp(logits - logits.max())
    out.append(int(rng.choice(BYTES, p=p / p.sum())))
  return bytes(out[len(prompt):])
