"""Self-describing export of one model stage, and loading it back onto any mesh.

  python -m kforcing_jax.export --workdir=DIR --stage=distill_k4 --out=OUT

OUT is an Orbax checkpoint holding the float32 parameters and a JSON description: the
architecture config, the window k, the tokenizer's identity and where its files were,
and the provenance (source run and stage). `kforcing_jax.load(OUT)` restores it onto a
mesh (default: one device) as a Sampler.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
import orbax.checkpoint as ocp

from kforcing_jax import errors
from kforcing_jax import precision
from kforcing_jax import runtime
from kforcing_jax import sampler as sampler_lib
from kforcing_jax import stages as stages_lib
from kforcing_jax import tokenization

FORMAT = stages_lib.EXPORT_FORMAT


def write(out: str, params, desc: dict) -> dict:
  """Writes an export (refuses an existing path); desc must hold 'arch', 'k', 'tokenizer'."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise stages_lib.StageError(f'--out={out} already exists; choose a new path')
  desc = {'format': FORMAT, **desc}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(out, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            description=ocp.args.JsonSave(desc)))
  return desc


def export(workdir: str, stage: str, out: str) -> dict:
  cfg = stages_lib.load_run_config(workdir)
  arch, params, meta, _ = stages_lib.load_model_stage(workdir, stage,
                                                      sampler_lib.one_device_mesh())
  return write(out, params, {
      'stage': stage, 'k': int(meta['k']), 'arch': arch.to_dict(),
      'tokenizer': meta['compat']['tokenizer'],
      'tokenizer_path': os.path.abspath(cfg.data.tokenizer_path) if cfg.data.tokenizer_path
                        else '',
      'teacher_stage': meta.get('teacher_stage'), 'source_workdir': os.path.abspath(workdir)})


read_description = stages_lib.read_export_description


def load(path: str, mesh=None, *, dtype: str = 'float32', decode_attention: str = 'xla',
         tokenizer_path: str | None = None) -> sampler_lib.Sampler:
  """Restores an export onto `mesh` (parameters sharded by their logical axes) as a
  Sampler in serving precision `dtype` (precision.SERVE_DTYPES or auto). The tokenizer
  comes from tokenizer_path, else where the export says it was; without its files the
  sampler decodes ids only."""
  path = os.path.abspath(path)
  arch, params, desc, _ = stages_lib.load_export(path, mesh or sampler_lib.one_device_mesh())
  tok_path = desc.get('tokenizer_path', '') if tokenizer_path is None else tokenizer_path
  try:
    tok = tokenization.from_identity(desc['tokenizer'], tok_path)
  except (OSError, ValueError) as e:  # files not here (offline): ids only, said once
    print(f'kforcing_jax.load: no tokenizer for {path} ({e}); generate_ids still works')
    tok = None
  exe = precision.exec_config(precision.choose(dtype)[0], decode_attention)
  return sampler_lib.Sampler(arch, params, k=int(desc['k']), tokenizer=tok, exe=exe,
                             description=desc)


def main(argv):
  del argv
  runtime.quiet_library_logs()
  try:
    desc = export(FLAGS.workdir, FLAGS.stage, FLAGS.out)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'exported {desc["stage"]} (k={desc["k"]}, {desc["tokenizer"]["name"]}) to {FLAGS.out}')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory')
  flags.DEFINE_string('stage', None, 'teacher | distill_k<K>')
  flags.DEFINE_string('out', None, 'output directory (must not exist)')
  flags.mark_flags_as_required(['workdir', 'stage', 'out'])
  app.run(main)
