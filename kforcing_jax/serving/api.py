"""The OpenAI completions protocol around the scheduler: request parsing with errors that
name the field, incremental detokenization, stop strings, and Prometheus metrics."""
from __future__ import annotations

import dataclasses
import secrets

import prometheus_client

from kforcing_jax import errors
from kforcing_jax.data import tokenization
from kforcing_jax.serving import engine as engine_lib

SEED_RANGE = (-2 ** 31, 2 ** 31)


class BadRequest(errors.UserError):
  def __init__(self, param: str | None, message: str, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status

  def body(self) -> dict:
    kind = 'invalid_request_error' if self.status < 500 else 'server_error'
    return {'error': {'message': str(self), 'type': kind, 'param': self.param,
                      'code': self.status}}


@dataclasses.dataclass(frozen=True)
class Model:
  """What the server serves: the model's facts the protocol checks requests against."""
  name: str
  k: int  # 0 = AR
  K: int
  vocab_size: int
  max_len: int
  never_emit: tuple[int, ...]
  tokenizer: tokenization.Tokenizer | None


@dataclasses.dataclass(frozen=True)
class Completion:
  prompts: list[list[int]]
  max_tokens: int
  sampling: engine_lib.SamplingParams
  stop: tuple[str, ...]
  stream: bool
  include_usage: bool
  ignore_eos: bool


def _typed(body: dict, name: str, kinds, default, what: str):
  v = body.get(name)
  if v is None:
    return default
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
    raise BadRequest(name, f'{name}: expected {what}, got {v!r}')
  return v


def _prompts(body: dict, model: Model) -> list[list[int]]:
  p = body.get('prompt')
  if p is None:
    raise BadRequest('prompt', 'prompt: required (a string, a list of token ids, or a list '
                     'of either)')
  is_ids = lambda x: isinstance(x, list) and x and all(
      isinstance(t, int) and not isinstance(t, bool) for t in x)
  if isinstance(p, str) or is_ids(p):
    p = [p]
  if not isinstance(p, list) or not p or not all(isinstance(x, str) or is_ids(x) for x in p):
    raise BadRequest('prompt', 'prompt: expected a string, a non-empty list of token ids, or '
                     'a list of either')
  out = []
  for x in p:
    if isinstance(x, str):
      if model.tokenizer is None:
        raise BadRequest('prompt', 'prompt: this model has no tokenizer; send token ids')
      if not x:
        raise BadRequest('prompt', 'prompt: empty string; give some text to continue')
      try:
        ids = tokenization.encode_prompt(model.tokenizer, x)
      except ValueError as e:
        raise BadRequest('prompt', f'prompt: {e}') from None
      if not ids:
        raise BadRequest('prompt', f'prompt {x!r} encodes to no tokens')
    else:
      ids = list(x)
      bad = [t for t in ids if not 0 <= t < model.vocab_size]
      if bad:
        raise BadRequest('prompt', f'prompt: token ids {bad[:5]} are outside the vocabulary '
                         f'0..{model.vocab_size - 1}')
    out.append(ids)
  return out


def parse_completion(body, model: Model) -> Completion:
  """A /v1/completions body -> Completion, or BadRequest naming the field."""
  if not isinstance(body, dict):
    raise BadRequest(None, 'the request body must be a JSON object')
  name = body.get('model')
  if name is not None and name != model.name:
    raise BadRequest('model', f'model {name!r} is not served here; available: {model.name}',
                     status=404)
  pflm = model.k > 0
  prompts = _prompts(body, model)
  max_tokens = _typed(body, 'max_tokens', int, 16, 'an integer >= 1')
  if max_tokens < 1:
    raise BadRequest('max_tokens', f'max_tokens={max_tokens}: must be >= 1')
  for ids in prompts:
    if len(ids) + max_tokens > model.max_len:
      raise BadRequest('prompt', f'prompt of {len(ids)} tokens + max_tokens={max_tokens} '
                       f'exceeds the model\'s maximum length {model.max_len}')
  temperature = float(_typed(body, 'temperature', (int, float), 1.0, 'a number in [0, 2]'))
  top_p = float(_typed(body, 'top_p', (int, float), 1.0, 'a number in (0, 1]'))
  top_k = _typed(body, 'top_k', int, 0, 'an integer >= 0 (0 or -1 = off)')
  penalty = float(_typed(body, 'frequency_penalty', (int, float), 0.0, 'a number in [-2, 2]'))
  if not 0.0 <= temperature <= 2.0:
    raise BadRequest('temperature', f'temperature={temperature}: allowed 0..2')
  if not 0.0 < top_p <= 1.0:
    raise BadRequest('top_p', f'top_p={top_p}: allowed 0 < top_p <= 1')
  if top_k < -1:
    raise BadRequest('top_k', f'top_k={top_k}: allowed >= 0 (0 or -1 = off)')
  if not -2.0 <= penalty <= 2.0:
    raise BadRequest('frequency_penalty', f'frequency_penalty={penalty}: allowed -2..2')
  if pflm:
    for field, value, off in (('temperature', temperature, 1.0), ('top_p', top_p, 1.0),
                              ('top_k', max(top_k, 0), 0)):
      if value != off:
        raise BadRequest(field, f'{field}={value}: a push-forward model samples through its '
                         f'noise, K tokens per pass; {field} is an AR setting (allowed here: '
                         f'{off}; the PFLM setting is frequency_penalty)')
  elif penalty:
    raise BadRequest('frequency_penalty', f'frequency_penalty={penalty}: an AR model takes '
                     'temperature, top_p and top_k (allowed here: 0)')
  K = _typed(body, 'K', int, model.K, 'an integer')
  if K != model.K:
    if pflm and K > model.k:
      raise BadRequest('K', f'K={K} is larger than the model\'s window k={model.k}')
    raise BadRequest('K', f'K={K}: this server decodes K={model.K} tokens per step (set at '
                     'start with --K)')
  for field, ok, what in (('n', lambda v: v == 1, '1'), ('best_of', lambda v: v == 1, '1'),
                          ('echo', lambda v: v is False, 'false'),
                          ('logprobs', lambda v: v in (0, False), 'null'),
                          ('presence_penalty', lambda v: v == 0, '0'),
                          ('suffix', lambda v: v == '', 'null'),
                          ('logit_bias', lambda v: v == {}, 'null')):
    if body.get(field) is not None and not ok(body[field]):
      raise BadRequest(field, f'{field}={body[field]!r} is not supported; allowed: {what}')
  stop = body.get('stop')
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > 4 or not all(
      isinstance(s, str) and s for s in stop):
    raise BadRequest('stop', 'stop: expected a non-empty string or a list of up to 4')
  stream = _typed(body, 'stream', bool, False, 'true or false')
  opts = body.get('stream_options')
  include_usage = False
  if opts is not None:
    if not stream:
      raise BadRequest('stream_options', 'stream_options: only allowed with stream=true')
    if not isinstance(opts, dict):
      raise BadRequest('stream_options', 'stream_options: expected an object')
    include_usage = _typed(opts, 'include_usage', bool, False, 'true or false')
  seed = _typed(body, 'seed', int, None, 'an integer')
  if seed is None:
    seed = secrets.randbelow(2 ** 31)
  if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
    raise BadRequest('seed', f'seed={seed}: allowed {SEED_RANGE[0]}..{SEED_RANGE[1] - 1}')
  ignore_eos = _typed(body, 'ignore_eos', bool, False, 'true or false')
  _typed(body, 'return_token_ids', bool, True, 'true or false')  # token_ids are always sent
  sampling = engine_lib.SamplingParams(temperature=temperature, top_k=max(top_k, 0),
                                       top_p=top_p, freq_penalty=penalty, seed=seed)
  return Completion(prompts=prompts, max_tokens=max_tokens,
                    sampling=sampling, stop=tuple(stop), stream=stream,
                    include_usage=include_usage, ignore_eos=ignore_eos)


class TextStream:
  """Token ids -> text deltas that never split a UTF-8 character (a replacement character
  at the end means the bytes are incomplete: wait for the next token) and never emit a
  stop string, nor the start of one that the next tokens may complete."""

  def __init__(self, tokenizer, eos_id: int, stop=()):
    self.tok, self.eos_id, self.stop = tokenizer, eos_id, tuple(stop)
    self.ids: list[int] = []
    self.text = ''  # decoded so far (stable)
    self.sent = 0  # characters of self.text already emitted
    self.stopped = False

  def _decode(self, ids):
    return self.tok.decode([t for t in ids if t != self.eos_id]) if self.tok else ''

  def add(self, ids, final: bool = False) -> str:
    """The next delta after `ids`; with final, everything left (minus a stop string)."""
    if self.stopped:
      return ''
    self.ids.extend(ids)
    text = self._decode(self.ids)
    if final or not text.endswith('\ufffd'):
      self.text = text
    for s in self.stop:
      i = self.text.find(s, max(0, self.sent - len(s)))
      if i >= 0:
        self.text, self.stopped = self.text[:i], True
    end = len(self.text)
    if not final and not self.stopped:  # hold back what could begin a stop string
      for s in self.stop:
        for n in range(min(len(s) - 1, end - self.sent), 0, -1):
          if self.text.endswith(s[:n]):
            end = min(end, len(self.text) - n)
            break
    delta = self.text[self.sent:end]
    self.sent = max(self.sent, end)
    return delta


class Metrics:
  """The server's Prometheus metrics (one registry per server)."""

  def __init__(self):
    self.registry = r = prometheus_client.CollectorRegistry()
    self.running = prometheus_client.Gauge('kforcing_running_requests',
                                           'requests in decoding slots', registry=r)
    self.waiting = prometheus_client.Gauge('kforcing_waiting_requests',
                                           'requests queued for a slot', registry=r)
    self.tokens = prometheus_client.Counter('kforcing_generated_tokens',
                                            'tokens generated', registry=r)
    self.requests = prometheus_client.Counter('kforcing_requests', 'finished requests',
                                              ['status'], registry=r)
    buckets = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
    self.step_seconds = prometheus_client.Histogram(
        'kforcing_step_seconds', 'one engine step (all slots advance by K)', buckets=buckets,
        registry=r)
    self.ttft_seconds = prometheus_client.Histogram(
        'kforcing_time_to_first_token_seconds', 'arrival to first tokens', buckets=buckets,
        registry=r)
    self.tpot_seconds = prometheus_client.Histogram(
        'kforcing_time_per_output_token_seconds', 'per-token latency after the first token',
        buckets=buckets, registry=r)

  def render(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)
