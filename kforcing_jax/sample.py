"""Sampling from any finished stage or export.

  python -m kforcing_jax.sample (--workdir=DIR --stage=distill_k4 | --export=DIR) [--K=4] \
      [--freq_penalty=0.5] (--prompt=TEXT | --prompts=FILE.jsonl) [--prompt_max_tokens=6] \
      --num_samples=N --out=FILE.jsonl

A prompts file has one {"prefix": "..."} per line (the released prompt files' format);
special tokens written in a prompt ('<|endoftext|>', '[CLS]') are single ids, as the
released tokenizers give them. Output: one JSON line per sample with the prompt, its token
ids, the completion text and ids, and the decoding settings.
"""
from __future__ import annotations

import json

from absl import flags

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax.interop import export as export_lib
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run_dir
from kforcing_jax.pipeline.sample import read_prompts, sample_records, write_jsonl


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory', flag_values=fv)
  flags.DEFINE_string('stage', None, 'teacher | distill_k1 | distill_k2 | distill_k4 | ...',
                      flag_values=fv)
  flags.DEFINE_string('export', None, 'an exported or imported model directory',
                      flag_values=fv)
  flags.DEFINE_string('tokenizer_path', None, 'tokenizer files for --export (default: where '
                      'the export says they were)', flag_values=fv)
  flags.DEFINE_integer('prompt_max_tokens', 0, 'keep the first N prompt ids (0 = all)',
                       flag_values=fv)
  flags.DEFINE_integer('K', None, 'tokens per step (PFLM: 1..k; default k)', flag_values=fv)
  flags.DEFINE_float('freq_penalty', 0.0,
                     'frequency penalty lambda (the released PFLM sampler: 0.5)',
                     flag_values=fv)
  flags.DEFINE_string('prompt', None, 'one prompt text', flag_values=fv)
  flags.DEFINE_string('prompts', None, 'JSONL file with one {"prefix": ...} per line',
                      flag_values=fv)
  flags.DEFINE_integer('num_samples', 1, 'samples per prompt', flag_values=fv)
  flags.DEFINE_integer('max_new_tokens', None, 'default: up to the model length',
                       flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'noise seed', flag_values=fv)
  flags.DEFINE_float('temperature', 1.0, 'AR sampling temperature (0 = greedy)',
                     flag_values=fv)
  flags.DEFINE_integer('top_k', 0, 'AR top-k (0 = off)', flag_values=fv)
  flags.DEFINE_float('top_p', 1.0, 'AR top-p (1 = off), after the temperature',
                     flag_values=fv)
  flags.DEFINE_string('sampler', 'categorical', 'AR sampler: categorical (Gumbel-max) | '
                      'inverse_cdf (the push-forward map of a shared u)', flag_values=fv)
  flags.DEFINE_string('dtype', 'float32', 'serving precision: float32 | mixed | bfloat16 | '
                      'int8 | auto', flag_values=fv)
  flags.DEFINE_string('out', None, 'output JSONL', flag_values=fv)
  flags.mark_flags_as_required(['out'], flag_values=fv)


def run(f) -> list[dict]:
  """Samples as the flags say, writes --out; the records."""
  if bool(f.prompt) == bool(f.prompts):
    raise SystemExit('error: give exactly one of --prompt=TEXT or --prompts=FILE.jsonl')
  if bool(f.export) == bool(f.workdir) or bool(f.workdir) != bool(f.stage):
    raise SystemExit('error: give --workdir=RUN with --stage=STAGE, or --export=DIR')
  if f.stage:
    try:
      run_dir.stage_k(run_dir.load_run_config(f.workdir), f.stage)
    except errors.UserError as e:
      raise SystemExit(f'error: --stage: {e}') from None
  prompts = [f.prompt] if f.prompt else read_prompts(f.prompts)
  if any(not p.strip() for p in prompts):
    raise SystemExit('error: empty prompt: give some text to continue')
  runtime.initialize()
  if f.export:
    sampler = export_lib.load(f.export, dtype=f.dtype, tokenizer_path=f.tokenizer_path)
  else:
    sampler = run_dir.load_sampler(f.workdir, f.stage, dtype=f.dtype)
  settings = dict(K=f.K, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                  sampler=f.sampler, freq_penalty=f.freq_penalty)
  recs = sample_records(sampler, prompts, f.num_samples, max_new_tokens=f.max_new_tokens,
                        seed=f.seed, prompt_max_tokens=f.prompt_max_tokens, **settings)
  write_jsonl(f.out, recs)
  for r in recs[:3]:
    print(json.dumps({'prompt': r['prompt'], 'completion': r['completion']}))
  print(f'wrote {len(recs)} samples to {f.out}')
  return recs


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
