"""The serving loop: a background thread that admits queued requests into free slots
between engine steps, advances all slots, and streams each request's tokens to it.

A request ends at its EOS (unless ignore_eos), at max_tokens, when its consumer finishes
it (a stop string, a client disconnect, a timeout: `Request.cancel`), or at shutdown.
The waiting queue is bounded: `submit` raises QueueFull (HTTP 429) when it is full.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Callable

import numpy as np

from kforcing_jax import errors
from kforcing_jax.serving import engine as engine_lib


class QueueFull(errors.UserError):
  pass


class ShuttingDown(errors.UserError):
  pass


@dataclasses.dataclass(frozen=True)
class Event:
  """What a request receives after each engine step that gave it tokens, and at its end."""
  token_ids: list[int]
  finish_reason: str | None = None  # 'stop' (EOS) | 'length' | 'cancelled' | 'shutdown'


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
  prompt: list[int]
  max_tokens: int
  params: engine_lib.SamplingParams
  emit: Callable[[Event], None]  # called through the scheduler's deliver
  ignore_eos: bool = False
  id: int = dataclasses.field(default_factory=lambda: next(_ids))
  arrived: float = dataclasses.field(default_factory=time.perf_counter)
  first_token_at: float | None = None
  generated: int = 0
  _cancelled: str | None = None

  def cancel(self, reason: str = 'cancelled') -> None:
    """Frees the request's slot before the next step (thread-safe)."""
    self._cancelled = reason

  @property
  def cancelled(self) -> str | None:
    """Why the request was cancelled, or None."""
    return self._cancelled


class Scheduler:
  """Runs `engine` for submitted requests in a background thread."""

  def __init__(self, engine: engine_lib.SlotEngine, *, eos_id: int = -1, max_queue: int = 256,
               metrics=None, deliver: Callable[[list[tuple[Request, Event]]], None] | None = None):
    """deliver: called once per engine step with every (request, event) of the step
    (default: each request's emit); a server hands them to its event loop in one call."""
    self.engine = engine
    self.eos_id = eos_id
    self.max_queue = max_queue
    self.metrics = metrics
    self._queue: collections.deque[Request] = collections.deque()
    self._slots: list[Request | None] = [None] * engine.max_slots
    self._cv = threading.Condition()
    self._stop = False
    self._accepting = True
    self._thread = threading.Thread(target=self._run, name='kforcing-scheduler', daemon=True)
    self._state = engine.init_state()
    self.deliver = deliver or (lambda items: [r.emit(ev) for r, ev in items])
    self._events: list[tuple[Request, Event]] = []
    self.error: BaseException | None = None

  # ---- client side -------------------------------------------------------------------------
  def start(self) -> Scheduler:
    self._thread.start()
    return self

  def submit(self, req: Request) -> None:
    self.engine.check(len(req.prompt), req.max_tokens)
    with self._cv:
      if not self._accepting:
        raise ShuttingDown('the server is shutting down and admits no new requests')
      if len(self._queue) >= self.max_queue:
        raise QueueFull(f'the waiting queue is full ({self.max_queue} requests); retry later')
      self._queue.append(req)
      self._cv.notify()
    self._gauges()

  @property
  def running(self) -> int:
    return sum(r is not None for r in self._slots)

  @property
  def waiting(self) -> int:
    return len(self._queue)

  def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
    """Stops admitting; with drain, lets queued and running requests finish (up to
    timeout seconds), then cancels what is left and stops the thread."""
    with self._cv:
      self._accepting = False
      self._cv.notify()
    deadline = time.monotonic() + timeout
    while drain and (self.running or self.waiting) and time.monotonic() < deadline and \
        self._thread.is_alive():
      time.sleep(0.01)
    with self._cv:
      self._stop = True
      self._cv.notify()
    if self._thread.is_alive():
      self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

  # ---- serving thread ----------------------------------------------------------------------
  def _gauges(self):
    if self.metrics is not None:
      self.metrics.running.set(self.running)
      self.metrics.waiting.set(self.waiting)

  def _admit(self) -> None:
    for slot, occupant in enumerate(self._slots):
      if occupant is not None:
        continue
      with self._cv:
        req = self._queue.popleft() if self._queue else None
      if req is None:
        return
      if req.cancelled:
        self._events.append((req, Event([], req.cancelled)))
        continue
      prefix = self.engine.prefill(req.prompt)
      self._state = self.engine.insert(self._state, prefix, slot, req.params)
      self._slots[slot] = req

  def _finish(self, slot: int, reason: str, tokens=()) -> None:
    req = self._slots[slot]
    self._slots[slot] = None
    self._events.append((req, Event(list(tokens), reason)))

  def _flush(self) -> None:
    if self._events:
      events, self._events = self._events, []
      self.deliver(events)

  def _run(self) -> None:
    """Each iteration dispatches the next step before reading the previous step's tokens,
    so the host's work (delivery, admission) overlaps the device's; the tokens of a step
    go to the requests that held the slots when it was dispatched, if they still run."""
    pending = None  # (tokens on device, slot occupants at dispatch, dispatch time)
    try:
      while True:
        with self._cv:
          while (not self._stop and not self._queue and not any(self._slots) and
                 pending is None):
            self._cv.wait()
          if self._stop:
            break
        for slot, req in enumerate(self._slots):
          if req is not None and req.cancelled:
            self._finish(slot, req.cancelled)
        self._admit()
        active = [r for r in self._slots if r is not None]
        dispatched = None
        if active:
          top_k = any(r.params.top_k > 0 for r in active)
          top_p = any(r.params.top_p < 1.0 for r in active)
          self._state, toks = self.engine.generate(self._state, top_k=top_k, top_p=top_p)
          dispatched = (toks, list(self._slots), time.perf_counter())
        if pending is not None:
          self._deliver(*pending)
        pending = dispatched
        self._flush()
        self._gauges()
      for slot, req in enumerate(self._slots):
        if req is not None:
          self._finish(slot, 'shutdown')
      with self._cv:
        while self._queue:
          self._events.append((self._queue.popleft(), Event([], 'shutdown')))
      self._flush()
    except BaseException as e:  # surfaced to every waiting client and to /health
      self.error = e
      for slot, req in enumerate(self._slots):
        if req is not None:
          self._finish(slot, 'error')
      with self._cv:
        self._accepting = False
        while self._queue:
          self._events.append((self._queue.popleft(), Event([], 'error')))
      self._flush()
      raise

  def _deliver(self, toks, occupants, t0: float) -> None:
    toks = np.asarray(toks)  # [n, slots, K]: waits for that step only
    now = time.perf_counter()
    if self.metrics is not None:
      self.metrics.step_seconds.observe((now - t0) / toks.shape[0])
    for slot, req in enumerate(occupants):
      if req is None or self._slots[slot] is not req:  # finished or replaced since
        continue
      out, reason = [], None
      for step in range(toks.shape[0]):
        for t in toks[step, slot].tolist():
          out.append(t)
          req.generated += 1
          if t == self.eos_id and not req.ignore_eos:
            reason = 'stop'
          elif req.generated >= req.max_tokens:
            reason = 'length'
          if reason:
            break
        if reason:
          break
      if req.first_token_at is None and out:
        req.first_token_at = now
        if self.metrics is not None:
          self.metrics.ttft_seconds.observe(now - req.arrived)
      if self.metrics is not None and out:
        self.metrics.tokens.inc(len(out))
      if reason:
        if self.metrics is not None and req.generated > 1:
          self.metrics.tpot_seconds.observe((now - req.first_token_at) / max(
              req.generated - 1, 1))
        self._finish(slot, reason, out)
      else:
        self._events.append((req, Event(out)))
