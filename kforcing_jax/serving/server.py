"""An OpenAI-compatible HTTP server (FastAPI) over the scheduler.

POST /v1/completions (text or token-id prompts, streaming as server-sent events with one
chunk per engine step), GET /v1/models, GET /health, GET /metrics (Prometheus). Bad
requests get a 4xx whose message names the field; a full queue gets a 429.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

import fastapi
from fastapi import responses

from kforcing_jax import errors
from kforcing_jax.serving import api
from kforcing_jax.serving import scheduler as scheduler_lib


def _error(e: api.BadRequest) -> responses.JSONResponse:
  return responses.JSONResponse(e.body(), status_code=e.status)


def make_app(sched: scheduler_lib.Scheduler, model: api.Model, metrics: api.Metrics, *,
             request_timeout: float = 600.0, drain_timeout: float = 60.0) -> fastapi.FastAPI:
  eos = model.tokenizer.eos_id if model.tokenizer is not None else -1

  @contextlib.asynccontextmanager
  async def lifespan(_):
    loop = asyncio.get_running_loop()

    def run_events(items):
      for req, ev in items:
        req.emit(ev)
    # one wake-up of the event loop per engine step, whatever the number of requests
    sched.deliver = lambda items: loop.call_soon_threadsafe(run_events, items)
    yield
    await asyncio.to_thread(sched.shutdown, True, drain_timeout)

  app = fastapi.FastAPI(title='kforcing_jax', lifespan=lifespan)

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation(_, exc):
    return _error(api.BadRequest(None, f'bad request: {exc}'))

  @app.get('/health')
  async def health():
    if sched.error is not None:
      return responses.JSONResponse({'status': 'error', 'error': repr(sched.error)}, 503)
    return {'status': 'ok', 'running': sched.running, 'waiting': sched.waiting}

  @app.get('/metrics')
  async def prometheus():
    return responses.Response(metrics.render(), media_type='text/plain; version=0.0.4')

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [{
        'id': model.name, 'object': 'model', 'created': 0, 'owned_by': 'kforcing_jax',
        'max_model_len': model.max_len, 'k': model.k, 'K': model.K}]}

  def submit(ids, c: api.Completion, queue) -> scheduler_lib.Request:
    req = scheduler_lib.Request(prompt=ids, max_tokens=c.max_tokens, params=c.sampling,
                                ignore_eos=c.ignore_eos, emit=queue.put_nowait)
    try:
      sched.submit(req)
    except scheduler_lib.QueueFull as e:
      raise api.BadRequest(None, str(e), status=429) from None
    except scheduler_lib.ShuttingDown as e:
      raise api.BadRequest(None, str(e), status=503) from None
    except errors.UserError as e:
      raise api.BadRequest('prompt', str(e)) from None
    return req

  async def events(req, queue, stream: api.TextStream, deadline: float):
    """(delta text, token ids, finish reason or None) per engine step of one request."""
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        req.cancel('timeout')
        raise api.BadRequest(None, f'the request took longer than {request_timeout:.0f} s',
                             status=504)
      try:
        ev = await asyncio.wait_for(queue.get(), timeout=left)
      except asyncio.TimeoutError:
        continue
      reason = ev.finish_reason
      if reason in ('shutdown', 'error'):
        raise api.BadRequest(None, f'the server stopped this request ({reason})', status=503)
      delta = stream.add(ev.token_ids, final=reason is not None)
      if stream.stopped and reason is None:
        req.cancel('stop')
        reason = 'stop'
      elif stream.stopped:
        reason = 'stop'
      yield delta, ev.token_ids, reason
      if reason is not None:
        metrics.requests.labels(status=reason).inc()
        return

  def chunk(cid, created, index, text, ids, reason):
    return {'id': cid, 'object': 'text_completion', 'created': created, 'model': model.name,
            'choices': [{'index': index, 'text': text, 'logprobs': None,
                         'finish_reason': reason, 'token_ids': ids}]}

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request):
    try:
      try:
        body = json.loads(await request.body())
      except (ValueError, UnicodeDecodeError) as e:
        raise api.BadRequest(None, f'the body is not valid JSON: {e}') from None
      c = api.parse_completion(body, model)
      if c.stream and len(c.prompts) > 1:
        raise api.BadRequest('prompt', 'prompt: streaming takes one prompt per request')
      queues = [asyncio.Queue() for _ in c.prompts]
      reqs = []
      try:
        for ids, q in zip(c.prompts, queues):
          reqs.append(submit(ids, c, q))
      except api.BadRequest:
        for r in reqs:
          r.cancel()
        raise
    except api.BadRequest as e:
      return _error(e)
    cid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())
    deadline = time.monotonic() + request_timeout
    # with ignore_eos an EOS is an ordinary token of the text; else only the last one
    streams = [api.TextStream(model.tokenizer, -1 if c.ignore_eos else eos, c.stop)
               for _ in c.prompts]

    def usage(n_out):
      n_in = sum(len(p) for p in c.prompts)
      return {'prompt_tokens': n_in, 'completion_tokens': n_out, 'total_tokens': n_in + n_out}

    if c.stream:
      async def sse():
        n_out = 0
        try:
          async for delta, ids, reason in events(reqs[0], queues[0], streams[0], deadline):
            n_out += len(ids)
            yield f'data: {json.dumps(chunk(cid, created, 0, delta, ids, reason))}\n\n'
          if c.include_usage:
            yield ('data: ' + json.dumps({'id': cid, 'object': 'text_completion',
                                           'created': created, 'model': model.name,
                                           'choices': [], 'usage': usage(n_out)}) + '\n\n')
        except api.BadRequest as e:
          yield f'data: {json.dumps(e.body())}\n\n'
        finally:  # also on a client disconnect: the slot is freed before the next step
          reqs[0].cancel()
        yield 'data: [DONE]\n\n'
      return responses.StreamingResponse(sse(), media_type='text/event-stream')

    async def one(i):
      text, ids, reason = [], [], None
      async for delta, new, reason in events(reqs[i], queues[i], streams[i], deadline):
        text.append(delta)
        ids.extend(new)
      return {'index': i, 'text': ''.join(text), 'logprobs': None, 'finish_reason': reason,
              'token_ids': ids}

    async def watch_disconnect():
      while not await request.is_disconnected():
        await asyncio.sleep(0.25)

    try:
      work = asyncio.ensure_future(asyncio.gather(*(one(i) for i in range(len(reqs)))))
      watcher = asyncio.ensure_future(watch_disconnect())
      done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
      if work not in done:  # the client went away: free its slots
        work.cancel()
        return responses.Response(status_code=499)
      watcher.cancel()
      choices = work.result()
    except api.BadRequest as e:
      return _error(e)
    finally:
      for r in reqs:
        r.cancel()
    return {'id': cid, 'object': 'text_completion', 'created': created, 'model': model.name,
            'choices': choices, 'usage': usage(sum(len(ch['token_ids']) for ch in choices))}

  return app
