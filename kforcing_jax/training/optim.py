"""The optimizer of a training stage: AdamW with warm-up, a decay schedule and clipping,
built from the stage's own `opt` sub-config (configs/base.py: optimizer)."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ('cosine', 'linear', 'constant')


def lr_schedule(peak: float, warmup: int, total: int, kind: str, min_ratio: float):
  if kind not in SCHEDULES:
    raise ValueError(f'opt.schedule={kind!r} is not known; allowed: {", ".join(SCHEDULES)}')
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  rest = max(total - warmup, 1)
  if kind == 'cosine':
    after = optax.cosine_decay_schedule(peak, rest, alpha=min_ratio)
  elif kind == 'linear':
    after = optax.linear_schedule(peak, peak * min_ratio, rest)
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [max(warmup, 1)])


def make_optimizer(opt, steps: int) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) for `steps` steps of the stage config's `opt`."""
  lr = lr_schedule(opt.learning_rate, opt.warmup_steps, steps, opt.schedule, opt.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)
  chain = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  chain.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)
