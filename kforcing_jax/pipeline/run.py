"""Runs the stages listed in `config.pipeline`, each under WORKDIR/<stage>/; a stage whose
summary.json exists is skipped (its summary is returned)."""
from __future__ import annotations

import json
import os
import time

import jax

from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import context as context_lib
from kforcing_jax.training import distill
from kforcing_jax.evaluation import evaluate
from kforcing_jax.pipeline import sample
from kforcing_jax.pipeline import run_dir
from kforcing_jax.training import teacher
from kforcing_jax.training import writers


# What runs a stage, by the `kind` of its section; sample and evaluate have no section.
STAGE_KINDS = {'teacher': teacher.run_stage, 'distill': distill.run_stage}


def run_one(ctx, stage: str) -> dict:
  if stage == 'sample':
    return sample.run_stage(ctx)
  if stage == 'evaluate':
    return evaluate_stage(ctx)
  return STAGE_KINDS[ctx.cfg.stages[stage].kind](ctx, stage)


def run(cfg, workdir: str) -> dict:
  names = config_lib.stages(cfg)
  ctx = context_lib.build(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(cfg.to_json(indent=2))
  results = {}
  for stage in names:
    directory = run_dir.stage_dir(workdir, stage)
    if run_dir.is_done(directory):
      print(f'{stage}: {directory}/summary.json exists, stage skipped')
      results[stage] = run_dir.read_summary(directory)
    else:
      results[stage] = run_one(ctx, stage)
  if jax.process_index() == 0:
    print(json.dumps({s: {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                      for s, r in results.items()}, indent=1, default=str))
  return results


def evaluate_stage(ctx) -> dict:
  out_dir = os.path.join(ctx.workdir, 'evaluate')
  t0 = time.time()
  report = evaluate.evaluate(ctx.cfg, ctx.source, *run_dir.stage_samplers(ctx.workdir, ctx.mesh))
  evaluate.write_report(report, out_dir, ctx.workdir)
  print(f'evaluate: wrote {out_dir}/report.json, report.md, report.png')
  print(evaluate.markdown(report))
  summary = {'stage': 'evaluate', 'rows': report['rows'], 'seconds': time.time() - t0,
             'source_entropy_rate': report['source_entropy_rate']}
  writers.write_json(os.path.join(out_dir, 'summary.json'), summary)
  return summary
