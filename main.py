"""kforcing_jax entry point: runs the configured pipeline of stages.

  python main.py --config=synthetic --workdir=/tmp/kf [--config.stages.teacher.steps=..]
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from kforcing_jax.pipeline import config_lib
from kforcing_jax import errors
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax import runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runtime.quiet_library_logs()
  runtime.initialize()
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
