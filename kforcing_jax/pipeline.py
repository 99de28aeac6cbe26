"""Runs the stages listed in `config.pipeline`, each under WORKDIR/<stage>/; a stage whose
summary.json exists is skipped (its summary is returned)."""
from __future__ import annotations

import json
import os

import jax

from kforcing_jax import config_lib
from kforcing_jax import context as context_lib
from kforcing_jax import distill
from kforcing_jax import evaluate
from kforcing_jax import sample
from kforcing_jax import stages as stages_lib
from kforcing_jax import teacher


def run_one(ctx, stage: str, names: list[str]) -> dict:
  if stage == 'teacher':
    return teacher.run_stage(ctx)
  if stage == 'sample':
    return sample.run_stage(ctx)
  if stage == 'evaluate':
    return evaluate.run_stage(ctx)
  return distill.run_stage(ctx, stage, names)


def run(cfg, workdir: str) -> dict:
  names = config_lib.stages(cfg)
  ctx = context_lib.build(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(cfg.to_json(indent=2))
  results = {}
  for stage in names:
    directory = stages_lib.stage_dir(workdir, stage)
    if stages_lib.is_done(directory):
      print(f'{stage}: {directory}/summary.json exists, stage skipped')
      results[stage] = stages_lib.read_summary(directory)
    else:
      results[stage] = run_one(ctx, stage, names)
  if jax.process_index() == 0:
    print(json.dumps({s: {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                      for s, r in results.items()}, indent=1, default=str))
  return results
