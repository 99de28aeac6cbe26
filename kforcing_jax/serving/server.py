"""An OpenAI-compatible HTTP server (FastAPI) over the scheduler.

POST /v1/completions (text or token-id prompts, n choices, streaming as server-sent events
with one chunk per engine step and choice), POST /v1/chat/completions (for a model with a
chat template), POST /v1/tokenize and /v1/detokenize (also at /tokenize, /detokenize as
vLLM), GET /v1/models, GET /health (503 while draining or after a fatal error), GET
/metrics (Prometheus). Every error is in the OpenAI shape {"error": {"message", "type",
"param", "code"}}: a bad request gets a 400 naming the field, an unknown model or route a
404, a full queue a 429, a timeout a 504, a request that failed alone a 500.

A failing engine step ends every request and stops the HTTP server too (the process exits
non-zero so that a supervisor restarts it; see kforcing_jax.serve): the launcher puts its
uvicorn.Server in `app.state.server`.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid

import fastapi
from fastapi import responses
import fastapi.openapi.utils
from starlette import exceptions as starlette_exceptions

from kforcing_jax import errors
from kforcing_jax.serving import api
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import protocol
from kforcing_jax.serving import scheduler as scheduler_lib


@dataclasses.dataclass(frozen=True)
class Delta:
  """What one choice gained from one engine step (or its scored prompt)."""
  index: int
  text: str
  ids: list[int]
  reason: str | None
  logprobs: scheduler_lib.Logprobs | None = None
  prompt_logprobs: scheduler_lib.Logprobs | None = None


def _error(e: api.BadRequest) -> responses.JSONResponse:
  return responses.JSONResponse(e.body(), status_code=e.status)


class LoopDelivery:
  """The scheduler's deliver: hands one step's events to the server's event loop in one
  call (one wake-up per engine step, whatever the number of requests)."""

  def __init__(self):
    self.loop: asyncio.AbstractEventLoop | None = None

  def __call__(self, items) -> None:
    self.loop.call_soon_threadsafe(scheduler_lib.emit_each, items)


def make_app(engine: engine_lib.SlotEngine, model: api.Model, *, max_queue: int = 256,
             metrics: api.Metrics | None = None, request_timeout: float = 600.0,
             drain_timeout: float = 60.0) -> fastapi.FastAPI:
  """The app; its scheduler (app.state.scheduler) runs from startup to shutdown."""
  metrics = metrics or api.Metrics()
  delivery = LoopDelivery()

  def fatal(_: BaseException) -> None:  # on the scheduler's thread
    def stop():
      server = getattr(app.state, 'server', None)
      if server is not None:
        server.should_exit = True
    delivery.loop.call_soon_threadsafe(stop)

  sched = scheduler_lib.Scheduler(engine, eos_id=model.eos_id, max_queue=max_queue,
                                  metrics=metrics, deliver=delivery, on_fatal=fatal)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    delivery.loop = asyncio.get_running_loop()
    sched.start()
    yield
    await asyncio.to_thread(sched.shutdown, True, drain_timeout)

  app = fastapi.FastAPI(title='kforcing_jax', lifespan=lifespan)
  app.state.scheduler, app.state.metrics, app.state.model = sched, metrics, model

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation(_, exc):
    message, param = protocol.describe(exc.errors())
    return _error(api.BadRequest(param, message))

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def _http(request, exc):
    message = (f'no route {request.method} {request.url.path}' if exc.status_code in (404, 405)
               else str(exc.detail))
    return responses.JSONResponse(protocol.error_body(message, status=exc.status_code),
                                  status_code=exc.status_code)

  @app.exception_handler(api.BadRequest)
  async def _bad(_, exc):
    return _error(exc)

  @app.get('/health')
  async def health():
    if sched.error is not None:
      return responses.JSONResponse({'status': 'error', 'error': repr(sched.error)}, 503)
    if not sched.accepting:
      return responses.JSONResponse({'status': 'draining', 'running': sched.running,
                                     'waiting': sched.waiting}, 503)
    return {'status': 'ok', 'running': sched.running, 'waiting': sched.waiting}

  @app.get('/metrics', response_class=responses.PlainTextResponse,
           responses={200: {'content': {'text/plain': {}}}})
  async def prometheus():
    """Prometheus text exposition format."""
    return responses.PlainTextResponse(metrics.render(), media_type='text/plain; version=0.0.4')

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{
        'id': model.name, 'object': 'model', 'created': 0, 'owned_by': 'kforcing_jax',
        'max_model_len': model.max_len, 'k': model.k, 'K': model.K,
        'chat': model.chat_template is not None}]}

  def submit(c: api.Completion, q: asyncio.Queue) -> list[scheduler_lib.Request]:
    reqs = []
    try:
      for ch in c.choices:
        req = scheduler_lib.Request(prompt=ch.prompt, max_tokens=ch.max_tokens,
                                    params=ch.sampling, ignore_eos=c.ignore_eos,
                                    stop_ids=c.stop_ids,
                                    prompt_logprobs=c.echo and c.logprobs is not None,
                                    emit=lambda ev, i=ch.index: q.put_nowait((i, ev)))
        sched.submit(req)
        reqs.append(req)
    except (scheduler_lib.QueueFull, scheduler_lib.ShuttingDown, errors.UserError) as e:
      for r in reqs:
        r.cancel()
      status = (429 if isinstance(e, scheduler_lib.QueueFull) else
                503 if isinstance(e, scheduler_lib.ShuttingDown) else 400)
      raise api.BadRequest(None if status != 400 else 'prompt', str(e), status) from None
    return reqs

  def failure(ev: scheduler_lib.Event) -> api.BadRequest:
    if ev.finish_reason == 'shutdown':
      return api.BadRequest(None, 'the server stopped this request (shutdown)', 503)
    if isinstance(ev.error, errors.UserError):
      return api.BadRequest(None, str(ev.error))
    return api.BadRequest(None, f'the server failed on this request: '
                          f'{type(ev.error).__name__}: {ev.error}', 500)

  async def results(c: api.Completion, reqs, q: asyncio.Queue, deadline: float):
    """Delta per engine step and choice (and one per scored prompt first), until every
    choice has finished; the requests end with it in any case."""
    streams = {ch.index: api.TextStream(model.tokenizer, c.stop, c.min_tokens)
               for ch in c.choices}
    by_index = {ch.index: r for ch, r in zip(c.choices, reqs)}
    running = set(streams)
    try:
      while running:
        left = deadline - time.monotonic()
        if left <= 0:
          for r in reqs:
            r.cancel('timeout')
          raise api.BadRequest(None, f'the request took longer than {request_timeout:.0f} s',
                               status=504)
        try:
          i, ev = await asyncio.wait_for(q.get(), timeout=left)
        except asyncio.TimeoutError:
          continue
        if i not in running:  # ended by a stop string before the scheduler saw it
          continue
        reason = ev.finish_reason
        if reason in ('shutdown', 'error'):
          raise failure(ev)
        if ev.prompt_logprobs is not None:
          yield Delta(i, '', [], None, prompt_logprobs=ev.prompt_logprobs)
          continue
        stream = streams[i]
        delta, ids = stream.add(ev.token_ids, final=reason is not None,
                                stop_token=reason == 'stop' and bool(ev.token_ids))
        if stream.stopped:
          by_index[i].cancel('stop')
          reason = 'stop'
        lp = None if ev.logprobs is None else ev.logprobs[:len(ids)]
        yield Delta(i, delta, ids, reason, lp)
        if reason is not None:
          running.discard(i)
    finally:  # also on a client disconnect: the slots are freed before the next step
      for r in reqs:
        r.cancel()

  def usage(c: api.Completion, n_out: int) -> dict:
    return {'prompt_tokens': c.prompt_tokens, 'completion_tokens': n_out,
            'total_tokens': c.prompt_tokens + n_out}

  lp_text = api.LogprobText(model.tokenizer)

  class Choices:
    """Each choice's response parts so far; text offsets (where each token's text begins
    in the choice's text, the echoed prompt first) by incremental decoding."""

    def __init__(self, c: api.Completion, chat: bool):
      self.c, self.chat = c, chat
      self.prompts = {ch.index: ch.prompt for ch in c.choices}
      self.base = dict.fromkeys(self.prompts, 0)  # the echoed prompt's text length
      self.texts = {i: api.TextStream(model.tokenizer) for i in self.prompts}
      self.started: set[int] = set()

    def echo(self, i: int, prompt_lp=None) -> tuple[str, dict | None]:
      """(the prompt's text, its logprobs part) for an echoed choice."""
      ids = self.prompts[i]
      text = model.tokenizer.decode(ids) if model.tokenizer is not None else ''
      self.base[i] = len(text)
      if self.c.logprobs is None:
        return text, None
      offsets = api.TextStream(model.tokenizer).offsets(ids)
      return text, lp_text.completion(ids, prompt_lp, self.c.logprobs, offsets, prompt=True)

    def logprobs(self, d: Delta):
      if self.c.logprobs is None or d.logprobs is None:
        return None
      if self.chat:
        return {'content': lp_text.chat(d.ids, d.logprobs, self.c.logprobs)}
      offsets = [self.base[d.index] + o for o in self.texts[d.index].offsets(d.ids)]
      return lp_text.completion(d.ids, d.logprobs, self.c.logprobs, offsets)

    def chunk(self, d: Delta, text: str, lp) -> dict:
      first = d.index not in self.started
      self.started.add(d.index)
      if not self.chat:
        return {'index': d.index, 'text': text, 'logprobs': lp, 'finish_reason': d.reason,
                'token_ids': d.ids}
      delta = {'role': 'assistant', 'content': text} if first else (
          {'content': text} if text else {})
      return {'index': d.index, 'delta': delta, 'logprobs': lp, 'finish_reason': d.reason,
              'token_ids': d.ids}

  def merge(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
      return a if b is None else b
    return {k: a[k] + b[k] for k in a}

  async def respond(request: fastapi.Request, c: api.Completion, chat: bool):
    q = asyncio.Queue()
    reqs = submit(c, q)
    cid = f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}'
    created = int(time.time())
    head = {'id': cid, 'object': 'chat.completion.chunk' if chat else 'text_completion',
            'created': created, 'model': model.name}
    events = results(c, reqs, q, time.monotonic() + request_timeout)
    parts = Choices(c, chat)
    scored = c.echo and c.logprobs is not None  # the echo waits for the prompt's scores

    def echoed(d: Delta) -> tuple[str, dict | None]:
      """The echoed prompt's text and logprobs, due before the choice's first delta."""
      if c.echo and d.index not in parts.started and (not scored or
                                                        d.prompt_logprobs is not None):
        return parts.echo(d.index, d.prompt_logprobs)
      return '', None

    if c.stream:
      async def sse():
        n_out = 0
        try:
          async for d in events:
            text, lp = echoed(d)
            n_out += len(d.ids)
            chunk = {**head, 'choices': [parts.chunk(d, text + d.text,
                                                     merge(lp, parts.logprobs(d)))]}
            yield f'data: {json.dumps(chunk)}\n\n'
          if c.include_usage:
            yield f'data: {json.dumps({**head, "choices": [], "usage": usage(c, n_out)})}\n\n'
        except api.BadRequest as e:
          yield f'data: {json.dumps(e.body())}\n\n'
        finally:
          await events.aclose()
        yield 'data: [DONE]\n\n'
      return responses.StreamingResponse(sse(), media_type='text/event-stream')

    async def collect():
      text = {ch.index: [] for ch in c.choices}
      ids = {ch.index: [] for ch in c.choices}
      lps = dict.fromkeys(text)
      reasons = {}
      async for d in events:
        head_text, head_lp = echoed(d)
        parts.started.add(d.index)
        text[d.index].append(head_text + d.text)
        ids[d.index].extend(d.ids)
        lps[d.index] = merge(lps[d.index], merge(head_lp, parts.logprobs(d)))
        reasons[d.index] = d.reason
      return text, ids, lps, reasons

    async def watch_disconnect():
      while not await request.is_disconnected():
        await asyncio.sleep(0.25)

    work = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(watch_disconnect())
    try:
      done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
      watcher.cancel()
      if not work.done():  # the client went away: free its slots
        work.cancel()
        for r in reqs:
          r.cancel()
    if work not in done:
      return responses.Response(status_code=499)
    text, ids, lps, reasons = work.result()  # raises the request's BadRequest
    choices = []
    for i in sorted(text):
      out = ''.join(text[i])
      if chat:
        choices.append({'index': i, 'message': {'role': 'assistant', 'content': out},
                        'logprobs': lps[i], 'finish_reason': reasons[i], 'token_ids': ids[i]})
      else:
        choices.append({'index': i, 'text': out, 'logprobs': lps[i],
                        'finish_reason': reasons[i], 'token_ids': ids[i]})
    return {**head, 'object': 'chat.completion' if chat else 'text_completion',
            'choices': choices, 'usage': usage(c, sum(map(len, ids.values())))}

  @app.post('/v1/completions', responses=protocol.ERROR_RESPONSES)
  async def completions(body: protocol.CompletionRequest, request: fastapi.Request):
    return await respond(request, api.parse_completion(body, model), chat=False)

  @app.post('/v1/chat/completions', responses=protocol.ERROR_RESPONSES)
  async def chat_completions(body: protocol.ChatCompletionRequest, request: fastapi.Request):
    return await respond(request, api.parse_chat(body, model), chat=True)

  @app.post('/v1/tokenize', responses=protocol.ERROR_RESPONSES)
  @app.post('/tokenize', responses=protocol.ERROR_RESPONSES)
  async def tokenize(body: protocol.TokenizeRequest):
    api.check_model_name(body.model, model)
    if (body.prompt is None) == (body.messages is None):
      raise api.BadRequest('prompt', 'give a prompt or chat messages (one of the two)')
    ids = (api.encode_text(model, body.prompt, add_special_tokens=body.add_special_tokens)
           if body.prompt is not None else api.chat_prompt(body.messages, model))
    return {'count': len(ids), 'max_model_len': model.max_len, 'tokens': ids}

  @app.get('/tokenizer_info', responses=protocol.ERROR_RESPONSES)
  @app.get('/v1/tokenizer_info', responses=protocol.ERROR_RESPONSES)
  async def tokenizer_info():
    """vLLM's /tokenizer_info (lm-evaluation-harness's remote tokenizer reads it): the
    special tokens by role, the maximum length and the chat template."""
    if model.tokenizer is None:
      raise api.BadRequest(None, 'this model has no tokenizer', status=404)
    tok = model.tokenizer
    return {**tok.template_tokens, 'tokenizer_class': tok.name,
            'model_max_length': model.max_len, 'chat_template': model.chat_template}

  @app.post('/v1/detokenize', responses=protocol.ERROR_RESPONSES)
  @app.post('/detokenize', responses=protocol.ERROR_RESPONSES)
  async def detokenize(body: protocol.DetokenizeRequest):
    api.check_model_name(body.model, model)
    if model.tokenizer is None:
      raise api.BadRequest(None, 'this model has no tokenizer')
    return {'prompt': model.tokenizer.decode(api.check_ids(body.tokens, model, 'tokens'))}

  def openapi() -> dict:
    """FastAPI's schema, without the 422 it documents by default (validation errors are
    400s in the OpenAI shape here)."""
    if app.openapi_schema is None:
      schema = fastapi.openapi.utils.get_openapi(title=app.title, version=app.version,
                                                 routes=app.routes)
      for path in schema['paths'].values():
        for op in path.values():
          op.get('responses', {}).pop('422', None)
      for name in ('HTTPValidationError', 'ValidationError'):
        schema.get('components', {}).get('schemas', {}).pop(name, None)
      app.openapi_schema = schema
    return app.openapi_schema
  app.openapi = openapi
  return app
