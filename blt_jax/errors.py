"""User-facing errors: launch.py prints them as one line and exits with status 2."""


class UserError(Exception):
  """Bad input from the user (config, paths, corpora, checkpoints); never a bug."""
