"""kforcing_jax entry point: runs the configured pipeline of stages.

  python main.py --config=kforcing_jax/configs/synthetic.py --workdir=/tmp/kf \
      [--config.stages.teacher.steps=..]
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from kforcing_jax import config_lib
from kforcing_jax import errors
from kforcing_jax import pipeline
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


def parse_flags(argv):
  """absl's flag parsing; --config=NAME also names a package config (kforcing_jax/configs/
  NAME.py) from any directory; a bad --config override is reported in one line."""
  argv = [config_lib.resolve_config_arg(a) for a in argv]
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
    text = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").strip('\'" ').split())
    name = text.split()[0].strip("'") if text else ''
    bad = [a.split('=')[0] for a in argv[1:]
           if a.startswith('--config.') and name and name in a.split('=')[0]]
    raise SystemExit(f'error: bad command line{" (" + bad[0] + ")" if bad else ""}: '
                     f'{text}') from None


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
