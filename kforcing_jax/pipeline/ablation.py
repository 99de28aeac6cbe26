"""Ablations of distillation settings: named variants of one config, run at the config's
own step budget, one pipeline run each, compared on the `evaluate` stage's numbers.

A variant edits the distill stages of window k >= 2 (at k = 1 with an AR teacher every
hard-target objective has the same targets); one that changes the student's readout
edits every distill stage and the model section. The stages all variants leave equal (the
teacher, usually distill_k1) are trained once per seed in SEED_DIR/shared and linked into
each variant's run directory. A rerun skips finished stages, variants included.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Callable

import numpy as np

from kforcing_jax import errors
from kforcing_jax.configs import base
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.pipeline import run_dir
from kforcing_jax.training import objectives as objectives_lib
from kforcing_jax.training import writers


@dataclasses.dataclass(frozen=True)
class Variant:
  description: str
  edit: Callable[[object], None]  # edits one distill stage section (k >= 2) in place
  # the student readout it trains (model.readout); where a k = 1 stage's objective trains
  # another readout, the variant's edit applies there too (argmax variants: progressive)
  readout: str = 'argmax'


def _set(objective: str, **fields) -> Callable[[object], None]:
  """Sets every objective field (the rest to their defaults), so a variant means the same
  whatever the config's own recipe."""
  default = base.distill_stage(2)
  values = {f: default[f] for f in ('ar_fraction', 'ar_fraction_end', 'position_power',
                                    'cdf_margin')}
  values.update(objective=objective, **fields)
  return lambda s: s.update(values)


VARIANTS: dict[str, Variant] = {
    'progressive': Variant("the paper's targets", _set('progressive')),
    'ar_rollout': Variant("the AR teacher's own k-token rollout at every stage",
                          _set('ar_rollout')),
    'mixed': Variant('half the windows ar_rollout, half progressive',
                     _set('mixed', ar_fraction=0.5)),
    'curriculum': Variant('progressive at the start, ar_rollout by the end (linear)',
                          _set('mixed', ar_fraction=0.0, ar_fraction_end=1.0)),
    'on_policy': Variant("the AR teacher's token after the student's own earlier tokens",
                         _set('on_policy')),
    'position_weighted': Variant('progressive, cross-entropy weight ~ window position',
                                 _set('progressive', position_power=1.0)),
    'on_policy_weighted': Variant('on_policy, cross-entropy weight ~ window position',
                                  _set('on_policy', position_power=1.0)),
    'on_policy_soft': Variant('on_policy_weighted learnt as soft targets over the CDF '
                              'neighbourhood of u (cdf_margin 0.02)',
                              _set('on_policy_soft', position_power=1.0, cdf_margin=0.02)),
    'on_policy_soft_wide': Variant('on_policy_soft with cdf_margin 0.1',
                                   _set('on_policy_soft', position_power=1.0,
                                        cdf_margin=0.1)),
    'inverse_cdf_kl': Variant("inverse-CDF readout, on_policy_kl at every stage (the AR "
                              "teacher's distributions), weight ~ window position",
                              _set('on_policy_kl', position_power=1.0), 'inverse_cdf'),
}


def variant_config(cfg, name: str, seed: int):
  """A copy of cfg with the variant's edits on its distill stages of k >= 2 and the seed."""
  if name not in VARIANTS:
    raise errors.UserError(f'--variants: {name!r} is not known; allowed: '
                           f'{", ".join(VARIANTS)}')
  out = copy.deepcopy(cfg)
  v = VARIANTS[name]
  with out.unlocked():
    out.seed = seed
    out.model.readout = v.readout
    for stage in config_lib.stages(out):
      s = out.stages.get(stage)
      if s is None or s.kind != 'distill':
        continue
      if s.k >= 2:
        v.edit(s)
      elif objectives_lib.get(s.objective).readout != v.readout:
        # k = 1: hard-target objectives all teach the AR teacher's inverse-CDF tokens, so
        # the argmax variants share one k = 1 stage
        (v.edit if v.readout != 'argmax' else _set('progressive'))(s)
  config_lib.validate(out)
  return out


def shared_stages(cfgs: list) -> list[str]:
  """The pipeline's leading model stages whose sections are equal in every config."""
  names = config_lib.stages(cfgs[0])
  shared = []
  for stage in names:
    if stage not in cfgs[0].stages:
      break
    if any(c.stages[stage].to_dict() != cfgs[0].stages[stage].to_dict() for c in cfgs[1:]):
      break
    shared.append(stage)
  return shared


def run(cfg, workdir: str, variants: list[str], seeds: list[int]) -> dict:
  """Runs every variant for every seed under workdir/seed<s>/<variant>; writes and returns
  the table (ablation.json / .md / .png in workdir)."""
  if not variants or len(set(variants)) != len(variants):
    raise errors.UserError(f'--variants={",".join(variants)}: name each variant once')
  if 'evaluate' not in config_lib.stages(cfg):
    raise errors.UserError('the config\'s pipeline must end with evaluate: the ablation '
                           'compares the evaluate stage\'s numbers')
  for seed in seeds:
    cfgs = [variant_config(cfg, v, seed) for v in variants]
    shared = shared_stages(cfgs)
    seed_dir = os.path.join(workdir, f'seed{seed}')
    if shared:
      shared_cfg = copy.deepcopy(cfgs[0])
      shared_cfg.pipeline = tuple(shared)
      pipeline.run(shared_cfg, os.path.join(seed_dir, 'shared'))
    for name, vcfg in zip(variants, cfgs):
      vdir = os.path.join(seed_dir, name)
      os.makedirs(vdir, exist_ok=True)
      for stage in shared:
        link = os.path.join(vdir, stage)
        if not os.path.lexists(link):
          os.symlink(os.path.join('..', 'shared', stage), link)
      t0 = time.time()
      print(f'ablation: seed {seed}, variant {name}: {VARIANTS[name].description}', flush=True)
      pipeline.run(vcfg, vdir)
      print(f'ablation: seed {seed}, variant {name} done in {time.time() - t0:.0f} s')
  table = collect(workdir, variants, seeds)
  write(table, workdir)
  return table


def collect(workdir: str, variants: list[str], seeds: list[int]) -> dict:
  """Per variant and seed: the widest student's evaluate row at K = k (lambda 0) as ratios
  to the teacher row of the same report, and the variant's own training seconds."""
  rows = []
  for seed in seeds:
    for name in variants:
      vdir = os.path.join(workdir, f'seed{seed}', name)
      with open(os.path.join(vdir, 'evaluate', 'report.json'), encoding='utf-8') as f:
        report = json.load(f)
      key = 'exact' if 'exact' in report['rows'][0]['gen_nll'] else 'teacher'
      ref = next(r for r in report['rows'] if r['model'] == 'teacher')
      students = [r for r in report['rows'] if r['model'] != 'teacher' and
                  r['freq_penalty'] == 0.0]
      widest = max(int(r['model'][1:]) for r in students)
      row = next(r for r in students if r['model'] == f'k{widest}' and r['K'] == widest)
      cfg = run_dir.load_run_config(vdir)
      trained = [s for s in run_dir.finished_model_stages(vdir, cfg)
                 if not os.path.islink(os.path.join(vdir, s))]
      summaries = {s: run_dir.read_summary(os.path.join(vdir, s)) for s in trained}
      rows.append({
          'variant': name, 'seed': seed, 'model': row['model'], 'K': row['K'],
          'nll': row['gen_nll'][key], 'nll_key': key,
          'nll_ratio': row['gen_nll'][key] / ref['gen_nll'][key],
          'entropy_ratio': row['entropy'] / ref['entropy'],
          'agreement_all': row['agreement_all'],
          'stage_agreement': {s: v.get('agreement_all') for s, v in summaries.items()},
          'train_seconds': sum(v['seconds'] for v in summaries.values()),
          'steps': sum(v['steps'] for v in summaries.values())})
  return {'rows': rows, 'summary': summarise(rows, variants),
          'variants': {v: VARIANTS[v].description for v in variants}}


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
  out = []
  for name in variants:
    mine = [r for r in rows if r['variant'] == name]
    entry = {'variant': name, 'seeds': len(mine)}
    for f in ('nll_ratio', 'entropy_ratio', 'agreement_all', 'train_seconds'):
      vals = np.asarray([r[f] for r in mine], np.float64)
      entry[f] = float(vals.mean())
      entry[f + '_std'] = float(vals.std(ddof=1)) if len(vals) > 1 else None
    out.append(entry)
  return out


def markdown(table: dict) -> str:
  lines = ['| variant | seeds | NLL / teacher\'s | entropy / teacher\'s | agreement (all K) '
           '| training s (own stages) | what it does |', '|---|---|---|---|---|---|---|']

  def fmt(e, f, digits=4):
    std = e[f + '_std']
    return f'{e[f]:.{digits}f}' + ('' if std is None else f' ± {std:.{digits}f}')
  for e in table['summary']:
    lines.append(f'| {e["variant"]} | {e["seeds"]} | {fmt(e, "nll_ratio")} | '
                 f'{fmt(e, "entropy_ratio")} | {fmt(e, "agreement_all")} | '
                 f'{fmt(e, "train_seconds", 0)} | {table["variants"][e["variant"]]} |')
  return '\n'.join(lines) + '\n'


def write(table: dict, workdir: str) -> None:
  writers.write_json(os.path.join(workdir, 'ablation.json'), table)
  with open(os.path.join(workdir, 'ablation.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(table))
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  rows = table['rows']
  agree = [r['agreement_all'] for r in rows]
  sc = ax.scatter([r['entropy_ratio'] for r in rows], [r['nll_ratio'] for r in rows], c=agree,
                  cmap='viridis')
  for r in rows:
    ax.annotate(f'{r["variant"]} (seed {r["seed"]})', (r['entropy_ratio'], r['nll_ratio']),
                fontsize=7)
  ax.axhline(1.0, color='grey', lw=0.5)
  ax.axvline(1.0, color='grey', lw=0.5)
  fig.colorbar(sc, label='all-K agreement with the AR rollout')
  ax.set_xlabel('unigram entropy / teacher\'s')
  ax.set_ylabel(f'generative NLL ({rows[0]["nll_key"]}) / teacher\'s')
  ax.set_title(f'{rows[0]["model"]} at K={rows[0]["K"]}')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'ablation.png'), dpi=120)
  plt.close(fig)
