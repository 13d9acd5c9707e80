"""Mode `sample`: continue prompts with a trained run's model (cached, batched generation),
streaming the bytes as they arrive."""
from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
from tqdm import tqdm

from blt_jax import api, sampling
from blt_jax.errors import UserError


def read_prompts(s: ml_collections.ConfigDict) -> list[bytes]:
  """`sample.prompts_file` (one prompt per line, blank lines kept as empty prompts), or
  the one `sample.prompt`."""
  if not s.prompts_file:
    return [s.prompt.encode("utf-8")]
  path = Path(s.prompts_file)
  try:
    lines = path.read_bytes().split(b"\n")
  except OSError as e:
    raise UserError(f"cannot read sample.prompts_file {path}: {e.strerror or e}") from None
  if lines and lines[-1] == b"":
    lines.pop()  # the file's final newline ends the last prompt
  if not lines:
    raise UserError(f"sample.prompts_file {path} holds no prompts")
  return lines


def options(s: ml_collections.ConfigDict) -> dict:
  """`LanguageModel.generate`'s options from the config, checked before anything loads."""
  sampling.check_options(max_bytes=s.max_bytes, temperature=s.temperature, top_k=s.top_k,
                         top_p=s.top_p, prefix="sample.")
  if s.batch_size < 1:
    raise UserError(f"sample.batch_size must be >= 1, got {s.batch_size}")
  return dict(max_bytes=s.max_bytes, temperature=s.temperature, top_k=s.top_k,
              top_p=s.top_p, stop=s.stop.encode("utf-8") or None)


def run(config: ml_collections.ConfigDict, workdir: Path):
  """Prompt i of the file draws with seed + i, whatever the batch size."""
  s = config.sample
  opts = options(s)
  prompts = read_prompts(s)
  lm = api.for_config(config, workdir)
  out = sys.stdout.buffer
  for lo in range(0, len(prompts), s.batch_size):
    batch = prompts[lo:lo + s.batch_size]
    if len(batch) == 1:  # one row: its bytes stream to stdout as they arrive
      if len(prompts) > 1:
        out.write(f"--- {lo + 1} ---\n".encode())
      out.write(batch[0])
      out.flush()
      lm.generate(batch, seed=s.seed + lo, on_bytes=lambda _, new: write(out, new), **opts)
      out.write(b"\n")
      continue
    with tqdm(total=len(batch) * s.max_bytes, desc=f"prompts {lo + 1}-{lo + len(batch)}",
              unit="byte", leave=False, file=sys.stderr) as bar:
      texts = lm.generate(batch, seed=s.seed + lo, on_bytes=lambda _, new: bar.update(len(new)),
                          **opts)
    for i, (prompt, text) in enumerate(zip(batch, texts)):
      out.write(f"--- {lo + i + 1} ---\n".encode() + prompt + text + b"\n")
  out.flush()


def write(out, new: bytes):
  out.write(new)
  out.flush()
