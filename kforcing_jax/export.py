"""Exports one finished stage of a run as a self-describing model (kforcing_jax.interop.export).

  python -m kforcing_jax.export --workdir=DIR --stage=distill_k4 --out=OUT
"""
from __future__ import annotations

import os

from absl import flags

from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.pipeline import config_lib
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


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'a kforcing_jax run directory', flag_values=fv)
  flags.DEFINE_string('stage', None, 'teacher | distill_k<K>', flag_values=fv)
  flags.DEFINE_string('out', None, 'output directory (must not exist)', flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'stage', 'out'], flag_values=fv)


def run(f) -> dict:
  desc = export(f.workdir, f.stage, f.out)
  print(f'exported {desc["stage"]} (k={desc["k"]}, {desc["tokenizer"]["name"]}) to {f.out}')
  return desc


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
