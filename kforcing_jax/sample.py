"""Sampling from any finished stage, and the `sample` pipeline stage.

  python -m kforcing_jax.sample --workdir=DIR --stage=distill_k4 [--K=4] \
      [--freq_penalty=0.5] (--prompt=TEXT | --prompts=FILE.jsonl) --num_samples=N \
      --out=FILE.jsonl

A prompts file has one {"prefix": "..."} per line. Output: one JSON line per sample with
the prompt, its token ids, the completion text and ids, and the decoding settings.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import jax

from kforcing_jax import config_lib
from kforcing_jax import data as data_lib
from kforcing_jax import decode
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import stages as stages_lib
from kforcing_jax import writers


def encode_prompt(tok, text: str) -> list[int]:
  ids = tok.encode(text)
  if tok.add_bos_eos and ids and ids[-1] == tok.eos_id:
    ids = ids[:-1]  # keep [CLS] ..., drop the closing [SEP]: the sentence goes on
  return ids


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


def spec_for(meta: dict, tok, K: int | None, freq_penalty: float, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_at_eos: bool = True) -> decode.DecodeSpec:
  k_model = int(meta['k'])
  pflm = k_model > 0
  if K is None:
    K = k_model if pflm else 1
  if not pflm and K != 1:
    raise decode.DecodeError(f'--K={K}: the AR teacher decodes one token per step (K=1)')
  if pflm and not 1 <= K <= k_model:
    raise decode.DecodeError(f'--K={K} is not allowed for {meta["stage"]} (window '
                             f'k={k_model}); allowed: 1..{k_model}')
  return decode.DecodeSpec(K=K, pflm=pflm, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           freq_penalty=freq_penalty if pflm else 0.0,
                           eos_id=tok.eos_id if stop_at_eos else -1, pad_id=tok.pad_id)


def sample_texts(workdir: str, stage: str, prompts: list[str], num_samples: int, *,
                 K=None, freq_penalty=0.0, max_new_tokens=None, seed=0, temperature=1.0,
                 top_k=0, top_p=1.0, mesh=None) -> list[dict]:
  cfg = stages_lib.load_run_config(workdir)
  tok = data_lib.make_tokenizer(cfg)
  mesh = mesh or sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  mcfg, params, meta, _ = stages_lib.load_model_stage(workdir, stage, mesh)
  if meta['compat']['tokenizer'] != tok.identity():
    raise stages_lib.StageError(f'{stage} was trained with tokenizer '
                                f'{meta["compat"]["tokenizer"]}, {workdir}/config.json gives '
                                f'{tok.identity()}')
  encoded = [encode_prompt(tok, p) for p in prompts]
  for p, ids in zip(prompts, encoded):
    if not ids:
      raise decode.DecodeError(f'prompt {p!r} encodes to no tokens')
  longest = max(len(e) for e in encoded)
  if max_new_tokens is None:
    max_new_tokens = mcfg.max_seq_len - longest
  spec = spec_for(meta, tok, K, freq_penalty, max_new_tokens, temperature, top_k, top_p)
  engine = decode.Engine(mcfg, params)
  rows = [e for e in encoded for _ in range(num_samples)]
  seeds = list(range(len(rows)))
  out, _ = engine.generate(rows, spec, seed=seed, row_seeds=seeds, k_model=int(meta['k']))
  results = []
  for i, (ids, gen) in enumerate(zip(rows, out)):
    gen = [int(t) for t in gen]
    if tok.eos_id in gen:
      gen = gen[:gen.index(tok.eos_id) + 1]
    results.append({'prompt': prompts[i // num_samples], 'prompt_ids': ids,
                    'completion': tok.decode(gen), 'completion_ids': gen, 'stage': stage,
                    'K': spec.K, 'freq_penalty': spec.freq_penalty, 'seed': seed,
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


def run_stage(ctx, names: list[str]) -> dict:
  """Writes WORKDIR/sample/<stage>_K<K>.jsonl for each finished model stage."""
  cfg = ctx.cfg
  out_dir = os.path.join(ctx.workdir, 'sample')
  if stages_lib.is_done(out_dir):
    print(f'sample: {out_dir}/summary.json exists, stage skipped')
    with open(os.path.join(out_dir, 'summary.json'), encoding='utf-8') as f:
      return json.load(f)
  eval_it = data_lib.BatchIterator(ctx.source, 'eval', cfg.data.eval_batch_size, None,
                                   cfg.seed, cfg.data.shuffle)
  rows = eval_it.local_batch(0)
  plen = cfg.sample.prompt_len
  prompts = [ctx.tokenizer.decode(r[:plen]) for r in rows['tokens'][:cfg.sample.num_prompts]]
  files = {}
  for stage in stages_lib.finished_model_stages(ctx.workdir):
    recs = sample_texts(ctx.workdir, stage, prompts, cfg.sample.num_samples,
                        freq_penalty=cfg.sample.freq_penalty,
                        max_new_tokens=cfg.sample.max_new_tokens, seed=cfg.seed,
                        mesh=ctx.mesh)
    path = os.path.join(out_dir, f'{stage}_K{recs[0]["K"]}.jsonl')
    write_jsonl(path, recs)
    files[stage] = path
    print(f'sample: {len(recs)} samples of {stage} -> {path}')
  summary = {'stage': 'sample', 'files': files}
  writers.write_json(os.path.join(out_dir, 'summary.json'), summary)
  return summary


FLAGS = flags.FLAGS


def main(argv):
  del argv
  from kforcing_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.initialize()
  f = FLAGS
  if bool(f.prompt) == bool(f.prompts):
    raise app.UsageError('give exactly one of --prompt=TEXT or --prompts=FILE.jsonl')
  try:
    config_lib.stage_k(f.stage)
  except config_lib.ConfigError as e:
    raise SystemExit(f'error: --stage: {e}') from None
  prompts = [f.prompt] if f.prompt else read_prompts(f.prompts)
  if any(not p.strip() for p in prompts):
    raise SystemExit('error: empty prompt: give some text to continue')
  from kforcing_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    recs = sample_texts(f.workdir, f.stage, prompts, f.num_samples, K=f.K,
                        freq_penalty=f.freq_penalty, max_new_tokens=f.max_new_tokens,
                        seed=f.seed, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  write_jsonl(f.out, recs)
  for r in recs[:3]:
    print(json.dumps({'prompt': r['prompt'], 'completion': r['completion']}))
  print(f'wrote {len(recs)} samples to {f.out}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory')
  flags.DEFINE_string('stage', None, 'teacher | distill_k1 | distill_k2 | distill_k4 | ...')
  flags.DEFINE_integer('K', None, 'tokens per step (PFLM: 1..k; default k)')
  flags.DEFINE_float('freq_penalty', 0.0, 'PFLM frequency penalty lambda (released: 0.5)')
  flags.DEFINE_string('prompt', None, 'one prompt text')
  flags.DEFINE_string('prompts', None, 'JSONL file with one {"prefix": ...} per line')
  flags.DEFINE_integer('num_samples', 1, 'samples per prompt')
  flags.DEFINE_integer('max_new_tokens', None, 'default: up to the model length')
  flags.DEFINE_integer('seed', 0, 'noise seed')
  flags.DEFINE_float('temperature', 1.0, 'AR sampling temperature (0 = greedy)')
  flags.DEFINE_integer('top_k', 0, 'AR top-k (0 = off)')
  flags.DEFINE_float('top_p', 1.0, 'AR top-p (1 = off)')
  flags.DEFINE_string('out', None, 'output JSONL')
  flags.mark_flags_as_required(['workdir', 'stage', 'out'])
  app.run(main)
