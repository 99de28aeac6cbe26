"""Evaluates a run's stages, or exported / imported models, against their AR teacher.

  python -m kforcing_jax.evaluate --workdir=RUN
  python -m kforcing_jax.evaluate --config=configs/owt_from_released.py \
      --teacher_export=AR_EXPORT --exports=PFLM_EXPORT[,...] --out=DIR

Writes report.json, report.md and report.png (kforcing_jax.evaluation.evaluate).
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.evaluation.evaluate import evaluate, markdown, write_report
from kforcing_jax.interop import export as export_lib
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run_dir


def export_models(teacher_export: str, exports, mesh):
  """The same for exported / imported models: the AR export first, then each export."""
  teacher = export_lib.load(teacher_export, mesh)
  if teacher.k:
    raise errors.StageError(f'--teacher_export={teacher_export} is a PFLM (k={teacher.k}); '
                            'the evaluators need an AR model')
  return teacher, [(teacher_export, lambda: teacher)] + [
      (p, lambda p=p: export_lib.load(p, mesh)) for p in exports]



def main(argv):
  del argv
  runtime.quiet_library_logs()
  runtime.initialize()
  f = FLAGS
  if bool(f.workdir) == bool(f.teacher_export):
    raise app.UsageError('give --workdir=RUN, or --config, --teacher_export (and --exports, '
                         '--out) for exported models')
  try:
    mesh = sampler_lib.one_device_mesh()
    if f.workdir:
      cfg = run_dir.load_run_config(f.workdir)
      out_dir, speed_dir = os.path.join(f.workdir, 'evaluate'), f.workdir
      models = run_dir.stage_samplers(f.workdir, mesh)
    else:
      if _CONFIG.value is None or not f.out:
        raise app.UsageError('--teacher_export needs --config (the data) and --out')
      cfg, out_dir, speed_dir = _CONFIG.value, f.out, f.out
      models = export_models(f.teacher_export, [p for p in f.exports.split(',') if p], mesh)
    source = data_lib.make_source(cfg)
    report = evaluate(cfg, source, *models)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  write_report(report, out_dir, speed_dir)
  print(markdown(report))


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory')
  flags.DEFINE_string('teacher_export', None, 'an exported/imported AR model (the evaluator)')
  flags.DEFINE_string('exports', '', 'comma-separated exported/imported PFLMs to evaluate')
  flags.DEFINE_string('out', None, 'report directory (with --teacher_export)')
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (the data)',
                                            lock_config=True)
  app.run(main, flags_parser=config_lib.parse_flags)
