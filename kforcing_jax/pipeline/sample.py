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

import jax

from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.pipeline import run_dir
from kforcing_jax.training import writers


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
  tok = model.require_tokenizer()
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
  for stage in run_dir.finished_model_stages(ctx.workdir):
    sampler = run_dir.load_sampler(ctx.workdir, stage, mesh=ctx.mesh)
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
