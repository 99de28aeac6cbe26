"""Loading finished model stages (teacher, distill_k<K>) from a workdir, read-only."""
from __future__ import annotations

from kforcing_jax import errors

import json
import os

import flax.linen as nn
import jax

from kforcing_jax import checkpoint as ckpt_lib
from kforcing_jax import config_lib
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib


class StageError(errors.UserError):
  pass


def model_init_fn(model, mcfg: model_lib.ModelConfig, seq_len: int):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def init_params(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    positions = jnp.zeros((1, seq_len), jnp.int32)
    kw = {}
    if mcfg.pflm:
      kw = dict(hint_u_BxH=jnp.full((1, 1), 0.5), hint_pos_BxH=jnp.zeros((1, 1), jnp.int32))
    return model.init(rng, tokens, positions, **kw)['params']
  return init_params


def model_config_from_meta(meta: dict) -> model_lib.ModelConfig:
  m = dict(meta['model'])
  m['never_emit_ids'] = tuple(m['never_emit_ids'])
  return model_lib.ModelConfig(**m)


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, 'summary.json'))


def finished_model_stages(workdir: str) -> list[str]:
  out = []
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    if (name == 'teacher' or config_lib.STAGE_RE.match(name)) and is_done(
        stage_dir(workdir, name)):
      out.append(name)
  return sorted(out, key=lambda s: (s != 'teacher', config_lib.stage_k(s)))


def abstract_params(mcfg: model_lib.ModelConfig, mesh):
  model = model_lib.Transformer(mcfg)
  boxed = jax.eval_shape(model_init_fn(model, mcfg, 8), jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh)
  return ckpt_lib.abstract_like(nn.unbox(boxed), shardings), shardings


def load_model_stage(workdir: str, stage: str, mesh):
  """(ModelConfig, params, meta, param shardings) of a finished stage."""
  config_lib.stage_k(stage)
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
  mcfg = model_config_from_meta(meta)
  abstract, shardings = abstract_params(mcfg, mesh)
  params, meta = ckpt_lib.restore_params(ckpt_dir, abstract)
  return mcfg, params, meta, shardings


def load_run_config(workdir: str):
  """The ml_collections config a pipeline run saved as WORKDIR/config.json."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise StageError(f'--workdir={workdir!r} has no config.json: it is not a kforcing_jax '
                     'run directory')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  try:  # fields added to the project after the run get their defaults
    from configs import base  # pylint: disable=g-import-not-at-top
    cfg = base.get_config()
  except ImportError:
    return ml_collections.ConfigDict(saved)

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in node and hasattr(node[key], 'keys'):
        merge(node[key], value)
      else:
        node[key] = value
  with cfg.unlocked():
    merge(cfg, saved)
  return cfg
