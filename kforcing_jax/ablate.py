"""Runs named distillation variants of a config at its own step budget and compares them.

  python -m kforcing_jax.ablate --config=synthetic --workdir=/tmp/ablate \
      [--variants=progressive,ar_rollout,on_policy] [--seeds=0,1] [--config.FIELD=...]

Each variant is one pipeline run under WORKDIR/seed<S>/<VARIANT>/ (the stages every variant
leaves equal are trained once per seed); the table of the widest student's numbers at its
full window (NLL and entropy as ratios to the AR teacher's samples, all-K agreement with
the AR rollout, training seconds) goes to WORKDIR/ablation.md, .json and .png. Variants:
kforcing_jax/pipeline/ablation.py (VARIANTS).
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from kforcing_jax import runtime
from kforcing_jax.pipeline import ablation
from kforcing_jax.pipeline import config_lib


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', None, 'config file (its pipeline ends with '
                                  'evaluate)', flag_values=fv, lock_config=True)
  flags.DEFINE_string('workdir', None, 'directory of the variants\' runs and the table',
                      flag_values=fv)
  flags.DEFINE_string('variants', ','.join(ablation.VARIANTS),
                      'comma-separated variants; allowed: ' + ', '.join(ablation.VARIANTS),
                      flag_values=fv)
  flags.DEFINE_string('seeds', '0', 'comma-separated run seeds (config.seed)', flag_values=fv)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=fv)


def run(f) -> dict:
  try:
    seeds = [int(s) for s in f.seeds.split(',') if s.strip()]
  except ValueError:
    raise SystemExit(f'error: --seeds={f.seeds!r}: give comma-separated integers') from None
  if not seeds:
    raise SystemExit('error: --seeds is empty')
  runtime.initialize()
  table = ablation.run(f.config, f.workdir, [v for v in f.variants.split(',') if v], seeds)
  print(ablation.markdown(table))
  return table


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
