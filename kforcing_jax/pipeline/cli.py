"""The pipeline command (main.py, the kforcing-run console script): runs the configured
stages in a run directory.

  python main.py --config=configs/owt.py --workdir=/tmp/owt [--config.stages.teacher.steps=..]
  python main.py --config=configs/synthetic.py --workdir=/tmp/kf

--config takes a config file's path or the name of a shipped config (--config=owt), from
any directory.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from kforcing_jax import runtime
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run as pipeline


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', None, 'a config file (configs/NAME.py) or the '
                                  'name of a shipped config', flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'directory for checkpoints and outputs',
                      flag_values=fv)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=fv)


def run(f) -> dict:
  runtime.initialize()
  return pipeline.run(f.config, f.workdir)


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
