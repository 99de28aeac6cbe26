"""kforcing_jax entry point: runs the configured pipeline of stages
(kforcing_jax.pipeline.cli; installed, also the `kforcing-run` command).

  python main.py --config=configs/owt.py --workdir=/tmp/owt [--config.stages.teacher.steps=..]
  python main.py --config=synthetic --workdir=/tmp/kf      (a shipped config by name)
"""
from kforcing_jax.pipeline.cli import main

if __name__ == '__main__':
  main()
