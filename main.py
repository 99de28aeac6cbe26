"""kforcing_jax entry point: runs the configured pipeline of stages.

  python main.py --config=configs/synthetic.py --workdir=/tmp/kf [--config.train.steps=..]
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from kforcing_jax import runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runtime.initialize()
  from kforcing_jax import errors  # pylint: disable=g-import-not-at-top
  from kforcing_jax import pipeline  # pylint: disable=g-import-not-at-top
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  from kforcing_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    config_lib.check_cli_overrides(sys.argv)
  except config_lib.ConfigError as e:
    sys.exit(f'error: {e}')
  app.run(main)
