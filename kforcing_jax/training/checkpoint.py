"""Orbax checkpoints per stage: train state, data-iterator position and metadata
(config, model shape, tokenizer identity), saved atomically by a CheckpointManager.

A rerun restores the latest step; a workdir written with an incompatible config is
refused with the differing fields named."""
from __future__ import annotations

import hashlib
import os
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from kforcing_jax import errors
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib


class IncompatibleCheckpointError(errors.UserError):
  pass


def manager(directory: str, keep: int | None = 2, create: bool = True) -> ocp.CheckpointManager:
  """create=False: open an existing stage's checkpoints to read them."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep if create else None, create=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         meta: dict, force: bool = False) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state),
                                          meta=ocp.args.JsonSave(meta)), force=force)


def restore_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict:
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore(mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
  """Returns (state, data_state, meta) of `step` (default latest) onto the shardings of
  `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding)."""
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return out['state'], out['data'], out['meta']


def restore_params(directory: str, abstract_params: Any, step: int | None = None):
  """Restores only the parameters of a stage's state (read-only; e.g. a frozen teacher)."""
  mngr = manager(directory, create=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {directory}')
  meta = restore_meta(mngr, step)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={'params': abstract_params},
      restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                {'params': abstract_params}),
      partial_restore=True)))
  mngr.close()
  return out['state']['params'], meta


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def check_compatible(saved: dict, wanted: dict, where: str) -> None:
  """Compares the fields that must match to resume or reuse a checkpoint."""
  diffs = []
  for key in sorted(set(saved) | set(wanted)):
    if saved.get(key) != wanted.get(key):
      diffs.append(f'{key}: checkpoint has {saved.get(key)!r}, config asks for '
                   f'{wanted.get(key)!r}')
  if diffs:
    raise IncompatibleCheckpointError(
        f'{where} was written with an incompatible configuration:\n  ' + '\n  '.join(diffs) +
        '\nUse a new --workdir, or the configuration the checkpoint was made with.')


def saved_compat(meta: dict) -> dict:
  """A checkpoint's compat fields; one written before an architecture version gains fields
  reads them from its own architecture as that version describes it (a run of an earlier
  version resumes; its backbone is the one it was trained with)."""
  compat = dict(meta['compat'])
  if int(meta.get('k', 0)) > 0:  # distill checkpoints before objectives were named
    compat.setdefault('objective', 'progressive')
  if 'arch' in meta or 'model' in meta:
    for field, value in arch_from_meta(meta).backbone().items():
      compat.setdefault(f'model.{field}', value)
  return compat


def arch_from_meta(meta: dict) -> arch_lib.ArchConfig:
  """The architecture a checkpoint or export describes ('arch', or the first format's
  'model')."""
  return arch_lib.ArchConfig.from_dict(meta['arch'] if 'arch' in meta else meta['model'])


def abstract_params(arch: arch_lib.ArchConfig, mesh, exe: arch_lib.ExecConfig | None = None):
  """(ShapeDtypeStructs with shardings, shardings) of a model's parameters on `mesh`."""
  boxed = jax.eval_shape(model_lib.init_fn(model_lib.build(arch, exe)), jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh)
  return abstract_like(nn.unbox(boxed), shardings), shardings


def params_fingerprint(params) -> str:
  """sha256 (16 hex digits) of the parameters' float32 bytes in tree order: the same for
  the same weights on any mesh, different for retrained ones."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(
        multihost_utils.process_allgather(x, tiled=True), np.float32)).tobytes())
  return h.hexdigest()[:16]
