"""Config parsing, command-line overrides, and one-line errors for bad ones."""
from __future__ import annotations

import pytest

from configs import common
from tests.conftest import launch


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
  from absl import flags
  from ml_collections import config_flags
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
