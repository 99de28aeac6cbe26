"""Batch-serving speed: AR vs PFLM tokens/s across batch sizes (docs/design.md section 6).

  python -m kforcing_jax.benchmark --config=configs/synthetic.py --random_init \
      --batch_sizes=1,16 --K=4 --out=DIR
  python -m kforcing_jax.benchmark --config=CONFIG --workdir=RUN --batch_sizes=... --out=DIR
  python -m kforcing_jax.benchmark --config=CONFIG --ar_export=DIR --pflm_export=DIR ...

AR and PFLM run in one process with the same dims and precision (--dtype, see
kforcing_jax.precision), prompt length 6, generation to data.seq_len, compile excluded,
median of --repeats timed runs. The AR baseline is the faster of the two correct AR samplers
at temperature 1 (one-pass Gumbel-max, the serving default, and the inverse CDF), each
reported; greedy AR is timed too. Writes
DIR/benchmark.json, DIR/benchmark.md, DIR/benchmark.png.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import runtime
from kforcing_jax.decoding import engine as decode
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib


PROMPT_LEN = 6
# Peak HBM bandwidth (bytes/s) by device kind, for the bandwidth fraction on GPUs/TPUs.
PEAK_BW = {'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.0e12, 'L4': 3.0e11, 'TPU v4': 1.2e12,
           'TPU v5': 8.2e11, 'TPU v5p': 2.76e12}


def peak_bandwidth(kind: str) -> float | None:
  for name, bw in sorted(PEAK_BW.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in kind.lower():
      return bw
  return None


def prompt_width(specs) -> int:
  return max(max(PROMPT_LEN, spec.K + 1) for spec in specs)


def precompile(jobs) -> None:
  """Compiles every (engine, spec, batch) decoding loop before timing: in parallel threads
  on an accelerator's host (XLA:GPU took ~25 s per loop at the OWT shape on an H100, most
  of a benchmark's wall time), one by one on a CPU, whose cores the compiles would share."""
  width = prompt_width([spec for _, spec, _ in jobs])
  workers = 1 if jax.default_backend() == 'cpu' else min(len(jobs), os.cpu_count() or 1)
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(lambda job: job[0].compile(job[1], job[2], width, exact=True), jobs))
  print(f'compiled {len(jobs)} decoding loops in {time.perf_counter() - t0:.1f} s '
        f'({workers} thread{"s" if workers > 1 else ""})', flush=True)


def time_decode(engines_and_specs, batch: int, repeats: int, vocab: int):
  """Median seconds and decoding steps of each (engine, spec), compile excluded.

  The engines' timed runs alternate (AR, PFLM, AR, PFLM, ...) so that slow drifts of a
  shared machine's speed affect both sides of a speedup alike."""
  rng = np.random.default_rng(batch)
  width = prompt_width([spec for _, spec in engines_and_specs])
  prompts = jnp.asarray(rng.integers(1, vocab - 1, (batch, width), dtype=np.int32))
  pads = jnp.zeros((batch,), jnp.int32)
  seeds = jnp.arange(batch, dtype=jnp.int32)
  steps = []
  for engine, spec in engines_and_specs:  # compile + warm up
    out, n = engine.generate_arrays(spec, prompts, pads, seeds)
    jax.block_until_ready(out)
    steps.append(int(n))
  times = [[] for _ in engines_and_specs]
  for r in range(repeats):
    for i, (engine, spec) in enumerate(engines_and_specs):
      t0 = time.perf_counter()
      out, _ = engine.generate_arrays(spec, prompts, pads, seeds, seed=r + 1)
      jax.block_until_ready(out)
      times[i].append(time.perf_counter() - t0)
  return [(statistics.median(t), n) for t, n in zip(times, steps)]


def bytes_per_step(arch, exe, params, batch: int, cache_slots_read: float) -> float:
  """Bytes a decoding step must read: every weight once plus the keys/values of the cache
  slots its attention reads (DecodeSpec.mean_cache_read)."""
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return weights + model_lib.cache_bytes(arch, exe, batch, 1) * cache_slots_read


def check_decode_attention(name: str, on_accel: bool) -> None:
  if name not in arch_lib.DECODE_ATTENTION:
    raise decode.DecodeError(f'--decode_attention={name!r}: allowed: '
                             f'{", ".join(arch_lib.DECODE_ATTENTION)}')
  if name == 'pallas' and not on_accel:
    raise decode.DecodeError("--decode_attention=pallas needs a GPU: on a CPU its kernel runs "
                             "in Pallas' interpret mode (correct, for tests; far too slow to "
                             "time); use xla")


def measure(cfg, ar: sampler_lib.Sampler, pf: sampler_lib.Sampler, batch_sizes, K: int,
            repeats: int, out_dir: str, *, dtype: str, dtype_reason: str,
            cache_phases: int = 1, decode_attention: str = 'xla', models: dict | None = None
            ) -> dict:
  """Times the AR sampler `ar` against the PFLM `pf` decoding K tokens per step at each
  batch size; writes out_dir/benchmark.{json,md,png}. models: where they came from (for
  the record)."""
  on_accel = jax.default_backend() != 'cpu'
  why = dtype_reason
  new_tokens = cfg.data.seq_len - PROMPT_LEN
  # AR's baseline is the fastest correct sampler at temperature 1 (each AR sampler is timed;
  # Gumbel-max is the serving default); greedy AR is reported too (the same reduction per
  # token as the PFLM's argmax)
  specs = {f'ar_{name}': decode.DecodeSpec(K=1, max_new_tokens=new_tokens, temperature=1.0,
                                           sampler=name, cache_phases=cache_phases)
           for name in decode.SAMPLERS}
  specs['ar_greedy'] = decode.DecodeSpec(K=1, max_new_tokens=new_tokens, temperature=0.0,
                                         cache_phases=cache_phases)
  specs['pf'] = decode.DecodeSpec(K=K, pflm=True, max_new_tokens=new_tokens,
                                  cache_phases=cache_phases)
  engines = {name: (pf.engine if name == 'pf' else ar.engine) for name in specs}
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', str(device))
  peak = peak_bandwidth(kind) if on_accel else None
  cache_mb = {}
  for b in batch_sizes:  # every batch is checked before anything compiles
    for name, spec in specs.items():
      cache_mb[b] = engines[name].check(spec, PROMPT_LEN, b) / 2**20
  precompile([(engines[n], s, b) for b in batch_sizes for n, s in specs.items()])
  rows = []
  for b in batch_sizes:
    print(f'batch {b}: KV cache {cache_mb[b]:.1f} MiB per engine', flush=True)
    timed = dict(zip(specs, time_decode([(engines[n], s) for n, s in specs.items()], b,
                                        repeats, ar.arch.vocab_size)))
    row = {'batch_size': b, 'K': K, 'new_tokens': new_tokens}
    for name, (seconds, steps) in timed.items():
      row[f'{name}_seconds'] = seconds
      row[f'{name}_tokens_per_s'] = b * new_tokens / seconds
      row[f'{name}_steps'] = steps
    best = min(decode.SAMPLERS, key=lambda n: row[f'ar_{n}_seconds'])
    row['ar_sampler'] = best
    for field in ('seconds', 'tokens_per_s', 'steps'):
      row[f'ar_{field}'] = row[f'ar_{best}_{field}']
    row['speedup'] = row['pf_tokens_per_s'] / row['ar_tokens_per_s']
    row['speedup_vs_greedy'] = row['pf_tokens_per_s'] / row['ar_greedy_tokens_per_s']
    if peak:
      filled = decode_attention == 'pallas'
      for name, spec_name in (('ar', f'ar_{best}'), ('pf', 'pf')):
        reads = specs[spec_name].mean_cache_read(PROMPT_LEN, filled)
        eng = engines[spec_name]
        row[f'{name}_hbm_fraction'] = bytes_per_step(eng.arch, eng.exe, eng.params, b, reads) / (
            row[f'{name}_seconds'] / row[f'{name}_steps']) / peak
    rows.append(row)
    print(f'batch {b}: AR {row["ar_tokens_per_s"]:,.0f} tok/s ({best}; categorical '
          f'{row["ar_categorical_tokens_per_s"]:,.0f}, inverse CDF '
          f'{row["ar_inverse_cdf_tokens_per_s"]:,.0f}, greedy '
          f'{row["ar_greedy_tokens_per_s"]:,.0f}), PFLM K={K} {row["pf_tokens_per_s"]:,.0f} '
          f'tok/s, speedup {row["speedup"]:.2f}x ({row["speedup_vs_greedy"]:.2f}x vs greedy)',
          flush=True)
  result = {'device': f'{kind} x{jax.device_count()} ({jax.default_backend()})',
            'cpu': runtime.cpu_model() if not on_accel else None,
            'date': time.strftime('%Y-%m-%d'), 'jax': jax.__version__,
            'config': {'d_model': ar.arch.d_model, 'n_layers': ar.arch.n_layers,
                       'n_heads': ar.arch.n_heads, 'vocab_size': ar.arch.vocab_size,
                       'seq_len': cfg.data.seq_len, 'dtype': dtype, 'dtype_reason': why,
                       **(models or {}), 'repeats': repeats,
                       'prompt_len': PROMPT_LEN, 'k_model': pf.k,
                       'cache_phases': cache_phases, 'decode_attention': decode_attention},
            'rows': rows}
  write_outputs(result, out_dir)
  return result


def markdown(result: dict) -> str:
  c = result['config']
  lines = [f'Device: {result["device"]}, {result["date"]}; D={c["d_model"]} L={c["n_layers"]} '
           f'H={c["n_heads"]} V={c["vocab_size"]} seq {c["seq_len"]} {c["dtype"]}'
           f'{", %d cache phases" % c["cache_phases"] if c.get("cache_phases", 1) > 1 else ""}'
           f'{", Pallas decode attention" if c.get("decode_attention") == "pallas" else ""}'
           f'{" (random weights)" if c["random_init"] else ""}', '',
           '| batch | K | new tokens | AR tok/s, Gumbel-max | AR tok/s, inverse CDF | '
           'AR tok/s, greedy | PFLM tok/s | speedup (vs the faster sampled AR) | vs greedy |' +
           (' AR HBM frac | PFLM HBM frac |' if 'ar_hbm_fraction' in result['rows'][0] else ''),
           '|---|---|---|---|---|---|---|---|---|' + ('---|---|' if 'ar_hbm_fraction' in
                                                      result['rows'][0] else '')]
  for r in result['rows']:
    line = (f'| {r["batch_size"]} | {r["K"]} | {r["new_tokens"]} | '
            f'{r["ar_categorical_tokens_per_s"]:,.0f} | {r["ar_inverse_cdf_tokens_per_s"]:,.0f} | '
            f'{r["ar_greedy_tokens_per_s"]:,.0f} | {r["pf_tokens_per_s"]:,.0f} | '
            f'{r["speedup"]:.2f}x | {r["speedup_vs_greedy"]:.2f}x |')
    if 'ar_hbm_fraction' in r:
      line += f' {r["ar_hbm_fraction"]:.1%} | {r["pf_hbm_fraction"]:.1%} |'
    lines.append(line)
  if 'ar_hbm_fraction' in result['rows'][0]:
    lines += ['', 'HBM frac: (weight bytes + bytes of the KV slots attention reads) per step / '
              'step time / peak HBM bandwidth.']
  return '\n'.join(lines) + '\n'


def write_outputs(result: dict, out_dir: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'benchmark.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, 'benchmark.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(result))
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  bs = [r['batch_size'] for r in result['rows']]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  a1.plot(bs, [r['ar_tokens_per_s'] for r in result['rows']], 'o-', label='AR (fastest sampler)')
  a1.plot(bs, [r['ar_greedy_tokens_per_s'] for r in result['rows']], '^--', label='AR (greedy)')
  a1.plot(bs, [r['pf_tokens_per_s'] for r in result['rows']], 's-',
          label=f'PFLM K={result["rows"][0]["K"]}')
  a1.set_xscale('log', base=2)
  a1.set_yscale('log')
  a1.set_xlabel('batch size')
  a1.set_ylabel('tokens / s')
  a1.legend()
  a1.grid(alpha=0.3)
  a2.plot(bs, [r['speedup'] for r in result['rows']], 'o-', color='C2')
  a2.axhline(1.0, color='gray', lw=0.8)
  a2.set_xscale('log', base=2)
  a2.set_xlabel('batch size')
  a2.set_ylabel('speedup (PFLM / AR)')
  a2.grid(alpha=0.3)
  fig.suptitle(result['device'])
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'benchmark.png'), dpi=120)
  plt.close(fig)
