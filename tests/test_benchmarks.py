"""The throughput benchmark runs end to end (tiny shapes, one timed step) and reports its rows."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_train_throughput_reports_bytes_per_second_and_mfu():
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--size=tiny",
       "--only=patch3", "--steps=1", "--rounds=1", "--matmul=256"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  rows = re.findall(r"^(blt patch3 \(tiny\)|baseline d\d+x\d+) .* ([\d.]+) bytes/s", out, re.M)
  assert [name.split()[0] for name, _ in rows] == ["blt", "baseline"], out
  assert all(float(rate) > 0 for _, rate in rows)
  mfus = [float(m) for m in re.findall(r"MFU ([\d.]+)$", out, re.M)]
  assert len(mfus) == 2 and all(0 < m < 1 for m in mfus), out
  ratio = re.search(r"blt patch3 \(tiny\): MFU ([\d.]+) = ([\d.]+) x the baseline's", out)
  assert ratio and abs(float(ratio.group(2)) - mfus[0] / mfus[1]) < 0.01, out


def test_generate_benchmark_reports_cached_and_uncached_rates():
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--size=tiny", "--new=8",
       "--uncached_new=2", "--batches=1,2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = re.findall(r"batch +(\d+): cached +([\d.]+) bytes/s .* uncached +([\d.]+) bytes/s .* "
                    r"cached / uncached ([\d.]+)x", proc.stdout)
  assert [r[0] for r in rows] == ["1", "2", "1", "2"], proc.stdout  # byte baseline, BLT
  for _, cached, uncached, ratio in rows:
    assert abs(float(cached) / float(uncached) - float(ratio)) < 0.06 * float(ratio)
  assert proc.stdout.count("ms per step: entropy model") == 2, proc.stdout
