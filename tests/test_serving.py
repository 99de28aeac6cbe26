"""The slot engine, scheduler and OpenAI-compatible server: a request's tokens equal its
alone-run tokens (Sampler.generate_ids) whatever else is served; no request can take the
server down (bad fields get a 400, a failing admission fails its request alone, a failing
step stops the process); a live server (serve.build's wiring) driven by the official
openai client; a bounded load test."""
import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx  # the openai client's HTTP library
import jax
import numpy as np
import openai
from prometheus_client import parser
import pytest

from kforcing_jax import errors
from kforcing_jax import serve
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.data import tokenization
from kforcing_jax.decoding import engine as decode
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.pipeline import config_lib
from kforcing_jax.serving import api
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import launcher
from kforcing_jax.serving import scheduler as scheduler_lib
from kforcing_jax.training import checkpoint as ckpt_lib
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


@pytest.mark.parametrize('kind,family', [('ar', 'llama_gqa'), ('pflm', 'qwen3_like')])
def test_served_tokens_equal_alone_tokens_for_llama_families(kind, family):
  """The same invariant for grouped-query attention with RMSNorm, SwiGLU, tied embeddings
  and llama3 RoPE (AR), and q/k norms, biases, head_dim != d / heads and linear RoPE (PFLM):
  5 requests on 2 slots."""
  pflm = kind == 'pflm'
  arch, _, params = tiny_model(pflm=pflm, vocab=V, max_len=64, never_emit=(V - 1,),
                               family=family, seed=3)
  k, K = (4, 4) if pflm else (0, 1)
  reqs = requests(np.random.default_rng(5), 5, pflm)
  eng = engine_lib.SlotEngine(arch, params, k=k, K=K, max_slots=2)
  for r, (toks, reason) in zip(reqs, serve_staggered(eng, reqs, -1)):
    assert toks == alone(arch, params, k, r, K) and reason == 'length', (r.prompt, r.params)


def test_finished_slots_are_compacted_and_steps_shrink_to_the_live_bucket(models):
  """Requests of different lengths on 4 slots: when a low slot finishes, the highest live
  request moves down into it, and steps compute only the smallest slot-count bucket that
  holds the live requests -- with every request's tokens still its alone-run tokens."""
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=4)
  assert eng.buckets == (1, 2, 4)
  rows, moves = [], []
  real_generate, real_move = eng.generate, eng.move
  eng.generate = lambda state, r=None: (rows.append(r), real_generate(state, r))[1]
  eng.move = lambda state, src, dst: (moves.append((src, dst)), real_move(state, src, dst))[1]
  lengths = [3, 25, 4, 30, 6, 12]  # the short ones free low slots under long ones
  reqs = [scheduler_lib.Request([5 + i, 9, 2], n, engine_lib.SamplingParams(
      temperature=(0.0, 1.0)[i % 2], seed=40 + i), None) for i, n in enumerate(lengths)]
  got = serve_staggered(eng, reqs, -1, gap=0)
  for r, (toks, reason) in zip(reqs, got):
    assert toks == alone(arch, params, 0, r, 1) and reason == 'length'
  assert moves and all(src > dst for src, dst in moves)
  assert 4 in rows and rows[-1] == 1
  assert rows.index(1, rows.index(4)) > rows.index(2, rows.index(4)) > rows.index(4)


def test_a_lone_ar_request_steps_on_float32_copies_of_bf16_weights(models):
  """On a CPU with bf16 weight products ('mixed'), a one-row AR step runs on a float32 copy
  of the bf16 weights (XLA:CPU would widen them on every call): its tokens are a float32
  engine's on the bf16-rounded weights; with bf16 activations ('bfloat16') the smallest
  AR bucket is two rows."""
  from kforcing_jax.models import precision  # pylint: disable=g-import-not-at-top
  arch, _, params = models['ar']
  mixed = precision.exec_config('mixed')
  bf16_params = precision.cast_params(params, mixed)
  eng = engine_lib.SlotEngine(arch, bf16_params, mixed, k=0, K=1, max_slots=4)
  assert eng.buckets == (1, 2, 4)
  # from the same state, the bucket's step is a float32 step on the rounded weights
  rounded = jax.tree.map(lambda x: x.astype(np.float32), bf16_params)
  f32_generate = engine_lib.jitted('generate', arch, arch_lib.ExecConfig(), eng.plan)
  state = eng.insert(eng.init_state(), eng.prefill([3, 7, 11]), 0,
                     engine_lib.SamplingParams(temperature=0.9, seed=4, logprobs=True))
  copy = jax.tree.map(jax.numpy.copy, state)
  for _ in range(6):
    state, toks, lp = eng.generate(state, 1)
    copy, want_toks, want_lp = f32_generate(rounded, copy, 1)
    np.testing.assert_array_equal(toks, want_toks)
    np.testing.assert_array_equal(lp.top_BxKxN, want_lp.top_BxKxN)
  bf16 = precision.exec_config('bfloat16')
  assert engine_lib.SlotEngine(arch, precision.cast_params(params, bf16), bf16, k=0, K=1,
                               max_slots=4).buckets == (2, 4)


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


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(models):
  """Its final event arrives at once (not when a slot frees) and its queue place is free
  for the next request."""
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=1)
  sched = scheduler_lib.Scheduler(eng, max_queue=1)  # not started yet: nothing is admitted
  q1, q2 = queue.Queue(), queue.Queue()
  first = scheduler_lib.Request([1, 2], 30, engine_lib.SamplingParams(), q1.put)
  sched.submit(first)
  first.cancel('timeout')  # e.g. a client that went away while queued
  assert q1.get_nowait() == scheduler_lib.Event([], 'timeout') and sched.waiting == 0
  sched.submit(scheduler_lib.Request([1, 2], 5, engine_lib.SamplingParams(), q2.put))
  sched.start()
  try:
    assert collect(q2)[1] == 'length' and q1.empty()
  finally:
    sched.shutdown()


def final_event(q):
  toks = []
  while True:
    ev = q.get(timeout=120)
    toks += ev.token_ids
    if ev.finish_reason:
      return toks, ev


def test_a_request_whose_admission_fails_fails_alone(models):
  """A prefill that raises (a compile or out-of-memory error of its length bucket) ends its
  request with 'error'; the requests before and after it get their alone tokens and the
  scheduler keeps running."""
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=2)
  real = eng.prefill

  def prefill(prompt):
    if prompt == [9, 9, 9]:
      raise RuntimeError('RESOURCE_EXHAUSTED: out of memory')
    return real(prompt)
  eng.prefill = prefill
  reqs = requests(np.random.default_rng(4), 4, False)
  bad = scheduler_lib.Request([9, 9, 9], 4, engine_lib.SamplingParams(), None)
  sched = scheduler_lib.Scheduler(eng).start()
  try:
    queues = []
    for r in reqs[:2] + [bad] + reqs[2:]:
      queues.append(queue.Queue())
      r.emit = queues[-1].put
      sched.submit(r)
    got = [final_event(q) for q in queues]
  finally:
    sched.shutdown()
  toks, ev = got.pop(2)
  assert toks == [] and ev.finish_reason == 'error' and 'out of memory' in str(ev.error)
  for r, (toks, ev) in zip(reqs, got):
    assert toks == alone(arch, params, 0, r, 1) and ev.finish_reason == 'length'
  assert sched.error is None


def test_a_failing_step_ends_every_request_and_stops_the_scheduler(models):
  arch, _, params = models['ar']
  eng = engine_lib.SlotEngine(arch, params, k=0, K=1, max_slots=1)
  real, calls = eng.generate, []

  def generate(state, *args):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('device lost')
    return real(state, *args)
  eng.generate = generate
  fatal = []
  sched = scheduler_lib.Scheduler(eng, on_fatal=fatal.append)
  queues = [queue.Queue(), queue.Queue()]  # one runs, one waits
  for q in queues:
    sched.submit(scheduler_lib.Request([1, 2], 30, engine_lib.SamplingParams(), q.put))
  sched.start()
  running, waiting = (final_event(q) for q in queues)
  assert running[1].finish_reason == waiting[1].finish_reason == 'error'
  assert len(running[0]) <= 2 and waiting[0] == []
  assert fatal == [sched.error] and str(sched.error) == 'device lost' and not sched.accepting
  with pytest.raises(scheduler_lib.ShuttingDown):
    sched.submit(scheduler_lib.Request([1], 4, engine_lib.SamplingParams(), queues[0].put))


def test_text_stream_keeps_utf8_and_stop_strings_whole():
  gpt2 = tokenization.Tokenizer(
      name='bytes', vocab_size=256, eos_id=0, pad_id=0, never_emit_ids=(), fingerprint='',
      add_bos_eos=False, _encode=lambda s: list(s.encode()),
      _decode=lambda ids: bytes(ids).decode('utf-8', errors='replace'))
  s = api.TextStream(gpt2, stop=('END',))
  ids = list('aé€'.encode()) + list(b'xEN')
  deltas = [s.add([t]) for t in ids]
  text = ''.join(d for d, _ in deltas)
  assert text == 'aé€x' and '\ufffd' not in text
  assert [i for _, new in deltas for i in new] == ids
  # 'EN' was held back, then matched; the ids end at the 'D' that completes the stop string
  assert s.add(list(b'D more')) == ('', [ord('D')]) and s.stopped
  s = api.TextStream(gpt2)
  assert s.add(list(b'ab') + [0], final=True, stop_token=True) == ('ab', [97, 98, 0])


# ---- the live server ------------------------------------------------------------------------
TOK = tokenization.synthetic(V, 'test')


free_port = launcher.free_port


def sampler(models, kind):
  arch, _, params = models[kind]
  return sampler_lib.Sampler(arch, params, k=4 if kind == 'pflm' else 0, tokenizer=TOK)


def serve_flags(*flags):
  return config_lib.cli_flags(serve.define_flags, ['serve', *flags])


class LiveServer:
  """serve.build's app for a Sampler, run by serve.uvicorn_server in a thread."""

  def __init__(self, s, *flags):
    port = free_port()
    self.flags = serve_flags(f'--port={port}', *flags)
    self.app = serve.build(self.flags, (s, 'tiny'))
    self.sched = self.app.state.scheduler
    self.engine = self.sched.engine
    self.server = serve.uvicorn_server(self.app, self.flags)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      assert self.thread.is_alive(), 'the server did not start'
      time.sleep(0.02)
    self.root = f'http://127.0.0.1:{port}'
    self.url = self.root + '/v1'
    self.client = openai.OpenAI(base_url=self.url, api_key='none', max_retries=0)

  def post(self, path, body=None, **kw):
    return httpx.post(self.url + path, json=body, timeout=60, **kw)

  def get(self, path):
    return httpx.get(self.root + path, timeout=60)

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=60)


@pytest.fixture(scope='module')
def live(models):
  s = LiveServer(sampler(models, 'pflm'), '--K=4', '--max_slots=8')
  yield s
  s.close()


@pytest.fixture(scope='module')
def live_ar(models):
  s = LiveServer(sampler(models, 'ar'), '--max_slots=4')
  yield s
  s.close()


def test_openai_client_completions(live, models):
  arch, _, params = models['pflm']
  c = live.client
  assert [m.id for m in c.models.list().data] == ['tiny']
  r = c.completions.create(model='tiny', prompt='| s3 s4', max_tokens=10, seed=7,
                           frequency_penalty=0.5, extra_body={'ignore_eos': True})
  ids = r.choices[0].model_extra['token_ids']
  want = sampler_lib.Sampler(arch, params, k=4).generate_ids(
      [[0, 3, 4]], 10, K=4, freq_penalty=0.5, seed=7, stop_at_eos=False)[0].tolist()
  assert ids == want and r.choices[0].text == TOK.decode(want)
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
  stop_at = TOK.decode(want[4:6])
  full = TOK.decode(want)
  # the ids end at the token that completes the stop string
  cut = next(n for n in range(1, 11) if stop_at in TOK.decode(want[:n]))
  for stream in (False, True):
    stop = c.completions.create(model='tiny', prompt='| s3 s4', max_tokens=10, seed=7,
                                frequency_penalty=0.5, stop=[stop_at], stream=stream,
                                extra_body={'ignore_eos': True})
    parts = [p for p in stop if p.choices] if stream else [stop]
    assert ''.join(p.choices[0].text for p in parts) == full[:full.find(stop_at)]
    assert sum((p.choices[0].model_extra['token_ids'] for p in parts), []) == want[:cut]
    assert parts[-1].choices[0].finish_reason == 'stop'


@pytest.mark.parametrize('body,status,param,match', [
    ({'max_tokens': 0}, 400, 'max_tokens', 'max_tokens=0 only returns the prompt: allowed '
     'with echo=true'),
    ({'max_tokens': -1}, 400, 'max_tokens', 'max_tokens: Input should be greater than or equal '
     'to 0'),
    ({'max_tokens': 80}, 400, 'max_tokens', "exceeds the model's maximum length 64"),
    ({'temperature': 0.7}, 400, 'temperature', 'temperature is an AR setting'),
    ({'K': 8}, 400, 'K', "K=8 is larger than the model's window k=4"),
    ({'K': 2}, 400, 'K', 'this server decodes K=4'),
    ({'stream': 'yes'}, 400, 'stream', "stream: Input should be a valid boolean, got 'yes'"),
    ({'n': 0}, 400, 'n', 'n: Input should be greater than or equal to 1'),
    ({'seed': 2 ** 31}, 400, 'seed', 'seed: Input should be less than or equal to 2147483647'),
    ({'seed': 2 ** 31 - 1, 'n': 2}, 400, 'seed', 'seed + n - 1 must be at most 2147483647'),
    ({'top_k': 4294967296}, 400, 'top_k', 'top_k: Input should be less than or equal to'),
    ({'logprobs': 21}, 400, 'logprobs', 'logprobs: Input should be less than or equal to 20'),
    ({'echo': True, 'logprobs': 1}, 400, 'echo', 'echo with logprobs scores the prompt, which '
     'needs an AR model'),
    ({'best_of': 2}, 400, 'best_of', 'best_of=2 is not supported'),
    ({'min_tokens': -1}, 400, 'min_tokens', 'min_tokens: Input should be greater than or equal'),
    ({'stream_options': {'include_usage': True}}, 400, 'stream_options',
     'only allowed with stream=true'),
    ({'prompt': [0, 99]}, 400, 'prompt', 'outside the vocabulary'),
    ({'prompt': [0, 2 ** 40]}, 400, 'prompt', 'prompt: expected a string, a non-empty list'),
    ({'prompt': '| hello'}, 400, 'prompt', 'not a token'),
    ({'stop_token_ids': [99]}, 400, 'stop_token_ids', 'token ids [99] are outside'),
    ({'foo': 1, 'guided_json': {}}, 400, 'foo', "unknown fields 'foo', 'guided_json'"),
    ({'model': 'gpt-4'}, 404, 'model', "model 'gpt-4' is not served here"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(live, body, status, param, match):
  r = live.post('/completions', {'prompt': '| s1', 'max_tokens': 4, **body})
  err = r.json()['error']
  assert r.status_code == status == err['code'] and match in err['message'], r.text
  assert err['param'] == param and err['type'] in ('invalid_request_error', 'not_found_error')
  ok = live.client.completions.create(model='tiny', prompt='| s1', max_tokens=4,
                                      extra_body={'ignore_eos': True})
  assert ok.usage.completion_tokens == 4
  assert live.get('/health').json()['status'] == 'ok'


def test_every_error_is_in_the_openai_shape(live):
  shape = lambda r: set(r.json()['error']) == {'message', 'type', 'param', 'code'}
  r = live.post('/nothing', {})
  assert r.status_code == 404 and shape(r) and 'no route POST /v1/nothing' in r.text
  r = live.get('/v1/completions')
  assert r.status_code == 405 and shape(r)
  for content, match in ((b'{"prompt": ', 'not valid JSON'),
                         (b'[1, 2]', 'must be a JSON object'),
                         (b'{"prompt": "| s1", "top_p": NaN}', 'top_p: Input should be a '
                          'finite number')):
    r = httpx.post(live.url + '/completions', content=content,
                   headers={'content-type': 'application/json'}, timeout=60)
    assert r.status_code == 400 and shape(r) and match in r.json()['error']['message'], r.text


def test_the_openapi_schema_describes_the_request_bodies_and_their_errors(live):
  schema = live.get('/openapi.json').json()
  post = schema['paths']['/v1/completions']['post']
  assert post['requestBody']['content']['application/json']['schema']['$ref'].endswith(
      '/CompletionRequest')
  assert sorted(post['responses']) == ['200', '400', '404', '429', '500', '503', '504']
  body = schema['components']['schemas']['CompletionRequest']
  assert body['additionalProperties'] is False
  assert {'type': 'integer', 'maximum': 2 ** 31 - 1, 'minimum': -1} in body['properties'][
      'top_k']['anyOf']
  assert '/v1/chat/completions' in schema['paths'] and '/v1/tokenize' in schema['paths']


def test_the_top_k_overflow_request_gets_400_and_the_server_keeps_serving(live_ar):
  """The request that used to kill the scheduler thread, and top_k past the vocabulary."""
  r = live_ar.post('/completions', {'model': 'tiny', 'prompt': [3, 5, 7], 'top_k': 4294967296})
  assert r.status_code == 400 and r.json()['error']['param'] == 'top_k'
  r = live_ar.post('/completions', {'prompt': [3, 5, 7], 'top_k': V + 1})
  assert r.status_code == 400 and f'allowed 0..{V}' in r.json()['error']['message']
  r = live_ar.post('/completions', {'prompt': [3, 5, 7], 'top_k': V, 'max_tokens': 3,
                                    'ignore_eos': True})
  assert r.status_code == 200 and len(r.json()['choices'][0]['token_ids']) == 3
  assert live_ar.get('/health').json()['status'] == 'ok' and live_ar.sched.error is None


def test_n_choices_use_seeds_s_plus_i_and_stream_by_index(live_ar, models):
  s = sampler(models, 'ar')
  prompts = [[0, 3, 4], [0, 7]]
  want = {i * 3 + j: s.generate_ids([p], 6, temperature=1.0, seed=5 + j,
                                    stop_at_eos=False)[0].tolist()
          for i, p in enumerate(prompts) for j in range(3)}
  body = dict(model='tiny', prompt=prompts, max_tokens=6, n=3, seed=5, temperature=1.0,
              extra_body={'ignore_eos': True})
  r = live_ar.client.completions.create(**body)
  assert [ch.index for ch in r.choices] == list(range(6))
  assert {ch.index: ch.model_extra['token_ids'] for ch in r.choices} == want
  assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 36
  got = {i: [] for i in want}
  for chunk in live_ar.client.completions.create(stream=True, **body):
    for ch in chunk.choices:
      got[ch.index] += ch.model_extra['token_ids']
  assert got == want


def test_stop_token_ids_end_a_choice_at_that_token(live_ar, models):
  want = sampler(models, 'ar').generate_ids([[0, 3, 4]], 12, temperature=0.0,
                                            stop_at_eos=False)[0].tolist()
  stop = want[4]
  cut = want.index(stop) + 1
  r = live_ar.client.completions.create(model='tiny', prompt=[0, 3, 4], max_tokens=12,
                                        temperature=0, extra_body={'ignore_eos': True,
                                                                   'stop_token_ids': [stop]})
  ch = r.choices[0]
  assert ch.model_extra['token_ids'] == want[:cut] and ch.finish_reason == 'stop'
  assert ch.text == TOK.decode(want[:cut - 1])


def test_tokenize_and_detokenize(live_ar):
  for path in ('/tokenize', '/v1/tokenize'):
    r = httpx.post(live_ar.root + path, json={'model': 'tiny', 'prompt': '| s3 s4'}, timeout=60)
    assert r.json() == {'count': 3, 'max_model_len': 64, 'tokens': [0, 3, 4]}
  assert live_ar.post('/detokenize', {'tokens': [0, 3, 4]}).json() == {'prompt': '| s3 s4'}
  assert live_ar.post('/detokenize', {'tokens': [0, V]}).status_code == 400
  r = live_ar.post('/tokenize', {'messages': [{'role': 'user', 'content': 'hi'}]})
  assert r.status_code == 400 and 'has no chat template' in r.json()['error']['message']
  r = live_ar.post('/chat/completions', {'messages': [{'role': 'user', 'content': 'hi'}]})
  assert r.status_code == 400 and r.json()['error']['param'] == 'messages'


def test_a_failed_admission_answers_500_for_that_request_alone(live_ar, monkeypatch):
  real = live_ar.engine.prefill

  def prefill(prompt):
    if prompt == [9, 9, 9]:
      raise RuntimeError('RESOURCE_EXHAUSTED: out of memory')
    return real(prompt)
  monkeypatch.setattr(live_ar.engine, 'prefill', prefill)
  r = live_ar.post('/completions', {'prompt': [9, 9, 9], 'max_tokens': 3})
  assert r.status_code == 500 and 'RuntimeError: RESOURCE_EXHAUSTED' in r.json()['error']['message']
  r = live_ar.post('/completions', {'prompt': [9, 9], 'max_tokens': 3, 'ignore_eos': True})
  assert r.status_code == 200 and live_ar.get('/health').json()['status'] == 'ok'


def test_metrics_count_queue_time_latency_and_prompt_tokens(live_ar):
  def read():
    text = live_ar.get('/metrics').text
    return {s.name: s.value for fam in parser.text_string_to_metric_families(text)
            for s in fam.samples}
  before = read()
  live_ar.post('/completions', {'prompt': [0, 3, 4, 5], 'max_tokens': 3, 'n': 2})
  after = read()
  delta = lambda name: after[name] - before.get(name, 0)
  assert delta('kforcing_prompt_tokens_total') == 8  # each choice's prompt was admitted
  assert delta('kforcing_request_queue_time_seconds_count') == 2
  assert delta('kforcing_e2e_request_latency_seconds_count') == 2
  assert 'kforcing_time_to_first_token_seconds_count' in after


def test_timed_out_requests_free_their_queue_place_and_a_full_queue_answers_429(models):
  """One slot, a one-request queue, 0.3 s timeouts, and an admission that blocks: a request
  that times out while queued (504) leaves the queue at once, so the next one is queued
  too (504), while one sent behind a live waiting request finds the queue full (429)."""
  s = LiveServer(sampler(models, 'ar'), '--max_slots=1', '--max_queue=1',
                 '--request_timeout=0.3')
  entered, release = threading.Event(), threading.Event()
  real = s.engine.prefill

  def blocked(prompt):
    entered.set()
    release.wait(60)
    return real(prompt)
  s.engine.prefill = blocked
  body = {'prompt': '| s1', 'max_tokens': 8}
  try:
    first = []
    threading.Thread(target=lambda: first.append(s.post('/completions', body))).start()
    assert entered.wait(60)  # the first request is being admitted; the queue is empty
    for _ in range(2):
      r = s.post('/completions', body)
      assert r.status_code == 504 and 'took longer than' in r.json()['error']['message']
      assert s.sched.waiting == 0
    third = []
    threading.Thread(target=lambda: third.append(s.post('/completions', body))).start()
    while s.sched.waiting == 0:
      time.sleep(0.01)
    r = s.post('/completions', body)
    assert r.status_code == 429 and 'queue is full' in r.json()['error']['message']
    while not (first and third):
      time.sleep(0.01)
    assert first[0].status_code == third[0].status_code == 504
    release.set()
    s.sched.shutdown(drain=False, timeout=10)
    assert s.get('/health').status_code == 503 and s.get('/health').json()['status'] == 'draining'
    assert s.post('/completions', body).status_code == 503
  finally:
    release.set()
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


def test_serve_refuses_K_for_an_AR_model_and_the_kernel_on_a_cpu(models):
  with pytest.raises(SystemExit, match='--decode_attention=pallas needs a GPU'):
    serve.main(['serve', '--config=synthetic', '--random_init', '--model=ar',
                '--decode_attention=pallas'])
  with pytest.raises(SystemExit, match="--decode_attention='flash': allowed: xla, pallas"):
    serve.main(['serve', '--config=synthetic', '--random_init', '--model=ar',
                '--decode_attention=flash'])
  with pytest.raises(SystemExit, match='--K=2 is a PFLM setting'):
    serve.main(['serve', '--config=synthetic', '--random_init', '--model=ar', '--K=2'])
  with pytest.raises(SystemExit, match='give one of --export=DIR'):
    serve.main(['serve', '--port=1'])
  with pytest.raises(errors.UserError, match='--K=2: tiny is an autoregressive model'):
    serve.build(serve_flags('--K=2'), (sampler(models, 'ar'), 'tiny'))


def test_a_failing_step_stops_the_server_with_exit_status_1(models, monkeypatch):
  """serve.main: the request in flight gets a 500, the HTTP server stops, and main ends
  with SystemExit naming the failure (status 1, for a supervisor to restart it)."""
  monkeypatch.setattr(serve, 'load_model', lambda f, mesh: (sampler(models, 'ar'), 'tiny'))

  def generate(self, state, *args):
    raise RuntimeError('device lost')
  monkeypatch.setattr(engine_lib.SlotEngine, 'generate', generate)
  port, ended = free_port(), []

  def target():
    try:
      serve.main(['serve', '--export=unused', f'--port={port}', '--nowarmup'])
    except SystemExit as e:
      ended.append(e)
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  url = f'http://127.0.0.1:{port}'
  while True:
    try:
      if httpx.get(url + '/health', timeout=5).status_code == 200:
        break
    except httpx.HTTPError:
      assert thread.is_alive(), ended
      time.sleep(0.05)
  r = httpx.post(url + '/v1/completions', json={'prompt': '| s1', 'max_tokens': 4}, timeout=60)
  assert r.status_code == 500 and 'RuntimeError: device lost' in r.json()['error']['message']
  thread.join(timeout=60)
  assert not thread.is_alive() and len(ended) == 1
  assert 'the decoding step failed (RuntimeError: device lost)' in str(ended[0].code)


def test_serve_cli_serves_and_drains_on_sigterm():
  """python -m kforcing_jax.serve with random weights: a completion in flight when SIGTERM
  arrives still completes; then the process exits cleanly."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = free_port()
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
        assert proc.poll() is None, proc.stdout.read()
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
    log = proc.stdout.read()
    assert 'Traceback' not in log
    if len(os.sched_getaffinity(0)) >= 2:  # --host_cpus=1 (default): the start-up line says
      assert 'XLA compute threads on CPUs' in log, log
  finally:
    if proc.poll() is None:
      proc.kill()
