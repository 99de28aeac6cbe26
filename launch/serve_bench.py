"""The load benchmark of record: AR vs PFLM servers under an OpenAI-API load generator.

  python -m venv /tmp/bench && /tmp/bench/bin/pip install -r requirements-bench.txt
  python launch/serve_bench.py --aiperf=/tmp/bench/bin/aiperf --out=DIR \
      [--server_cpus=1 --client_cpus=0]
  python launch/serve_bench.py --client=inproc --out=DIR

Two protocols, because on a small machine the load generator competes with the server for
its cores: `aiperf` (a separate process; --server_cpus / --client_cpus pin the server and
the offline engine to some cores and aiperf to others, so both engines get the same
cores), and `inproc` (the server's app on uvicorn in this process, driven by a minimal
asyncio streaming client: no generator process at all). Either way the server splits its
cores as `serve` does (--host_cpus: its Python threads on the first core, XLA's compute
threads on the others; e.g. --server_cpus=0,1 --client_cpus=0 puts aiperf beside the
server's Python, off the compute core); the offline engine is timed on every core the
server has, and, when the server splits them, also on its compute cores alone (`vs
offline, compute cores`).

For each model (AR and PFLM K=4 of one random-weight shape, default the CPU benchmark's
D=256, L=4, H=4, V=8192, max length 256) this starts `python -m kforcing_jax.serve` on
127.0.0.1 and runs NVIDIA aiperf (streaming completions, ignore_eos, server token counts)
with a fixed seeded prompt set (synthetic-vocabulary prompts of 2..6 tokens, 250-token
completions): a concurrency sweep, then Poisson request rates. It also times the offline
engine's static batch (kforcing_jax.benchmark) at the same shape and precision. Writes
DIR/serve_bench.json, DIR/serve_bench.md and DIR/serve_bench.png (output tokens/s against
per-token latency, AR and PFLM).
"""
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from kforcing_jax import runtime
from kforcing_jax.serving import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS
flags.DEFINE_string('aiperf', 'aiperf', 'the aiperf executable (requirements-bench.txt)')
flags.DEFINE_enum('client', 'aiperf', ['aiperf', 'inproc'], 'load generator (see above)')
flags.DEFINE_string('server_cpus', '', 'taskset CPU list of the server and the offline engine')
flags.DEFINE_string('client_cpus', '', 'taskset CPU list of aiperf')
flags.DEFINE_integer('host_cpus', 1, 'the server\'s --host_cpus (cores kept for its Python '
                     'threads; 0: every thread on every core)')
flags.DEFINE_string('out', 'serve_bench_out', 'output directory')
flags.DEFINE_string('concurrency', '1,4,16,32', 'concurrency sweep')
flags.DEFINE_string('rates', '', 'Poisson request rates (req/s); default: 0.25, 0.5 and 1x '
                    'the PFLM\'s measured request throughput at concurrency 16')
flags.DEFINE_integer('requests_per_point', 48, 'requests per point (at least 2x concurrency)')
flags.DEFINE_integer('output_len', 250, 'completion tokens (ignore_eos)')
flags.DEFINE_integer('prompt_vocab', 8190, 'prompts use synthetic symbols s1..s<this - 1>')
flags.DEFINE_integer('prompt_min', 2, 'shortest prompt (tokens)')
flags.DEFINE_integer('prompt_max', 6, 'longest prompt (tokens; + output_len <= the max length 256)')
flags.DEFINE_integer('max_slots', 16, 'server slots')
flags.DEFINE_integer('K', 4, 'PFLM tokens per step')
flags.DEFINE_float('slo_ms', 0.0, 'per-token latency SLO for goodput (ms); default: 1.5x '
                   'the AR server\'s p50 at concurrency 1')
flags.DEFINE_string('model_flags', '--config.model.d_model=256 --config.model.n_layers=4 '
                    '--config.model.n_heads=4 --config.model.vocab_size=8192 '
                    '--config.data.synthetic.n_symbols=8190 --config.data.seq_len=256',
                    'model fields (the CPU benchmark shape)')
flags.DEFINE_string('serve_flags', '', 'more server flags, space-separated (e.g. '
                    '--steps_per_call=4)')
flags.DEFINE_string('dtype', 'auto', 'serving precision (both models and the offline engine)')
flags.DEFINE_integer('seed', 0, 'prompt set and aiperf seed')
flags.DEFINE_string('tokenizer', '', 'a local Hugging Face tokenizer directory for aiperf '
                    '(it only counts input text here; default: one built from the GPT-2 files '
                    'in $KFORCING_TESTDATA/tokenizers/gpt2)')


def write_prompts(path: str) -> None:
  rng = np.random.default_rng(FLAGS.seed)
  with open(path, 'w', encoding='utf-8') as f:
    for _ in range(512):
      n = int(rng.integers(FLAGS.prompt_min, FLAGS.prompt_max + 1))
      words = ['|'] + [f's{i}' for i in rng.integers(1, FLAGS.prompt_vocab, n - 1)]
      f.write(json.dumps({'text': ' '.join(words), 'output_length': FLAGS.output_len}) + '\n')


def hf_tokenizer(out_dir: str) -> str:
  if FLAGS.tokenizer:
    return FLAGS.tokenizer
  import tokenizers  # pylint: disable=g-import-not-at-top
  src = os.path.join(os.environ.get('KFORCING_TESTDATA', ''), 'tokenizers', 'gpt2')
  tok = tokenizers.ByteLevelBPETokenizer(os.path.join(src, 'vocab.json'),
                                         os.path.join(src, 'merges.txt'))
  d = os.path.join(out_dir, 'hf_tokenizer')
  os.makedirs(d, exist_ok=True)
  tok.save(os.path.join(d, 'tokenizer.json'))
  with open(os.path.join(d, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': 1024}, f)
  return d


def server_flags(model: str) -> list[str]:
  return (['--config=synthetic', '--random_init', f'--model={model}',
           f'--max_slots={FLAGS.max_slots}', f'--dtype={FLAGS.dtype}', f'--served_name={model}']
          + ([f'--K={FLAGS.K}'] if model == 'pflm' else []) + FLAGS.model_flags.split()
          + [f'--host_cpus={FLAGS.host_cpus}'] + FLAGS.serve_flags.split())


def start_server(model: str, log_path: str) -> launcher.ServerProcess:
  return launcher.ServerProcess(server_flags(model), log_path, cpus=FLAGS.server_cpus or None)


class _Stream:
  """A bare HTTP/1.1 keep-alive connection that POSTs streaming completions and yields
  each SSE event's token count: asyncio streams and byte scans, no HTTP library and no
  JSON decoding per event, so that the in-process client takes as little of the server's
  interpreter as it can."""

  def __init__(self, port: int):
    self.port = port
    self.reader = self.writer = None

  async def post(self, body: dict):
    import asyncio  # pylint: disable=g-import-not-at-top
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection('127.0.0.1', self.port)
    data = json.dumps(body).encode()
    self.writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                      b'Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s'
                      % (len(data), data))
    head = (await self.reader.readuntil(b'\r\n\r\n')).lower()
    if not head.startswith(b'http/1.1 200') or b'transfer-encoding: chunked' not in head:
      raise RuntimeError(f'unexpected response head: {head[:200]!r}')
    buf = b''
    while True:
      size = int((await self.reader.readline()).split(b';')[0], 16)
      chunk = await self.reader.readexactly(size + 2)
      if not size:
        break
      buf += chunk[:-2]
      *events, buf = buf.split(b'\n\n')
      for ev in events:
        if ev.startswith(b'data: {'):
          at = ev.find(b'"token_ids": [')
          if at < 0:
            raise RuntimeError(f'an event without token_ids: {ev[:200]!r}')
          ids = ev[at + 14:ev.index(b']', at)]
          yield ids.count(b',') + 1 if ids.strip() else 0
    if b'connection: close' in head:
      self.close()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      self.writer = None


def inproc(model: str, prompts: str, out_dir: str, concurrency: int) -> dict:
  """The concurrency point with the app on uvicorn in this process and `concurrency`
  asyncio clients each streaming completions back to back over its own keep-alive
  connection (_Stream)."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from kforcing_jax import serve  # pylint: disable=g-import-not-at-top
  from kforcing_jax.pipeline import config_lib  # pylint: disable=g-import-not-at-top
  port = launcher.free_port()
  f = config_lib.cli_flags(serve.define_flags, ['serve', f'--port={port}', '--log_level=error',
                                                *server_flags(model)])
  app = serve.build(f)
  srv = serve.uvicorn_server(app, f)
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  while not srv.started:
    time.sleep(0.05)
  with open(prompts, encoding='utf-8') as fh:
    texts = [json.loads(line)['text'] for line in fh]
  n = max(FLAGS.requests_per_point, 2 * concurrency)
  ttft, itl, tokens, e2e = [], [], [0], []

  async def one(conn, text):
    body = {'model': model, 'prompt': text, 'max_tokens': FLAGS.output_len, 'stream': True,
            'ignore_eos': True}
    t0 = time.perf_counter()
    last, got = None, 0
    async for k in conn.post(body):
      if not k:
        continue
      now = time.perf_counter()
      if last is None:
        ttft.append(now - t0)
      else:
        itl.extend([(now - last) / k] * k)
      last, got = now, got + k
    if got != FLAGS.output_len:  # ignore_eos: every completion has output_len tokens
      raise RuntimeError(f'a completion of {got} tokens, expected {FLAGS.output_len}')
    tokens[0] += got
    e2e.append(time.perf_counter() - t0)

  async def worker(queue):
    conn = _Stream(port)
    try:
      while queue:
        await one(conn, queue.pop())
    finally:
      conn.close()

  async def drive():
    queue = [texts[i % len(texts)] for i in range(n)]
    warm = _Stream(port)
    await one(warm, texts[0])  # warm the HTTP path
    warm.close()
    ttft.clear(), itl.clear(), e2e.clear()
    tokens[0] = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
    return time.perf_counter() - t0

  try:
    wall = asyncio.run(drive())
  finally:
    srv.should_exit = True
    thread.join(timeout=120)
  ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 2)
  return {'concurrency': concurrency, 'rate': None, 'requests': n,
          'output_tok_s': tokens[0] / wall, 'request_s': n / wall, 'goodput_req_s': None,
          'ttft_ms_p50': ms(ttft, 50), 'ttft_ms_p99': ms(ttft, 99),
          'itl_ms_p50': ms(itl, 50), 'itl_ms_p99': ms(itl, 99),
          'output_len_avg': tokens[0] / n}


def aiperf(url, model, prompts, tok, out_dir, slo_ms, *, concurrency=None, rate=None) -> dict:
  n = max(FLAGS.requests_per_point, 2 * (concurrency or 0))
  cmd = [FLAGS.aiperf, 'profile', '--url', url, '--endpoint-type', 'completions', '--model',
         model, '--streaming', '--input-file', prompts, '--custom-dataset-type', 'single_turn',
         '--extra-inputs', 'ignore_eos:true', '--use-server-token-count', '--tokenizer', tok,
         '--random-seed', str(FLAGS.seed), '--request-count', str(n),
         '--warmup-request-count', '2', '--output-artifact-dir', out_dir, '--ui-type', 'none',
         # the generator shares this machine's cores with the server: keep it light
         '--workers-max', '1', '--record-processors', '1', '--export-level', 'summary',
         '--goodput', f'inter_token_latency:{slo_ms}']
  if concurrency:
    cmd += ['--concurrency', str(concurrency)]
  else:
    cmd += ['--request-rate', str(rate), '--arrival-pattern', 'poisson']
  if FLAGS.client_cpus:
    cmd = ['taskset', '-c', FLAGS.client_cpus, *cmd]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
  if r.returncode:
    raise SystemExit(f'aiperf failed ({" ".join(cmd)}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}')
  path = next(os.path.join(dp, f) for dp, _, fs in os.walk(out_dir) for f in fs
              if f.endswith('aiperf.json'))
  with open(path, encoding='utf-8') as f:
    m = json.load(f)

  def stat(name, key):
    v = m.get(name) or {}
    return v.get(key)
  failed = stat('error_request_count', 'avg') or 0
  if failed:
    raise SystemExit(f'{failed:.0f} of {n} requests failed in {out_dir}: see its logs')
  return {'concurrency': concurrency, 'rate': rate, 'requests': n,
          'output_tok_s': stat('output_token_throughput', 'avg'),
          'request_s': stat('request_throughput', 'avg'),
          'goodput_req_s': stat('goodput', 'avg'),
          'ttft_ms_p50': stat('time_to_first_token', 'p50'),
          'ttft_ms_p99': stat('time_to_first_token', 'p99'),
          'itl_ms_p50': stat('inter_token_latency', 'p50'),
          'itl_ms_p99': stat('inter_token_latency', 'p99'),
          'output_len_avg': stat('output_sequence_length', 'avg')}


def cpu_list(spec: str) -> list[int]:
  """The CPUs of a taskset list ('0,2-3')."""
  out = []
  for part in spec.split(','):
    lo, _, hi = part.partition('-')
    out += range(int(lo), int(hi or lo) + 1)
  return sorted(set(out))


def offline(out_dir: str, cpus: str = '') -> dict:
  """The offline engine's static batches 1 and 16, same shape and precision, on `cpus`
  (default: the server's)."""
  cmd = [sys.executable, '-m', 'kforcing_jax.benchmark', '--config=synthetic', '--random_init',
         '--batch_sizes=1,16', f'--K={FLAGS.K}', '--repeats=3', f'--dtype={FLAGS.dtype}',
         f'--out={out_dir}'] + FLAGS.model_flags.split()
  cpus = cpus or FLAGS.server_cpus
  if cpus:
    cmd = ['taskset', '-c', cpus, *cmd]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=3600, env=env)
  with open(os.path.join(out_dir, 'benchmark.json'), encoding='utf-8') as f:
    rows = {r['batch_size']: r for r in json.load(f)['rows']}
  return {str(b): {'ar_categorical_tok_s': rows[b]['ar_categorical_tokens_per_s'],
                   'pflm_tok_s': rows[b]['pf_tokens_per_s']} for b in (1, 16)}


def main(argv):
  del argv
  server_cpus = cpu_list(FLAGS.server_cpus) if FLAGS.server_cpus else sorted(
      os.sched_getaffinity(0))
  host, compute = server_cpus[:FLAGS.host_cpus], server_cpus[FLAGS.host_cpus:]
  splits = 0 < FLAGS.host_cpus < len(server_cpus)
  if FLAGS.client == 'inproc':  # the server runs in this process: split its cores now
    split = runtime.reserve_host_cpus(FLAGS.host_cpus)
  else:  # as each server process splits them
    split = (runtime.split_line(host, compute) if splits else
             'host and compute threads share every core')
  print(split, flush=True)
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  prompts = os.path.join(out, 'prompts.jsonl')
  write_prompts(prompts)
  tok = hf_tokenizer(out)
  conc = [int(c) for c in FLAGS.concurrency.split(',') if c]
  result = {'date': time.strftime('%Y-%m-%d'), 'command': ' '.join(sys.argv),
            'output_len': FLAGS.output_len, 'prompt_len': [FLAGS.prompt_min, FLAGS.prompt_max],
            'max_slots': FLAGS.max_slots, 'K': FLAGS.K, 'model_flags': FLAGS.model_flags,
            'models': {}}
  slo = FLAGS.slo_ms
  result['client'] = FLAGS.client
  result['cpus'] = {'server': FLAGS.server_cpus, 'client': FLAGS.client_cpus,
                    'host_cpus': FLAGS.host_cpus, 'split': split}
  result['offline'] = offline(os.path.join(out, 'offline'))
  if splits:
    result['cpus']['compute'] = ','.join(map(str, compute))
    result['offline_compute'] = offline(os.path.join(out, 'offline_compute'),
                                        result['cpus']['compute'])
  if FLAGS.client == 'inproc':
    for model in ('ar', 'pflm'):
      rows = []
      for c in conc:
        rows.append(inproc(model, prompts, out, c))
        print(model, rows[-1], flush=True)
      result['models'][model] = {'concurrency': rows}
  for model in ('ar', 'pflm') if FLAGS.client == 'aiperf' else ():
    srv = start_server(model, os.path.join(out, f'server_{model}.log'))
    try:
      rows = []
      if not slo:  # calibrate the SLO on the AR server alone at concurrency 1
        probe = aiperf(srv.url, model, prompts, tok, os.path.join(out, 'slo_probe'), 1e9,
                       concurrency=1)
        slo = round(1.5 * probe['itl_ms_p50'], 2)
      for c in conc:
        rows.append(aiperf(srv.url, model, prompts, tok, os.path.join(out, f'{model}_c{c}'),
                           slo, concurrency=c))
        print(model, rows[-1], flush=True)
      result['models'][model] = {'concurrency': rows}
    finally:
      srv.close()
  if FLAGS.client == 'aiperf':
    pf16 = next((r for r in result['models']['pflm']['concurrency'] if r['concurrency'] == 16),
                result['models']['pflm']['concurrency'][-1])
    rates = ([float(r) for r in FLAGS.rates.split(',') if r] if FLAGS.rates else
             [round(f * pf16['request_s'], 3) for f in (0.25, 0.5, 1.0)])
    for model in ('ar', 'pflm'):
      srv = start_server(model, os.path.join(out, f'server_{model}_rates.log'))
      try:
        rows = []
        for rate in rates:
          rows.append(aiperf(srv.url, model, prompts, tok, os.path.join(out, f'{model}_r{rate}'),
                             slo, rate=rate))
          print(model, rows[-1], flush=True)
        result['models'][model]['poisson'] = rows
      finally:
        srv.close()
  result['slo_itl_ms'] = slo or None
  with open(os.path.join(out, 'serve_bench.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  md = markdown(result)
  with open(os.path.join(out, 'serve_bench.md'), 'w', encoding='utf-8') as f:
    f.write(md)
  plot(result, os.path.join(out, 'serve_bench.png'))
  print(md)


def markdown(r: dict) -> str:
  o = r['offline']
  slo = f'SLO: per-token latency <= {r["slo_itl_ms"]} ms; ' if r.get('slo_itl_ms') else ''
  lines = [f'Client: {r["client"]}; {slo}{r["output_len"]}-token completions, prompts '
           f'{r["prompt_len"][0]}-{r["prompt_len"][1]} tokens, {r["max_slots"]} slots.', '',
           '| model | load | output tok/s | vs offline | vs offline, compute cores | '
           'TTFT p50 / p99 ms | per-token p50 / p99 ms | goodput req/s |',
           '|---|---|---|---|---|---|---|---|']
  oc = r.get('offline_compute')
  for model, d in r['models'].items():
    key = 'ar_categorical_tok_s' if model == 'ar' else 'pflm_tok_s'
    for kind in ('concurrency', 'poisson'):
      for row in d.get(kind, []):
        load = f'conc {row["concurrency"]}' if kind == 'concurrency' else f'{row["rate"]} req/s'
        f = lambda v: '-' if v is None else f'{v:,.1f}'
        b = str(row['concurrency']) if kind == 'concurrency' else None
        vs = lambda ref: (f'{row["output_tok_s"] / ref[b][key]:.0%}'
                          if ref and b in ('1', '16') else '-')
        lines.append(f'| {model} | {load} | {f(row["output_tok_s"])} | {vs(o)} | {vs(oc)} | '
                     f'{f(row["ttft_ms_p50"])} / {f(row["ttft_ms_p99"])} | '
                     f'{f(row["itl_ms_p50"])} / {f(row["itl_ms_p99"])} | '
                     f'{f(row["goodput_req_s"])} |')
  offline_line = lambda d: '; '.join(
      f'batch {b}: AR (Gumbel-max) {d[b]["ar_categorical_tok_s"]:,.0f} tok/s, PFLM K={r["K"]} '
      f'{d[b]["pflm_tok_s"]:,.0f} tok/s' for b in ('1', '16')) + '.'
  lines += ['', f'Server cores: {r["cpus"]["split"]}.',
            '', 'Offline engine, same shape and precision, every core of the server: ' +
            offline_line(o)]
  if oc:
    lines += ['', f'Offline engine on the compute cores alone (CPUs {r["cpus"]["compute"]}): '
              + offline_line(oc)]
  return '\n'.join(lines) + '\n'


def plot(r: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for model, d in r['models'].items():
    rows = d['concurrency']
    ax.plot([x['itl_ms_p50'] for x in rows], [x['output_tok_s'] for x in rows], 'o-',
            label=f'{model} (concurrency sweep)')
    for x in rows:
      ax.annotate(str(x['concurrency']), (x['itl_ms_p50'], x['output_tok_s']), fontsize=7)
  if r.get('slo_itl_ms'):
    ax.axvline(r['slo_itl_ms'], color='grey', ls='--', lw=0.8, label='SLO')
  ax.set_xlabel('per-token latency p50 (ms)')
  ax.set_ylabel('output tokens/s')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
