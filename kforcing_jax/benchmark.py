"""Batch-serving speed: AR vs PFLM tokens/s across batch sizes (docs/design.md section 6).

  python -m kforcing_jax.benchmark --config=configs/synthetic.py --random_init \
      --batch_sizes=1,16 --K=4 --out=DIR
  python -m kforcing_jax.benchmark --config=CONFIG --workdir=RUN --batch_sizes=... --out=DIR
  python -m kforcing_jax.benchmark --config=CONFIG --ar_export=DIR --pflm_export=DIR ...

AR and PFLM run in one process with the same dims and precision (--dtype, see
kforcing_jax.models.precision), prompt length 6, generation to data.seq_len, compile
excluded, median of --repeats timed runs (kforcing_jax.evaluation.benchmark). Writes
DIR/benchmark.json, DIR/benchmark.md, DIR/benchmark.png.
"""
from __future__ import annotations

import sys

from absl import flags
import jax
from ml_collections import config_flags

from kforcing_jax import errors
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.evaluation import benchmark as benchmark_lib
from kforcing_jax.evaluation.benchmark import markdown
from kforcing_jax.interop import export as export_lib
from kforcing_jax.models import precision
from kforcing_jax.pipeline import config_lib
from kforcing_jax.models import random_init as random_init_lib
from kforcing_jax.pipeline import run_dir


def run_benchmark(cfg, workdir: str | None, random_init: bool, batch_sizes, K: int,
                  repeats: int, out_dir: str, cache_phases: int = 1, dtype: str = 'auto',
                  decode_attention: str = 'xla',
                  exports: tuple[str, str] | None = None) -> dict:
  """exports: (AR export, PFLM export) directories (e.g. imported released checkpoints)
  instead of a run's stages or random weights."""
  on_accel = jax.default_backend() != 'cpu'
  dtype, why = precision.choose(dtype)
  print(f'serving precision: {dtype} ({why})', flush=True)
  benchmark_lib.check_decode_attention(decode_attention, on_accel)
  exe = precision.exec_config(dtype, decode_attention)
  if random_init:
    arch, params = random_init_lib.random_model(cfg, data_lib.model_vocab_size(cfg))
    ar = sampler_lib.Sampler(arch, params, k=K, exe=exe, max_len=cfg.data.seq_len)
    pf = ar
  elif exports:
    ar, pf = (export_lib.load(p, dtype=dtype, decode_attention=decode_attention)
              for p in exports)
    if ar.k or pf.k < K:
      raise errors.StageError(f'--ar_export must be an AR model (k={ar.k}) and '
                                  f'--pflm_export a PFLM with k >= --K={K} (k={pf.k})')
  else:
    ar = run_dir.load_sampler(workdir, 'teacher', dtype=dtype,
                              decode_attention=decode_attention)
    run_cfg = run_dir.load_run_config(workdir)
    have = run_dir.finished_model_stages(workdir, run_cfg)
    cands = [s for s in have if run_dir.stage_k(run_cfg, s) >= K]
    if not cands:
      raise errors.StageError(f'--K={K}: {workdir} has no finished distill stage '
                                  f'with k >= {K} (finished: {", ".join(have)})')
    pf = run_dir.load_sampler(workdir, cands[0], dtype=dtype,
                              decode_attention=decode_attention)
  return benchmark_lib.measure(
      cfg, ar, pf, batch_sizes, K, repeats, out_dir, dtype=dtype, dtype_reason=why,
      cache_phases=cache_phases, decode_attention=decode_attention,
      models={'random_init': random_init, 'workdir': workdir,
              'exports': list(exports) if exports else None})


def define_flags(fv: flags.FlagValues) -> None:
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory with teacher and distill stages',
                      flag_values=fv)
  flags.DEFINE_bool('random_init', False, 'random weights; model fields used as given',
                    flag_values=fv)
  flags.DEFINE_string('ar_export', None, 'an exported/imported AR model', flag_values=fv)
  flags.DEFINE_string('pflm_export', None, 'an exported/imported PFLM', flag_values=fv)
  flags.DEFINE_string('batch_sizes', '1,16', 'comma-separated batch sizes', flag_values=fv)
  flags.DEFINE_integer('K', 4, 'PFLM tokens per step', flag_values=fv)
  flags.DEFINE_integer('repeats', 5, 'timed runs per point (median), AR and PFLM alternating',
                       flag_values=fv)
  flags.DEFINE_string('out', 'bench_out', 'output directory', flag_values=fv)
  flags.DEFINE_integer('cache_phases', 1, '> 1: decode in phases over a growing cache whose '
                       'attention reads only the filled prefix (AR and PFLM alike)',
                       flag_values=fv)
  flags.DEFINE_string('dtype', 'auto', 'serving precision: auto (bfloat16 on accelerators; '
                      'on CPU mixed with native bf16 dot instructions, else float32) | '
                      'bfloat16 | mixed (bf16 weight products, float32 activations and KV '
                      'cache) | float32 | int8 (weight-only int8 products, float32 '
                      'activations; on CPU a kernel built on first use)', flag_values=fv)
  flags.DEFINE_string('decode_attention', 'xla', 'cached attention (AR and PFLM alike): xla '
                      '(masked, over the whole cache) | pallas (GPU: a flash-decoding kernel '
                      'over the filled slots only)', flag_values=fv)
  flags.mark_flags_as_required(['config'], flag_values=fv)


def run(f) -> dict:
  """The benchmark as the flags say; writes --out and returns the result."""
  exports = (f.ar_export, f.pflm_export) if f.ar_export or f.pflm_export else None
  if exports and not all(exports):
    raise SystemExit('error: give both --ar_export and --pflm_export')
  if sum(map(bool, (f.random_init, f.workdir, exports))) != 1:
    raise SystemExit('error: give one of --workdir=RUN (trained stages), --random_init, or '
                     '--ar_export=DIR --pflm_export=DIR')
  try:
    sizes = [int(b) for b in f.batch_sizes.split(',') if b.strip()]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    raise SystemExit(f'error: --batch_sizes={f.batch_sizes!r}: give positive integers, '
                     'e.g. 1,16')
  if f.repeats < 3:
    raise SystemExit('error: --repeats must be >= 3 (the protocol takes a median of >= 3 '
                     'runs)')
  result = run_benchmark(f.config, f.workdir, f.random_init, sizes, f.K, f.repeats, f.out,
               f.cache_phases, f.dtype, f.decode_attention, exports)
  print(markdown(result))
  print(f'wrote {f.out}/benchmark.json, benchmark.md, benchmark.png', file=sys.stderr)
  return result


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
