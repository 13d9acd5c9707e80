"""Config parsing, command-line overrides, and one-line errors for bad ones."""
from __future__ import annotations

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from blt_jax import config_files
from blt_jax.errors import UserError
from configs import common
from tests.conftest import ROOT, launch


def test_parse_arg_sizes():
  assert common.parse_arg(None) == {"size": "small"}
  assert common.parse_arg("size=tiny") == {"size": "tiny"}
  assert common.parse_arg("gpu") == {"size": "gpu"}
  with pytest.raises(ValueError, match="unknown size"):
    common.parse_arg("size=huge")
  with pytest.raises(ValueError, match="unknown config argument"):
    common.parse_arg("depth=3")


def test_every_config_has_the_contract_fields():
  config = common.base_config("size=tiny")
  for field in ("train.steps", "train.batch_size", "train.seed", "ckpt.every_steps",
                "data.corpus", "patching.mode", "patching.target_patch_size", "eval.corpus",
                "mesh.data", "mesh.fsdp", "mode"):
    node = config
    for part in field.split("."):
      node = node[part]
  assert config.data.corpus == "stdlib" and config.mode == "train"
  assert common.base_config(None).size == "small"


def test_overrides_apply():
  argv = ["prog", "--config=configs/entropy_model.py:size=tiny", "--config.train.steps=7",
          "--config.data.corpus=/some/where", "--config.model.dim=48"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  assert fv.config.train.steps == 7
  assert fv.config.data.corpus == "/some/where"
  assert fv.config.model.dim == 48 and fv.config.size == "tiny"


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/entropy_model.py:size=tiny", "--config.trian.steps=3"], "'trian'"),
    (["--config=configs/entropy_model.py:size=tiny", "--config.train.stepz=3"], "'steps'"),
    (["--config=configs/entropy_model.py:size=tiny", "--config.train.steps=abc"], "abc"),
    (["--config=configs/entropy_model.py:size=huge"], "unknown size"),
    (["--config=configs/no_such_config.py"], "no_such_config"),
    (["--config=configs/entropy_model.py:size=tiny", "--config.mode=fly"], "unknown mode"),
    ([], "--config is required"),
])
def test_bad_command_lines_fail_in_one_line(args, needle):
  result = launch(*args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert needle in lines[0] and "Traceback" not in result.stderr


def test_configs_load_by_module_name_or_path_and_stay_frozen():
  by_module = config_files.load("configs.patch3:size=tiny", {"model": {"dec_layers": 3}})
  by_path = config_files.load(str(ROOT / "configs" / "patch3.py") + ":size=tiny",
                              {"model.dec_layers": 3})
  assert by_module.to_dict() == by_path.to_dict() and by_module.model.dec_layers == 3
  assert by_module.patching.entropy_config == "configs.entropy_patcher:size=tiny"
  with pytest.raises(AttributeError, match="immutable"):
    by_module.train.steps = 1
  assert config_files.default_workdir("configs.patch3", "tiny") == "runs/patch3_tiny"
  assert config_files.default_workdir("x/configs/patch3.py", "small") == "runs/patch3"
  for spec, needle in (("configs.nope", "not found"), ("configs/nope.py", "not found")):
    with pytest.raises(UserError, match=needle):
      config_files.load(spec)
  with pytest.raises(UserError, match="no field 'stepz'"):
    config_files.load("configs.patch3:size=tiny", {"train": {"stepz": 1}})
  sweep = config_files.load("configs.sweeps.architecture:size=tiny")
  variant = sweep.sweep.variants.dec_layers_4
  assert variant.config == "configs.patch3:size=tiny"
  assert isinstance(variant.overrides, ml_collections.ConfigDict)
  assert variant.overrides.model.dec_layers == 4  # nested config, not a JSON string
