"""The self-describing export of one model, and loading it back onto any mesh.

An export is an Orbax checkpoint holding the float32 parameters and a JSON description: the
architecture config, the window k, the tokenizer's identity and where its files were, and
the provenance (the source run and stage, or the imported file and its sha256). Exports are
written by `python -m kforcing_jax.export` (a stage of a run) and the importers
(`kforcing_jax.import_official`, `kforcing_jax.import_hf`); `kforcing_jax.load(DIR)`
restores one onto a mesh (default: one device) as a Sampler.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp

from kforcing_jax import errors
from kforcing_jax.data import tokenization
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.models import precision
from kforcing_jax.training import checkpoint as ckpt_lib

EXPORT_FORMAT = 'kforcing_jax.export/1'  # 'model' (first format) or 'arch' describe the weights


def is_export(ref: str) -> bool:
  """Whether a teacher/model reference names an export directory (not a stage name)."""
  return os.sep in ref or os.path.isdir(ref)


def read_export_description(path: str) -> dict:
  path = os.path.abspath(path)
  if not os.path.isdir(path) or not os.path.isdir(os.path.join(path, 'description')):
    raise errors.StageError(f'{path} is not an exported kforcing_jax model (made by '
                     'python -m kforcing_jax.export or kforcing_jax.import_official)')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    desc = ckptr.restore(path, args=ocp.args.Composite(
        description=ocp.args.JsonRestore()))['description']
  if desc.get('format') != EXPORT_FORMAT:
    raise errors.StageError(f'{path}: unknown export format {desc.get("format")!r} (this code reads '
                     f'{EXPORT_FORMAT})')
  return desc


def load_export(path: str, mesh):
  """(ArchConfig, float32 params, description, param shardings) of an export."""
  path = os.path.abspath(path)
  desc = read_export_description(path)
  arch = ckpt_lib.arch_from_meta(desc)
  abstract, shardings = ckpt_lib.abstract_params(arch, mesh)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    params = ckptr.restore(path, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))['params']
  return arch, params, desc, shardings


def write(out: str, params, desc: dict, *, compress: bool = True) -> dict:
  """Writes an export (refuses an existing path); desc must hold 'arch', 'k', 'tokenizer'.
  compress=False stores the arrays without zstd: larger files, but the write needs less
  host memory (no compression buffers) and time; the export reads back the same way."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise errors.StageError(f'--out={out} already exists; choose a new path')
  desc = {'format': EXPORT_FORMAT, **desc}
  if compress:
    handler, params_args = ocp.CompositeCheckpointHandler(), ocp.args.StandardSave(params)
  else:
    handler = ocp.CompositeCheckpointHandler(
        params=ocp.PyTreeCheckpointHandler(use_compression=False),
        description=ocp.JsonCheckpointHandler())
    params_args = ocp.args.PyTreeSave(params)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(out, args=ocp.args.Composite(params=params_args,
                                            description=ocp.args.JsonSave(desc)))
  return desc


def load(path: str, mesh=None, *, dtype: str = 'float32', decode_attention: str = 'xla',
         tokenizer_path: str | None = None) -> sampler_lib.Sampler:
  """Restores an export onto `mesh` (parameters sharded by their logical axes) as a
  Sampler in serving precision `dtype` (precision.SERVE_DTYPES or auto). The tokenizer
  comes from tokenizer_path, else where the export says it was; without its files the
  sampler decodes ids only."""
  path = os.path.abspath(path)
  arch, params, desc, _ = load_export(path, mesh or sampler_lib.one_device_mesh())
  tok_path = desc.get('tokenizer_path', '') if tokenizer_path is None else tokenizer_path
  if tokenizer_path is None and desc.get('tokenizer_dir'):  # files kept in the export
    tok_path = os.path.join(path, desc['tokenizer_dir'])
  try:
    tok = tokenization.from_identity(desc['tokenizer'], tok_path)
  except (OSError, ValueError) as e:  # files not here (offline): ids only, said once
    print(f'kforcing_jax.load: no tokenizer for {path} ({e}); generate_ids still works')
    tok = None
  exe = precision.exec_config(precision.choose(dtype)[0], decode_attention)
  return sampler_lib.Sampler(arch, params, k=int(desc['k']), tokenizer=tok, exe=exe,
                             description=desc)
