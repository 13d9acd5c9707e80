"""Hugging Face model folders: config.json and safetensors weights (one file or the
shards of an index), read without torch, and written back in the same layout."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import safetensors
import safetensors.flax

from blt_jax.errors import UserError


def listing(names) -> str:
  """The first of sorted `names`, and how many more there are."""
  more = len(names) - 1
  return names[0] + (f" (and {more} more)" if more else "")


def check_present(names, present, source):
  missing = sorted(set(names) - set(present))
  if missing:
    raise UserError(f"{source} lacks tensor {listing(missing)}")


def _open(file: Path):
  """One safetensors file, opened (a context manager); tensors come back as jax arrays."""
  if not file.is_file():
    raise UserError(f"missing safetensors file {file}")
  try:
    return safetensors.safe_open(str(file), framework="flax")
  except safetensors.SafetensorError as e:
    raise UserError(f"{file} is not a safetensors file ({' '.join(str(e).split())})") from None


def read_safetensors(file: str | Path, names=None) -> dict[str, jax.Array]:
  """Tensors of one .safetensors file (all, or those in `names`) in their stored dtype."""
  file = Path(file)
  with _open(file) as f:
    present = f.keys()
    names = present if names is None else sorted(names)
    check_present(names, present, file)
    return {name: f.get_tensor(name) for name in names}


def _checkpoint_files(path: Path) -> dict[Path, set[str] | None]:
  """Safetensors files of a HF directory -> the tensors to read from each (None: all)."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    return {single: None}
  if not index.is_file():
    raise UserError(f"missing weights: no model.safetensors or model.safetensors.index.json "
                    f"in {path}")
  try:
    weight_map = dict(json.loads(index.read_text())["weight_map"])
  except (ValueError, KeyError, TypeError):
    raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
  files = {}
  for name, shard in weight_map.items():
    files.setdefault(path / shard, set()).add(name)
  return files


def read_checkpoint(path: str | Path) -> dict[str, jax.Array]:
  """All tensors of a HF directory: model.safetensors or the shards of its index."""
  out = {}
  for file, names in _checkpoint_files(Path(path)).items():
    out.update(read_safetensors(file, names))
  return out


def checkpoint_names(path: str | Path) -> set[str]:
  """Tensor names of a HF directory, from the file headers (reads no tensor data)."""
  out = set()
  for file, names in _checkpoint_files(Path(path)).items():
    with _open(file) as f:
      present = set(f.keys())
    check_present(names or (), present, file)
    out |= present if names is None else names
  return out


def read_hf_config(path: str | Path, what: str = "Qwen3") -> dict:
  """The dict of `path`/config.json (`what` names the model in errors)."""
  path = Path(path)
  if not path.is_dir():
    raise UserError(f"missing {what} checkpoint directory {path}")
  file = path / "config.json"
  if not file.is_file():
    raise UserError(f"missing config.json in {path}")
  try:
    return json.loads(file.read_text())
  except ValueError as e:
    raise UserError(f"bad JSON in {file}: {e}")




SHARD_BYTES = 4 << 30  # tensors per safetensors shard when writing (as transformers does)


def write_checkpoint(path: str | Path, config: dict, tensors: dict,
                     shard_bytes: int = SHARD_BYTES):
  """Writes config.json and `tensors` (name -> array) to the folder `path`: one
  model.safetensors, or shards of at most `shard_bytes` and their index."""
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards, size = [{}], 0
    for name in sorted(tensors):
      array = jax.numpy.asarray(tensors[name])
      if shards[-1] and size + array.nbytes > shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = array
      size += array.nbytes
    if len(shards) == 1:
      safetensors.flax.save_file(shards[0], str(path / "model.safetensors"),
                                 metadata={"format": "pt"})
      return
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors.flax.save_file(shard, str(path / file), metadata={"format": "pt"})
      weight_map.update({name: file for name in shard})
    total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  except OSError as e:
    raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def variable(module, path: tuple):
  """The nnx variable at `path` (attribute names and list indices) inside `module`."""
  node = module
  for part in path:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node
