"""Writes the tiny Qwen3 fixtures of tests/test_qwen3.py with PyTorch + transformers.

  pip install torch transformers   # for this script only; not project dependencies
  python scripts/make_qwen3_reference.py [--out tests/fixtures]

Each folder is a Hugging Face checkpoint (config.json + model.safetensors) of a tiny
random Qwen3, plus input_ids.npy [2, 16] and the reference logits.npy [2, 16, vocab]
(float32, eager attention):
  qwen3_tiny         tied head, head_dim * heads == hidden, rope_theta 1e6
  qwen3_tiny_untied  untied head, head_dim * heads != hidden, rope_theta 1e4
  qwen3_tiny_bf16    qwen3_tiny saved in bfloat16; logits of its bf16-rounded weights
                     computed in float32
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import transformers

VARIANTS = {
    "qwen3_tiny": dict(head_dim=16, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3_tiny_untied": dict(head_dim=24, tie_word_embeddings=False, rope_theta=1e4),
}


def tiny_model(seed: int, head_dim: int, tie_word_embeddings: bool, rope_theta: float):
  config = transformers.Qwen3Config(
      vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6,
      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
      tie_word_embeddings=tie_word_embeddings, max_position_embeddings=128,
      attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(config).eval()
  # Weights of order-one logits (HF's 0.02 init makes every logit ~0), random norm scales.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 0.125)
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model


def logits_of(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(ids)).logits.float().numpy()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures"))
  out = Path(parser.parse_args().out)
  ids = np.random.default_rng(0).integers(0, 300, size=(2, 16)).astype(np.int64)
  for seed, (name, kw) in enumerate(VARIANTS.items()):
    model = tiny_model(seed, **kw)
    folder = out / name
    model.save_pretrained(folder, safe_serialization=True)
    np.save(folder / "input_ids.npy", ids)
    np.save(folder / "logits.npy", logits_of(model, ids))
    if name == "qwen3_tiny":
      copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out / "qwen3_tiny_bf16",
                                                              safe_serialization=True)
      with torch.no_grad():  # bf16-rounded weights, float32 compute (rotary buffers intact)
        for p in model.parameters():
          p.copy_(p.bfloat16().float())
      np.save(out / "qwen3_tiny_bf16" / "input_ids.npy", ids)
      np.save(out / "qwen3_tiny_bf16" / "logits.npy", logits_of(model, ids))
  for f in out.glob("qwen3_tiny*/generation_config.json"):
    f.unlink()  # not needed by the loader
  for f in sorted(out.glob("qwen3_tiny*/*")):
    print(f"{f.stat().st_size:>9} {f}")


if __name__ == "__main__":
  main()
