"""Exports one finished stage of a run as a self-describing model (kforcing_jax.interop.export).

  python -m kforcing_jax.export --workdir=DIR --stage=distill_k4 --out=OUT
"""
from __future__ import annotations

import os

from absl import app
from absl import flags

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.pipeline import run_dir


def export(workdir: str, stage: str, out: str) -> dict:
  cfg = run_dir.load_run_config(workdir)
  arch, params, meta, _ = run_dir.load_model_stage(workdir, stage, sampler_lib.one_device_mesh())
  return export_lib.write(out, params, {
      'stage': stage, 'k': int(meta['k']), 'arch': arch.to_dict(),
      'tokenizer': meta['compat']['tokenizer'],
      'tokenizer_path': os.path.abspath(cfg.data.tokenizer_path) if cfg.data.tokenizer_path
                        else '',
      'teacher_stage': meta.get('teacher_stage'), 'source_workdir': os.path.abspath(workdir)})


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
