"""Mode `eval`: restore a run's checkpoint and score the documents it held out (or all of
`eval.corpus`), writing `<workdir>/eval.json` (`eval_<field>-<value>.json` when the
invocation changes how the model computes: `model.zero_global`, `model.dtype`)."""
from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx

from blt_jax import api, bpe, checkpoint, entropy, files, models, train
from blt_jax.errors import UserError
from blt_jax.evaluate import Evaluator
from blt_jax.patcher import BatchPatcher
from blt_jax.splits import SPLIT_FILE, Split, Splits


def run(config: ml_collections.ConfigDict, workdir: Path):
  changes = {}
  if config.model.kind == api.PRETRAINED:
    lm = api.for_config(config, workdir)
    config = ml_collections.ConfigDict(
        {**config.to_dict(), "data": {**config.data.to_dict(), "seq_len": lm.seq_len}})
    splits = Splits(config)  # this config's split of data.corpus (or all of eval.corpus)
    workdir.mkdir(parents=True, exist_ok=True)
  else:
    lm, config, splits, changes = restore(config, workdir)
  transform = None
  if lm.patcher is not None:
    rule, entropy_lm = lm.patcher.rule, lm.patcher.lm
    h = (entropy.corpus_entropies(entropy_lm, splits.eval_corpus, config.data.cache_dir)
         if rule.uses_entropy else None)
    transform = BatchPatcher(rule, h)
  if lm.bpe is not None:  # one token slot per byte: every window fits
    transform = bpe.TokenWindows(lm.bpe, lm.seq_len)
  batches, total = splits.eval_batches(config, config.eval.max_bytes, transform)
  graphdef, state = nnx.split(lm.model)
  result = Evaluator(graphdef)(state, (train.to_device(b) for b in batches), total=total)
  result.update(step=lm.step, corpus=config.eval.corpus or f"{config.data.corpus} (held-out)")
  name = "eval.json"
  if changes:  # an ablation or another dtype: the run's own eval.json stays
    result["model_changes"] = changes
    name = "eval_" + "_".join(f"{k}-{v}" for k, v in sorted(changes.items())) + ".json"
  if config.model.kind == api.PRETRAINED:
    result["pretrained"] = str(config.model.path)
  files.write_json(workdir / name, result)
  print(f"{workdir} step {lm.step}: bpb {result['bpb']:.4f}  loss {result['loss']:.4f}  "
        f"accuracy {result['accuracy']:.3f}  perplexity {result['perplexity']:.3f}  "
        f"on {result['bytes']} bytes of {result['corpus']}")


def runtime_changes(config: ml_collections.ConfigDict, saved: dict) -> dict:
  """The fields of how the model computes that this invocation changes from the run's
  (an ablation such as `model.zero_global`, or another dtype); a field the run's config
  predates had its default."""
  was = {**models.default_fields(saved["model"]["kind"]), **saved["model"]}
  return {k: v for k, v in config.model.to_dict().items()
          if k in checkpoint.RUNTIME_FIELDS and k in was and v != was[k]}


def restore(config: ml_collections.ConfigDict, workdir: Path):
  """A trained run's model (with this invocation's changes of how it computes), its own
  config (with this invocation's eval section and cache), the documents it held out, and
  those changes."""
  saved, _ = checkpoint.read_config(workdir, config.eval.step)
  checkpoint.check_same_model(saved, config.model.to_dict(), workdir,
                              models.default_fields(config.model.kind))
  changes = runtime_changes(config, saved)
  lm = api.load(workdir, config.eval.step, runtime=changes)
  config = ml_collections.ConfigDict({**lm.config.to_dict(), "eval": config.eval.to_dict(),
                                      "data": {**lm.config.data.to_dict(),
                                               "cache_dir": config.data.cache_dir}})
  recorded = Split.load(workdir)
  if recorded is None and not config.eval.corpus:
    raise UserError(f"{workdir} has no {SPLIT_FILE}: it was trained before runs recorded "
                    "their held-out split, so its held-out documents are unknown; "
                    "evaluate it on eval.corpus")
  return lm, config, Splits(config, recorded), changes
