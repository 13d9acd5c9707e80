"""Loads a BltForCausalLM folder with blt-jax, saves it back with `save_pretrained`, and
writes blt-jax's own logits beside the export, for `make_blt_reference.py --check`:

  python scripts/export_for_check.py tests/fixtures/blt_tiny_entropy /tmp/export
  python scripts/make_blt_reference.py --check /tmp/export   # in a venv with torch

The texts are the fixture's (input_ids_{i}.npy, and patch_lengths_{i}.npy for the check's
static patches); logits_{i}.npy [1, N, 260] are blt-jax's raw logits of the exported model.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import blt_jax
from blt_jax.models import vocab


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("folder", type=Path)
  parser.add_argument("out", type=Path)
  parser.add_argument("--seq_len", type=int, default=512)
  args = parser.parse_args()
  blt_jax.from_pretrained(args.folder, seq_len=args.seq_len).save_pretrained(args.out)
  lm = blt_jax.from_pretrained(args.out, seq_len=args.seq_len)
  for ids_file in sorted(args.folder.glob("input_ids_*.npy")):
    i = ids_file.stem.split("_")[-1]
    ids = np.load(ids_file)[0]
    text = bytes((ids[1:] - vocab.BLT_OFFSET).tolist()) + b"\0"  # targets cover all N rows
    batch = lm.patcher(text, lm.windows(text))
    logits = lm.model.logits({k: jnp.asarray(v) for k, v in batch.items()})
    np.save(args.out / f"logits_{i}.npy", np.asarray(logits, np.float32)[:1, :len(ids)])
    shutil.copy(ids_file, args.out / ids_file.name)
    lengths = args.folder / f"patch_lengths_{i}.npy"
    if lengths.exists():
      shutil.copy(lengths, args.out / lengths.name)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
