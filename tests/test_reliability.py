"""Losing nothing: kill -9 and resume, damaged checkpoints, divergence, atomic caches."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import blt_jax
from blt_jax import checkpoint, data
from blt_jax.errors import UserError
from tests.conftest import ROOT, launch

TINY = ["--config=configs/entropy_model.py:size=tiny", "--config.train.steps=30",
        "--config.ckpt.every_steps=5", "--config.eval.max_bytes=512"]


def params(workdir):
  return jax.tree.leaves(jax.tree.map(np.asarray, blt_jax.load(workdir).state))


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("unbroken") / "run"
  assert launch(*TINY, f"--workdir={workdir}").returncode == 0
  return workdir


def test_kill_9_then_rerun_ends_bit_identical(unbroken, tmp_path):
  workdir = tmp_path / "killed"
  for delay in (4.0, 6.0, 7.5):  # kills land while compiling, training or saving
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *TINY,
                             f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if delay == 4.0:  # the first kill cut the run short: there is work left to resume
      assert not (workdir / "eval.json").exists()
  result = launch(*TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert blt_jax.load(workdir).step == 30
  for a, b in zip(params(unbroken), params(workdir)):
    np.testing.assert_array_equal(a, b)


def test_damaged_latest_checkpoint_falls_back(unbroken, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(unbroken), str(workdir)], check=True)
  for f in (workdir / "checkpoints" / "30" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])  # truncated
  result = launch(*TINY, f"--workdir={workdir}", "--config.mode=eval")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "checkpoint at step 30 is damaged" in result.stderr
  assert "step 25" in result.stdout
  assert (workdir / "checkpoints" / "damaged-30").is_dir()  # kept aside, not deleted
  for step in ("25", "20"):  # ckpt.keep = 3: steps 20, 25, 30 were kept
    subprocess.run(["rm", "-rf", str(workdir / "checkpoints" / step / "state")], check=True)
  result = launch(*TINY, f"--workdir={workdir}", "--config.mode=eval")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: no readable checkpoint") and "25, 20" in lines[-1]
  assert all(line.startswith("warning: checkpoint at step") for line in lines[:-1])


def test_resume_with_another_process_count_is_refused_and_keeps_the_checkpoint(unbroken,
                                                                              tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(unbroken), str(workdir)], check=True)
  data_dir = workdir / "checkpoints" / "30" / "data"
  saved = data_dir / "process_0-of-1.json"
  assert saved.is_file()  # grain's per-process data position
  saved.rename(data_dir / "process_0-of-2.json")  # as if two processes had saved it
  result = launch(*TINY, f"--workdir={workdir}", "--config.train.steps=35")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: checkpoint at step 30 in {workdir} was saved by 2 process(es); resume it "
      "with that many (this run has 1)")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "25", "30"]


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  assert launch(*TINY, "--config.train.stop_at=10", f"--workdir={workdir}").returncode == 0
  result = launch(*TINY, f"--workdir={workdir}", "--config.train.lr=1e30")
  assert result.returncode == 2
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: training diverged at step 1") and "is nan" in line
  assert "last good checkpoint: step 10" in line
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "5"]
  assert np.isfinite(np.concatenate([p.ravel() for p in params(workdir)])).all()


BAD_INPUTS = [  # (extra arguments, what the one-line error says); README's table
    (["--config.train.stepz=3"], "unknown config field 'stepz'"),
    (["--config.train.steps=ten"], "invalid literal for int()"),
    (["--config.data.corpus=/no/such/corpus"], "not found"),
    (["--config.data.corpus={tmp}/empty"], "no text documents"),
    (["--config.data.corpus={tmp}/binary"], "no text documents"),
    (["--config.data.corpus={tmp}/short.txt"], "fewer than one window"),
    (["--config.data.eval_fraction=0.0"], "no held-out documents"),
    (["--workdir={tmp}/file"], "not a directory"),
    (["--workdir=/proc/blt_jax_run"], "cannot write to workdir"),
    (["--workdir={tmp}/none", "--config.mode=eval"], "no checkpoint"),
    (["--workdir={tmp}/none", "--config.mode=sample"], "no checkpoint"),
    (["--config.mode=sample", "--config.sample.max_bytes=0"], "sample.max_bytes"),
    (["--config.mode=sample", "--config.sample.top_k=300"], "sample.top_k in 0..256"),
    (["--config.mode=sample", "--config.sample.temperature=-1.0"], "sample.temperature"),
    (["--config.mode=patch"], "needs a patching config"),
    (["--config.patching.mode=global"], "needs patching.threshold"),
]


@pytest.mark.parametrize("extra, needle", BAD_INPUTS)
def test_bad_inputs_end_in_one_line_and_status_2(extra, needle, tmp_path):
  (tmp_path / "file").write_text("x")
  (tmp_path / "empty").mkdir()
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "blob.bin").write_bytes(bytes(range(256)) * 64)
  (tmp_path / "short.txt").write_text("tiny")
  args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path / 'run'}")
  result = launch(*TINY, *args)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_interrupted_corpus_build_leaves_nothing_trusted(tmp_path, monkeypatch):
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_text("some text " * 50)
  real_save = np.save
  calls = []

  def failing_save(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt  # as if killed between the two arrays
    return real_save(*args, **kwargs)
  monkeypatch.setattr(np, "save", failing_save)
  cache = str(tmp_path / "cache")  # its own: other workers build corpora in the shared one
  with pytest.raises(KeyboardInterrupt):
    data.prepare(str(tmp_path / "c"), cache_dir=cache)
  monkeypatch.setattr(np, "save", real_save)
  corpora = data.cache_root(cache) / "corpora"
  assert not any(".tmp-" in p.name for p in corpora.iterdir())
  corpus = data.prepare(str(tmp_path / "c"), cache_dir=cache)
  assert corpus.doc(0) == b"some text " * 50


def test_checkpoint_of_another_parameter_layout_is_refused_and_kept(tmp_path):
  """E.g. separate q/k/v kernels written by an older version, restored into fused qkv."""
  ckpt = checkpoint.Checkpointer(tmp_path)
  old = {"attn": {"q": {"kernel": np.ones((4, 4), np.float32)},
                  "k": {"kernel": np.ones((4, 4), np.float32)}}}
  ckpt.save(3, old, config={"model": {}})
  ckpt.wait()
  new = {"attn": {"qk": {"kernel": np.ones((4, 8), np.float32)}}}
  with pytest.raises(UserError) as error:
    ckpt.restore(None, checkpoint.abstract(new))
  assert str(error.value) == (
      f"checkpoint at step 3 in {tmp_path} has another parameter layout than this code builds "
      "(attn/qk/kernel is not in the checkpoint); it was written by another version of "
      "blt-jax: restore it with that version, or retrain")
  assert ckpt.all_steps() == [3] and (tmp_path / "checkpoints" / "3").is_dir()  # not moved
  restored, _, step = ckpt.restore(None, checkpoint.abstract(old))  # its own layout still loads
  assert step == 3 and restored["attn"]["q"]["kernel"].shape == (4, 4)
  ckpt.close()


def test_a_run_resumes_and_evaluates_only_on_its_own_split(unbroken, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(unbroken), str(workdir)], check=True)
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  result = launch(*TINY, f"--workdir={workdir}", "--config.train.steps=35",
                  "--config.data.eval_fraction=0.1")
  assert result.returncode == 2, result.stderr[-2000:]
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith(f"error: {workdir} holds a run on another split: eval_fraction 0.05")
  assert "it trained on" in line and "documents this run holds out (e.g." in line
  # eval scores the documents the run held out, whatever eval_fraction says now
  result = launch(*TINY, f"--workdir={workdir}", "--config.mode=eval",
                  "--config.data.eval_fraction=0.5")
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((workdir / "eval.json").read_text())["bytes"] == json.loads(
      (unbroken / "eval.json").read_text())["bytes"]
  (workdir / "split.json").unlink()  # a run from before splits were recorded
  for extra, needle in (("--config.train.steps=35", "has checkpoints but no split.json"),
                        ("--config.mode=eval", "has no split.json")):
    result = launch(*TINY, f"--workdir={workdir}", extra)
    assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
