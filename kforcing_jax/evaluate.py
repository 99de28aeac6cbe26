"""Evaluates a run's stages, or exported / imported models, against their AR teacher.

  python -m kforcing_jax.evaluate --workdir=RUN
  python -m kforcing_jax.evaluate --config=configs/owt_from_released.py \
      --teacher_export=AR_EXPORT --exports=PFLM_EXPORT[,...] --out=DIR

Writes report.json, report.md and report.png (kforcing_jax.evaluation.evaluate).
"""
from __future__ import annotations

import os

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


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory', flag_values=fv)
  flags.DEFINE_string('teacher_export', None, 'an exported/imported AR model (the evaluator)',
                      flag_values=fv)
  flags.DEFINE_string('exports', '', 'comma-separated exported/imported PFLMs to evaluate',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'report directory (with --teacher_export)', flag_values=fv)
  config_flags.DEFINE_config_file('config', None, 'config file (the data)', flag_values=fv,
                                  lock_config=True)


def run(f) -> dict:
  """Evaluates as the flags say and writes the report files; the report."""
  if bool(f.workdir) == bool(f.teacher_export):
    raise SystemExit('error: give --workdir=RUN, or --config, --teacher_export (and '
                     '--exports, --out) for exported models')
  if f.teacher_export and (f.config is None or not f.out):
    raise SystemExit('error: --teacher_export needs --config (the data) and --out')
  runtime.initialize()
  mesh = sampler_lib.one_device_mesh()
  if f.workdir:
    cfg = run_dir.load_run_config(f.workdir)
    out_dir, speed_dir = os.path.join(f.workdir, 'evaluate'), f.workdir
    models = run_dir.stage_samplers(f.workdir, mesh)
  else:
    cfg, out_dir, speed_dir = f.config, f.out, f.out
    models = export_models(f.teacher_export, [p for p in f.exports.split(',') if p], mesh)
  report = evaluate(cfg, data_lib.make_source(cfg), *models)
  write_report(report, out_dir, speed_dir)
  print(markdown(report))
  return report


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
