"""Sweeps: the tiny patch-size sweep end to end, resuming, entropy models from other runs
(a fine-tuned Qwen3), tables over seeds, and the FLOP cross-check against XLA."""
from __future__ import annotations

import csv
import importlib
import json
import math

import pytest

import blt_jax
from blt_jax import checkpoint, models
from blt_jax.errors import UserError
from blt_jax.jobs import sweep
from blt_jax.models import blt, flops
from tests.conftest import launch, tiny_config
from tests.test_qwen3 import with_tokenizer

PATCH_SIZES = ("patch3", "patch12")  # two of the five rows: the ends


@pytest.fixture(scope="module")
def sweep_dir(blt_run, small_corpus):
  """The tiny patch-size sweep on the small corpus, patching with the BLT tests' entropy
  model (scored once)."""
  result = launch("--config=configs/sweeps/patch_size.py:size=tiny",
                  f"--workdir={blt_run / 'ps'}", f"--config.sweep.only={','.join(PATCH_SIZES)}",
                  f"--config.sweep.corpus={small_corpus}",
                  f"--config.sweep.entropy_models={blt_run / 'entropy'}")
  assert result.returncode == 0, result.stderr[-3000:]
  return blt_run


def test_patch_size_sweep_table(sweep_dir):
  with open(sweep_dir / "ps" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == list(PATCH_SIZES)
  for r in rows:
    for key in ("bpb", "loss", "accuracy", "perplexity", "mean_patch_size", "params",
                "params_without_hash", "train_flops_per_byte", "xla_train_flops_per_byte",
                "wall_s", "train_bytes_per_s", "infer_flops_per_byte", "eval_bytes"):
      assert math.isfinite(float(r[key])), (r["variant"], key, r[key])
    assert 0 < float(r["bpb"]) < 8 and float(r["params_without_hash"]) < float(r["params"])
    assert r["kind"] == "blt"
    assert float(r["infer_flops_per_byte"]) == pytest.approx(float(r["train_flops_per_byte"]) / 3)
  eval_bytes = {r["eval_bytes"] for r in rows}  # every row scored on the same held-out bytes
  assert len(eval_bytes) == 1 and float(eval_bytes.pop()) > 8000
  sizes = [float(r["mean_patch_size"]) for r in rows]  # held-out sizes follow the targets
  assert sizes[0] < 4 < 9 < sizes[-1]
  flops = [float(r["train_flops_per_byte"]) for r in rows]
  assert flops == sorted(flops, reverse=True)  # bigger patches: fewer global steps
  table = (sweep_dir / "ps" / "results.md").read_text()
  assert all(f"| {name} | global |" in table for name in PATCH_SIZES)
  for png in ("bpb_vs_patch_size.png", "bpb_vs_flops.png", "bpb_by_variant.png", "patches.png"):
    assert (sweep_dir / "ps" / png).stat().st_size > 5000
  for name in PATCH_SIZES:  # every row is an ordinary run with its own eval and checkpoint
    run = sweep_dir / "ps" / name / "seed0"
    assert json.loads((run / "eval.json").read_text())["bpb"] == pytest.approx(
        float(rows[PATCH_SIZES.index(name)]["bpb"]))


def test_finished_sweep_is_not_retrained(sweep_dir, small_corpus):
  row = sweep_dir / "ps" / "patch3" / "seed0"
  before = (row / "metrics.jsonl").read_text()
  summary = json.loads((row / "summary.json").read_text())
  (row / "summary.json").write_text(json.dumps({**summary, "train_flops_per_byte": 1.0}))
  result = launch("--config=configs/sweeps/patch_size.py:size=tiny",
                  f"--workdir={sweep_dir / 'ps'}", "--config.sweep.only=patch3,patch12",
                  f"--config.sweep.corpus={small_corpus}",
                  f"--config.sweep.entropy_models={sweep_dir / 'entropy'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("finished, reusing") == 2
  assert (sweep_dir / "ps" / "patch3" / "seed0" / "metrics.jsonl").read_text() == before
  with open(sweep_dir / "ps" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["variant"] for r in rows] == ["patch3", "patch12"]
  # the analytic FLOPs are recounted from the row's shape and held-out patch size
  fields = json.loads((row / "resolved.json").read_text())["model"]
  cfg = blt.BLTConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in fields.items() if k != "kind"})
  want = flops.blt_flops_per_byte(cfg, 64, summary["mean_patch_size"])
  assert float(rows[0]["train_flops_per_byte"]) == pytest.approx(want, rel=1e-6)
  assert float(rows[0]["infer_flops_per_byte"]) == pytest.approx(want / 3, rel=1e-6)


def test_qwen3_entropy_model_in_a_sweep(small_corpus, tmp_path):
  """A fine-tuned Qwen3 run patches BLT, next to the default byte patcher."""
  qwen_dir, _ = with_tokenizer("qwen3_tiny", tmp_path)
  qwen_run = tmp_path / "entropy_qwen3"
  result = launch("--config=configs/entropy_qwen3.py:size=tiny", f"--workdir={qwen_run}",
                  f"--config.model.path={qwen_dir}", "--config.train.steps=20",
                  f"--config.data.corpus={small_corpus}")
  assert result.returncode == 0, result.stderr[-3000:]
  losses = [json.loads(l)["loss"] for l in (qwen_run / "metrics.jsonl").read_text().splitlines()]
  assert losses[-1] < losses[0] - 0.5  # fine-tuning on bytes lowers the byte loss
  out = tmp_path / "sweep"
  result = launch("--config=configs/sweeps/patch_size.py:size=tiny", f"--workdir={out}",
                  "--config.sweep.only=patch3", "--config.sweep.steps=20",
                  f"--config.sweep.corpus={small_corpus}",
                  f"--config.sweep.entropy_models={tmp_path / 'entropy'},{qwen_run}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / "results.csv") as f:
    rows = {r["variant"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"patch3@entropy", "patch3@entropy_qwen3"}
  assert rows["patch3@entropy_qwen3"]["series"] == "global@entropy_qwen3"
  assert rows["patch3@entropy"]["threshold"] != rows["patch3@entropy_qwen3"]["threshold"]
  lm = blt_jax.load(out / "patch3@entropy_qwen3" / "seed0")
  assert lm.resolved.patching.entropy_workdir == str(qwen_run)
  assert lm.patcher.lm.config.model.kind == "qwen3"
  assert lm.next_byte_logprobs(b"def f(x):\n  return x\n").shape == (21, 256)


def test_a_finished_row_is_reused_only_with_its_own_config(sweep_dir, small_corpus):
  config = importlib.import_module("configs.sweeps.patch_size").get_config("size=tiny")
  config.sweep.entropy_models = str(sweep_dir / "entropy")
  config.sweep.corpus = str(small_corpus)
  run = next(r for r in sweep.expand(config.sweep) if r["name"] == "patch3")
  workdir = sweep_dir / "ps" / "patch3" / "seed0"
  saved = checkpoint.read_config(workdir)[0]
  sweep.check_same_run(saved, sweep.variant_config(config.sweep, run), workdir)  # the row
  for field, value in (("train.steps", 11), ("patching.target_patch_size", 4.0),
                       ("data.seq_len", 32), ("model.dec_layers", 2)):
    other = sweep.variant_config(config.sweep, {**run, "overrides": {**run["overrides"],
                                                                     field: value}})
    with pytest.raises(UserError, match=field.split(".")[1]):
      sweep.check_same_run(saved, other, workdir)


def test_aggregate_over_seeds():
  rows = [dict(variant="a", series="global", config="c", patching="global",
               target_patch_size=3.0, bpb=b, loss=b * 0.69, mean_patch_size=3.0)
          for b in (2.0, 2.2, 2.4)]
  (row,) = sweep.aggregate(rows)
  assert row["seeds"] == 3 and row["bpb"] == pytest.approx(2.2)
  assert row["bpb_std"] == pytest.approx(0.2)
  assert "2.2000 ± 0.2000" in sweep.markdown_table([row])


def test_every_sweep_config_expands():
  expected = {"patch_size": 5, "threshold": 10, "scheme": 5, "architecture": 8,
              "tokens_vs_patches": 7, "budget": 4, "understanding": 5}
  for name, n in expected.items():
    config = importlib.import_module(f"configs.sweeps.{name}").get_config("size=tiny")
    runs = sweep.expand(config.sweep)
    assert len(runs) == n and config.mode == "sweep"
    configs = [sweep.variant_config(config.sweep, r) for r in runs]
    assert all(c.size == "tiny" for c in configs)
  scheme = importlib.import_module("configs.sweeps.scheme").get_config("size=small")
  by_name = {r["name"]: sweep.variant_config(scheme.sweep, r)
             for r in sweep.expand(scheme.sweep)}
  assert by_name["space"].model.max_patches is None  # derived from the rule when it runs
  fields = {**by_name["static8"].model.to_dict(), "max_patches": 32}
  static = models.build(fields)
  byte = models.build(by_name["byte_transformer"].model.to_dict())
  ratio = byte.flops_per_byte(256) / static.flops_per_byte(256, 8)
  assert 0.9 < ratio < 1.1  # matched FLOPs per byte


def test_bad_sweep_settings_fail_in_one_line(tmp_path):
  for arg, needle in (("--config.sweep.only=patch4", "unknown variants ['patch4']"),
                      ("--config.sweep.seeds=0", "sweep.seeds must be >= 1")):
    result = launch("--config=configs/sweeps/patch_size.py:size=tiny",
                    f"--workdir={tmp_path / 'x'}", arg)
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_xla_flops_agree_with_analytic_for_a_dense_byte_lm():
  """Without masked-out work to count, XLA's executed FLOPs match the analytic count."""
  config = tiny_config("byte_baseline", **{"data.seq_len": 128})
  fields = config.model.to_dict()
  analytic = models.build(fields).flops_per_byte(128)
  ratio = sweep.xla_train_flops_per_byte(config, fields) / analytic
  assert 1.0 < ratio < 1.35, ratio  # + causal-masked half of the scores, optimizer, softmax


def test_entropy_workdir_must_be_a_next_byte_model(blt_run, small_corpus, tmp_path):
  result = launch("--config=configs/patch3.py:size=tiny", f"--workdir={tmp_path / 'x'}",
                  f"--config.data.corpus={small_corpus}",
                  f"--config.patching.entropy_workdir={blt_run / 'patch3'}")
  assert result.returncode == 2 and "holds a patched model (blt)" in result.stderr, \
      result.stderr[-2000:]
