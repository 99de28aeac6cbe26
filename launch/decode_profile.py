"""Where a decoding step's time goes: AR and PFLM ms/step and, with --trace, the kernels.

  python launch/decode_profile.py --config=configs/owt.py --config.model.vocab_size=50258 \
      --batch_sizes=1,256 --K=4 --trace --out=DIR [--attention=dot|reduce|kernel] \
      [--label=NAME] [--engine=offline|slot]

Random weights at the config's model fields, the benchmark's protocol (prompt length 6,
generation to data.seq_len, compile excluded, median of --repeats runs). With --trace, one
more run of each engine goes under jax.profiler; the events are summed by name per trace
line (process | thread: a GPU's kernels are on its stream's line), and the top ones are
printed per decoding step:
  ms/step  calls/step  name
so a step's kernel time can be set against its wall time (the rest is launch gaps and the
loop's host round trip), and then the same time per source op -- events mapped through the
compiled HLO's op_name metadata, all layers together (e.g. `Transformer/block/attn/
reduce_sum`, `Transformer/head/dot_general`) -- which says what a fusion or kernel is.
--attention sets ExecConfig.cache_products (dot: batched dots for every step; reduce:
multiply-reduce for steps of 2..16 queries; kernel: as reduce, one-query steps in the CPU
kernel; auto: kernel on a one-device CPU, else reduce) to compare them;
--decode_attention=pallas profiles the flash-decoding kernel path (GPU). --engine=slot
times and traces the serving SlotEngine's step instead (as many slots as the batch size,
all busy, or --slots slots of which the batch size are busy, stepping in their slot-count
bucket as a server's; AR sampled at temperature 1): the same decode_step at a position per
row. XLA_FLAGS set outside (e.g. command buffers) apply as usual; --label names the variant
in the JSON.
Writes DIR/decode_profile_<label>.json.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from kforcing_jax.data import datasets as data_lib
from kforcing_jax.evaluation import benchmark
from kforcing_jax.models import random_init
from kforcing_jax.pipeline import config_lib
from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import precision
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.serving import engine as slot_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/owt.py', 'config file',
                                          lock_config=True)
flags.DEFINE_string('batch_sizes', '1', 'comma-separated batch sizes')
flags.DEFINE_integer('K', 4, 'PFLM tokens per step')
flags.DEFINE_integer('cache_phases', 1, 'DecodeSpec.cache_phases')
flags.DEFINE_integer('repeats', 3, 'timed runs (median)')
flags.DEFINE_bool('trace', False, 'profile one more run of each engine')
flags.DEFINE_integer('top', 25, 'events printed per trace')
flags.DEFINE_enum('attention', 'auto', ['auto', 'dot', 'reduce', 'kernel'],
                  'products of the xla cached attention (ExecConfig.cache_products)')
flags.DEFINE_string('dtype', 'auto', 'serving precision, as benchmark.py --dtype')
flags.DEFINE_string('decode_attention', 'xla', 'as benchmark.py --decode_attention')
flags.DEFINE_enum('engine', 'offline', ['offline', 'slot'],
                  'offline: the decoding loop (benchmark protocol); slot: the serving '
                  'SlotEngine step with every slot busy')
flags.DEFINE_integer('slots', 0, 'with --engine=slot: the engine\'s slots (0: the batch size); '
                     'the batch size busy slots step in their slot-count bucket, as a server '
                     'with fewer requests than slots')
flags.DEFINE_string('label', 'default', 'variant name for the output file')
flags.DEFINE_string('out', 'bench_out', 'output directory')
FLAGS = flags.FLAGS


# Events that wrap or mark others (XLA:CPU's executor, thread-pool bookkeeping): not ops.
_WRAPPERS = ('ThunkExecutor', 'end: ', 'ThreadpoolListener', 'SlinkyThreadPool')


def op_categories(hlo_text: str) -> dict[str, str]:
  """Instruction name -> its source op (the op_name metadata, with the loop's prefix and
  the layer index dropped), so a step's time adds up per model op (every layer's
  'block/attn/reduce_sum' together) instead of per fusion name."""
  cats = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(', line)
    if not m:
      continue
    op = re.search(r'op_name="([^"]+)"', line)
    if op:
      op = re.sub(r'^jit\([^)]*\)/', '', op.group(1)).replace('while/body/', '')
      cats[m.group(1)] = re.sub(r'block_\d+', 'block', op)
    else:  # made by a compiler pass, no source op: opcode and shape say what it is
      cats[m.group(1)] = f'({m.group(3)} {m.group(2).split("{")[0]})'
  return cats


def trace_summary(run, steps: int, top: int, categories: dict[str, str] | None = None) -> dict:
  """Per trace line (process | thread): busy ms/step, the top events by time and, where
  events name their HLO instruction (XLA:CPU ops, GPU kernels), ms/step per source op
  ('by_op', via op_categories). run(): the traced work, returning arrays to wait for."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  # on an accelerator the kernels come from the device tracer; host ops only on CPU
  options.host_tracer_level = 2 if jax.default_backend() == 'cpu' else 1
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True, profiler_options=options):
      jax.block_until_ready(run())
    files = glob.glob(os.path.join(d, '**', '*.trace.json.gz'), recursive=True)
    if not files:
      return {'error': f'no perfetto trace under {d}: {os.listdir(d)}'}
    with gzip.open(files[0]) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  proc = {e['pid']: e['args'].get('name', str(e['pid'])) for e in events
          if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  thread = {(e['pid'], e['tid']): e['args'].get('name', str(e['tid'])) for e in events
            if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  total = collections.defaultdict(float)
  calls = collections.Counter()
  by_op = collections.defaultdict(float)
  example_args = {}
  categories = categories or {}
  for e in events:
    if e.get('ph') != 'X' or 'dur' not in e:
      continue
    # a device's trace holds kernels and, on other lines, the XLA ops/modules around them
    line = f'{proc.get(e["pid"], e["pid"])} | {thread.get((e["pid"], e.get("tid")), e.get("tid"))}'
    key = (line, e['name'])
    total[key] += e['dur']
    calls[key] += 1
    example_args.setdefault(key, {k: str(v)[:120] for k, v in (e.get('args') or {}).items()})
    hlo_op = (e.get('args') or {}).get('hlo_op')
    if hlo_op in categories and not e['name'].startswith(_WRAPPERS):
      by_op[(line, categories[hlo_op])] += e['dur']
  result = {}
  for pname in sorted({k[0] for k in total}):
    keys = sorted((k for k in total if k[0] == pname), key=lambda k: -total[k])
    result[pname] = {
        'busy_ms_per_step': sum(total[k] for k in keys) / 1e3 / steps,
        'top': [{'name': k[1][:160], 'ms_per_step': total[k] / 1e3 / steps,
                 'calls_per_step': calls[k] / steps, 'args': example_args[k]}
                for k in keys[:top]]}
    ops = sorted((k for k in by_op if k[0] == pname), key=lambda k: -by_op[k])
    if ops:
      result[pname]['ops_ms_per_step'] = sum(by_op[k] for k in ops) / 1e3 / steps
      result[pname]['by_op'] = [{'op': k[1][:120], 'ms_per_step': by_op[k] / 1e3 / steps}
                                for k in ops[:top]]
  return result


def print_trace(name: str, summary: dict, ms_per_step: float, top: int) -> None:
  for pname, s in summary.items():
    if pname == 'error':
      print(f'  {name}: {s}')
      continue
    if s['busy_ms_per_step'] < 0.02 * ms_per_step:
      continue
    print(f'  {name} trace [{pname}] busy {s["busy_ms_per_step"]:.3f} ms/step '
          f'(wall {ms_per_step:.3f})')
    device_line = not pname.startswith('/host')
    for t in s['top'][:top if device_line else 3]:
      print(f'    {t["ms_per_step"]:8.4f} {t["calls_per_step"]:7.2f}  {t["name"][:110]}')
    if s.get('by_op'):
      print(f'    per source op ({s["ops_ms_per_step"]:.3f} ms/step of ops on this line):')
      for t in s['by_op'][:top]:
        print(f'    {t["ms_per_step"]:8.4f}  {t["op"]}')


def offline_row(f, engine, specs, b: int, vocab_size: int, new_tokens: int) -> dict:
  """The benchmark protocol's times of each spec's loop at batch b (and, with --trace, the
  kernels of one more run)."""
  timed = benchmark.time_decode([(engine, s) for s in specs.values()], b, f.repeats,
                                vocab_size)
  row = {'batch_size': b}
  for (name, spec), (sec, steps) in zip(specs.items(), timed):
    row[name] = {'seconds': sec, 'steps': steps, 'ms_per_step': 1e3 * sec / steps,
                 'tokens_per_s': b * new_tokens / sec}
  if f.trace:
    width = max(benchmark.PROMPT_LEN, f.K + 1)
    prompts = jnp.ones((b, width), jnp.int32)
    pads = jnp.zeros((b,), jnp.int32)
    seeds = jnp.arange(b, dtype=jnp.int32)
    for name, spec in specs.items():
      categories = op_categories(engine.compile(spec, b, width, exact=True).as_text())
      row[name]['trace'] = trace_summary(
          lambda: engine.generate_arrays(spec, prompts, pads, seeds, seed=99)[0],
          row[name]['steps'], f.top, categories)
  return row


def slot_row(f, slot_engines, b: int, new_tokens: int) -> dict:
  """SlotEngine.generate with all b slots busy: the median over --repeats of the mean step
  time over a request's steps (prefill and insert excluded); with --trace the kernels."""
  row = {'batch_size': b}
  for name, eng in slot_engines.items():
    steps = -(-new_tokens // eng.K)

    def busy():
      state = eng.init_state()
      for i in range(b):
        state = eng.insert(state, eng.prefill([1] * benchmark.PROMPT_LEN), i,
                           slot_lib.SamplingParams(temperature=1.0, seed=i))
      return jax.block_until_ready(state)

    def run(state):
      for _ in range(steps):
        state, toks, _ = eng.generate(state, eng.rows(b))
      return toks
    jax.block_until_ready(run(busy()))  # compile + warm up
    times = []
    for _ in range(f.repeats):
      state = busy()
      t0 = time.perf_counter()
      jax.block_until_ready(run(state))
      times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    row[name] = {'seconds': sec, 'steps': steps, 'ms_per_step': 1e3 * sec / steps,
                 'tokens_per_s': b * steps * eng.K / sec}
    if f.trace:
      state = busy()
      fn, params = eng.step_program(eng.rows(b))
      categories = op_categories(fn.lower(params, state, eng.rows(b)).compile().as_text())
      row[name]['trace'] = trace_summary(lambda: run(state), steps, f.top, categories)
  return row


def main(argv):
  del argv
  f = FLAGS
  cfg = _CONFIG.value
  dtype, why = precision.choose(f.dtype)
  print(f'serving precision: {dtype} ({why})')
  benchmark.check_decode_attention(f.decode_attention, jax.default_backend() != 'cpu')
  arch, params = random_init.random_model(cfg, data_lib.model_vocab_size(cfg))
  exe = precision.exec_config(dtype, f.decode_attention, f.attention)
  sampler = sampler_lib.Sampler(arch, params, k=f.K, exe=exe, max_len=cfg.data.seq_len)
  engine = sampler.engine
  new_tokens = cfg.data.seq_len - benchmark.PROMPT_LEN
  specs = {'ar': decode.DecodeSpec(K=1, pflm=False, max_new_tokens=new_tokens,
                                   cache_phases=f.cache_phases),
           'pf': decode.DecodeSpec(K=f.K, pflm=True, max_new_tokens=new_tokens,
                                   cache_phases=f.cache_phases)}
  device = jax.devices()[0]
  result = {'device': getattr(device, 'device_kind', str(device)), 'label': f.label,
            'engine': f.engine, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'attention': f.attention, 'decode_attention': f.decode_attention,
            'dtype': dtype,
            'cache_phases': f.cache_phases, 'K': f.K, 'new_tokens': new_tokens,
            'model': {'d_model': arch.d_model, 'n_layers': arch.n_layers,
                      'n_heads': arch.n_heads, 'n_kv_heads': arch.n_kv_heads,
                      'vocab_size': arch.vocab_size, 'dtype': dtype}, 'rows': []}
  batch_sizes = [int(x) for x in f.batch_sizes.split(',') if x.strip()]
  for b in batch_sizes:
    for spec in specs.values():
      engine.check(spec, benchmark.PROMPT_LEN, b)
  if f.engine == 'offline':
    benchmark.precompile([(engine, spec, b) for b in batch_sizes for spec in specs.values()])
  for b in batch_sizes:
    if f.engine == 'offline':
      row = offline_row(f, engine, specs, b, arch.vocab_size, new_tokens)
    else:
      slot_engines = {name: slot_lib.SlotEngine(arch, sampler.params, engine.exe,
                                                k=f.K if name == 'pf' else 0,
                                                K=f.K if name == 'pf' else 1,
                                                max_slots=max(b, f.slots),
                                                max_len=cfg.data.seq_len)
                      for name in specs}
      row = slot_row(f, slot_engines, b, new_tokens)
    row['speedup'] = row['pf']['tokens_per_s'] / row['ar']['tokens_per_s']
    print(f'[{f.label}] {f.engine} batch {b}: AR {row["ar"]["ms_per_step"]:.3f} ms/step '
          f'({row["ar"]["tokens_per_s"]:,.0f} tok/s), PFLM K={f.K} '
          f'{row["pf"]["ms_per_step"]:.3f} ms/step ({row["pf"]["tokens_per_s"]:,.0f} tok/s), '
          f'speedup {row["speedup"]:.2f}x', flush=True)
    for name in specs:
      if 'trace' in row[name]:
        print_trace(name, row[name]['trace'], row[name]['ms_per_step'], f.top)
    result['rows'].append(row)
  os.makedirs(f.out, exist_ok=True)
  path = os.path.join(f.out, f'decode_profile_{f.label}.json')
  with open(path, 'w', encoding='utf-8') as fh:
    json.dump(result, fh, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
