"""Sweeps: run the variants of a sweep config in turn (resumable), then write
results.csv / results.md and plots into the sweep's workdir.

A sweep config (`configs/sweeps/*.py`, mode `sweep`) lists variants, each a config (by
module name) with nested field overrides. Variant `name` at seed k trains in
`<workdir>/<name>/seed<k>` with the ordinary train job (`jobs.train`), so every row is a
normal run that can be evaluated, sampled or restored on its own. A finished run is not
trained again.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from blt_jax import api, checkpoint, config_files, entropy, files, models, patching, plots, train
from blt_jax.errors import UserError
from blt_jax.jobs import entropy_model, train as train_job
from blt_jax.models import flops
from blt_jax.resolved import Resolved
from blt_jax.splits import Splits
from blt_jax.workdir_lock import WorkdirLock

# (results key, table header, format) in table order; mean (± std over seeds) per variant.
COLUMNS = (
    ("bpb", "bpb", "{:.4f}"),
    ("loss", "loss (nats)", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("mean_patch_size", "mean patch", "{:.2f}"),
    ("folded_windows", "folded windows", "{:.1%}"),
    ("threshold", "threshold (nats)", "{:.3f}"),
    ("params", "params (M)", "{:.2f}"),
    ("params_without_hash", "w/o hash (M)", "{:.2f}"),
    ("train_flops_per_byte", "train MFLOP/byte", "{:.2f}"),
    ("infer_flops_per_byte", "infer MFLOP/byte", "{:.2f}"),
    ("xla_train_flops_per_byte", "XLA MFLOP/byte", "{:.2f}"),
    ("train_bytes_per_s", "bytes/s", "{:.0f}"),
    ("wall_s", "wall (s)", "{:.0f}"),
    ("eval_bytes", "held-out bytes", "{:.0f}"),
)
SCALE = {"params": 1e-6, "params_without_hash": 1e-6, "train_flops_per_byte": 1e-6,
         "infer_flops_per_byte": 1e-6, "xla_train_flops_per_byte": 1e-6}


# ------------------------------------------------------------------------- variants

def expand(sweep: ml_collections.ConfigDict) -> list[dict]:
  """The runs of a sweep: [{name, config, overrides, seed, series}] in order."""
  models = [m.strip() for m in sweep.entropy_models.split(",") if m.strip()] or ["default"]
  only = {n.strip() for n in sweep.only.split(",") if n.strip()}
  unknown = only - set(sweep.variants)
  if unknown:
    raise UserError(f"sweep.only names unknown variants {sorted(unknown)} "
                    f"(known: {', '.join(sweep.variants)})")
  if sweep.seeds < 1:
    raise UserError(f"sweep.seeds must be >= 1, got {sweep.seeds}")
  runs = []
  for name, v in sorted(sweep.variants.items(), key=lambda item: item[1].rank):
    if only and name not in only:
      continue
    overrides = config_files.flatten(v.overrides.to_dict())
    probe = variant_config(sweep, dict(config=v.config, overrides=overrides, seed=0))
    uses_entropy = probe.patching.mode in patching.THRESHOLD_MODES
    for model in (models if uses_entropy else ["default"]):
      label = name if model == "default" or len(models) == 1 else f"{name}@{Path(model).name}"
      extra = {} if model == "default" else {"patching.entropy_workdir": model}
      series = (probe.model.kind if probe.patching.mode == "none" else probe.patching.mode)
      series += f"@{Path(model).name}" if uses_entropy and len(models) > 1 else ""
      for seed in range(sweep.seeds):
        runs.append(dict(name=label, config=v.config, overrides={**overrides, **extra},
                         seed=seed, series=series))
  return runs


def variant_config(sweep: ml_collections.ConfigDict, run: dict,
                   mesh: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """A run's config: its module, its overrides, the seed, the sweep-wide fields and mesh."""
  overrides = {**run["overrides"], "train.seed": run["seed"]}
  if sweep.steps > 0:
    overrides["train.steps"] = sweep.steps
  if sweep.corpus:
    overrides["data.corpus"] = sweep.corpus
  if mesh is not None:
    overrides.update(config_files.flatten({"mesh": mesh.to_dict()}))
  return config_files.load(run["config"], overrides)


# ------------------------------------------------------------------------- FLOPs

def xla_train_flops_per_byte(config: ml_collections.ConfigDict, model_fields: dict) -> float:
  """XLA's HLO cost analysis of one whole train step (forward, backward, optimizer),
  per byte position of the batch: the FLOPs executed, masked parts of attention blocks and every
  patch (or token) slot included, unlike the analytic model FLOPs of `models.flops`."""
  def init():
    model = models.build(model_fields)
    return model, nnx.Optimizer(model, train.make_optimizer(config.train), wrt=nnx.Param)

  graphdef, state = nnx.split(nnx.eval_shape(init))
  B, T = config.train.batch_size, config.data.seq_len
  S = model_fields.get("max_tokens") or T  # a token model's training windows: S token slots
  batch = {"inputs": jax.ShapeDtypeStruct((B, S), jnp.int32),
           "targets": jax.ShapeDtypeStruct((B, S), jnp.int32),
           "mask": jax.ShapeDtypeStruct((B, S), jnp.float32)}
  if "max_patches" in model_fields:
    batch["patch_lengths"] = jax.ShapeDtypeStruct((B, model_fields["max_patches"]), jnp.int32)
  if "max_tokens" in model_fields:
    batch["target_bytes"] = jax.ShapeDtypeStruct((B, S), jnp.int32)
  step = train.make_train_step(graphdef, grad_accum=config.train.get("grad_accum", 1))
  cost = step.lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) / (B * T)


# ------------------------------------------------------------------------- running

def run_one(config, run: dict, workdir: Path) -> dict:
  """Trains one variant at one seed unless finished; its summary plus the sweep fields."""
  config = variant_config(config.sweep, run, config.mesh)
  summary_file = workdir / "summary.json"
  summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
  if summary.get("step", -1) >= config.train.steps:
    check_same_run(checkpoint.read_config(workdir)[0], config, workdir)  # a stale row
    print(f"{run['name']} seed {run['seed']}: finished, reusing {workdir}")
  else:
    print(f"\n=== {run['name']} seed {run['seed']} ({run['config']}) -> {workdir}")
    with WorkdirLock(workdir):
      train_job.run(config, workdir)
    summary = json.loads(summary_file.read_text())
  model_fields = Resolved.of_run(workdir).model
  if "xla_train_flops_per_byte" not in summary:
    summary["xla_train_flops_per_byte"] = xla_train_flops_per_byte(config, model_fields)
    files.write_json(summary_file, summary)
  # The analytic FLOPs by today's count, from the row's shape and measured patch (token)
  # size: every row of a table is counted alike, however long ago it ran.
  train_flops = nnx.eval_shape(lambda: models.build(model_fields)).flops_per_byte(
      config.data.seq_len, summary.get("mean_patch_size"))
  summary.update(train_flops_per_byte=train_flops,
                 infer_flops_per_byte=train_flops / flops.TRAIN_PER_FORWARD)
  return {"variant": run["name"], "seed": run["seed"], "series": run["series"],
          "config": run["config"], "kind": config.model.kind, "patching": config.patching.mode,
          "target_patch_size": config.patching.target_patch_size,
          "workdir": str(workdir), "eval_bytes": summary["bytes"], **summary}


# Fields that change what a run computes: a finished row is reused only when they match.
SAME_RUN = ("model", "patching", "data", "train")
NOT_COMPUTED = ("patching.text", "patching.file", "data.cache_dir", "train.stop_at",
                "train.log_every")


def check_same_run(saved: dict, config: ml_collections.ConfigDict, workdir: Path):
  """A finished run is this row only if it was trained with this row's config."""
  checkpoint.check_same_model(saved, config.model.to_dict(), workdir,
                              models.default_fields(config.model.kind))
  want = config_files.flatten({k: config[k].to_dict() for k in SAME_RUN if k != "model"})
  have = config_files.flatten({k: saved.get(k, {}) for k in SAME_RUN if k != "model"})
  for key, value in want.items():  # (a field newer than the run is not compared)
    if key in have and key not in NOT_COMPUTED and json.loads(json.dumps(value)) != have[key]:
      raise UserError(f"{workdir} is a finished run with {key}={have.get(key)!r}, but this "
                      f"sweep's row says {value!r}; use another workdir (or runs_dir)")


def run(config: ml_collections.ConfigDict, workdir: Path):
  """Runs every variant (skipping finished ones), then writes tables and plots."""
  sweep = config.sweep
  runs = expand(sweep)  # builds every variant's config: typos fail before any training
  if not runs:
    raise UserError("the sweep has no variants to run")
  check_entropy_models(sweep, runs)
  rows, failed = [], []
  runs_dir = Path(sweep.runs_dir) if sweep.runs_dir else workdir
  for run in runs:
    try:
      rows.append(run_one(config, run, runs_dir / run["name"] / f"seed{run['seed']}"))
    except UserError as e:
      print(f"{run['name']} seed {run['seed']} failed: {e}")
      failed.append((run, str(e)))
  table = aggregate(rows)
  write_results(workdir, config, rows, table, failed)
  print((workdir / "results.md").read_text())
  if rows:
    plot_results(workdir, sweep, table, rows)
  if failed:
    raise UserError(f"{len(failed)} of {len(runs)} runs failed "
                    f"({', '.join(r['name'] for r, _ in failed)}); see {workdir}/results.md")


def check_entropy_models(sweep, runs: list[dict]):
  """Every trained entropy model a sweep names has its variants' split, checked before
  anything trains."""
  for run in runs:
    workdir = run["overrides"].get("patching.entropy_workdir")
    if workdir and checkpoint.latest_step(workdir) is not None:
      config = variant_config(sweep, run)
      entropy_model.check_split(workdir, Splits(config).split)


def aggregate(rows: list[dict]) -> list[dict]:
  """One row per variant: the mean of every column over seeds, `<key>_std`, `seeds`."""
  table = {}
  for row in rows:
    table.setdefault(row["variant"], []).append(row)
  out = []
  for name, group in table.items():
    agg = {k: group[0].get(k) for k in ("variant", "series", "config", "kind", "patching",
                                        "target_patch_size")}
    agg["seeds"] = len(group)
    for key, _, _ in COLUMNS:
      values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
      if values:
        agg[key] = float(np.mean(values))
        agg[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    if "xla_train_flops_per_byte" in agg and agg.get("train_flops_per_byte"):
      agg["xla_over_analytic"] = agg["xla_train_flops_per_byte"] / agg["train_flops_per_byte"]
    out.append(agg)
  return out


def _cell(row: dict, key: str, fmt: str) -> str:
  if key not in row or not math.isfinite(row[key]):
    return "-"
  scale = SCALE.get(key, 1.0)
  text = fmt.format(row[key] * scale)
  if row["seeds"] > 1 and key in ("bpb", "loss", "accuracy", "mean_patch_size"):
    text += " ± " + fmt.format(row[f"{key}_std"] * scale).lstrip("+")
  return text


def markdown_table(table: list[dict]) -> str:
  heads = ["variant", "patching"] + [h for _, h, _ in COLUMNS] + ["XLA / analytic", "seeds"]
  lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
  for row in table:
    cells = [row["variant"], row["patching"]] + [_cell(row, k, f) for k, _, f in COLUMNS]
    cells += [f"{row['xla_over_analytic']:.2f}" if "xla_over_analytic" in row else "-",
              str(row["seeds"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_results(workdir: Path, config, rows, table, failed):
  """results.csv (one row per variant), runs.csv (one per seed), results.md."""
  keys = ["variant", "kind", "series", "patching", "target_patch_size", "seeds"]
  keys += [k for k, _, _ in COLUMNS] + [f"{k}_std" for k, _, _ in COLUMNS]
  keys += ["xla_over_analytic", "config"]
  for name, items, cols in (("results.csv", table, keys),
                            ("runs.csv", rows, ["variant", "kind", "seed", "workdir", "config"] +
                             [k for k, _, _ in COLUMNS] + ["bytes", "step"])):
    with open(workdir / name, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
      writer.writeheader()
      writer.writerows(items)
  sweep = config.sweep
  text = [f"# {sweep.title}", "", sweep.description, "",
          f"Size `{config.size}`; bpb, loss, accuracy and perplexity are per real byte of "
          "held-out documents (never seen in training); mean patch size is measured on "
          "those documents; train FLOPs are analytic model FLOPs per byte at that patch "
          "size, XLA FLOPs are what one compiled train step executes per byte position "
          "(masked attention scores and every patch slot included).", ""]
  if table:
    text += [markdown_table(table), ""]
  for run, message in failed:
    text.append(f"- **{run['name']} seed {run['seed']} failed**: {message}")
  files.write_text(workdir / "results.md", "\n".join(text).rstrip() + "\n")


# ------------------------------------------------------------------------- plots

def plot_results(workdir: Path, sweep, table: list[dict], rows: list[dict]):
  plots.sweep_curve(table, x="mean_patch_size", xlabel="mean patch size (bytes, held-out)",
                    path=workdir / "bpb_vs_patch_size.png", title=sweep.title,
                    connect=sweep.connect)
  plots.sweep_curve(table, x="train_flops_per_byte", xlabel="training MFLOP per byte",
                    path=workdir / "bpb_vs_flops.png", title=sweep.title, x_scale=1e-6,
                    connect=sweep.connect)
  plots.sweep_bars(table, path=workdir / "bpb_by_variant.png", title=sweep.title)
  boundaries_figure(workdir, sweep, rows)


def boundaries_figure(workdir: Path, sweep, rows: list[dict]):
  """The sample text's entropies with each patched variant's boundaries (seed 0)."""
  raw = sweep.sample_text.encode("utf-8")
  panels, h_by_model = [], {}
  for row in rows:
    if row["seed"] != 0 or row["patching"] == "none":
      continue
    lm = api.load(row["workdir"])
    rule = lm.resolved.patching
    h = None
    if rule.uses_entropy:
      if rule.entropy_workdir not in h_by_model:
        h_by_model[rule.entropy_workdir] = entropy.document_entropies(lm.patcher.lm, raw)
      h = h_by_model[rule.entropy_workdir]
    starts = np.asarray(patching.patch_starts(
        h, mode=rule.mode, threshold=rule.threshold, patch_size=rule.patch_size,
        data=np.frombuffer(raw, np.uint8), max_patch_len=rule.max_patch_len))
    panels.append((row["variant"], h, starts, rule.threshold))
  if panels:
    plots.boundaries_figure(raw, panels, workdir / "patches.png")
