"""The one training-stage loop every training stage (kinds teacher and distill) runs.

A stage is a `StageSpec`: how to initialise its parameters, a step factory
`make_step(tx) -> step(state, batch, rng, *frozen) -> (state, metrics)`, the frozen
arguments (a teacher's parameters) with their shardings, its settings (stages.<name>:
steps, batch, microbatches, cadences, `opt`), and its evaluation. `run` owns the rest:
state creation, the data iterator, the checkpoint manager and resume (refusing a
checkpoint whose compatibility fields differ), the memory report, jit with explicit
shardings and a donated state (the RNG folded with the step inside it; frozen arguments
never donated, never checkpointed), metric writers and progress, the deferred NaN check,
log / eval / checkpoint cadences and the summary.
"""
from __future__ import annotations

import dataclasses
import os
import time
import zlib
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kforcing_jax.training import checkpoint as ckpt_lib
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.training import memory
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.training import optim
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.training import writers


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any
  opt_state: Any
  ema_params: Any  # same tree as params, or None when EMA is off

  @property
  def eval_params(self):
    return self.params if self.ema_params is None else self.ema_params


class NonFiniteLossError(FloatingPointError):
  pass


def abstract_state(init_params: Callable[[jax.Array], Any], tx, mesh, ema: bool):
  """(abstract unboxed state with shardings, state shardings, init function)."""

  def init_fn(rng):
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=params if ema else None)

  boxed = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh)
  abstract = ckpt_lib.abstract_like(nn.unbox(boxed), shardings)
  return abstract, shardings, lambda rng: nn.unbox(init_fn(rng))


def create_state(init_params, tx, mesh, rng, ema: bool):
  abstract, shardings, init_fn = abstract_state(init_params, tx, mesh, ema)
  with sharding_lib.mesh_context(mesh):
    state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return state, abstract, shardings


def apply_update(state: TrainState, grads, tx, ema_decay: float, finite) -> TrainState:
  """One optimizer update, skipped (state kept, step counted) when `finite` is False."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(finite, new, old)
  params = jax.tree.map(keep, params, state.params)
  opt_state = jax.tree.map(keep, opt_state, state.opt_state)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: jnp.where(finite, ema_decay * e + (1 - ema_decay) * p, e),
                       ema, params)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def sum_over_microbatches(grad_fn, params, inputs, n: int):
  """Sums grad_fn(params, inputs_j, j) -> (grads, sums) over n microbatches of `inputs`.

  Row r of every input goes to microbatch r % n, so each device keeps its own rows and the
  summed gradients equal the full batch's, while only B/n rows of activations are alive
  at a time (a lax.scan)."""
  if n == 1:
    return grad_fn(params, inputs, 0)

  def split(x):
    x = jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))
  stacked = jax.tree.map(split, inputs)
  first = jax.tree.map(lambda x: x[0], stacked)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(lambda p, b: grad_fn(p, b, 0), params, first))

  def body(acc, xs):
    mb, j = xs
    return jax.tree.map(jnp.add, acc, grad_fn(params, mb, j)), None
  acc, _ = jax.lax.scan(body, zeros, (stacked, jnp.arange(n)))
  return acc


def finish_update(state: TrainState, tx, ema_decay: float, grad_sums, total, count):
  """Mean gradients and loss over `count` targets, the guarded update and base metrics."""
  count = jnp.maximum(count, 1.0)
  loss = total / count
  grads = jax.tree.map(lambda g: g / count, grad_sums)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = apply_update(state, grads, tx, ema_decay, finite)
  return new_state, {'loss': loss, 'grad_norm': grad_norm,
                     'nonfinite': 1.0 - finite.astype(jnp.float32)}


def jit_step(step_fn, state_shardings, mesh, frozen_shardings=()):
  """step(state, batch, rng, *frozen) jitted with explicit shardings, the state donated and
  the RNG folded with state.step inside (so a resumed run draws the same numbers)."""
  def stepped(state, batch, rng, *frozen):
    return step_fn(state, batch, jax.random.fold_in(rng, state.step), *frozen)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(stepped,
                 in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), rep,
                               *frozen_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


@dataclasses.dataclass
class StageSpec:
  name: str
  arch: arch_lib.ArchConfig  # the trained model's (saved in checkpoints)
  settings: Any  # stages.<name>: steps, batch_size, microbatches, cadences, opt
  init_params: Callable[[jax.Array], Any]  # rng -> boxed parameters
  make_step: Callable[[optax.GradientTransformation], Callable]
  compat: dict  # must equal a checkpoint's to resume it
  evaluate: Callable[[Any], dict]  # params -> summary fields (numbers go to the writer)
  seeds: tuple[int, int, int]  # (parameter init, data order, step RNG): stage_seeds
  tokens_per_step: int
  # the seeds of checkpoints written before checkpoints recorded theirs (resumed with them)
  legacy_seeds: tuple[int, int, int] | None = None
  window: int = 0  # 0: the teacher step; k: a distill step of window k (memory estimate)
  target_factor: float = 1.0  # the objective's target arrays (Objective.target_memory)
  frozen: tuple = ()
  frozen_shardings: tuple = ()
  start_params: Callable[[Any], Any] | None = None  # fresh params -> starting params
  progress_keys: tuple[str, ...] = ('loss',)
  meta: dict = dataclasses.field(default_factory=dict)  # extra checkpoint metadata
  summary: dict = dataclasses.field(default_factory=dict)  # extra summary fields


def stage_seeds(seed: int, stage: str) -> tuple[int, int, int]:
  """(parameter init, data order, step RNG) seeds of a stage, from the run's seed and the
  stage's name: two stages never share a draw, whatever their kind or window."""
  return tuple(zlib.crc32(f'{seed}/{stage}/{use}'.encode()) & 0x7FFFFFFF
               for use in ('init', 'data', 'step'))


def run(ctx, spec: StageSpec) -> dict:
  """Trains spec's stage under WORKDIR/<name>/ and writes its summary.json (the pipeline
  skips a stage whose summary exists before building its spec)."""
  stage_dir = os.path.join(ctx.workdir, spec.name)
  t_start = time.time()
  s = spec.settings
  sharding_lib.check_batch(s.batch_size, ctx.mesh, f'stages.{spec.name}.batch_size',
                           s.microbatches, f'stages.{spec.name}.microbatches')
  tx = optim.make_optimizer(s.opt, s.steps)
  ema = s.opt.ema_decay > 0
  abstract, shardings, _ = abstract_state(spec.init_params, tx, ctx.mesh, ema)
  mngr = ckpt_lib.manager(os.path.join(stage_dir, 'checkpoints'), s.keep_checkpoints)
  init_seed, data_seed, step_seed = resume_seeds(mngr, spec)
  train_it = data_lib.BatchIterator(ctx.source, 'train', s.batch_size,
                                    sharding_lib.batch_sharding(ctx.mesh), data_seed,
                                    ctx.cfg.data.shuffle)
  meta = {'stage': spec.name, 'arch': spec.arch.to_dict(), 'compat': spec.compat,
          'config': ctx.cfg.to_dict(), 'seeds': [init_seed, data_seed, step_seed],
          **spec.meta}
  state = resume(mngr, meta, abstract, train_it, stage_dir)
  if state is None:  # a fresh start: initialise, then e.g. copy the teacher's weights in
    state, _, _ = create_state(spec.init_params, tx, ctx.mesh, jax.random.key(init_seed), ema)
    if spec.start_params is not None:
      params = spec.start_params(state.params)
      state = state.replace(params=params, ema_params=None if state.ema_params is None
                            else jax.tree.map(jnp.copy, params))
  n_params = model_lib.count_params(state.params)
  start = int(state.step)
  print(f'{spec.name}: {n_params:,} parameters, mesh {dict(ctx.mesh.shape)}, '
        f'{jax.device_count()} devices ({jax.default_backend()})')
  memory.report(spec.name, memory.estimate(spec.arch, ctx.exe, abstract, ctx.mesh,
                                           s.batch_size, ctx.cfg.data.seq_len,
                                           s.microbatches, window=spec.window,
                                           target_factor=spec.target_factor))
  step_fn = jit_step(spec.make_step(tx), shardings, ctx.mesh, spec.frozen_shardings)
  writer = writers.MetricWriter(os.path.join(stage_dir, 'logs'), resume_step=start)
  progress = writers.Progress(spec.name, s.steps, spec.tokens_per_step, start)
  rng = jax.random.key(step_seed)
  eval_every = s.get('eval_every', 0)
  results = {}
  pending = None
  try:
    with sharding_lib.mesh_context(ctx.mesh):
      for step in range(start, s.steps):
        state, metrics = step_fn(state, next(train_it), rng, *spec.frozen)
        if pending is not None:  # step t's metrics are read after step t+1 is dispatched
          check_finite(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        if done % s.log_every == 0 or done == s.steps:
          m = {k: float(v) for k, v in metrics.items() if k != 'nonfinite'}
          writer.write_scalars(done, {f'train/{k}': v for k, v in m.items()})
          progress.report(done, {k: m[k] for k in spec.progress_keys})
        if done == s.steps or (eval_every and done % eval_every == 0):
          check_finite(*pending)
          results = spec.evaluate(state.eval_params)
          writer.write_scalars(done, {f'eval/{k}': v for k, v in results.items()
                                      if isinstance(v, (int, float)) and v is not None})
        if done % s.checkpoint_every == 0 or done == s.steps:
          ckpt_lib.save(mngr, done, state, train_it.state(), meta)
      if pending is not None:
        check_finite(*pending)
      if start >= s.steps:  # resumed from the final checkpoint of an unfinished stage
        results = spec.evaluate(state.eval_params)
  finally:
    # an interrupted run keeps every checkpoint it started writing
    mngr.wait_until_finished()
  mngr.close()
  writer.close()
  summary = {'stage': spec.name, 'steps': s.steps, 'seconds': time.time() - t_start,
             'params': n_params, **spec.summary, **results}
  writers.write_json(os.path.join(stage_dir, 'summary.json'), summary)
  return summary


def resume_seeds(mngr, spec: StageSpec) -> tuple[int, int, int]:
  """The seeds a stage continues with: a checkpoint's recorded ones, the legacy ones of a
  checkpoint written before seeds were recorded, else the spec's."""
  if mngr.latest_step() is None:
    return spec.seeds
  saved = ckpt_lib.restore_meta(mngr).get('seeds')
  if saved:
    return tuple(int(x) for x in saved)
  return spec.legacy_seeds or spec.seeds


def resume(mngr, meta: dict, abstract, train_it, stage_dir: str):
  """The latest checkpoint's state (data iterator repositioned), or None; refuses a
  checkpoint whose compat fields differ from `meta`'s."""
  if mngr.latest_step() is None:
    return None
  saved = ckpt_lib.restore_meta(mngr)
  ckpt_lib.check_compatible(ckpt_lib.saved_compat(saved), meta['compat'], stage_dir)
  state, data_state, _ = ckpt_lib.restore(mngr, abstract)
  train_it.restore(data_state)
  print(f'{meta["stage"]}: resumed from step {int(state.step)}')
  return state


def check_finite(step: int, metrics) -> None:
  if float(metrics['nonfinite']) > 0:
    raise NonFiniteLossError(
        f'step {step}: the loss or gradient norm is not finite (loss={float(metrics["loss"])}, '
        f'grad_norm={float(metrics["grad_norm"])}). The update was skipped and the last '
        'checkpoint is intact; lower the stage\'s opt.learning_rate or enable opt.grad_clip '
        'and rerun.')
