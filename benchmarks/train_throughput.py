"""Training throughput: bytes/s, model FLOP/s and MFU of BLT and of a byte baseline with the
same analytic FLOPs per byte, against the peak of this device measured in the same run.

  python benchmarks/train_throughput.py                  # size=small shapes + the reference
  python benchmarks/train_throughput.py --size=gpu       # GPU shapes (bf16 compute)
  python benchmarks/train_throughput.py --only=reference --steps=10

Rows: `patch3` is BLT at configs/patch3.py:size=SIZE (batch and window from that config)
with patch lengths drawn as entropy patching would give them (a patch starts at each byte
with probability 1/3; surplus patches fold into the last of `model.max_patches` slots);
`reference` is the fixed shape for comparing BLT implementations (encoder 128 x 1, global
256 x 4, decoder 128 x 2, 4 heads each, hash n-grams 3..8 x 4096, cross_attn_k=2, batch
8 x 512 bytes, static patches of 4). Each BLT row is followed by a byte transformer
(`baseline`) whose width is chosen so that its analytic training FLOPs per byte
(blt_jax/models/flops.py) match the BLT row's. The step is the training step of
blt_jax/train.py (AdamW, donated state, data-parallel over every local device) on one
fixed device-resident batch of random bytes, so input pipelines are not timed. Timing:
the best of --rounds windows of --steps steps after two warm-up steps. MFU = analytic model
FLOPs per byte x bytes/s / peak, where peak is the best FLOP/s of a large square matmul in
the models' compute dtype (times the number of accelerators), timed at the start, next to
each row and at the end (the best of these counts). "Executed" GFLOP/s is what XLA's cost
analysis says the compiled step runs (padded patch slots, the masked parts of attention
blocks), for comparison; for a BLT whose global transformer runs on packed slots
(`model.global_capacity`; the row says "packed"), XLA counts the unpacked branch of the
step, which the packed branch replaces with fewer FLOPs. Memory: XLA's buffer sizes for
one compiled step per device (arguments, outputs and temporaries, less donated aliases),
the process's peak RSS so far, and on accelerators the device's peak bytes in use so far.
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt_jax import models, patching, sharding
from blt_jax import train as train_lib
from blt_jax.models import flops
from configs import common

REFERENCE = dict(enc_dim=128, enc_layers=1, enc_heads=4, enc_window=512, global_dim=256,
                 global_layers=4, global_heads=4, dec_dim=128, dec_layers=2, dec_heads=4,
                 dec_window=512, cross_attn_k=2, cross_heads=4, hash_ngrams=(3, 4, 5, 6, 7, 8),
                 hash_buckets=4096, max_patches=128, pooling="max", mlp_ratio=4.0)
REFERENCE_BATCH, REFERENCE_SEQ, REFERENCE_PATCH = 8, 512, 4


def matmul_peak(dtype, n: int, repeats: int = 10) -> float:
  """Best FLOP/s of an n x n x n matmul in `dtype`."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def matched_baseline(blt_flops: float, seq_len: int, template: dict) -> dict:
  """A byte LM of the template's depth whose width gives the closest training FLOPs/byte."""
  heads = template["n_heads"]
  best = None
  for dim in range(heads * 2, 4097, heads * 2):  # even head dims (RoPE)
    fields = {**template, "dim": dim}
    f = flops.byte_lm_flops_per_byte(models.config_for({"kind": "byte_lm", **fields}), seq_len)
    if best is None or abs(f - blt_flops) < abs(best[0] - blt_flops):
      best = (f, fields)
  return best[1]


def synthetic_batch(B: int, T: int, rng, max_patches: int | None, patch_size: float,
                    static: bool):
  """Random bytes; patch lengths from static patches or random starts (p = 1/patch_size)."""
  targets = rng.integers(0, 256, (B, T), dtype=np.int32)
  batch = {"inputs": np.concatenate([np.full((B, 1), 256, np.int32), targets[:, :-1]], 1),
           "targets": targets, "mask": np.ones((B, T), np.float32)}
  mean_patch = None
  if max_patches:
    if static:
      starts = np.arange(T)[None].repeat(B, 0) % int(patch_size) == 0
    else:
      starts = rng.random((B, T)) < 1.0 / patch_size
      starts[:, 0] = True
    batch["patch_lengths"] = np.asarray(patching.patch_lengths(starts, max_patches))
    mean_patch = T / starts.sum(1).mean()
  return batch, mean_patch


def measure(name: str, kind: str, fields: dict, B: int, T: int, args, timed_peak,
            patch_size: float = 0.0, static: bool = False) -> dict:
  batch_np, mean_patch = synthetic_batch(B, T, np.random.default_rng(0),
                                         fields.get("max_patches"), patch_size, static)
  model = models.build({"kind": kind, **fields})
  fpb = model.flops_per_byte(T, mean_patch)
  n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tcfg = common.base_config("size=small").train
  tcfg.steps = 10_000
  optimizer = nnx.Optimizer(model, train_lib.make_optimizer(tcfg), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  del model, optimizer
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}))
  sharding.check_batch(B, mesh, what=f"{name} batch")
  shardings = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  batch = sharding.full_batch(batch_np, mesh)
  step = train_lib.make_train_step(graphdef, shardings=shardings, mesh=mesh)
  compiled = step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  step_bytes = None
  if mem is not None:
    step_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  for _ in range(2):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  timed_peak()  # the device's peak, timed next to this row
  best = float("inf")
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = step(state, batch)
    jax.block_until_ready((state, m))
    best = min(best, (time.perf_counter() - t0) / args.steps)
  bytes_s = B * T / best
  row = dict(name=name, params=n_params, batch=f"{B}x{T}", mean_patch=mean_patch,
             packed=float(m["packed"]) if "packed" in m else None,  # BLT: ran packed
             mflop_per_byte=fpb / 1e6, step_s=best, bytes_s=bytes_s,
             gflop_s=fpb * bytes_s / 1e9,
             xla_gflop_s=cost.get("flops", float("nan")) * mesh.size / best / 1e9,
             step_mib=None if step_bytes is None else step_bytes / 2 ** 20,
             rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             loss=float(m["loss"]))
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    row["device_peak_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
  print_row(row)
  return row


def print_row(r: dict):
  extra = f"  device peak {r['device_peak_mib']:.0f} MiB" if "device_peak_mib" in r else ""
  patch = f"  mean patch {r['mean_patch']:.2f}" if r["mean_patch"] else ""
  if r.get("packed") is not None:
    patch += "  packed" if r["packed"] else "  unpacked (over capacity)"
  step_mem = f"{r['step_mib']:.0f} MiB" if r["step_mib"] is not None else "n/a"
  print(f"{r['name']:<20} {r['params'] / 1e6:6.2f}M params  batch {r['batch']}{patch}  "
        f"{r['mflop_per_byte']:7.2f} MFLOP/byte  {r['step_s'] * 1e3:8.1f} ms/step  "
        f"{r['bytes_s']:10.0f} bytes/s  {r['gflop_s']:8.1f} GFLOP/s  "
        f"(executed {r['xla_gflop_s']:.1f} GFLOP/s)  "
        f"step memory {step_mem}  RSS {r['rss_mib']:.0f} MiB{extra}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="small", choices=common.SIZES)
  parser.add_argument("--only", default="", choices=["", "patch3", "reference"])
  parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
  parser.add_argument("--rounds", type=int, default=3, help="timed windows; the best counts")
  parser.add_argument("--matmul", type=int, default=0, help="peak matmul size (0: by device)")
  args = parser.parse_args()

  patch3 = importlib.import_module("configs.patch3").get_config(f"size={args.size}")
  baseline = importlib.import_module("configs.byte_baseline").get_config(f"size={args.size}")
  dtype = jnp.dtype(patch3.model.dtype)
  on_cpu = jax.default_backend() == "cpu"
  n = args.matmul or (2048 if on_cpu else 8192)
  # Accelerators: the peak of one times their number. CPU: one matmul already uses every
  # core (simulated CPU devices share them).
  scale = 1 if on_cpu else jax.device_count()
  peaks = []

  def timed_peak():
    peaks.append(matmul_peak(dtype, n) * scale)
    return peaks[-1]

  timed_peak()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}); compute dtype {dtype.name}; peak {n}^3 matmul "
        f"{peaks[0] / scale / 1e9:.1f} GFLOP/s per device, {peaks[0] / 1e9:.1f} in all",
        flush=True)

  template = {k: v for k, v in baseline.model.to_dict().items() if k != "kind"}
  rows = {}
  if args.only in ("", "patch3"):
    fields = {k: v for k, v in patch3.model.to_dict().items() if k != "kind"}
    B, T = patch3.train.batch_size, patch3.data.seq_len
    rows["patch3"] = measure(f"blt patch3 ({args.size})", "blt", fields, B, T, args,
                             timed_peak, patch_size=3.0)
    base = matched_baseline(rows["patch3"]["mflop_per_byte"] * 1e6, T, template)
    rows["patch3_base"] = measure(f"baseline d{base['dim']}x{base['n_layers']}", "byte_lm",
                                  base, B, T, args, timed_peak)
  if args.only in ("", "reference"):
    fields = {**REFERENCE, "dtype": dtype.name}
    B, T = REFERENCE_BATCH, REFERENCE_SEQ
    rows["ref"] = measure("blt reference", "blt", fields, B, T, args, timed_peak,
                          patch_size=REFERENCE_PATCH, static=True)
    base = matched_baseline(rows["ref"]["mflop_per_byte"] * 1e6, T,
                            {**template, "n_layers": 4, "n_heads": 4, "dtype": dtype.name})
    rows["ref_base"] = measure(f"baseline d{base['dim']}x{base['n_layers']} (ref)", "byte_lm",
                               base, B, T, args, timed_peak)
  # The peak is timed at the start, next to every row and at the end; the best of these
  # counts. On a shared host one timing can land in a slow moment, and a low peak would
  # flatter the MFU.
  timed_peak()
  peak = max(peaks)
  print(f"peak {n}^3 matmul timings (GFLOP/s): "
        f"{', '.join(f'{p / 1e9:.1f}' for p in peaks)}; MFU against the best, {peak / 1e9:.1f}:")
  for row in rows.values():
    row["mfu"] = row["gflop_s"] * 1e9 / peak
    print(f"  {row['name']:<28} MFU {row['mfu']:.3f}")
  for key in ("patch3", "ref"):
    if key in rows:
      ratio = rows[key]["mfu"] / rows[f"{key}_base"]["mfu"]
      print(f"{rows[key]['name']}: MFU {rows[key]['mfu']:.3f} = {ratio:.2f} x the baseline's "
            f"({rows[f'{key}_base']['mfu']:.3f})")

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
