"""AR teacher training: optimizer, the pure jitted train step, evaluation, and the
`teacher` pipeline stage (resumable, sharded, checkpointed)."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from kforcing_jax import checkpoint as ckpt_lib
from kforcing_jax import data as data_lib
from kforcing_jax import memory
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import stages as stages_lib
from kforcing_jax import writers

SCHEDULES = ('cosine', 'linear', 'constant')


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: Any
  opt_state: Any
  ema_params: Any  # same tree as params, or None when EMA is off


class NonFiniteLossError(FloatingPointError):
  pass


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------
def lr_schedule(peak: float, warmup: int, total: int, kind: str, min_ratio: float):
  if kind not in SCHEDULES:
    raise ValueError(f'train.schedule={kind!r} is not known; allowed: {", ".join(SCHEDULES)}')
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  rest = max(total - warmup, 1)
  if kind == 'cosine':
    after = optax.cosine_decay_schedule(peak, rest, alpha=min_ratio)
  elif kind == 'linear':
    after = optax.linear_schedule(peak, peak * min_ratio, rest)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [max(warmup, 1)])


def make_optimizer(t, steps: int, learning_rate: float | None = None,
                   warmup: int | None = None) -> optax.GradientTransformation:
  lr = lr_schedule(t.learning_rate if learning_rate is None else learning_rate,
                   t.warmup_steps if warmup is None else warmup, steps, t.schedule,
                   t.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Teacher loss and steps
# --------------------------------------------------------------------------------------
def shift_targets(tokens_BxT, mask_BxT):
  """Next-token targets at the same length: target[t] = token[t+1]; the last is masked."""
  targets = jnp.concatenate([tokens_BxT[:, 1:], tokens_BxT[:, -1:]], axis=1)
  weights = jnp.concatenate([mask_BxT[:, 1:] & mask_BxT[:, :-1],
                             jnp.zeros_like(mask_BxT[:, :1])], axis=1)
  return targets, weights.astype(jnp.float32)


def lm_nll(model, params, batch, rng=None, train=False):
  """(sum of NLL over valid targets, number of valid targets)."""
  tokens, mask = batch['tokens'], batch['mask']
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  rngs = {'dropout': rng} if train and rng is not None else None
  logits, _ = model.apply({'params': params}, tokens, positions, train=train, rngs=rngs)
  targets, weights = shift_targets(tokens, mask)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


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


def make_train_step(model, tx, ema_decay: float, microbatches: int = 1):
  def train_step(state: TrainState, batch, rng):
    def grad_fn(params, mb, j):
      (total, count), grads = jax.value_and_grad(
          lambda p: lm_nll(model, p, mb, jax.random.fold_in(rng, j), train=True),
          has_aux=True)(params)
      return grads, {'total': total, 'count': count}

    grad_sums, sums = sum_over_microbatches(grad_fn, state.params, batch, microbatches)
    count = jnp.maximum(sums['count'], 1.0)
    loss = sums['total'] / count
    grads = jax.tree.map(lambda g: g / count, grad_sums)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = apply_update(state, grads, tx, ema_decay, finite)
    return new_state, {'loss': loss, 'grad_norm': grad_norm, 'tokens': sums['count'],
                       'nonfinite': 1.0 - finite.astype(jnp.float32)}
  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    total, count = lm_nll(model, params, batch)
    return {'nll_sum': total, 'count': count}
  return eval_step


def jit_train_step(step_fn, state_shardings, mesh):
  batch_s = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, {'tokens': batch_s, 'mask': batch_s}, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


def evaluate(eval_fn, params, it: data_lib.BatchIterator, num_batches: int) -> float:
  """Mean NLL per valid token over `num_batches` held-out batches (from batch 0)."""
  it.restore({'step': 0, 'global_batch': it.global_batch})
  total = count = 0.0
  for _ in range(num_batches):
    out = eval_fn(params, next(it))
    total += float(out['nll_sum'])
    count += float(out['count'])
  return total / max(count, 1.0)


# --------------------------------------------------------------------------------------
# The teacher stage
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageContext:
  """What every stage needs: config, data source, tokenizer, mesh, model config."""
  cfg: Any
  workdir: str
  source: Any
  mesh: Any
  model_cfg: model_lib.ModelConfig

  @property
  def tokenizer(self):
    return self.source.tokenizer


def build_context(cfg, workdir: str) -> StageContext:
  from kforcing_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate(cfg)
  source = data_lib.make_source(cfg)
  tok = source.tokenizer
  if cfg.model.vocab_size not in (-1, tok.vocab_size):
    raise config_lib.ConfigError(
        f'model.vocab_size={cfg.model.vocab_size} does not match the {tok.name} tokenizer '
        f'of data.source={cfg.data.source} ({tok.vocab_size} ids incl. the reserved one); '
        'set it to -1 or to that value')
  mcfg = model_lib.model_config(cfg, tok.vocab_size, tok.never_emit_ids)
  if cfg.data.seq_len > mcfg.max_seq_len:
    raise config_lib.ConfigError(
        f'data.seq_len={cfg.data.seq_len} is longer than model.max_seq_len='
        f'{mcfg.max_seq_len}')
  mesh = sharding_lib.make_mesh(cfg.mesh)
  sharding_lib.check_batch(cfg.data.batch_size, mesh, 'data.batch_size',
                           cfg.train.microbatches, 'train.microbatches')
  sharding_lib.check_batch(cfg.data.eval_batch_size, mesh, 'data.eval_batch_size')
  return StageContext(cfg=cfg, workdir=workdir, source=source, mesh=mesh, model_cfg=mcfg)


def compat_fields(ctx: StageContext, **extra) -> dict:
  """The fields that must agree between a checkpoint and the config that resumes it."""
  out = {'model.' + k: v for k, v in ctx.model_cfg.backbone_shape().items()}
  out.update({'tokenizer': ctx.tokenizer.identity(), 'data.source': ctx.cfg.data.source,
              'data.seq_len': ctx.cfg.data.seq_len})
  out.update(extra)
  return out


def stage_done(stage_dir: str) -> bool:
  return stages_lib.is_done(stage_dir)


model_init_fn = stages_lib.model_init_fn


def run_teacher(ctx: StageContext) -> dict:
  cfg, t = ctx.cfg, ctx.cfg.train
  stage_dir = os.path.join(ctx.workdir, 'teacher')
  if stage_done(stage_dir):
    print(f'teacher: {stage_dir}/summary.json exists, stage skipped')
    return read_summary(stage_dir)
  t_start = time.time()
  mcfg = ctx.model_cfg
  model = model_lib.Transformer(mcfg)
  tx = make_optimizer(t, t.steps)
  rng = jax.random.key(cfg.seed)
  state, abstract, shardings = create_state(model_init_fn(model, mcfg, cfg.data.seq_len), tx,
                                            ctx.mesh, rng, t.ema_decay > 0)
  n_params = model_lib.count_params(state.params)
  batch_s = sharding_lib.batch_sharding(ctx.mesh)
  train_it = data_lib.BatchIterator(ctx.source, 'train', cfg.data.batch_size, batch_s,
                                    cfg.seed, cfg.data.shuffle)
  eval_it = data_lib.BatchIterator(ctx.source, 'eval', cfg.data.eval_batch_size, batch_s,
                                   cfg.seed, cfg.data.shuffle)
  meta = {'stage': 'teacher', 'k': 0, 'model': dataclasses.asdict(mcfg),
          'compat': compat_fields(ctx), 'config': cfg.to_dict()}
  mngr = ckpt_lib.manager(os.path.join(stage_dir, 'checkpoints'), t.keep_checkpoints)
  state = resume(mngr, meta, abstract, train_it, stage_dir) or state
  start = int(state.step)
  print(f'teacher: {n_params:,} parameters, mesh {dict(ctx.mesh.shape)}, '
        f'{jax.device_count()} devices ({jax.default_backend()})')
  memory.report('teacher', memory.estimate(mcfg, abstract, ctx.mesh, cfg.data.batch_size,
                                           cfg.data.seq_len, t.microbatches))

  train_step = jit_train_step(make_train_step(model, tx, t.ema_decay, t.microbatches),
                              shardings, ctx.mesh)
  param_s = shardings.params
  eval_fn = jax.jit(make_eval_step(model),
                    in_shardings=(param_s, {'tokens': batch_s, 'mask': batch_s}))
  writer = writers.MetricWriter(os.path.join(stage_dir, 'logs'))
  progress = writers.Progress('teacher', t.steps, cfg.data.batch_size * cfg.data.seq_len, start)
  base_rng = jax.random.key(cfg.seed + 1)
  val_nll = float('nan')
  pending = None
  try:
    with sharding_lib.mesh_context(ctx.mesh):
      for step in range(start, t.steps):
        batch = next(train_it)
        state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
        if pending is not None:
          check_finite(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
          m = {k: float(v) for k, v in metrics.items() if k != 'nonfinite'}
          writer.write_scalars(done, {f'train/{k}': v for k, v in m.items()})
          progress.report(done, {'loss': m['loss']})
        if done % t.eval_every == 0 or done == t.steps:
          eval_params = state.ema_params if state.ema_params is not None else state.params
          val_nll = evaluate(eval_fn, eval_params, eval_it, t.eval_batches)
          writer.write_scalars(done, {'eval/nll': val_nll, 'eval/ppl': math.exp(min(val_nll, 50))})
          if jax.process_index() == 0:
            print(f'teacher {done}: val_nll {val_nll:.4f} ppl {math.exp(min(val_nll, 50)):.3f}')
        if done % t.checkpoint_every == 0 or done == t.steps:
          ckpt_lib.save(mngr, done, state, train_it.state(), meta)
      if pending is not None:
        check_finite(*pending)
  finally:
    # an interrupted run keeps every checkpoint it started writing
    mngr.wait_until_finished()
  mngr.close()
  writer.close()
  seconds = time.time() - t_start
  summary = {'stage': 'teacher', 'val_nll': val_nll, 'val_ppl': math.exp(min(val_nll, 50)),
             'steps': t.steps, 'seconds': seconds, 'params': n_params,
             'source_entropy_rate': source_entropy_rate(ctx)}
  if summary['source_entropy_rate'] is not None:
    print(f'teacher: val_nll {val_nll:.4f} nats/token, source entropy rate '
          f'{summary["source_entropy_rate"]:.4f} (ratio {val_nll / summary["source_entropy_rate"]:.3f})')
  writers.write_json(os.path.join(stage_dir, 'summary.json'), summary)
  return summary


def resume(mngr, meta: dict, abstract, train_it, stage_dir: str):
  """The latest checkpoint's state (data iterator repositioned), or None; refuses a
  checkpoint whose compat fields differ from `meta`'s."""
  if mngr.latest_step() is None:
    return None
  saved = ckpt_lib.restore_meta(mngr)
  ckpt_lib.check_compatible(saved['compat'], meta['compat'], stage_dir)
  state, data_state, _ = ckpt_lib.restore(mngr, abstract)
  train_it.restore(data_state)
  print(f'{meta["stage"]}: resumed from step {int(state.step)}')
  return state


def check_finite(step: int, metrics) -> None:
  if float(metrics['nonfinite']) > 0:
    raise NonFiniteLossError(
        f'step {step}: the loss or gradient norm is not finite (loss={float(metrics["loss"])}, '
        f'grad_norm={float(metrics["grad_norm"])}). The update was skipped and the last '
        'checkpoint is intact; lower train.learning_rate or enable train.grad_clip and rerun.')


def source_entropy_rate(ctx: StageContext) -> float | None:
  if isinstance(ctx.source, data_lib.SyntheticSource):
    return ctx.source.hmm.entropy_rate(ctx.cfg.data.seq_len)
  return None


def read_summary(stage_dir: str) -> dict:
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(stage_dir, 'summary.json'), encoding='utf-8') as f:
    return json.load(f)
