"""Shared defaults for every config: sections, fields, sizes, and the `:arg` parser.

A config file's `get_config(arg)` takes an optional string such as `size=tiny`:
  tiny  - seconds on a CPU; for tests and smoke runs
  small - the CPU default; minutes on a 2-core machine
  gpu   - sized for one 80 GB GPU
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from blt_jax.patching import max_patches

SIZES = ("tiny", "small", "gpu")

# Entropy model / byte baseline shapes per size.
BYTE_LM = {
    "tiny": dict(dim=32, n_layers=2, n_heads=2, window=0),
    "small": dict(dim=128, n_layers=4, n_heads=4, window=0),
    "gpu": dict(dim=768, n_layers=12, n_heads=12, window=0),
}

# The small entropy model a BLT run trains (once) and patches with; cheap to score.
ENTROPY_PATCHER = {
    "tiny": dict(dim=32, n_layers=2, n_heads=2, window=0),
    "small": dict(dim=64, n_layers=2, n_heads=2, window=0),
    "gpu": dict(dim=512, n_layers=8, n_heads=8, window=0),
}

# BLT shapes per size (max_patches is derived from the expected mean patch size).
BLT = {
    "tiny": dict(enc_dim=32, enc_layers=1, enc_heads=2, enc_window=64, global_dim=64,
                 global_layers=2, global_heads=2, dec_dim=32, dec_layers=1, dec_heads=2,
                 dec_window=64, cross_attn_k=2, cross_heads=2, hash_buckets=512),
    "small": dict(enc_dim=128, enc_layers=1, enc_heads=4, enc_window=256, global_dim=256,
                  global_layers=4, global_heads=4, dec_dim=128, dec_layers=2, dec_heads=4,
                  dec_window=256, cross_attn_k=2, cross_heads=4, hash_buckets=4096),
    "gpu": dict(enc_dim=512, enc_layers=1, enc_heads=8, enc_window=512, global_dim=1536,
                global_layers=12, global_heads=12, dec_dim=512, dec_layers=6, dec_heads=8,
                dec_window=512, cross_attn_k=2, cross_heads=8, hash_buckets=65536),
}

# Data / optimisation scale per size (byte LMs; BLT_SCHEDULE changes some for BLT).
SCHEDULE = {
    "tiny": dict(seq_len=64, batch_size=8, steps=40, warmup=5, lr=3e-3, log_every=10,
                 eval_every=0, eval_bytes=8192, final_eval_bytes=16384, ckpt_every=20),
    "small": dict(seq_len=256, batch_size=16, steps=900, warmup=50, lr=3e-3, log_every=25,
                  eval_every=300, eval_bytes=32768, final_eval_bytes=0, ckpt_every=300),
    "gpu": dict(seq_len=1024, batch_size=64, steps=20000, warmup=1000, lr=1e-3, log_every=100,
                eval_every=2000, eval_bytes=1 << 20, final_eval_bytes=0, ckpt_every=2000),
}


# BLT runs per size: small trains in < 15 min on 2 cores.
BLT_SCHEDULE = {
    "tiny": dict(steps=40, eval_every=0, ckpt_every=20),
    "small": dict(steps=400, eval_every=200, ckpt_every=200),
    "gpu": dict(steps=20000, eval_every=2000, ckpt_every=2000, batch_size=32),
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
  c.data.eval_fraction = 0.05    # share of source documents held out, by a hash of the name
  c.data.cache_dir = ""          # prepared corpora and entropy caches; '' = ~/.cache/blt_jax

  c.model = ml_collections.ConfigDict()
  c.model.kind = "byte_lm"
  c.model.update(BYTE_LM[size])
  c.model.mlp_ratio = 4.0
  c.model.rope_theta = 10000.0
  c.model.dtype = "bfloat16" if size == "gpu" else "float32"  # compute; params stay fp32
  c.model.remat = False          # recompute block activations in backward (saves memory)

  c.patching = ml_collections.ConfigDict()
  c.patching.mode = "none"       # none | global | monotonic | static | space
  c.patching.target_patch_size = 0.0  # calibrate the threshold to this mean patch size
  c.patching.threshold = placeholder(float)  # entropy threshold (nats); None = calibrate
  c.patching.patch_size = 4      # for `static`
  c.patching.max_patch_len = 0   # cut longer patches every this many bytes; 0 = off
  c.patching.text = ""           # mode=patch: the text to patch (or patching.file)
  c.patching.file = ""           # mode=patch: a file to patch (its first 2000 bytes)
  c.patching.entropy_config = ""  # entropy model config, a module name ('' = the size's
                                 # configs.entropy_patcher); trained if not yet done
  c.patching.entropy_workdir = ""  # its workdir; '' = the default workdir of that config

  c.train = ml_collections.ConfigDict()
  c.train.steps = s["steps"]
  c.train.batch_size = s["batch_size"]
  c.train.seed = 0
  c.train.stop_at = placeholder(int)  # end this invocation after this step (None =
                                 # train.steps); the schedule still spans train.steps
  c.train.optimizer = "adamw"    # adamw | muon
  c.train.lr = s["lr"]
  c.train.warmup_steps = s["warmup"]
  c.train.min_lr_ratio = 0.1     # cosine decays to lr * this
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0        # global-norm clip
  c.train.log_every = s["log_every"]
  c.train.grad_accum = 1         # micro-batches per step (batch_size is the whole step's)

  c.eval = ml_collections.ConfigDict()
  c.eval.corpus = ""             # '' = held-out split of data.corpus; else all of this corpus
  c.eval.every_steps = s["eval_every"]  # periodic held-out eval during training; 0 = off
  c.eval.train_max_bytes = s["eval_bytes"]   # bytes scored by each periodic eval
  c.eval.max_bytes = s["final_eval_bytes"]   # bytes scored by the final eval; 0 = all
  c.eval.batch_size = 32
  c.eval.step = placeholder(int)  # checkpoint step to evaluate (and sample); None = latest

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = "def "       # mode=sample: the text to continue
  c.sample.prompts_file = ""     # or a file of prompts, one per line
  c.sample.batch_size = 8        # prompts generated together
  c.sample.max_bytes = 200       # bytes to generate per prompt
  c.sample.temperature = 0.8     # 0 = greedy
  c.sample.top_k = 0             # sample from the k likeliest bytes (tokens); 0 = all
  c.sample.top_p = 1.0           # ... and from the smallest set holding this much mass
  c.sample.stop = ""             # end a prompt's output once it ends with this text
  c.sample.seed = 0              # prompt i draws with seed + i

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = s["ckpt_every"]
  c.ckpt.keep = 3

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # data-parallel axis size; -1 = all remaining devices
  c.mesh.fsdp = 1                # parameter-sharding (FSDP) axis size; -1 = the rest
  c.mesh.distributed = False     # multi-host: call jax.distributed.initialize() first
  c.mesh.coordinator = ""        # host:port of process 0; '' = detect (SLURM, Open MPI, env)
  c.mesh.num_processes = 0       # processes in all; 0 = detect
  c.mesh.process_id = -1         # this process; -1 = detect
  return c


def blt_config(arg: str | None, *, mode: str, target_patch_size: float = 0.0,
               patch_size: int = 4, expected_patch_size: float | None = None):
  """A BLT run with the given patching rule (global entropy patching by default)."""
  c = base_config(arg)
  size = c.size
  c.model = ml_collections.ConfigDict(dict(kind="blt", **BLT[size]))
  c.model.pooling = "max"
  c.model.hash_ngrams = (3, 4, 5, 6, 7, 8)
  c.model.mlp_ratio = 4.0
  c.model.rope_theta = 10000.0
  c.model.dtype = "bfloat16" if size == "gpu" else "float32"
  c.model.remat = False
  c.model.zero_global = False  # an ablation: the decoder reads zeros for the global slots
  expected = expected_patch_size or target_patch_size or patch_size
  # Patch slots P per window; None = derived from the rule's mean patch size on training data.
  c.model.max_patches = max_patches(c.data.seq_len, expected)
  # Global dense layers on packed slots: 1.2 x the expected patches of a batch, a margin
  # that a batch's total (unlike one window's count) rarely exceeds; an overflowing batch
  # runs unpacked. Off at tiny, where it would save nothing worth a second compile.
  packed_share = 1.2 * c.data.seq_len / expected / c.model.max_patches
  c.model.global_capacity = 1.0 if size == "tiny" else min(1.0, round(packed_share, 3))
  c.patching.mode = mode
  c.patching.target_patch_size = float(target_patch_size)
  c.patching.patch_size = patch_size
  c.patching.entropy_config = f"configs.entropy_patcher:size={size}"
  s = BLT_SCHEDULE[size]
  c.train.steps = s["steps"]
  # gpu: dense masked local attention keeps [B, H, T, T] scores per layer
  c.train.batch_size = s.get("batch_size", c.train.batch_size)
  c.eval.every_steps = s["eval_every"]
  c.ckpt.every_steps = s["ckpt_every"]
  return c


SAMPLE_TEXT = ("def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
               "        a, b = b, a + b\n    return a\n")


def nested(dotted: dict) -> dict:
  """{'model.dec_layers': 1} -> {'model': {'dec_layers': 1}}."""
  out = {}
  for key, value in dotted.items():
    *path, leaf = key.split(".")
    node = out
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out


def sweep_config(arg: str | None, *, title: str, description: str, variants: dict):
  """A sweep (mode `sweep`): `variants` maps a row name to (config module, {field: value}),
  e.g. ('configs.patch3', {'model.dec_layers': 1}); each becomes nested config.

  Every variant runs at the sweep's size; the sweep fields below apply to all of them.
  """
  size = parse_arg(arg)["size"]
  c = ml_collections.ConfigDict()
  c.mode = "sweep"
  c.size = size
  c.sweep = ml_collections.ConfigDict()
  c.sweep.title = title
  c.sweep.description = description
  c.sweep.seeds = 1              # runs per variant with train.seed 0..seeds-1 (mean ± std)
  c.sweep.steps = 0              # train.steps of every variant; 0 = each config's own
  c.sweep.corpus = ""            # data.corpus of every variant; '' = each config's own
  c.sweep.entropy_models = "default"  # comma-separated: 'default' (each config's own
                                 # patcher) or workdirs of trained next-byte models (byte LM,
                                 # fine-tuned Qwen3); entropy-patched variants run with each
  c.sweep.only = ""              # comma-separated variant names to run; '' = all
  c.sweep.runs_dir = ""          # where the rows' runs live ('' = the sweep's workdir): sweeps
                                 # sharing it reuse each other's finished rows (same config)
  c.sweep.sample_text = SAMPLE_TEXT  # the text of the patch-boundary figure
  c.sweep.connect = True         # plots join each series' points (rows ordered along x)
  c.mesh = base_config(arg).mesh  # the device mesh of every variant (and multi-host start)
  c.sweep.variants = ml_collections.ConfigDict()
  for rank, (name, (module, overrides)) in enumerate(variants.items()):
    c.sweep.variants[name] = ml_collections.ConfigDict(dict(  # ConfigDict sorts keys
        rank=rank, config=f"{module}:size={size}", overrides=nested(overrides)))
  return c
