"""The serving loop: a background thread that admits queued requests into free slots
between engine steps, advances all slots, and streams each request's tokens to it.

A request ends at a stop token (the model's EOS unless ignore_eos, and the request's own
stop_ids: a chat template's end of turn, stop_token_ids), at max_tokens, when its consumer
finishes it (a stop string, a client disconnect, a timeout: `Request.cancel`), or at
shutdown. The waiting queue is bounded: `submit` raises QueueFull (HTTP 429) when it is
full; a cancelled waiting request leaves it at once.

Failures: a request whose admission fails (its prefill or insert raises: a bad setting the
protocol did not catch, a compile or out-of-memory error of its length bucket) ends alone
with finish reason 'error' and the exception. A failing engine step is fatal: every
request ends with 'error', the scheduler stops admitting, and `on_fatal` is called (the
server then exits so that a supervisor restarts it).
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
class Logprobs:
  """Host log-probabilities of n tokens: each token's and its top alternatives'."""
  token_n: np.ndarray  # float32 [n]
  top_ids_nxN: np.ndarray  # int32 [n, N]
  top_nxN: np.ndarray  # float32 [n, N]

  def __len__(self) -> int:
    return len(self.token_n)

  def __getitem__(self, cut) -> Logprobs:
    return Logprobs(self.token_n[cut], self.top_ids_nxN[cut], self.top_nxN[cut])

  @classmethod
  def from_device(cls, lp, reshape=lambda x: x) -> Logprobs:
    """An engine's Logprobs (decoding.step.Logprobs) on the host, each field reshaped."""
    return cls(*(reshape(np.asarray(x)) for x in (lp.token_BxK, lp.top_ids_BxKxN,
                                                   lp.top_BxKxN)))


@dataclasses.dataclass(frozen=True)
class Event:
  """What a request receives after each engine step that gave it tokens, and at its end."""
  token_ids: list[int]
  # 'stop' (a stop token, the last of token_ids) | 'length' | 'shutdown' | 'error' | the
  # reason given to Request.cancel
  finish_reason: str | None = None
  error: BaseException | None = None  # with 'error'
  logprobs: Logprobs | None = None  # of token_ids, when the request asked for them
  prompt_logprobs: Logprobs | None = None  # of prompt tokens 1.. (once, before any token)


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Request:
  prompt: list[int]
  max_tokens: int  # 0: nothing is generated (only the prompt scored, if asked)
  params: engine_lib.SamplingParams
  emit: Callable[[Event], None]  # called through the scheduler's deliver
  ignore_eos: bool = False
  stop_ids: frozenset[int] = frozenset()  # tokens that end it besides the model's EOS
  prompt_logprobs: bool = False  # score the prompt first (AR)
  id: int = dataclasses.field(default_factory=lambda: next(_ids))
  arrived: float = dataclasses.field(default_factory=time.perf_counter)
  admitted_at: float | None = None
  first_token_at: float | None = None
  generated: int = 0
  ended: bool = False  # its final event is on its way
  _cancelled: str | None = None
  _scheduler: Scheduler | None = dataclasses.field(default=None, repr=False)

  def cancel(self, reason: str = 'cancelled') -> None:
    """Ends the request (thread-safe): a waiting one leaves the queue now, a running one
    frees its slot before the next step."""
    if self._cancelled is None:
      self._cancelled = reason
      if self._scheduler is not None:
        self._scheduler.withdraw(self)

  @property
  def cancelled(self) -> str | None:
    """Why the request was cancelled, or None."""
    return self._cancelled


Deliver = Callable[[list[tuple[Request, Event]]], None]


def emit_each(items: list[tuple[Request, Event]]) -> None:
  for req, ev in items:
    req.emit(ev)


class Scheduler:
  """Runs `engine` for submitted requests in a background thread."""

  def __init__(self, engine: engine_lib.SlotEngine, *, eos_id: int = -1, max_queue: int = 256,
               metrics=None, deliver: Deliver = emit_each,
               on_fatal: Callable[[BaseException], None] | None = None):
    """deliver: called with every (request, event) of one engine step at once (a server
    hands them to its event loop in one call); on_fatal: called on the scheduler's thread
    after a failing engine step has ended every request."""
    self.engine = engine
    self.eos_id = eos_id
    self.max_queue = max_queue
    self.metrics = metrics
    self.deliver = deliver
    self.on_fatal = on_fatal
    self._queue: collections.deque[Request] = collections.deque()
    self._slots: list[Request | None] = [None] * engine.max_slots
    self._cv = threading.Condition()
    self._stop = False
    self._accepting = True
    self._thread = threading.Thread(target=self._run, name='kforcing-scheduler', daemon=True)
    self._state = engine.init_state()
    self._events: list[tuple[Request, Event]] = []
    self.error: BaseException | None = None

  # ---- client side -------------------------------------------------------------------------
  def start(self) -> Scheduler:
    self._thread.start()
    return self

  def submit(self, req: Request) -> None:
    self.engine.check(len(req.prompt), max(req.max_tokens, 1), req.params)
    with self._cv:
      if not self._accepting:
        raise ShuttingDown('the server is shutting down and admits no new requests')
      if len(self._queue) >= self.max_queue:
        raise QueueFull(f'the waiting queue is full ({self.max_queue} requests); retry later')
      req._scheduler = self  # pylint: disable=protected-access
      self._queue.append(req)
      self._cv.notify()
    if self.metrics is not None:
      self.metrics.prompt_tokens.inc(len(req.prompt))
    self._gauges()

  def withdraw(self, req: Request) -> None:
    """A cancelled request: out of the queue now if it waits there (its final event is
    delivered from this thread); a running one is finished by the serving thread."""
    with self._cv:
      try:
        self._queue.remove(req)
      except ValueError:  # running, finished, or never queued
        self._cv.notify()
        return
    self._gauges()
    self._count(req.cancelled)
    self.deliver([(req, Event([], req.cancelled))])

  @property
  def running(self) -> int:
    return sum(r is not None for r in self._slots)

  @property
  def waiting(self) -> int:
    return len(self._queue)

  @property
  def accepting(self) -> bool:
    """False while draining, after shutdown and after a fatal error."""
    return self._accepting

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

  def _count(self, reason: str) -> None:
    if self.metrics is not None:
      self.metrics.requests.labels(status=reason).inc()

  def _next_waiting(self) -> Request | None:
    with self._cv:
      return self._queue.popleft() if self._queue else None

  def _compact(self) -> None:
    """Keeps the running requests in slots [0, n): the highest one moves into the lowest
    free slot (one row copy), so that a step computes only the smallest bucket >= n."""
    while True:
      free = next((i for i, r in enumerate(self._slots) if r is None), None)
      last = max((i for i, r in enumerate(self._slots) if r is not None), default=-1)
      if free is None or last < free:
        return
      self._state = self.engine.move(self._state, last, free)
      self._slots[free], self._slots[last] = self._slots[last], None

  def _admit(self) -> None:
    """Fills free slots from the queue; a request whose prefill or insert fails ends
    alone (the state is only replaced by a successful insert)."""
    self._compact()
    free = [i for i, r in enumerate(self._slots) if r is None]
    while free:
      req = self._next_waiting()
      if req is None:
        return
      if req.cancelled:  # cancelled after it left the queue: withdraw did not end it
        self._end(req, Event([], req.cancelled))
        continue
      try:
        if req.prompt_logprobs:
          self._events.append((req, Event([], prompt_logprobs=Logprobs.from_device(
              self.engine.score(req.prompt)))))
        if req.max_tokens == 0:
          self._end(req, Event([], 'length'))
          continue
        prefix = self.engine.prefill(req.prompt)
        self._state = self.engine.insert(self._state, prefix, free[0], req.params)
      except Exception as e:  # pylint: disable=broad-except
        self._end(req, Event([], 'error', e))
        continue
      req.admitted_at = time.perf_counter()
      if self.metrics is not None:
        self.metrics.queue_seconds.observe(req.admitted_at - req.arrived)
      self._slots[free.pop(0)] = req

  def _end(self, req: Request, ev: Event) -> None:
    req.ended = True
    self._events.append((req, ev))
    self._count(ev.finish_reason)
    if self.metrics is not None:
      self.metrics.e2e_seconds.observe(time.perf_counter() - req.arrived)

  def _finish(self, slot: int, reason: str, tokens=(), error=None) -> None:
    req = self._slots[slot]
    self._slots[slot] = None
    self._end(req, Event(list(tokens), reason, error))

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
        live = sum(r is not None for r in self._slots)  # slots [0, live) after _admit
        dispatched = None
        if live:
          rows = self.engine.rows(live)
          self._state, toks, lp = self.engine.generate(self._state, rows)
          dispatched = (toks, lp, self._slots[:rows], time.perf_counter())
        if pending is not None:
          self._deliver(*pending)
        pending = dispatched
        self._flush()
        self._gauges()
      for slot, req in enumerate(self._slots):
        if req is not None:
          self._finish(slot, 'shutdown')
      with self._cv:
        left = list(self._queue)
        self._queue.clear()
      for req in left:
        self._end(req, Event([], 'shutdown'))
      self._flush()
    except BaseException as e:  # pylint: disable=broad-except
      self._fail(e)

  def _fail(self, e: BaseException) -> None:
    """A failed engine step: the slot state is lost, so every request ends and the
    scheduler stops; on_fatal lets the process exit."""
    self.error = e
    with self._cv:
      self._accepting = False
      left = list(self._queue)
      self._queue.clear()
    for slot, req in enumerate(self._slots):
      if req is not None:
        self._finish(slot, 'error', error=e)
    for req in left:
      self._end(req, Event([], 'error', e))
    try:
      self._flush()
    finally:
      self._gauges()
      if self.on_fatal is not None:
        self.on_fatal(e)

  def _deliver(self, toks, lp, occupants, t0: float) -> None:
    toks = np.asarray(toks)  # [n, slots, K]: waits for that step only
    now = time.perf_counter()
    if self.metrics is not None:
      self.metrics.step_seconds.observe((now - t0) / toks.shape[0])
    n, B, K = toks.shape
    by_slot = toks.transpose(1, 0, 2).reshape(B, n * K)
    lp_host = None
    if any(r is not None and r.params.logprobs for r in occupants):
      lp_host = Logprobs.from_device(  # [slots, n * K, ...]
          lp, lambda x: np.swapaxes(x, 0, 1).reshape(B, n * K, *x.shape[3:]))
    stop_B = np.zeros((B, n * K), bool)  # a stop token (EOS unless ignore_eos, stop ids)
    live = []
    for slot, req in enumerate(occupants):
      if req is None or req.ended:  # (it may have moved to another slot since: _compact)
        continue
      live.append(slot)
      row = by_slot[slot]
      stop_B[slot] = np.isin(row, list(req.stop_ids)) if req.stop_ids else False
      if not req.ignore_eos and self.eos_id >= 0:
        stop_B[slot] |= row == self.eos_id
    # tokens up to and with the first stop token (all n * K if none)
    upto_B = np.where(stop_B.any(1), stop_B.argmax(1) + 1, n * K + 1)
    emitted = 0
    for slot in live:
      req = occupants[slot]
      room = req.max_tokens - req.generated
      take = min(int(upto_B[slot]), room, n * K)
      reason = ('stop' if take == upto_B[slot] else 'length' if take == room else None)
      out = by_slot[slot, :take].tolist()
      req.generated += take
      emitted += take
      if req.first_token_at is None:
        req.first_token_at = now
        if self.metrics is not None:
          self.metrics.ttft_seconds.observe(now - req.arrived)
      logprobs = (None if lp_host is None or not req.params.logprobs else
                  lp_host[slot, :take])
      if reason:
        if self.metrics is not None and req.generated > 1:
          self.metrics.tpot_seconds.observe((now - req.first_token_at) / (req.generated - 1))
        self._slots[self._slots.index(req)] = None
        self._end(req, Event(out, reason, logprobs=logprobs))
      else:
        self._events.append((req, Event(out, logprobs=logprobs)))
    if self.metrics is not None and emitted:
      self.metrics.tokens.inc(emitted)
