"""A pipeline run directory: its finished model stages (teacher, distill_k<K>), their
checkpoints as Samplers, distillation teachers (a stage or an export), and the run config
saved as WORKDIR/config.json. Read-only."""
from __future__ import annotations

import json
import os
import re

import ml_collections

from kforcing_jax import errors
from kforcing_jax.configs import base as base_config
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.models import precision
from kforcing_jax.training import checkpoint as ckpt_lib

STAGE_RE = re.compile(r'^distill_k(\d+)$')


StageError = errors.StageError


def stage_k(stage: str) -> int:
  """0 for the AR teacher, K for distill_kK."""
  if stage == 'teacher':
    return 0
  m = STAGE_RE.match(stage)
  if not m:
    raise StageError(f'{stage!r} is not a model stage (teacher or distill_k<K>)')
  return int(m.group(1))


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, 'summary.json'))


def read_summary(directory: str) -> dict:
  with open(os.path.join(directory, 'summary.json'), encoding='utf-8') as f:
    return json.load(f)


def finished_model_stages(workdir: str) -> list[str]:
  out = []
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    if (name == 'teacher' or STAGE_RE.match(name)) and is_done(stage_dir(workdir, name)):
      out.append(name)
  return sorted(out, key=lambda s: (s != 'teacher', stage_k(s)))


def load_model_stage(workdir: str, stage: str, mesh):
  """(ArchConfig, float32 params, meta, param shardings) of a finished stage."""
  stage_k(stage)
  d = stage_dir(workdir, stage)
  ckpt_dir = os.path.join(d, 'checkpoints')
  if not is_done(d) or not os.path.isdir(ckpt_dir):
    have = finished_model_stages(workdir)
    raise StageError(f'stage {stage!r} has no finished checkpoint under {d} (finished stages '
                     f'there: {", ".join(have) or "none"}): run it first (list it in '
                     '`pipeline`) or point --workdir at a run that has it')
  mngr = ckpt_lib.manager(ckpt_dir, create=False)
  meta = ckpt_lib.restore_meta(mngr)
  mngr.close()
  arch = ckpt_lib.arch_from_meta(meta)
  abstract, shardings = ckpt_lib.abstract_params(arch, mesh)
  params, meta = ckpt_lib.restore_params(ckpt_dir, abstract)
  return arch, params, meta, shardings


def teacher_stage_of(stage: str, names: list[str], override: str = '') -> str:
  if override:
    return override
  model_stages = [s for s in names if s == 'teacher' or s.startswith('distill_k')]
  i = model_stages.index(stage)
  if i > 0:
    return model_stages[i - 1]
  k = stage_k(stage)
  return 'teacher' if k == 1 else f'distill_k{k // 2}'


def load_teacher(workdir: str, ref: str, mesh):
  """A distillation teacher: a finished stage of `workdir` or an export directory.
  Returns (arch, params, {'k', 'tokenizer', 'name'}, shardings)."""
  if export_lib.is_export(ref):
    arch, params, desc, shardings = export_lib.load_export(ref, mesh)
    return arch, params, {'k': int(desc['k']), 'tokenizer': desc['tokenizer'],
                          'name': os.path.abspath(ref)}, shardings
  arch, params, meta, shardings = load_model_stage(workdir, ref, mesh)
  return arch, params, {'k': int(meta['k']), 'tokenizer': meta['compat']['tokenizer'],
                        'name': ref}, shardings


def load_run_config(workdir: str):
  """The config a pipeline run saved as WORKDIR/config.json, over today's defaults (fields
  added since get their defaults; sections of older layouts that no longer exist are
  ignored)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise StageError(f'--workdir={workdir!r} has no config.json: it is not a kforcing_jax '
                     'run directory')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  cfg = base_config.get_config()

  def merge(node, values):
    for key, value in values.items():
      if key not in node:
        continue
      if isinstance(value, dict) and isinstance(node[key], ml_collections.ConfigDict):
        merge(node[key], value)
      elif not isinstance(node[key], ml_collections.ConfigDict):
        if isinstance(node[key], tuple):
          value = (value,) if isinstance(value, str) else tuple(value)
        try:
          node[key] = value
        except TypeError:  # a field whose type changed since the run: today's default
          pass
  with cfg.unlocked():
    merge(cfg, saved)
  return cfg


def load_sampler(workdir: str, stage: str, *, dtype: str = 'float32', mesh=None,
                 decode_attention: str = 'xla') -> sampler_lib.Sampler:
  """A finished stage of a pipeline run as a Sampler; the tokenizer from the run's config."""
  cfg = load_run_config(workdir)
  tok = data_lib.make_tokenizer(cfg)
  arch, params, meta, _ = load_model_stage(workdir, stage, mesh or sampler_lib.one_device_mesh())
  if meta['compat']['tokenizer'] != tok.identity():
    raise StageError(f'{stage} was trained with tokenizer {meta["compat"]["tokenizer"]}, '
                     f'{workdir}/config.json gives {tok.identity()}')
  exe = precision.exec_config(precision.choose(dtype)[0], decode_attention)
  return sampler_lib.Sampler(arch, params, k=int(meta['k']), tokenizer=tok, exe=exe,
                             description={'stage': stage, 'workdir': workdir})


def ar_teacher_ref(workdir: str, cfg) -> str:
  """The AR model a run's students are compared with: evaluate.teacher when set, else the
  run's teacher stage, else (a run that distils an export) the export that the first
  distill stage of the pipeline learns from."""
  if cfg.evaluate.teacher:
    return cfg.evaluate.teacher
  if is_done(stage_dir(workdir, 'teacher')):
    return 'teacher'
  pipeline = [cfg.pipeline] if isinstance(cfg.pipeline, str) else list(cfg.pipeline)
  distills = [s for n in pipeline for s in n.split(',') if STAGE_RE.match(s.strip())]
  if distills and cfg.stages[distills[0].strip()].teacher_stage:
    ref = cfg.stages[distills[0].strip()].teacher_stage
    if export_lib.is_export(ref) and int(export_lib.read_export_description(ref)['k']) == 0:
      return ref
  raise StageError(f'{workdir} has no finished teacher stage and its first distill stage '
                   'learns from no AR export: set evaluate.teacher to an AR export')


def stage_samplers(workdir: str, mesh):
  """(AR teacher Sampler, [(stage, Sampler loader)]) of a run's finished stages; the
  teacher as ar_teacher_ref says."""
  cfg = load_run_config(workdir)
  ref = ar_teacher_ref(workdir, cfg)
  models = [(stage, lambda stage=stage: load_sampler(workdir, stage, mesh=mesh))
            for stage in finished_model_stages(workdir)]
  if ref == 'teacher':
    return load_sampler(workdir, 'teacher', mesh=mesh), models
  teacher = export_lib.load(ref, mesh)
  tok = data_lib.make_tokenizer(cfg)
  if teacher.tokenizer is None or teacher.tokenizer.identity() != tok.identity():
    raise StageError(f'the AR teacher {ref} does not have the run\'s tokenizer '
                     f'{tok.identity()}')
  # the export is evaluated first, as a run's own teacher stage is: the reference row
  return teacher, [(ref, lambda: teacher)] + models
