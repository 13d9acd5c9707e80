"""Config files by name: a module of the installed `configs` package
(`configs.patch3:size=tiny`) or a file path (`path/to/x.py:size=tiny`), with nested
overrides; and the default workdirs named after them."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import ml_collections

from blt_jax.errors import UserError


def _module(name: str):
  if name.endswith(".py") or "/" in name:
    path = Path(name).expanduser()
    if not path.is_file():
      raise UserError(f"config file {name!r} not found")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    raise UserError(f"config module {name!r} not found ({e})")


def flatten(overrides: dict, prefix: str = "") -> dict:
  """{'model': {'dec_layers': 1}} -> {'model.dec_layers': 1}."""
  out = {}
  for key, value in overrides.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)) and value:
      out.update(flatten(dict(value), f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def set_field(config: ml_collections.ConfigDict, dotted: str, value):
  """config['a.b.c'] = value, for an existing field (a typo is an error, not a new field)."""
  *path, leaf = dotted.split(".")
  node = config
  for part in path:
    if part not in node:
      raise UserError(f"override {dotted!r}: no section {part!r}")
    node = node[part]
  if leaf not in node:
    raise UserError(f"override {dotted!r}: no field {leaf!r}")
  with node.ignore_type():
    node[leaf] = value


def load(spec: str, overrides: dict | None = None) -> ml_collections.FrozenConfigDict:
  """The config `spec` names ('configs.x:size=tiny' or 'path/x.py:size=tiny'), with
  `overrides` (nested or dotted fields) applied, frozen."""
  name, _, arg = spec.partition(":")
  try:
    config = _module(name).get_config(arg or None)
  except ValueError as e:
    raise UserError(f"{spec}: {e}")
  for dotted, value in flatten(overrides or {}).items():
    set_field(config, dotted, value)
  return ml_collections.FrozenConfigDict(config)


def config_name(spec: str) -> str:
  """'configs/patch3.py:size=tiny' or 'configs.patch3' -> 'patch3'."""
  name = spec.partition(":")[0]
  return Path(name).stem if name.endswith(".py") else name.rpartition(".")[2]


def default_workdir(spec: str, size: str) -> str:
  """runs/<config name>[_<size>] (no suffix at the default size, small)."""
  name = config_name(spec)
  return f"runs/{name}" if size == "small" else f"runs/{name}_{size}"
