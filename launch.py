"""blt-jax launcher: a config file, command-line overrides, and a mode.

  python launch.py --config=configs/patch3.py[:size=tiny] [--workdir=runs/patch3]
                   [--config.FIELD=VALUE ...]
Modes (--config.mode): train (default), eval, patch, sample.
"""
from __future__ import annotations

import re
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from blt_jax import config_files, jobs, signals
from blt_jax.errors import Stopped, UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:size=tiny]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>[_<size>].")


def main(argv):
  logging.set_verbosity(logging.WARNING)
  signal.signal(signal.SIGTERM, signals.raise_stopped)  # the train loop saves first
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  if config is None:
    fail("--config is required, e.g. --config=configs/patch3.py")
  workdir = FLAGS.workdir or config_files.default_workdir(
      config_flags.get_config_filename(FLAGS["config"]), config.get("size", "small"))
  try:
    jobs.run(config, workdir)
  except UserError as e:
    fail(str(e))
  except Stopped as e:
    fail(str(e), e.status)
  except KeyboardInterrupt:
    fail(str(Stopped(signal.SIGINT)), Stopped(signal.SIGINT).status)


def fail(message: str, status: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _one_line(error: BaseException) -> str:
  """A flag or config-file error on one line (a traceback shrinks to its last line)."""
  text = str(error).replace("\\n", "\n").replace("\\'", "'")
  if isinstance(error.__cause__ or error.__context__, KeyError) or "Did you mean" in text:
    field = re.search(r"(\w+)", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    text = f"unknown config field {field.group(1)!r}" if field else "unknown config field"
    text += f" (did you mean {hint.group(1)!r}?)" if hint else ""
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if "Traceback" in text or "Attempted" in text:
    lines = lines[-1:]
  return " ".join(lines) or type(error).__name__


def parse_flags(argv):
  """absl flag parsing with one-line errors and exit status 2 (no usage dump)."""
  try:
    argv = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.get("mode")  # config-file errors surface on first access
    return argv
  except flags.Error as e:
    message = _one_line(e)
    flag = message.split(": ")[0]
    fail(flag + ": " + message.replace(flag + ": ", "") if flag.startswith("flag --") else message)
  except Exception as e:  # a config file that fails to load, or its `:arg` is bad
    fail(_one_line(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
