"""Shared fixtures: a private cache, parsed absl flags, a tiny trained entropy model."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from absl import flags

from blt_jax import config_files

ROOT = Path(__file__).resolve().parents[1]
# Files with the longest work go to the two workers first, so neither ends on a long tail.
LONGEST_FIRST = ("test_sharding.py", "test_sweep.py", "test_blt_pipeline.py", "test_heldout.py",
                 "test_reliability.py", "test_entropy_model.py")


def pytest_collection_modifyitems(items):
  order = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: order.get(item.path.name, len(order)))


def shared_folder(tmp_path_factory, name: str, build) -> Path:
  """A folder `build(folder)` fills once for the whole session, whichever worker asks
  first (the others wait for it): a run trained once, not once per worker."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the workers' common folder
  folder = base / name
  with open(base / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (folder / ".built").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      (folder / ".built").touch()
  return folder


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
  """Corpora and entropy caches of the tests live in a temporary folder, and compiled XLA
  programs in one more: both shared by this session's workers and launched subprocesses
  (caches are written atomically; the same tiny programs compile dozens of times
  otherwise)."""
  session = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    session = session.parent  # the workers' common folder
  cache = session / "cache"
  cache.mkdir(exist_ok=True)
  os.environ["BLT_JAX_CACHE"] = str(cache)
  compiled = {"JAX_COMPILATION_CACHE_DIR": str(session / "xla_cache"),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  os.environ.update(compiled)
  jax.config.update("jax_compilation_cache_dir", compiled["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
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
  def build(folder):
    result = launch("--config=configs/entropy_model.py:size=tiny", f"--workdir={folder / 'run'}",
                    "--config.train.steps=60", "--config.ckpt.every_steps=30")
    assert result.returncode == 0, result.stderr[-2000:]
  return shared_folder(tmp_path_factory, "entropy_tiny", build) / "run"


@pytest.fixture(scope="session")
def blt_run(tmp_path_factory, private_cache, small_corpus):
  """A tiny patch3 BLT run on the small corpus and its own tiny entropy model, trained
  once, launched from another directory than the repository's."""
  def build(root):
    result = launch(f"--config={ROOT / 'configs' / 'patch3.py'}:size=tiny",
                    f"--workdir={root / 'patch3'}", f"--config.data.corpus={small_corpus}",
                    f"--config.patching.entropy_workdir={root / 'entropy'}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
  return shared_folder(tmp_path_factory, "blt", build)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
  """150 documents of 3000 stdlib bytes (7 of them held out): a corpus scored in seconds.
  One folder for every worker (a corpus's fingerprint holds its files' times)."""
  src = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40])

  def build(root):
    for i in range(150):
      (root / f"doc{i:03d}.py").write_bytes(src[i * 3000:(i + 1) * 3000])
  return shared_folder(tmp_path_factory, "small_corpus", build)
