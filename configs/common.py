"""Shared defaults for every config: sections, fields, sizes, and the `:arg` parser.

A config file's `get_config(arg)` takes an optional string such as `size=tiny`:
  tiny  - seconds on a CPU; for tests and smoke runs
  small - the CPU default; minutes on a 2-core machine
  gpu   - sized for one 80 GB GPU
"""
from __future__ import annotations

import ml_collections

SIZES = ("tiny", "small", "gpu")

# Entropy model / byte baseline shapes per size.
BYTE_LM = {
    "tiny": dict(dim=32, n_layers=2, n_heads=2, window=0),
    "small": dict(dim=128, n_layers=4, n_heads=4, window=0),
    "gpu": dict(dim=768, n_layers=12, n_heads=12, window=0),
}

# Data / optimisation scale per size.
SCHEDULE = {
    "tiny": dict(seq_len=64, batch_size=8, steps=40, warmup=5, lr=3e-3, log_every=10,
                 eval_every=0, eval_bytes=8192, final_eval_bytes=16384, ckpt_every=20),
    "small": dict(seq_len=256, batch_size=16, steps=900, warmup=50, lr=3e-3, log_every=25,
                  eval_every=300, eval_bytes=32768, final_eval_bytes=0, ckpt_every=300),
    "gpu": dict(seq_len=1024, batch_size=64, steps=20000, warmup=1000, lr=1e-3, log_every=100,
                eval_every=2000, eval_bytes=1 << 20, final_eval_bytes=0, ckpt_every=2000),
}


def parse_arg(arg: str | None) -> dict:
  """'size=tiny' or 'tiny' (or '') -> {'size': ...}; unknown keys are an error."""
  out = {"size": "small"}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if not value:
      key, value = "size", key
    if key != "size":
      raise ValueError(f"unknown config argument {key!r} (known: size)")
    if value not in SIZES:
      raise ValueError(f"unknown size {value!r} (known: {', '.join(SIZES)})")
    out[key] = value
  return out


def base_config(arg: str | None) -> ml_collections.ConfigDict:
  """Every section and field every config has, at the size `arg` names."""
  size = parse_arg(arg)["size"]
  s = SCHEDULE[size]
  c = ml_collections.ConfigDict()
  c.mode = "train"           # train | eval | patch | sample
  c.size = size

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "stdlib"   # stdlib | path | dir | glob | *.jsonl | *.parquet | hf:NAME
  c.data.seq_len = s["seq_len"]  # target bytes per training window (BOS is prepended)
  c.data.eval_fraction = 0.05    # share of documents held out, chosen by a hash of the name
  c.data.max_doc_bytes = 65536   # longer documents are split into pieces before the split
  c.data.cache_dir = ""          # prepared corpora and entropy caches; '' = ~/.cache/blt_jax

  c.model = ml_collections.ConfigDict()
  c.model.kind = "byte_lm"
  c.model.update(BYTE_LM[size])
  c.model.mlp_ratio = 4.0
  c.model.rope_theta = 10000.0
  c.model.dtype = "bfloat16" if size == "gpu" else "float32"

  c.patching = ml_collections.ConfigDict()
  c.patching.mode = "none"       # none | global | monotonic | static | space
  c.patching.target_patch_size = 0.0  # calibrate the threshold to this mean patch size
  c.patching.threshold = -1.0    # explicit entropy threshold (nats); < 0 = calibrate
  c.patching.patch_size = 4      # for `static`
  c.patching.max_patch_len = 0   # cut longer patches every this many bytes; 0 = off
  c.patching.entropy_config = "configs/entropy_model.py"  # how to train the entropy model
  c.patching.entropy_workdir = ""  # '' = runs/entropy_model[_<size>], trained if missing

  c.train = ml_collections.ConfigDict()
  c.train.steps = s["steps"]
  c.train.batch_size = s["batch_size"]
  c.train.seed = 0
  c.train.stop_at = 0            # end this invocation after this step (0 = train.steps);
                                 # the schedule still spans train.steps; rerun to resume
  c.train.optimizer = "adamw"    # adamw | muon
  c.train.lr = s["lr"]
  c.train.warmup_steps = s["warmup"]
  c.train.min_lr_ratio = 0.1     # cosine decays to lr * this
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0        # global-norm clip
  c.train.log_every = s["log_every"]

  c.eval = ml_collections.ConfigDict()
  c.eval.corpus = ""             # '' = held-out split of data.corpus; else all of this corpus
  c.eval.every_steps = s["eval_every"]  # periodic held-out eval during training; 0 = off
  c.eval.train_max_bytes = s["eval_bytes"]   # bytes scored by each periodic eval
  c.eval.max_bytes = s["final_eval_bytes"]   # bytes scored by the final eval; 0 = all
  c.eval.batch_size = 32
  c.eval.step = -1               # checkpoint step to evaluate; -1 = latest

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = s["ckpt_every"]
  c.ckpt.keep = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # data-parallel axis size; -1 = all remaining devices
  c.mesh.fsdp = 1                # parameter-sharding axis size
  return c
