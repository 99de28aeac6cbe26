"""Finished model stages (teacher, distill_k<K>) of a run directory and exported models
(kforcing_jax.export, kforcing_jax.import_official): names, loading, the saved run config.
Read-only."""
from __future__ import annotations

import hashlib
import json
import os
import re

import flax.linen as nn
import orbax.checkpoint as ocp
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from kforcing_jax import checkpoint as ckpt_lib
from kforcing_jax.configs import base as base_config
from kforcing_jax import errors
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib

STAGE_RE = re.compile(r'^distill_k(\d+)$')
EXPORT_FORMAT = 'kforcing_jax.export/1'  # 'model' (first format) or 'arch' describe the weights


class StageError(errors.UserError):
  pass


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


def arch_from_meta(meta: dict) -> model_lib.ArchConfig:
  """The architecture a checkpoint or export describes ('arch', or the first format's
  'model')."""
  return model_lib.ArchConfig.from_dict(meta['arch'] if 'arch' in meta else meta['model'])


def abstract_params(arch: model_lib.ArchConfig, mesh, exe: model_lib.ExecConfig | None = None):
  """(ShapeDtypeStructs with shardings, shardings) of a model's parameters on `mesh`."""
  boxed = jax.eval_shape(model_lib.init_fn(model_lib.build(arch, exe)), jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh)
  return ckpt_lib.abstract_like(nn.unbox(boxed), shardings), shardings


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
  arch = arch_from_meta(meta)
  abstract, shardings = abstract_params(arch, mesh)
  params, meta = ckpt_lib.restore_params(ckpt_dir, abstract)
  return arch, params, meta, shardings


def is_export(ref: str) -> bool:
  """Whether a teacher/model reference names an export directory (not a stage name)."""
  return os.sep in ref or os.path.isdir(ref)


def read_export_description(path: str) -> dict:
  path = os.path.abspath(path)
  if not os.path.isdir(path) or not os.path.isdir(os.path.join(path, 'description')):
    raise StageError(f'{path} is not an exported kforcing_jax model (made by '
                     'python -m kforcing_jax.export or kforcing_jax.import_official)')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    desc = ckptr.restore(path, args=ocp.args.Composite(
        description=ocp.args.JsonRestore()))['description']
  if desc.get('format') != EXPORT_FORMAT:
    raise StageError(f'{path}: unknown export format {desc.get("format")!r} (this code reads '
                     f'{EXPORT_FORMAT})')
  return desc


def load_export(path: str, mesh):
  """(ArchConfig, float32 params, description, param shardings) of an export."""
  path = os.path.abspath(path)
  desc = read_export_description(path)
  arch = arch_from_meta(desc)
  abstract, shardings = abstract_params(arch, mesh)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    params = ckptr.restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']
  return arch, params, desc, shardings


def load_teacher(workdir: str, ref: str, mesh):
  """A distillation teacher: a finished stage of `workdir` or an export directory.
  Returns (arch, params, {'k', 'tokenizer', 'name'}, shardings)."""
  if is_export(ref):
    arch, params, desc, shardings = load_export(ref, mesh)
    return arch, params, {'k': int(desc['k']), 'tokenizer': desc['tokenizer'],
                          'name': os.path.abspath(ref)}, shardings
  arch, params, meta, shardings = load_model_stage(workdir, ref, mesh)
  return arch, params, {'k': int(meta['k']), 'tokenizer': meta['compat']['tokenizer'],
                        'name': ref}, shardings


def params_fingerprint(params) -> str:
  """sha256 (16 hex digits) of the parameters' float32 bytes in tree order: the same for
  the same weights on any mesh, different for retrained ones."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(
        multihost_utils.process_allgather(x, tiled=True), np.float32)).tobytes())
  return h.hexdigest()[:16]


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
