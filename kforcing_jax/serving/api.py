"""The OpenAI completions protocol around the scheduler: validated request bodies checked
against the served model (errors name the field), a request's engine requests (one per
prompt and choice), chat prompts through the model's template, incremental detokenization
with stop strings, and Prometheus metrics."""
from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Callable

import prometheus_client

from kforcing_jax import errors
from kforcing_jax.data import tokenization
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import protocol

SEED_RANGE = (protocol.INT32_MIN, protocol.INT32_MAX + 1)


class BadRequest(errors.UserError):
  def __init__(self, param: str | None, message: str, status: int = 400):
    super().__init__(message)
    self.param, self.status = param, status

  def body(self) -> dict:
    return protocol.error_body(str(self), status=self.status, param=self.param)


@dataclasses.dataclass(frozen=True)
class Model:
  """What the server serves: the model's facts the protocol checks requests against."""
  name: str
  k: int  # 0 = AR
  K: int
  vocab_size: int
  max_len: int
  tokenizer: tokenization.Tokenizer | None
  eos_id: int = -1
  eos_ids: tuple[int, ...] = ()  # further ids that end a text (the model config's EOS list)
  chat_template: str | None = None  # jinja, as the model ships it
  # chat messages -> prompt ids: the rendered template, its special tokens as single ids
  encode_chat: Callable[[list[dict]], list[int]] | None = None
  end_of_turn_ids: tuple[int, ...] = ()  # chat answers end there as at EOS


@dataclasses.dataclass(frozen=True)
class Choice:
  """One engine request of an API request: choice `index` (prompt i, sample j: i * n + j)."""
  index: int
  prompt: list[int]
  max_tokens: int
  sampling: engine_lib.SamplingParams


@dataclasses.dataclass(frozen=True)
class Completion:
  choices: list[Choice]
  prompt_tokens: int  # each prompt counted once, whatever n
  stop: tuple[str, ...]
  stop_ids: frozenset[int]  # besides EOS: stop_token_ids, a chat's end of turn
  stream: bool
  include_usage: bool
  ignore_eos: bool
  logprobs: int | None = None  # top alternatives per token (0: the token's own); None: off
  echo: bool = False  # the prompt's text (and, with logprobs, its scored tokens) first
  min_tokens: int = 0  # no stop token or stop string before this many tokens


def _same(value, neutral) -> bool:
  """value == neutral, with 0 == 0.0 but 0 != False and [] == {} == None == ''."""
  if isinstance(neutral, bool) or isinstance(value, bool):
    return value is neutral
  if isinstance(neutral, (int, float)):
    return isinstance(value, (int, float)) and value == neutral
  return not value if neutral is None else value == neutral


def check_model_name(name: str | None, model: Model) -> None:
  if name is not None and name != model.name:
    raise BadRequest('model', f'model {name!r} is not served here; available: {model.name}',
                     status=404)


def _check_neutral(req: protocol.SamplingFields) -> None:
  for field, neutral in protocol.NEUTRAL.items():
    value = getattr(req, field, None)
    if value is not None and not _same(value, neutral):
      allowed = json.dumps(neutral) + ' or ' if neutral not in (None, False, 0) else ''
      raise BadRequest(field, f'{field}={json.dumps(value)} is not supported by this server '
                       f'(allowed: {allowed}leave it out)')


def check_ids(ids: list[int], model: Model, field: str) -> list[int]:
  bad = [t for t in ids if not 0 <= t < model.vocab_size]
  if bad:
    raise BadRequest(field, f'{field}: token ids {bad[:5]} are outside the vocabulary '
                     f'0..{model.vocab_size - 1}')
  return list(ids)


def encode_text(model: Model, text: str, field: str = 'prompt',
                add_special_tokens: bool = True) -> list[int]:
  """A prompt's ids; special tokens written in the text are single ids."""
  if model.tokenizer is None:
    raise BadRequest(field, f'{field}: this model has no tokenizer; send token ids')
  if not text:
    raise BadRequest(field, f'{field}: empty string; give some text to continue')
  try:
    ids = tokenization.encode_prompt(model.tokenizer, text, add_special_tokens)
  except ValueError as e:
    raise BadRequest(field, f'{field}: {e}') from None
  if not ids:
    raise BadRequest(field, f'{field}: {text!r} encodes to no tokens')
  return ids


def _prompts(prompt, model: Model) -> list[list[int]]:
  if isinstance(prompt, str) or isinstance(prompt[0], int):
    prompt = [prompt]
  return [encode_text(model, p) if isinstance(p, str) else check_ids(p, model, 'prompt')
          for p in prompt]


def chat_messages(messages: list[protocol.ChatMessage]) -> list[dict]:
  """The messages as a chat template takes them (text parts joined)."""
  out = []
  for m in messages:
    d = m.model_dump(exclude_none=True)
    if isinstance(m.content, list):
      d['content'] = ''.join(part.text for part in m.content)
    out.append(d)
  return out


def chat_prompt(messages: list[protocol.ChatMessage], model: Model) -> list[int]:
  if model.chat_template is None or model.encode_chat is None:
    raise BadRequest('messages', f'model {model.name!r} has no chat template (its export '
                     'carries none), so it takes no chat messages: use /v1/completions with '
                     'a prompt')
  try:
    ids = model.encode_chat(chat_messages(messages))
  except errors.UserError as e:
    raise BadRequest('messages', f'messages: {e}') from None
  if not ids:
    raise BadRequest('messages', 'messages: the chat template renders them as no tokens')
  return check_ids(ids, model, 'messages')


def _sampling(req: protocol.SamplingFields, model: Model) -> engine_lib.SamplingParams:
  """The settings of choice 0 after every model-dependent check."""
  _check_neutral(req)
  pflm = model.k > 0
  temperature = 1.0 if req.temperature is None else float(req.temperature)
  top_p = 1.0 if req.top_p is None else float(req.top_p)
  top_k = max(req.top_k or 0, 0)
  penalty = float(req.frequency_penalty or 0.0)
  presence = float(req.presence_penalty or 0.0)
  if top_k > model.vocab_size:
    raise BadRequest('top_k', f'top_k={top_k}: allowed 0..{model.vocab_size} (the '
                     'vocabulary; 0 or -1 = off)')
  if pflm:
    for field, value, off in (('temperature', temperature, 1.0), ('top_p', top_p, 1.0),
                              ('top_k', top_k, 0)):
      if value != off:
        raise BadRequest(field, f'{field}={value}: a push-forward model samples through its '
                         f'noise, K tokens per pass; {field} is an AR setting (allowed here: '
                         f'{off}; its settings are frequency_penalty and presence_penalty)')
  if req.K is not None and req.K != model.K:
    if pflm and req.K > model.k:
      raise BadRequest('K', f'K={req.K} is larger than the model\'s window k={model.k}')
    raise BadRequest('K', f'K={req.K}: this server decodes K={model.K} tokens per step (set at '
                     'start with --K)')
  if req.stream_options is not None and not req.stream:
    raise BadRequest('stream_options', 'stream_options: only allowed with stream=true')
  seed = req.seed
  if seed is None:
    seed = secrets.randbelow(SEED_RANGE[1] - req.n)
  elif seed + req.n > SEED_RANGE[1]:
    raise BadRequest('seed', f'seed={seed} with n={req.n}: choice i uses seed + i, so seed + n '
                     f'- 1 must be at most {SEED_RANGE[1] - 1}')
  return engine_lib.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                   freq_penalty=penalty, presence_penalty=presence, seed=seed,
                                   min_tokens=req.min_tokens or 0)


def _logprobs(req: protocol.SamplingFields, chat: bool) -> int | None:
  """Top alternatives per token (0: only the token's own), or None: no logprobs."""
  if not chat:
    return req.logprobs
  if req.top_logprobs and not req.logprobs:
    raise BadRequest('top_logprobs', 'top_logprobs: only allowed with logprobs=true')
  return (req.top_logprobs or 0) if req.logprobs else None


def _completion(req: protocol.SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                model: Model, end_of_turn=(), chat: bool = False) -> Completion:
  sampling = _sampling(req, model)
  logprobs = _logprobs(req, chat)
  echo = bool(getattr(req, 'echo', False))
  if echo and logprobs is not None and model.k:
    raise BadRequest('echo', 'echo with logprobs scores the prompt, which needs an AR model '
                     '(a push-forward model scores nothing without its noise): leave out echo '
                     'or logprobs')
  if max_tokens == 0 and not echo:
    raise BadRequest('max_tokens', 'max_tokens=0 only returns the prompt: allowed with '
                     'echo=true (and logprobs to score it), else 1 or more')
  stop_ids = set(check_ids(req.stop_token_ids or [], model, 'stop_token_ids'))
  if not req.ignore_eos:  # an end of turn is the chat's EOS
    stop_ids.update(model.eos_ids + tuple(end_of_turn))
  banned = stop_ids | ({model.eos_id} if model.eos_id >= 0 and not req.ignore_eos else set())
  sampling = dataclasses.replace(sampling, banned=tuple(sorted(banned)),
                                 logprobs=logprobs is not None)
  choices = []
  for i, ids in enumerate(prompts):
    n_out = model.max_len - len(ids) if max_tokens is None else max_tokens
    if len(ids) + max(n_out, 1) > model.max_len:
      raise BadRequest('max_tokens' if max_tokens else 'messages' if chat else 'prompt',
                       f'prompt of {len(ids)} tokens + max_tokens={n_out} exceeds the model\'s '
                       f'maximum length {model.max_len}')
    for j in range(req.n):
      choices.append(Choice(i * req.n + j, ids, n_out,
                            dataclasses.replace(sampling, seed=sampling.seed + j)))
  stop = req.stop or ()
  return Completion(choices=choices, prompt_tokens=sum(map(len, prompts)),
                    stop=(stop,) if isinstance(stop, str) else tuple(stop),
                    stop_ids=frozenset(stop_ids), stream=req.stream,
                    include_usage=bool(req.stream_options and
                                       req.stream_options.include_usage),
                    ignore_eos=req.ignore_eos, logprobs=logprobs, echo=echo,
                    min_tokens=sampling.min_tokens)


def parse_completion(req: protocol.CompletionRequest, model: Model) -> Completion:
  """A validated /v1/completions body -> Completion, or BadRequest naming the field."""
  check_model_name(req.model, model)
  max_tokens = 16 if req.max_tokens is None else req.max_tokens
  return _completion(req, _prompts(req.prompt, model), max_tokens, model)


def parse_chat(req: protocol.ChatCompletionRequest, model: Model) -> Completion:
  """A validated /v1/chat/completions body -> Completion (one prompt: the rendered
  messages; the answer also ends at the template's end-of-turn token)."""
  check_model_name(req.model, model)
  prompt = chat_prompt(req.messages, model)
  return _completion(req, [prompt], req.max_completion_tokens or req.max_tokens, model,
                     end_of_turn=model.end_of_turn_ids, chat=True)


class TextStream:
  """Token ids -> text deltas, incrementally: each step decodes only a window of the last
  tokens (the text of ids[prefix:] minus that of ids[prefix:read], as vLLM's detokenizer),
  so a long completion costs O(window) per step, not O(length). A delta never splits a
  UTF-8 character (a replacement character at the end means the bytes are incomplete: wait
  for the next token) and never emits a stop string, nor the start of one that the next
  tokens may complete; stop strings are matched only in the text after the first
  min_tokens tokens. The token ids end where the text ends: at the token that completes a
  stop string."""

  def __init__(self, tokenizer, stop=(), min_tokens: int = 0):
    self.tok, self.stop = tokenizer, tuple(stop)
    self.ids: list[int] = []
    self._dec: list[int] = []  # the ids whose text is the text (a final stop token is not)
    self._prefix = self._read = 0
    self.text = ''  # decoded so far (stable)
    self.sent = 0  # characters of self.text already emitted
    self.stopped = False
    self.min_tokens = min_tokens
    self._search_from = 0 if min_tokens == 0 else None  # stop strings start here or later

  def _decode(self, ids) -> str:
    return self.tok.decode(ids) if self.tok else ''

  def _advance(self, final: bool) -> None:
    prefix_text = self._decode(self._dec[self._prefix:self._read])
    new_text = self._decode(self._dec[self._prefix:])
    if len(new_text) > len(prefix_text) and (final or not new_text.endswith('\ufffd')):
      self.text += new_text[len(prefix_text):]
      self._prefix, self._read = self._read, len(self._dec)

  def offsets(self, ids) -> list[int]:
    """Adds ids one by one (no stop strings): where each one's text begins in self.text."""
    out = []
    for t in ids:
      out.append(len(self.text))
      self._dec.append(t)
      self.ids.append(t)
      self._advance(False)
    return out

  def add(self, ids, *, final: bool = False, stop_token: bool = False) -> tuple[str, list[int]]:
    """(text delta, token ids delta) after `ids`; with final, everything left (minus a stop
    string); stop_token: the last id ended the request (an EOS, kept out of the text)."""
    if self.stopped:
      return '', []
    before = len(self.ids)
    self.ids.extend(ids)
    self._dec.extend(ids[:-1] if stop_token else ids)
    self._advance(final)
    if self._search_from is None and len(self.ids) >= self.min_tokens:
      self._search_from = len(self._decode(self.ids[:self.min_tokens]))
    found = [] if self._search_from is None else [
        (i, s) for s in self.stop
        if (i := self.text.find(s, max(self._search_from, self.sent - len(s)))) >= 0]
    if found:
      i, s = min(found)
      self.text, self.stopped = self.text[:i], True
      n = next((n for n in range(before + 1, len(self.ids) + 1)
                if len(self._decode(self.ids[:n])) >= i + len(s)), len(self.ids))
      del self.ids[n:]
    end = len(self.text)
    if not final and not self.stopped:  # hold back what could begin a stop string
      for s in self.stop:
        for n in range(min(len(s) - 1, end - self.sent), 0, -1):
          if self.text.endswith(s[:n]):
            end = min(end, len(self.text) - n)
            break
    delta = self.text[self.sent:end]
    self.sent = max(self.sent, end)
    return delta, self.ids[before:]


NEG_INF_LOGPROB = -9999.0  # JSON has no -inf: a token the distribution excludes (vLLM's value)


class LogprobText:
  """Log-probabilities in the OpenAI response shapes; a token's text is its own decode
  (`token_id:N` without a tokenizer)."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self._text: dict[int, str] = {}

  def text(self, t: int) -> str:
    if t not in self._text:
      self._text[t] = self.tok.decode([t]) if self.tok is not None else f'token_id:{t}'
    return self._text[t]

  @staticmethod
  def value(x) -> float:
    x = float(x)
    return x if x > NEG_INF_LOGPROB else NEG_INF_LOGPROB

  def _top(self, lp, j: int, n_top: int, token: int) -> dict:
    top = {self.text(int(t)): self.value(v)
           for t, v in zip(lp.top_ids_nxN[j, :n_top], lp.top_nxN[j, :n_top])}
    top.setdefault(self.text(token), self.value(lp.token_n[j]))  # always the token's own
    return top

  def completion(self, ids, lp, n_top: int, offsets, prompt: bool = False) -> dict:
    """{tokens, token_logprobs, top_logprobs, text_offset} of ids (a prompt's first token
    has no log-probability: lp scores ids[1:]); offsets: where each token's text begins."""
    out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': offsets}
    for j, t in enumerate(ids):
      k = j - 1 if prompt else j
      out['tokens'].append(self.text(t))
      out['token_logprobs'].append(None if k < 0 else self.value(lp.token_n[k]))
      out['top_logprobs'].append(None if k < 0 else self._top(lp, k, n_top, t))
    return out

  def chat(self, ids, lp, n_top: int) -> list[dict]:
    """The chat completions content entries of ids."""
    out = []
    for j, t in enumerate(ids):
      text = self.text(t)
      out.append({'token': text, 'logprob': self.value(lp.token_n[j]),
                  'bytes': list(text.encode()),
                  'top_logprobs': [{'token': self.text(int(a)), 'logprob': self.value(v),
                                    'bytes': list(self.text(int(a)).encode())}
                                   for a, v in zip(lp.top_ids_nxN[j, :n_top],
                                                   lp.top_nxN[j, :n_top])]})
    return out


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
    self.prompt_tokens = prometheus_client.Counter('kforcing_prompt_tokens',
                                                   'prompt tokens of admitted requests',
                                                   registry=r)
    self.requests = prometheus_client.Counter('kforcing_requests', 'finished requests',
                                              ['status'], registry=r)
    buckets = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
    long = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
    histogram = lambda name, doc, b=buckets: prometheus_client.Histogram(name, doc, buckets=b,
                                                                        registry=r)
    self.step_seconds = histogram('kforcing_step_seconds',
                                  'one engine step (all slots advance by K), from its dispatch '
                                  'until its tokens reach the host: it includes waiting behind '
                                  'the step dispatched before it')
    self.ttft_seconds = histogram('kforcing_time_to_first_token_seconds',
                                  'arrival to first tokens')
    self.tpot_seconds = histogram('kforcing_time_per_output_token_seconds',
                                  'per-token latency after the first token')
    self.queue_seconds = histogram('kforcing_request_queue_time_seconds',
                                   'arrival to admission into a slot', long)
    self.e2e_seconds = histogram('kforcing_e2e_request_latency_seconds',
                                 'arrival to the last token (or the end of the request)', long)

  def render(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)
