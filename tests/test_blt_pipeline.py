"""The BLT job end to end at size=tiny: entropy model, cache, calibration, training,
causality through the public API, checkpoint round trip, patch and sample modes."""
from __future__ import annotations

import json

import numpy as np

import blt_jax
from blt_jax import checkpoint, data, entropy
from blt_jax.resolved import Resolved
from tests.conftest import ROOT, launch, tiny_config

TEXT = (b"import os\n\ndef walk(top):\n    for name in os.listdir(top):\n"
        b"        yield os.path.join(top, name)  # caf\xc3\xa9\n" * 3)


def test_run_writes_summary_with_calibrated_patches(blt_run):
  summary = json.loads((blt_run / "patch3" / "summary.json").read_text())
  assert abs(summary["mean_patch_size"] - 3.0) < 0.3  # calibrated on train, measured held-out
  assert np.isfinite(summary["bpb"]) and summary["bpb"] < 8.0
  assert summary["params"] > summary["params_without_hash"] > 0
  assert summary["train_flops_per_byte"] > 0 and summary["threshold"] > 0
  assert (blt_run / "entropy" / "eval.json").exists()  # the entropy model was trained first
  rows = [json.loads(l) for l in (blt_run / "patch3" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["loss"] < rows[0]["loss"]


def test_the_run_records_what_it_resolved_and_keeps_its_config(blt_run, small_corpus):
  """The saved config is the launched one, untouched; the calibrated threshold, the patch
  slots and the entropy model live in resolved.json, which the API reads back."""
  saved, _ = checkpoint.read_config(blt_run / "patch3")
  launched = tiny_config("patch3", **{"patching.entropy_workdir": str(blt_run / "entropy"),
                                      "data.corpus": str(small_corpus)})
  assert saved == json.loads(launched.to_json())  # nothing was written into the config
  assert saved["patching"]["threshold"] is None and saved["train"]["stop_at"] is None
  record = Resolved.of_run(blt_run / "patch3")
  summary = json.loads((blt_run / "patch3" / "summary.json").read_text())
  assert record.patching.threshold == summary["threshold"] > 0
  assert record.patching.entropy_workdir == str(blt_run / "entropy")
  assert record.model["max_patches"] == record.patching.max_patches == saved["model"]["max_patches"]
  lm = blt_jax.load(blt_run / "patch3")
  assert lm.resolved == record and lm.patcher.rule == record.patching
  assert (blt_run / "entropy" / "resolved.json").exists()  # every run has its record


def test_blt_next_byte_logprobs_is_prefix_invariant(blt_run):
  lm = blt_jax.load(blt_run / "patch3")
  assert lm.patcher is not None and lm.seq_len == 64 and len(TEXT) > 3 * 64
  full = lm.next_byte_logprobs(TEXT)
  assert full.shape == (len(TEXT), 256)
  np.testing.assert_allclose(np.exp(full).sum(-1), 1.0, rtol=1e-4)
  for k in (1, 2, 3, 9, 17, 40, 63, 64, 65, 100, 127, 128, 150, len(TEXT) - 1):
    np.testing.assert_allclose(lm.next_byte_logprobs(TEXT[:k]), full[:k], atol=2e-5,
                               err_msg=f"prefix of {k} bytes")


def test_patches_are_dynamic_in_the_public_api(blt_run):
  lm = blt_jax.load(blt_run / "patch3")
  windows = lm.patcher(TEXT[:64], lm.windows(TEXT[:64]))
  lengths = windows["patch_lengths"][0]
  assert lengths.sum() == 64 and len(set(lengths[lengths > 0].tolist())) > 1


def test_restore_gives_identical_logprobs(blt_run):
  a = blt_jax.load(blt_run / "patch3").next_byte_logprobs(TEXT)
  b = blt_jax.load(blt_run / "patch3").next_byte_logprobs(TEXT)
  np.testing.assert_array_equal(a, b)
  trained = json.loads((blt_run / "patch3" / "eval.json").read_text())
  result = launch("--config=configs/patch3.py:size=tiny", f"--workdir={blt_run / 'patch3'}",
                  "--config.mode=eval")
  assert result.returncode == 0, result.stderr[-2000:]
  restored = json.loads((blt_run / "patch3" / "eval.json").read_text())
  assert restored["bytes"] == trained["bytes"] and abs(restored["bpb"] - trained["bpb"]) < 1e-5


def test_entropy_cache_matches_direct_scoring_and_is_reused(blt_run, small_corpus):
  lm = blt_jax.load(blt_run / "entropy")
  corpus = data.prepare(str(small_corpus))  # the run's corpus
  path = (data.cache_root() / "entropies" /
          f"{corpus.fingerprint}-{entropy.model_fingerprint(lm)}.npy")
  written = path.stat().st_mtime_ns  # the run scored the corpus once ...
  cached = entropy.corpus_entropies(lm, corpus)
  assert path.stat().st_mtime_ns == written  # ... and it is reused here, not scored again
  assert cached.shape == corpus.data.shape and cached.dtype == np.float32
  doc = int(np.argmax(np.diff(corpus.offsets)))  # the longest document spans many windows
  lo, hi = corpus.offsets[doc], corpus.offsets[doc + 1]
  direct = entropy.document_entropies(lm, corpus.doc(doc))
  np.testing.assert_allclose(cached[lo:hi], direct, atol=1e-5)
  assert hi - lo > 4 * lm.seq_len


def test_document_entropies_never_see_later_bytes(blt_run):
  lm = blt_jax.load(blt_run / "entropy")
  full = entropy.document_entropies(lm, TEXT)
  for k in (1, 50, 64, 65, 97, 160, len(TEXT) - 1):
    np.testing.assert_allclose(entropy.document_entropies(lm, TEXT[:k]), full[:k], atol=1e-5)
  # and entropies are those of the next-byte distributions
  lp = lm.next_byte_logprobs(TEXT[:64])
  np.testing.assert_allclose(full[:64], -(np.exp(lp) * lp).sum(-1), atol=1e-4)


def test_chunks_cover_every_byte_once():
  offsets = np.array([0, 5, 5, 200, 1000, 1001])
  for window, stride in ((64, None), (64, 32), (8, 8), (8, 1)):
    cover = np.zeros(offsets[-1], int)
    for ctx, ctx_end, keep_from, keep_to in entropy.chunk_table(offsets, window, stride):
      assert ctx <= keep_from < keep_to <= ctx_end <= ctx + window
      cover[keep_from:keep_to] += 1
    assert (cover == 1).all()


def test_patch_mode_prints_and_plots(blt_run):
  result = launch("--config=configs/patch3.py:size=tiny", f"--workdir={blt_run / 'patch3'}",
                  "--config.mode=patch", "--config.patching.text=for x in range(10): pass")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "|" in result.stdout and "mean patch size" in result.stdout
  assert (blt_run / "patch3" / "patches.png").stat().st_size > 10000


def test_sample_mode_generates_bytes(blt_run):
  result = launch("--config=configs/patch3.py:size=tiny", f"--workdir={blt_run / 'patch3'}",
                  "--config.mode=sample", "--config.sample.prompt=def f(",
                  "--config.sample.max_bytes=12", "--config.sample.top_k=5")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("def f(") and len(result.stdout.encode()) >= 12


def test_static_and_space_runs_need_no_entropy_model(tmp_path):
  """Launched from another directory by absolute paths: the configs import as the
  installed package, and the default workdir is under the working directory."""
  for name in ("static4", "space"):
    result = launch(f"--config={ROOT / 'configs' / name}.py:size=tiny",
                    "--config.train.steps=6", "--config.eval.max_bytes=2048",
                    f"--config.patching.entropy_workdir={tmp_path / 'none'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "none").exists()
    workdir = tmp_path / "runs" / f"{name}_tiny"
    assert (workdir / "resolved.json").exists() and not (ROOT / "runs" / f"{name}_tiny"
                                                         / "resolved.json").exists()
    lm = blt_jax.load(workdir)
    full = lm.next_byte_logprobs(TEXT)
    np.testing.assert_allclose(lm.next_byte_logprobs(TEXT[:70]), full[:70], atol=2e-5)
