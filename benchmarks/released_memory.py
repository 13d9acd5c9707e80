"""Memory a released BLT needs on one device, from its config.json alone (no weights read):
parameters by part, and the generation caches for a window of --bytes bytes, as
`blt_jax.from_pretrained(folder, seq_len=--bytes)` allocates them (float32 parameters and
caches; bf16 halves both).

  python benchmarks/released_memory.py /path/to/blt-1b [--bytes=1024] [--batch=1]

Shapes are built abstractly (`nnx.eval_shape`), so a BLT-7B config costs nothing to read.
The global transformer's cache has one position per patch slot, and from_pretrained gives
a window as many slots as bytes (a window never folds patches): its cache is sized for
the worst case, one patch per byte.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import jax
from flax import nnx

from blt_jax.models import blt_hf
from blt_jax.models.blt import BLT
from blt_jax.models.byte_lm import ByteLM

GiB = 1 << 30


def n_params(module, prefix: tuple = ()) -> int:
  state = nnx.state(module, nnx.Param)
  return sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
             if tuple(getattr(p, "key", p) for p in path[:len(prefix)]) == prefix)


def n_bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folder", help="a BltForCausalLM folder (only its config.json is read)")
  parser.add_argument("--bytes", type=int, default=1024, help="bytes per window")
  parser.add_argument("--batch", type=int, default=1, help="rows generated together")
  args = parser.parse_args()
  released = blt_hf.read_config(args.folder)
  cfg = dataclasses.replace(released.blt, max_patches=args.bytes)
  blt = nnx.eval_shape(lambda: BLT(cfg, rngs=nnx.Rngs(0)))
  parts = {"hash n-gram tables": n_params(blt, ("hash_embed",)),
           "global transformer": n_params(blt, ("global_tf",)),
           "local encoder, decoder, cross-attention": 0}
  parts["local encoder, decoder, cross-attention"] = (
      n_params(blt) - parts["hash n-gram tables"] - parts["global transformer"])
  cache = {"BLT": n_bytes(jax.eval_shape(lambda: blt.init_cache(args.batch, args.bytes)))}
  if released.patcher is not None:
    patcher = nnx.eval_shape(lambda: ByteLM(released.patcher, rngs=nnx.Rngs(0)))
    parts["entropy patcher"] = n_params(patcher)
    cache["entropy patcher"] = n_bytes(
        jax.eval_shape(lambda: patcher.init_cache(args.batch, args.bytes)))
  total = sum(parts.values())
  print(f"{args.folder}: parameters")
  for name, n in parts.items():
    print(f"  {name:42s} {n / 1e9:7.3f} B  {4 * n / GiB:6.2f} GiB fp32  "
          f"{2 * n / GiB:6.2f} GiB bf16")
  print(f"  {'total':42s} {total / 1e9:7.3f} B  {4 * total / GiB:6.2f} GiB fp32  "
        f"{2 * total / GiB:6.2f} GiB bf16")
  print(f"generation caches, batch {args.batch}, {args.bytes} bytes per window "
        f"({args.bytes} global slots), float32")
  for name, b in cache.items():
    print(f"  {name:42s} {b / GiB:7.3f} GiB")
  print(f"  {'total':42s} {sum(cache.values()) / GiB:7.3f} GiB")


if __name__ == "__main__":
  main()
