"""What each distillation objective costs per training step, at a config's shapes.

  python launch/objective_cost.py --config=configs/synthetic.py --k=4 --steps=20 \
      [--objectives=progressive,ar_rollout,mixed,on_policy] --out=DIR

Random weights (an AR model, a PFLM teacher of window k/2 and the student, the config's
model fields), one batch of the stage's batch size from the config's source, the jitted
distill step of each objective with the same compiled-once protocol: compile excluded,
median ms per step over --repeats runs of --steps steps. Writes DIR/objective_cost.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from kforcing_jax import runtime
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import random_init
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.pipeline import config_lib
from kforcing_jax.training import distill
from kforcing_jax.training import objectives
from kforcing_jax.training import optim
from kforcing_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'config file',
                                          lock_config=True)
flags.DEFINE_integer('k', 4, 'the student\'s window (its teacher: a PFLM of window k/2)')
flags.DEFINE_string('objectives', ','.join(objectives.OBJECTIVES), 'comma-separated')
flags.DEFINE_integer('steps', 20, 'steps per timed run')
flags.DEFINE_integer('repeats', 3, 'timed runs (median)')
flags.DEFINE_string('out', None, 'output directory')
FLAGS = flags.FLAGS


def main(_):
  runtime.quiet_library_logs()
  cfg, k = _CONFIG.value, FLAGS.k
  config_lib.validate(cfg)
  stage = f'distill_k{k}'
  s = cfg.stages[stage]
  tok = data_lib.make_tokenizer(cfg)
  _, exe = arch_lib.configs_from_run(cfg, tok.vocab_size, tok.never_emit_ids)
  pflm, t_params = random_init.random_model(cfg, tok.vocab_size)
  arch = dataclasses.replace(pflm, pflm=False)
  ar_params = {n: v for n, v in t_params.items() if n != 'noise_encoder'}
  mesh = sharding_lib.make_mesh(cfg.mesh)
  ar_model, t_model, student = (model_lib.build(a, exe) for a in (arch, pflm, pflm))
  batch = next(data_lib.BatchIterator(data_lib.make_source(cfg), 'train', s.batch_size,
                                      sharding_lib.batch_sharding(mesh), 0))
  tx = optim.make_optimizer(s.opt, s.steps)
  rows = []
  for name in [n for n in FLAGS.objectives.split(',') if n]:
    obj = objectives.get(name)
    teacher_k = k // 2
    models = objectives.Models(teacher=t_model if teacher_k else ar_model,
                               teacher_k=teacher_k, ar=ar_model if teacher_k else None,
                               student=student, k=k)
    frozen = {'teacher': t_params if teacher_k else ar_params}
    if teacher_k:
      frozen['ar'] = ar_params
    step_fn = distill.make_distill_step(student, obj, obj.make_targets(models, s), tx, k=k,
                                        settings=s, never_emit=tuple(pflm.never_emit_ids))
    state, _, shardings = trainer.create_state(model_lib.init_fn(student, cfg.data.seq_len),
                                               tx, mesh, jax.random.key(0), False)
    step = trainer.jit_step(step_fn, shardings, mesh,
                            (jax.tree.map(lambda x: x.sharding, frozen),))
    with sharding_lib.mesh_context(mesh):
      state, m = step(state, batch, jax.random.key(1), frozen)  # compile
      jax.block_until_ready(m)
      times = []
      for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
          state, m = step(state, batch, jax.random.key(1), frozen)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - t0) / FLAGS.steps)
    ms = 1000 * statistics.median(times)
    row = {'objective': name, 'k': k, 'batch': s.batch_size, 'seq_len': cfg.data.seq_len,
           'ms_per_step': ms, 'target_passes_per_window': obj.target_passes(models)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  base = next((r['ms_per_step'] for r in rows if r['objective'] == 'progressive'), None)
  for r in rows:
    r['vs_progressive'] = None if base is None else r['ms_per_step'] / base
  result = {**runtime.machine(), 'rows': rows}
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, 'objective_cost.json'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  print('| objective | ms/step | vs progressive | target passes / window |')
  print('|---|---|---|---|')
  for r in rows:
    vs = '-' if r['vs_progressive'] is None else f'{r["vs_progressive"]:.2f}'
    print(f'| {r["objective"]} | {r["ms_per_step"]:.1f} | {vs} | '
          f'{r["target_passes_per_window"]:g} |')


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
