"""Losing nothing: kill -9, SIGTERM and Ctrl-C then resume, a workdir in use, damaged
checkpoints and caches, a full disk, divergence, bad input in one line."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import blt_jax
from blt_jax import checkpoint, data, entropy, files, jobs, workdir_lock
from blt_jax.errors import UserError
from tests.conftest import ROOT, launch, tiny_config

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
    if delay == 4.0:  # the first kill lands mid-training, however fast this machine is
      deadline = time.time() + 60
      while not any((workdir / "checkpoints").glob("[0-9]*")) and time.time() < deadline:
        time.sleep(0.05)
    else:
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
    (["--config.data.corpus={tmp}/empty"], "no readable text documents"),
    (["--config.data.corpus={tmp}/binary"], "no readable text documents (1 binary skipped)"),
    (["--config.data.cache_dir={tmp}/file/cache"], "cannot write {tmp}/file/cache"),
    (["--config.data.corpus={tmp}/short.txt"], "fewer than one window"),
    (["--config.data.eval_fraction=0.0"], "no held-out documents"),
    (["--workdir={tmp}/file"], "not a directory"),
    (["--workdir=/proc/blt_jax_run"], "cannot write to workdir"),
    (["--workdir={tmp}/none", "--config.mode=eval"], "no checkpoint"),
    (["--workdir={tmp}/none", "--config.mode=sample"], "no checkpoint"),
    (["--config.mode=sample", "--config.sample.max_bytes=0"], "sample.max_bytes"),
    (["--config.mode=sample", "--config.sample.top_k=-1"], "sample.top_k must be an integer >= 0"),
    (["--config.mode=sample", "--config.sample.temperature=-1.0"], "sample.temperature"),
    (["--config.mode=sample", "--config.sample.top_p=1.5"], "sample.top_p must be in (0, 1]"),
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
  needle = needle.replace("{tmp}", str(tmp_path))
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


# ----------------------------------------------------------------------------- faults

def start(*args, workdir):
  """launch.py in the background, as a user's run (stdout/stderr captured)."""
  return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args,
                           f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for_rows(workdir, n, proc, timeout=120):
  """Waits until metrics.jsonl has `n` rows (the run is training)."""
  t0 = time.time()
  while time.time() - t0 < timeout and proc.poll() is None:
    path = workdir / "metrics.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= n:
      return
    time.sleep(0.02)
  raise AssertionError(f"no {n} metrics rows: {proc.poll()} {proc.stderr.read()[-2000:]}")


def test_sigterm_and_ctrl_c_save_then_resume_bit_identical(unbroken, tmp_path):
  """SIGTERM (status 143), then Ctrl-C (130): each run finishes its step, saves it, says so
  in one line; rerunning ends with the parameters of a run never stopped."""
  workdir = tmp_path / "stopped"
  every_step = [*TINY, "--config.train.log_every=1", "--config.ckpt.every_steps=1000"]
  stops = []
  for signum, status, name in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
    rows = len((workdir / "metrics.jsonl").read_text().splitlines()) if stops else 0
    proc = start(*every_step, workdir=workdir)
    wait_for_rows(workdir, rows + 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: stopped by {name} at step ") and "after saving" in line
    step = int(line.split("at step ")[1].split(",")[0])
    assert step < 30 and (workdir / "checkpoints" / str(step)).is_dir()
    stops.append(step)
  assert stops[0] < stops[1]  # the second run resumed from the first one's checkpoint
  result = launch(*TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-2000:]
  for a, b in zip(params(unbroken), params(workdir)):
    np.testing.assert_array_equal(a, b)


def test_a_second_run_on_a_workdir_in_use_stops_and_leaves_the_first_alone(tmp_path):
  workdir = tmp_path / "busy"
  first = start(*TINY, "--config.train.steps=3000", "--config.train.log_every=1",
                workdir=workdir)
  wait_for_rows(workdir, 1, first)
  second = launch(*TINY, f"--workdir={workdir}")
  assert second.returncode == 2 and "Traceback" not in second.stderr
  line = second.stderr.strip()
  assert len(line.splitlines()) == 1
  assert f"is in use by another run (pid {first.pid} on " in line, line
  rows = len((workdir / "metrics.jsonl").read_text().splitlines())
  wait_for_rows(workdir, rows + 3, first)  # the first run kept training
  first.send_signal(signal.SIGTERM)
  first.communicate(timeout=120)
  assert first.returncode == 143 and not (workdir / "run.lock").exists()


def test_a_lock_left_by_a_gone_run_is_taken_over(tmp_path, capsys):
  dead = subprocess.Popen(["true"])
  dead.wait()
  for holder, age in (({"host": socket.gethostname(), "pid": dead.pid}, 0.0),  # kill -9
                      ({"host": "another-host", "pid": 1}, workdir_lock.STALE_S + 5)):
    lock_file = tmp_path / workdir_lock.LOCK_FILE
    lock_file.write_text(json.dumps({**holder, "since": "then"}))
    os.utime(lock_file, (time.time() - age,) * 2)
    with workdir_lock.WorkdirLock(tmp_path):
      assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()
    assert "taking it over" in capsys.readouterr().err
  lock_file.write_text(json.dumps({"host": "another-host", "pid": 1, "since": "now"}))
  with pytest.raises(UserError, match="in use by another run .pid 1 on another-host"):
    workdir_lock.WorkdirLock(tmp_path).acquire()  # a fresh heartbeat: alive elsewhere
  assert json.loads(lock_file.read_text())["host"] == "another-host"  # left alone


def test_damaged_caches_are_moved_aside_and_rebuilt(tiny_run, small_corpus, tmp_path, capsys):
  cache = str(tmp_path / "cache")
  corpus = data.prepare(str(small_corpus), cache_dir=cache)
  original = np.array(corpus.data)
  lm = blt_jax.load(tiny_run)
  h = np.array(entropy.corpus_entropies(lm, corpus, cache, progress=False))
  data_file = corpus.path / "data.npy"
  h_file = next((tmp_path / "cache" / "entropies").glob("*.npy"))
  for damage in ("truncate", "flip"):
    for path in (data_file, h_file):
      raw = bytearray(path.read_bytes())
      if damage == "truncate":
        raw = raw[:len(raw) // 2]
      else:  # same size, one byte changed: only the checksum sees it
        raw[-7] ^= 0x55
      path.write_bytes(bytes(raw))
    corpus = data.prepare(str(small_corpus), cache_dir=cache)
    np.testing.assert_array_equal(corpus.data, original)
    np.testing.assert_array_equal(entropy.corpus_entropies(lm, corpus, cache, progress=False), h)
    err = capsys.readouterr().err
    assert "the prepared corpus" in err and "the entropy cache" in err and "moved aside" in err
  assert len(list((tmp_path / "cache" / "corpora").glob("*.damaged-*"))) == 2


def test_a_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  """Fault injection: the second checkpoint save, then a metrics write, then a cache write
  find the disk full."""
  workdir = tmp_path / "run"
  config = tiny_config("entropy_model", **{"train.steps": 10, "ckpt.every_steps": 5,
                                           "eval.max_bytes": 512})
  full = OSError(errno.ENOSPC, "No space left on device")
  real_save, saves = checkpoint.ocp.CheckpointManager.save, []

  def save(self, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
      raise full
    return real_save(self, *args, **kwargs)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", save)
  with pytest.raises(UserError, match="cannot write .*checkpoints: No space left on device"):
    jobs.run(config, workdir)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", real_save)
  assert checkpoint.latest_step(workdir) == 5 and blt_jax.load(workdir).step == 5
  leftover = workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1764000000"
  leftover.mkdir()  # what a save cut short leaves behind

  class FullFile:  # metrics.jsonl, opened to append to
    def write(self, text):
      raise full

    def close(self):
      pass
  real_open = open
  monkeypatch.setattr(files, "open", lambda path, mode="r", *args, **kwargs: (
      FullFile() if mode == "a" else real_open(path, mode, *args, **kwargs)), raising=False)
  with pytest.raises(UserError, match="cannot write .*metrics.jsonl: No space left on device"):
    jobs.run(config, workdir)
  monkeypatch.delattr(files, "open")
  assert not leftover.exists()  # cleaned when the run started
  jobs.run(config, workdir)
  assert checkpoint.latest_step(workdir) == 10

  monkeypatch.setattr(np, "save", lambda *args, **kwargs: (_ for _ in ()).throw(full))
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_text("some text " * 50)
  with pytest.raises(UserError, match="cannot write .*: No space left on device"):
    data.prepare(str(tmp_path / "c"), cache_dir=str(tmp_path / "cache"))
  assert not any((tmp_path / "cache" / "corpora").iterdir())  # nothing half-written


def test_corpora_skip_what_is_not_text_and_say_so(tmp_path, monkeypatch, capsys):
  root = tmp_path / "c"
  root.mkdir()
  (root / "a.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe not UTF-8, still bytes\n" * 20)
  (root / "empty.txt").write_bytes(b"")
  (root / "blob.bin").write_bytes(bytes(range(256)))
  (root / "locked.txt").write_text("unreadable")
  real_read = Path.read_bytes
  monkeypatch.setattr(Path, "read_bytes", lambda self: (
      (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(self)))
      if self.name == "locked.txt" else real_read(self)))
  corpus = data.prepare(str(root), cache_dir=str(tmp_path / "cache"))
  assert corpus.names == ["a.txt"] and corpus.doc(0) == (root / "a.txt").read_bytes()
  assert "skipped 1 binary, 1 empty, 1 unreadable document(s)" in capsys.readouterr().out
  (root / "a.txt").unlink()
  with pytest.raises(UserError, match="has no readable text documents "
                                      r"\(1 binary, 1 empty, 1 unreadable skipped\)"):
    data.prepare(str(root), cache_dir=str(tmp_path / "cache"))
  (root / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
  with pytest.raises(UserError, match=r"bad.jsonl:2: expected a JSON object with a 'text'"):
    data.prepare(str(root / "bad.jsonl"), cache_dir=str(tmp_path / "cache"))
