"""A pipeline run directory: its finished model stages (teacher, distill_k<K>), their
checkpoints as Samplers, distillation teachers (a stage or an export), and the run config
saved as WORKDIR/config.json. Read-only."""
from __future__ import annotations

import json
import os

import ml_collections

from kforcing_jax import errors
from kforcing_jax.configs import base as base_config
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.models import precision
from kforcing_jax.training import checkpoint as ckpt_lib

# The kinds of the model stages a config's `stages` sections declare (`kind`).
MODEL_KINDS = ('teacher', 'distill')


StageError = errors.StageError


def model_stages(cfg) -> dict[str, int]:
  """{name: window k (0 for an AR stage)} of the config's model stage sections."""
  out = {}
  for name, s in cfg.stages.items():
    kind = s.get('kind', 'teacher' if name == 'teacher' else 'distill')
    if kind in MODEL_KINDS:
      out[name] = 0 if kind == 'teacher' else int(s.k)
  return out


def stage_k(cfg, stage: str) -> int:
  """0 for an AR stage, k for a distill stage of window k."""
  ks = model_stages(cfg)
  if stage not in ks:
    raise StageError(f'{stage!r} is not a model stage of the config (model stages: '
                     f'{", ".join(sorted(ks))})')
  return ks[stage]


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, 'summary.json'))


def read_summary(directory: str) -> dict:
  with open(os.path.join(directory, 'summary.json'), encoding='utf-8') as f:
    return json.load(f)


def finished_model_stages(workdir: str, cfg=None) -> list[str]:
  """The model stages of a run (its config.json's) with a summary, AR first, then by k."""
  cfg = load_run_config(workdir) if cfg is None else cfg
  ks = model_stages(cfg)
  done = [s for s in ks if is_done(stage_dir(workdir, s))]
  return sorted(done, key=lambda s: (ks[s], s != 'teacher', s))


def load_model_stage(workdir: str, stage: str, mesh):
  """(ArchConfig, float32 params, meta, param shardings) of a finished stage."""
  d = stage_dir(workdir, stage)
  ckpt_dir = os.path.join(d, 'checkpoints')
  cfg = (load_run_config(workdir) if os.path.exists(os.path.join(workdir, 'config.json'))
         else None)
  if cfg is not None:
    stage_k(cfg, stage)  # a name that is no model stage of the run: say which are
  if not is_done(d) or not os.path.isdir(ckpt_dir):
    have = finished_model_stages(workdir, cfg) if cfg is not None else []
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


def teacher_stage_of(cfg, stage: str, names: list[str]) -> str:
  """A distill stage's teacher: stages.<stage>.teacher_stage, else the model stage before
  it in the pipeline `names`, else (the first model stage listed) the AR stage 'teacher'
  for k=1 and distill_k<k/2> for wider windows."""
  override = cfg.stages[stage].get('teacher_stage', '')
  if override:
    return override
  ks = model_stages(cfg)
  listed = [s for s in names if s in ks]
  i = listed.index(stage) if stage in listed else 0  # a stage of the chain not run now
  if i > 0:
    return listed[i - 1]
  k = ks[stage]
  return 'teacher' if k == 1 else f'distill_k{k // 2}'


def ar_root(cfg, stage: str, names: list[str]) -> str:
  """The AR model at the root of a distill stage's chain of teachers (the model whose own
  rollout AR-based objectives use): stages.<stage>.ar_teacher when set, else the first
  teacher along the chain that is an AR stage or an AR export."""
  s = cfg.stages[stage]
  if s.get('ar_teacher', ''):
    return s.ar_teacher
  ks, seen, ref = model_stages(cfg), [stage], stage
  while True:
    ref = teacher_stage_of(cfg, ref, names)
    if ref in ks and ks[ref] == 0:
      return ref
    if ref not in ks:  # an export
      if export_lib.is_export(ref) and int(export_lib.read_export_description(ref)['k']) == 0:
        return ref
      raise StageError(f'{stage}: its chain of teachers ({" <- ".join(seen + [ref])}) ends '
                       f'in {ref}, not an AR model: set stages.{stage}.ar_teacher to the AR '
                       'stage or export its objective should roll out')
    if ref in seen:
      raise StageError(f'{stage}: its teachers form a cycle: {" <- ".join(seen + [ref])}')
    seen.append(ref)


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
      if key not in node and node is cfg.stages and isinstance(value, dict):
        # a stage section of the run's own (e.g. a second k=4 stage under another name)
        node[key] = (base_config.teacher_stage() if value.get('kind') == 'teacher' else
                     base_config.distill_stage(int(value.get('k', 1))))
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
  names = [n.strip() for item in pipeline for n in item.split(',') if n.strip()]
  ks = model_stages(cfg)
  distills = [n for n in names if ks.get(n, 0) > 0]
  if distills:
    ref = teacher_stage_of(cfg, distills[0], names)
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
