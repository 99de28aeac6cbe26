"""Sampling from any finished stage, and the `sample` pipeline stage.

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
import os

from absl import app
from absl import flags
import jax

from kforcing_jax import data as data_lib
from kforcing_jax import errors
from kforcing_jax import export as export_lib
from kforcing_jax import runtime
from kforcing_jax import sampler as sampler_lib
from kforcing_jax import stages as stages_lib
from kforcing_jax import writers


def read_prompts(path: str) -> list[str]:
  if not os.path.exists(path):
    raise FileNotFoundError(f'--prompts={path!r} does not exist')
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      rec = json.loads(line)
      if 'prefix' not in rec:
        raise ValueError(f'{path}:{n}: each line needs a "prefix" field, got {sorted(rec)}')
      out.append(rec['prefix'])
  return out


def sample_records(model: sampler_lib.Sampler, prompts: list[str], num_samples: int, *,
                   max_new_tokens=None, seed=0, prompt_max_tokens: int = 0,
                   **settings) -> list[dict]:
  """num_samples samples of each prompt text (row i has row seed i), as JSON records."""
  tok = model._tok()  # pylint: disable=protected-access
  encoded = model.encode_prompts(prompts, prompt_max_tokens)
  rows = [e for e in encoded for _ in range(num_samples)]
  seeds = list(range(len(rows)))
  out = model.generate_ids(rows, max_new_tokens, seed=seed, row_seeds=seeds, **settings)
  K = settings.get('K') or max(model.k, 1)
  results = []
  for i, (ids, gen) in enumerate(zip(rows, out)):
    gen = sampler_lib.cut_at_eos(gen, tok.eos_id)
    results.append({'prompt': prompts[i // num_samples], 'prompt_ids': ids,
                    'completion': tok.decode(gen), 'completion_ids': gen,
                    'stage': model.description.get('stage'), 'K': K,
                    'freq_penalty': settings.get('freq_penalty', 0.0), 'seed': seed,
                    'row_seed': seeds[i]})
  return results


def write_jsonl(path: str, records: list[dict]) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)


def run_stage(ctx) -> dict:
  """Writes WORKDIR/sample/<stage>_K<K>.jsonl for each finished model stage."""
  cfg = ctx.cfg
  out_dir = os.path.join(ctx.workdir, 'sample')
  eval_it = data_lib.BatchIterator(ctx.source, 'eval', cfg.data.eval_batch_size, None,
                                   cfg.seed, cfg.data.shuffle)
  rows = eval_it.local_batch(0)
  plen = cfg.sample.prompt_len
  prompts = [ctx.tokenizer.decode(r[:plen]) for r in rows['tokens'][:cfg.sample.num_prompts]]
  files = {}
  for stage in stages_lib.finished_model_stages(ctx.workdir):
    sampler = sampler_lib.Sampler.from_workdir(ctx.workdir, stage, mesh=ctx.mesh)
    longest = max(len(p) for p in sampler.encode_prompts(prompts))
    recs = sample_records(sampler, prompts, cfg.sample.num_samples,
                          max_new_tokens=min(cfg.sample.max_new_tokens,
                                             sampler.engine.max_len - longest), seed=cfg.seed,
                          freq_penalty=cfg.sample.freq_penalty if sampler.k else 0.0)
    path = os.path.join(out_dir, f'{stage}_K{recs[0]["K"]}.jsonl')
    write_jsonl(path, recs)
    files[stage] = path
    print(f'sample: {len(recs)} samples of {stage} -> {path}')
  summary = {'stage': 'sample', 'files': files}
  writers.write_json(os.path.join(out_dir, 'summary.json'), summary)
  return summary


def main(argv):
  del argv
  runtime.quiet_library_logs()
  runtime.initialize()
  f = FLAGS
  if bool(f.prompt) == bool(f.prompts):
    raise app.UsageError('give exactly one of --prompt=TEXT or --prompts=FILE.jsonl')
  if bool(f.export) == bool(f.workdir) or bool(f.workdir) != bool(f.stage):
    raise app.UsageError('give --workdir=RUN with --stage=STAGE, or --export=DIR')
  if f.stage:
    try:
      stages_lib.stage_k(f.stage)
    except errors.UserError as e:
      raise SystemExit(f'error: --stage: {e}') from None
  prompts = [f.prompt] if f.prompt else read_prompts(f.prompts)
  if any(not p.strip() for p in prompts):
    raise SystemExit('error: empty prompt: give some text to continue')
  try:
    if f.export:
      sampler = export_lib.load(f.export, dtype=f.dtype, tokenizer_path=f.tokenizer_path)
    else:
      sampler = sampler_lib.Sampler.from_workdir(f.workdir, f.stage, dtype=f.dtype)
    settings = dict(K=f.K, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                    sampler=f.sampler)
    if sampler.k:
      settings['freq_penalty'] = f.freq_penalty
    recs = sample_records(sampler, prompts, f.num_samples, max_new_tokens=f.max_new_tokens,
                          seed=f.seed, prompt_max_tokens=f.prompt_max_tokens, **settings)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  write_jsonl(f.out, recs)
  for r in recs[:3]:
    print(json.dumps({'prompt': r['prompt'], 'completion': r['completion']}))
  print(f'wrote {len(recs)} samples to {f.out}')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory')
  flags.DEFINE_string('stage', None, 'teacher | distill_k1 | distill_k2 | distill_k4 | ...')
  flags.DEFINE_string('export', None, 'an exported or imported model directory')
  flags.DEFINE_string('tokenizer_path', None, 'tokenizer files for --export (default: where '
                      'the export says they were)')
  flags.DEFINE_integer('prompt_max_tokens', 0, 'keep the first N prompt ids (0 = all)')
  flags.DEFINE_integer('K', None, 'tokens per step (PFLM: 1..k; default k)')
  flags.DEFINE_float('freq_penalty', 0.0, 'PFLM frequency penalty lambda (released: 0.5)')
  flags.DEFINE_string('prompt', None, 'one prompt text')
  flags.DEFINE_string('prompts', None, 'JSONL file with one {"prefix": ...} per line')
  flags.DEFINE_integer('num_samples', 1, 'samples per prompt')
  flags.DEFINE_integer('max_new_tokens', None, 'default: up to the model length')
  flags.DEFINE_integer('seed', 0, 'noise seed')
  flags.DEFINE_float('temperature', 1.0, 'AR sampling temperature (0 = greedy)')
  flags.DEFINE_integer('top_k', 0, 'AR top-k (0 = off)')
  flags.DEFINE_float('top_p', 1.0, 'AR top-p (1 = off), after the temperature')
  flags.DEFINE_string('sampler', 'categorical', 'AR sampler: categorical (Gumbel-max) | '
                      'inverse_cdf (the push-forward map of a shared u)')
  flags.DEFINE_string('dtype', 'float32', 'serving precision: float32 | mixed | bfloat16 | auto')
  flags.DEFINE_string('out', None, 'output JSONL')
  flags.mark_flags_as_required(['out'])
  app.run(main)
