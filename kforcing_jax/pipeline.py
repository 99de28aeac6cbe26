"""Runs the stages listed in `config.pipeline`, each under WORKDIR/<stage>/."""
from __future__ import annotations

import json
import os

import jax

from kforcing_jax import config_lib
from kforcing_jax import train as train_lib


def run(cfg, workdir: str) -> dict:
  names = config_lib.stages(cfg)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(cfg.to_json(indent=2))
  ctx = train_lib.build_context(cfg, workdir)
  results = {}
  for stage in names:
    if stage == 'teacher':
      results[stage] = train_lib.run_teacher(ctx)
    elif stage.startswith('distill_k'):
      from kforcing_jax import distill  # pylint: disable=g-import-not-at-top
      results[stage] = distill.run_stage(ctx, stage, names)
    elif stage == 'sample':
      from kforcing_jax import sample  # pylint: disable=g-import-not-at-top
      results[stage] = sample.run_stage(ctx, names)
    elif stage == 'evaluate':
      from kforcing_jax import evaluate  # pylint: disable=g-import-not-at-top
      results[stage] = evaluate.run_stage(ctx, names)
  if jax.process_index() == 0:
    print(json.dumps({s: {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                      for s, r in results.items()}, indent=1, default=str))
  return results
