"""kforcing_jax entry point: runs the configured pipeline of stages
(kforcing_jax.pipeline.cli; installed, also the `kforcing-run` command).

  python main.py --config=configs/owt.py --workdir=/tmp/owt [--config.stages.teacher.steps=..]
  python main.py --config=configs/synthetic.py --workdir=/tmp/kf

--config takes a config file's path or the name of a shipped config (--config=owt), from
any directory.
"""
from kforcing_jax.pipeline.cli import main

if __name__ == '__main__':
  main()
