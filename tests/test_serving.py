"""The slot engine, scheduler and OpenAI-compatible server: a request's tokens equal its
alone-run tokens (Sampler.generate_ids) whatever else is served; a live server driven by
the official openai client; a bounded load test."""
import asyncio
import queue
import socket
import threading
import time

import jax
import numpy as np
import openai
import pytest
import uvicorn

from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.training import checkpoint as ckpt_lib
from kforcing_jax.data import tokenization
from kforcing_jax.serving import api
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import scheduler as scheduler_lib
from kforcing_jax.serving import server
from tests.helpers import tiny_model

V = 53


@pytest.fixture(scope='module')
def models():
  ar = tiny_model(pflm=False, vocab=V, max_len=64, never_emit=(V - 1,))
  pf = tiny_model(pflm=True, vocab=V, max_len=64, never_emit=(V - 1,), seed=1)
  return {'ar': ar, 'pflm': pf}


_SAMPLERS = {}


def alone(arch, params, k, req, K, eos=-1):
  """The request decoded by itself with the offline engine, cut after its first EOS."""
  if (id(params), k) not in _SAMPLERS:  # one Sampler: its loops compile once per shape
    _SAMPLERS[id(params), k] = (params, sampler_lib.Sampler(arch, params, k=k))
  s = _SAMPLERS[id(params), k][1]
  p = req.params
  out = s.generate_ids([req.prompt], req.max_tokens, K=K if k else None,
                       temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                       freq_penalty=p.freq_penalty, seed=p.seed, stop_at_eos=False)[0].tolist()
  if eos >= 0 and eos in out and not req.ignore_eos:
    out = out[:out.index(eos) + 1]
  return out


def collect(q):
  toks = []
  while True:
    ev = q.get(timeout=120)
    toks += ev.token_ids
    if ev.finish_reason:
      return toks, ev.finish_reason


def serve_staggered(eng, reqs, eos, gap=0.02):
  sched = scheduler_lib.Scheduler(eng, eos_id=eos).start()
  queues = []
  try:
    for r in reqs:
      q = queue.Queue()
      r.emit = q.put
      sched.submit(r)
      queues.append(q)
      time.sleep(gap)
    return [collect(q) for q in queues]
  finally:
    sched.shutdown()


def requests(rng, n, pflm):
  out = []
  for i in range(n):
    if pflm:
      sp = engine_lib.SamplingParams(freq_penalty=(0.0, 0.5)[i % 2], seed=100 + i)
    else:
      sp = engine_lib.SamplingParams(temperature=(1.0, 0.0, 0.8)[i % 3],
                                     top_p=(1.0, 1.0, 0.9)[i % 3], top_k=5 * (i % 4 == 3),
                                     seed=100 + i)
    out.append(scheduler_lib.Request(rng.integers(1, V - 1, int(rng.integers(1, 12))).tolist(),
                                     int(rng.integers(2, 20)), sp, None))
  return out


@pytest.mark.parametrize('kind', ['ar', 'pflm'])
def test_served_tokens_equal_alone_tokens(models, kind):
  """Staggered arrivals, prompt lengths 1..11, AR sampled / greedy / top-p / top-k and PFLM
  with and without the frequency penalty; 3 slots for 9 requests (slots reused), and an
  EOS id that stops some requests early."""
  arch, _, params = models[kind]
  k, K = (4, 4) if kind == 'pflm' else (0, 1)
  reqs = requests(np.random.default_rng(0), 9, kind == 'pflm')
  eos = alone(arch, params, k, reqs[0], K)[2]  # request 0 stops at its third token
  eng = engine_lib.SlotEngine(arch, params, k=k, K=K, max_slots=3)
  got = serve_staggered(eng, reqs, eos)
  stopped = 0
  for r, (toks, reason) in zip(reqs, got):
    want = alone(arch, params, k, r, K, eos)
    assert toks == want, (r.prompt, r.params)
    stopped += reason == 'stop'
    assert reason == ('stop' if want[-1] == eos else 'length')
  assert stopped >= 1 and got[0][1] == 'stop'


def test_no_recompilation_in_steady_state(models):
  arch, _, params = models['pflm']
  eng = engine_lib.SlotEngine(arch, params, k=4, K=2, max_slots=2)
  rng = np.random.default_rng(1)
  serve_staggered(eng, requests(rng, 3, True), -1, gap=0)
  traces = eng.traces
  serve_staggered(eng, requests(rng, 6, True), -1, gap=0)  # same buckets
  assert eng.traces == traces


def test_sharded_engine_gives_the_same_tokens(models):
  """Parameters sharded by their logical axes over (data 4, tensor 2) virtual devices,
  slots along the data axis: the tokens of one device."""
  arch, _, params = tiny_model(pflm=True, vocab=54, max_len=64, seed=2)  # V splits in 2
  mesh = sharding_lib.make_mesh({'data': 4, 'fsdp': 1, 'tensor': 2})
  _, shardings = ckpt_lib.abstract_params(arch, mesh)
  sharded = jax.device_put(params, shardings)
  one = serve_staggered(engine_lib.SlotEngine(arch, params, k=4, K=4, max_slots=4),
                        requests(np.random.default_rng(2), 6, True), -1)
  many = serve_staggered(engine_lib.SlotEngine(arch, sharded, k=4, K=4, max_slots=4, mesh=mesh),
                         requests(np.random.default_rng(2), 6, True), -1)
  assert one == many


def test_engine_refuses_what_it_cannot_serve(models):
  arch, _, params = models['pflm']
  from kforcing_jax.decoding import engine as decode  # pylint: disable=g-import-not-at-top
  with pytest.raises(decode.DecodeError, match='K=8: allowed 1..4'):
    engine_lib.SlotEngine(arch, params, k=4, K=8, max_slots=2)
  eng = engine_lib.SlotEngine(arch, params, k=4, K=4, max_slots=2)
  with pytest.raises(decode.DecodeError, match='exceeds the model\'s maximum length 64'):
    eng.check(40, 30)
  sched = scheduler_lib.Scheduler(eng, max_queue=1)
  sched.submit(scheduler_lib.Request([1], 4, engine_lib.SamplingParams(), lambda ev: None))
  with pytest.raises(scheduler_lib.QueueFull, match='queue is full'):
    sched.submit(scheduler_lib.Request([1], 4, engine_lib.SamplingParams(), lambda ev: None))


def test_graceful_shutdown_finishes_running_and_queued_requests(models):
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=2)
  sched = scheduler_lib.Scheduler(eng).start()
  queues = []
  for i in range(4):  # two run, two wait
    q = queue.Queue()
    sched.submit(scheduler_lib.Request([1, 2, 3], 12, engine_lib.SamplingParams(seed=i), q.put))
    queues.append(q)
  sched.shutdown(drain=True, timeout=120)
  assert [collect(q)[1] for q in queues] == ['length'] * 4
  with pytest.raises(scheduler_lib.ShuttingDown, match='admits no new requests'):
    sched.submit(scheduler_lib.Request([1], 4, engine_lib.SamplingParams(), q.put))


def test_cancelled_requests_free_their_place(models):
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=1)
  sched = scheduler_lib.Scheduler(eng)
  q1, q2 = queue.Queue(), queue.Queue()
  first = scheduler_lib.Request([1, 2], 30, engine_lib.SamplingParams(), q1.put)
  sched.submit(first)
  sched.submit(scheduler_lib.Request([1, 2], 5, engine_lib.SamplingParams(), q2.put))
  first.cancel('timeout')  # e.g. a client that went away while queued
  sched.start()
  try:
    assert collect(q1) == ([], 'timeout')
    assert collect(q2)[1] == 'length'
  finally:
    sched.shutdown()


def test_text_stream_keeps_utf8_and_stop_strings_whole():
  gpt2 = tokenization.Tokenizer(
      name='bytes', vocab_size=256, eos_id=0, pad_id=0, never_emit_ids=(), fingerprint='',
      add_bos_eos=False, _encode=lambda s: list(s.encode()),
      _decode=lambda ids: bytes(ids).decode('utf-8', errors='replace'))
  s = api.TextStream(gpt2, eos_id=0, stop=('END',))
  ids = list('aé€'.encode()) + list(b'xEN')
  deltas = [s.add([t]) for t in ids]
  assert ''.join(deltas) == 'aé€x' and '\ufffd' not in ''.join(deltas)
  assert s.add(list(b'D more')) == '' and s.stopped  # 'EN' was held back, then matched


# ---- the live server ------------------------------------------------------------------------
class LiveServer:
  def __init__(self, arch, params, k, K, slots, max_queue=256, request_timeout=600.0,
               start=True):
    self.engine = engine_lib.SlotEngine(arch, params, k=k, K=K, max_slots=slots)
    self.tok = tokenization.synthetic(V, 'test')
    metrics = api.Metrics()
    self.sched = scheduler_lib.Scheduler(self.engine, eos_id=self.tok.eos_id,
                                         max_queue=max_queue, metrics=metrics)
    if start:
      self.sched.start()
    model = api.Model('tiny', k, K, V, self.engine.max_len, arch.never_emit_ids, self.tok)
    app = server.make_app(self.sched, model, metrics, request_timeout=request_timeout)
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    self.port = sock.getsockname()[1]
    sock.close()
    self.server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=self.port,
                                                log_level='warning'))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.02)
    self.url = f'http://127.0.0.1:{self.port}/v1'

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=60)


@pytest.fixture(scope='module')
def live(models):
  arch, _, params = models['pflm']
  s = LiveServer(arch, params, 4, 4, slots=8)
  yield s
  s.close()


def test_openai_client_completions(live, models):
  arch, _, params = models['pflm']
  c = openai.OpenAI(base_url=live.url, api_key='none', max_retries=0)
  assert [m.id for m in c.models.list().data] == ['tiny']
  r = c.completions.create(model='tiny', prompt='| s3 s4', max_tokens=10, seed=7,
                           frequency_penalty=0.5, extra_body={'ignore_eos': True})
  ids = r.choices[0].model_extra['token_ids']
  want = sampler_lib.Sampler(arch, params, k=4).generate_ids(
      [[0, 3, 4]], 10, K=4, freq_penalty=0.5, seed=7, stop_at_eos=False)[0].tolist()
  assert ids == want and r.choices[0].text == live.tok.decode(want)
  assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 10)
  assert r.choices[0].finish_reason == 'length'
  again = c.completions.create(model='tiny', prompt=[0, 3, 4], max_tokens=10, seed=7,
                               frequency_penalty=0.5, extra_body={'ignore_eos': True})
  assert again.choices[0].model_extra['token_ids'] == ids  # a seed reproduces a completion
  chunks = list(c.completions.create(model='tiny', prompt='| s3 s4', max_tokens=10, seed=7,
                                     frequency_penalty=0.5, stream=True,
                                     stream_options={'include_usage': True},
                                     extra_body={'ignore_eos': True}))
  steps = [ch for ch in chunks if ch.choices]
  assert len(steps) == 3  # one chunk per engine step of K=4 tokens
  assert sum((ch.choices[0].model_extra['token_ids'] for ch in steps), []) == ids
  assert ''.join(ch.choices[0].text for ch in steps) == r.choices[0].text
  assert steps[-1].choices[0].finish_reason == 'length' and chunks[-1].usage.completion_tokens == 10
  stop_at = live.tok.decode(want[4:6])
  for stream in (False, True):
    stop = c.completions.create(model='tiny', prompt='| s3 s4', max_tokens=10, seed=7,
                                frequency_penalty=0.5, stop=[stop_at], stream=stream,
                                extra_body={'ignore_eos': True})
    parts = list(stop) if stream else [stop]
    text = ''.join(p.choices[0].text for p in parts)
    full = live.tok.decode(want)
    assert text == full[:full.find(stop_at)] and parts[-1].choices[0].finish_reason == 'stop'


@pytest.mark.parametrize('body,status,match', [
    ({'max_tokens': 0}, 400, 'max_tokens=0: must be >= 1'),
    ({'max_tokens': 80}, 400, "exceeds the model's maximum length"),
    ({'temperature': 0.7}, 400, 'temperature is an AR setting'),
    ({'K': 8}, 400, "K=8 is larger than the model's window k=4"),
    ({'K': 2}, 400, 'this server decodes K=4'),
    ({'stream': 'yes'}, 400, 'stream: expected true or false'),
    ({'n': 2}, 400, 'n=2 is not supported'),
    ({'prompt': [0, 99]}, 400, 'outside the vocabulary'),
    ({'prompt': '| hello'}, 400, 'not a token'),
    ({'model': 'gpt-4'}, 404, "model 'gpt-4' is not served here"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(live, body, status, match):
  import httpx2 as httpx  # pylint: disable=g-import-not-at-top  (the openai client's HTTP)
  r = httpx.post(live.url + '/completions', json={'prompt': '| s1', 'max_tokens': 4, **body},
                 timeout=60)
  assert r.status_code == status and match in r.json()['error']['message'], r.text
  bad_json = httpx.post(live.url + '/completions', content=b'{"prompt": ', timeout=60)
  assert bad_json.status_code == 400 and 'not valid JSON' in bad_json.text
  ok = openai.OpenAI(base_url=live.url, api_key='none').completions.create(
      model='tiny', prompt='| s1', max_tokens=4, extra_body={'ignore_eos': True})
  assert ok.usage.completion_tokens == 4
  assert httpx.get(live.url.replace('/v1', '/health'), timeout=60).json()['status'] == 'ok'


def test_timeouts_and_full_queues_answer_504_and_429(models):
  """A scheduler that admits nothing: the first request times out while queued (504) and
  stays queued, so the next one finds the one-request queue full (429)."""
  import httpx2 as httpx  # pylint: disable=g-import-not-at-top
  arch, _, params = models['ar']
  s = LiveServer(arch, params, 0, 1, slots=1, max_queue=1, request_timeout=0.2, start=False)
  try:
    r = httpx.post(s.url + '/completions', json={'prompt': '| s1', 'max_tokens': 8}, timeout=60)
    assert r.status_code == 504 and 'took longer than' in r.json()['error']['message']
    r = httpx.post(s.url + '/completions', json={'prompt': '| s1', 'max_tokens': 8}, timeout=60)
    assert r.status_code == 429 and 'queue is full' in r.json()['error']['message']
  finally:
    s.close()


def test_load_nothing_lost_nothing_mixed(live, models):
  """200 requests from 32 concurrent clients on 8 slots: each completes with exactly its
  token count and its alone-run tokens."""
  arch, _, params = models['pflm']
  rng = np.random.default_rng(3)
  jobs = [(rng.integers(1, V - 1, int(rng.choice([3, 7]))).tolist(), int(rng.choice([5, 12])),
           float(rng.choice([0.0, 0.5])), i) for i in range(200)]
  client = openai.AsyncOpenAI(base_url=live.url, api_key='none', max_retries=0, timeout=300)

  async def run():
    gate = asyncio.Semaphore(32)

    async def one(prompt, n, lam, seed):
      async with gate:
        r = await client.completions.create(model='tiny', prompt=prompt, max_tokens=n, seed=seed,
                                            frequency_penalty=lam, extra_body={'ignore_eos': True})
        return r.choices[0].model_extra['token_ids'], r.usage.completion_tokens
    return await asyncio.gather(*(one(*j) for j in jobs))
  results = asyncio.run(run())
  s = sampler_lib.Sampler(arch, params, k=4)
  for (prompt, n, lam, seed), (ids, count) in zip(jobs, results):
    assert count == n == len(ids)
    assert ids == s.generate_ids([prompt], n, K=4, freq_penalty=lam, seed=seed,
                                 stop_at_eos=False)[0].tolist()
  metrics = __import__('httpx2').get(live.url.replace('/v1', '/metrics'), timeout=60).text
  assert 'kforcing_time_to_first_token_seconds_count' in metrics


def test_serve_cli_serves_and_drains_on_sigterm(tmp_path):
  """python -m kforcing_jax.serve with random weights: a completion in flight when SIGTERM
  arrives still completes; then the process exits cleanly."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import httpx2 as httpx  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sock = socket.socket()
  sock.bind(('127.0.0.1', 0))
  port = sock.getsockname()[1]
  sock.close()
  proc = subprocess.Popen(
      [sys.executable, '-m', 'kforcing_jax.serve', '--config=synthetic', '--random_init',
       '--model=pflm', '--K=2', '--max_slots=2', f'--port={port}', '--config.model.d_model=32',
       '--config.model.n_layers=2', '--config.model.n_heads=2', '--config.data.seq_len=64',
       '--config.model.dtype=float32', '--dtype=float32'], cwd=root,
      env={**os.environ, 'PYTHONPATH': root}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    url = f'http://127.0.0.1:{port}'
    for _ in range(300):
      try:
        if httpx.get(url + '/health', timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        time.sleep(0.5)
    c = openai.OpenAI(base_url=url + '/v1', api_key='none', max_retries=0)
    assert c.models.list().data[0].id == 'random-pflm'
    stream = c.completions.create(model='random-pflm', prompt='| s1 s2', max_tokens=40,
                                  stream=True, extra_body={'ignore_eos': True})
    first = next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    n = sum(len(ch.choices[0].model_extra['token_ids']) for ch in [first] + rest if ch.choices)
    assert n == 40 and rest[-1].choices[0].finish_reason == 'length'
    # uvicorn re-raises the SIGTERM after its graceful shutdown (the status a process
    # manager expects of a terminated server)
    assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
    assert 'Traceback' not in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
