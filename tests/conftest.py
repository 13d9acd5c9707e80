"""Shared fixtures: a private cache, parsed absl flags, a tiny trained entropy model."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blt_jax import config_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
  """Corpora and entropy caches of the tests live in a temporary folder; compiled XLA
  programs in one more, shared by this session's workers and launched subprocesses (the
  same tiny programs compile dozens of times otherwise)."""
  cache = tmp_path_factory.mktemp("cache")
  os.environ["BLT_JAX_CACHE"] = str(cache)
  session = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    session = session.parent  # the workers' common folder
  compiled = {"JAX_COMPILATION_CACHE_DIR": str(session / "xla_cache"),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  os.environ.update(compiled)
  import jax
  jax.config.update("jax_compilation_cache_dir", compiled["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  return cache


def launch(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs launch.py in a subprocess, as a user would (from the repository root unless `cwd`
  says otherwise)."""
  return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def tiny_config(name: str = "entropy_model", **overrides):
  """A config as a run sees it (frozen), at size=tiny, with dotted-field overrides."""
  return config_files.load(f"configs.{name}:size=tiny", overrides)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, private_cache):
  """A tiny entropy model trained once through the launcher; its workdir."""
  workdir = tmp_path_factory.mktemp("runs") / "entropy_tiny"
  result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={workdir}",
                  "--config.train.steps=60", "--config.ckpt.every_steps=30")
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


@pytest.fixture(scope="session")
def blt_run(tmp_path_factory, private_cache):
  """A tiny patch3 BLT run and its own tiny entropy model, trained once, launched from
  another directory than the repository's."""
  root = tmp_path_factory.mktemp("blt")
  result = launch(f"--config={ROOT / 'configs' / 'patch3.py'}:size=tiny",
                  f"--workdir={root / 'patch3'}",
                  f"--config.patching.entropy_workdir={root / 'entropy'}", cwd=root)
  assert result.returncode == 0, result.stderr[-3000:]
  return root


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
  """150 documents of 3000 stdlib bytes (7 of them held out): a corpus scored in seconds."""
  import os
  src = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40])
  root = tmp_path_factory.mktemp("small_corpus")
  for i in range(150):
    (root / f"doc{i:03d}.py").write_bytes(src[i * 3000:(i + 1) * 3000])
  return root
