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
  from kforcing_jax import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
