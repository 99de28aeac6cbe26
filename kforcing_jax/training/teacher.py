"""The AR teacher stage: next-token cross-entropy, its step, validation NLL, and the
StageSpec that kforcing_jax.trainer runs."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from kforcing_jax.data import datasets as data_lib
from kforcing_jax.training import memory
from kforcing_jax.models import transformer as model_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.training import trainer


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
  logits = model.apply({'params': params}, tokens, positions, train=train, rngs=rngs,
                       method=model_lib.Transformer.forward)
  targets, weights = shift_targets(tokens, mask)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights), jnp.sum(weights)


def make_train_step(model, tx, ema_decay: float, microbatches: int = 1):
  def train_step(state: trainer.TrainState, batch, rng):
    def grad_fn(params, mb, j):
      (total, count), grads = jax.value_and_grad(
          lambda p: lm_nll(model, p, mb, jax.random.fold_in(rng, j), train=True),
          has_aux=True)(params)
      return grads, {'total': total, 'count': count}

    grad_sums, sums = trainer.sum_over_microbatches(grad_fn, state.params, batch, microbatches)
    new_state, metrics = trainer.finish_update(state, tx, ema_decay, grad_sums, sums['total'],
                                               sums['count'])
    return new_state, {**metrics, 'tokens': sums['count']}
  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    total, count = lm_nll(model, params, batch)
    return {'nll_sum': total, 'count': count}
  return eval_step


def evaluate_nll(eval_fn, params, it: data_lib.BatchIterator, num_batches: int) -> float:
  """Mean NLL per valid token over `num_batches` held-out batches (from batch 0)."""
  it.restore({'step': 0, 'global_batch': it.global_batch})
  total = count = 0.0
  for _ in range(num_batches):
    out = eval_fn(params, next(it))
    total += float(out['nll_sum'])
    count += float(out['count'])
  return total / max(count, 1.0)


def spec(ctx, stage: str = 'teacher') -> trainer.StageSpec:
  """An AR stage (kind 'teacher') trained from a fresh init on next-token cross-entropy."""
  cfg, s = ctx.cfg, ctx.cfg.stages[stage]
  model = model_lib.build(ctx.arch, ctx.exe)
  batch_s = sharding_lib.batch_sharding(ctx.mesh)
  eval_fn = jax.jit(make_eval_step(model))

  def evaluate(params):
    entropy_rate = (ctx.source.hmm.entropy_rate(cfg.data.seq_len)
                    if isinstance(ctx.source, data_lib.SyntheticSource) else None)
    eval_it = data_lib.BatchIterator(ctx.source, 'eval', cfg.data.eval_batch_size, batch_s,
                                     cfg.seed, cfg.data.shuffle)
    with sharding_lib.mesh_context(ctx.mesh):
      nll = evaluate_nll(eval_fn, params, eval_it, s.eval_batches)
    ppl = math.exp(min(nll, 50))
    note = (f', source entropy rate {entropy_rate:.4f} (ratio {nll / entropy_rate:.3f})'
            if entropy_rate else '')
    if jax.process_index() == 0:
      print(f'{stage}: val_nll {nll:.4f} nats/token, ppl {ppl:.3f}{note}', flush=True)
    return {'val_nll': nll, 'val_ppl': ppl,
            'source_entropy_rate': None if entropy_rate is None else float(entropy_rate)}

  return trainer.StageSpec(
      name=stage, arch=ctx.arch, settings=s,
      init_params=model_lib.init_fn(model, cfg.data.seq_len),
      make_step=lambda tx: make_train_step(model, tx, s.opt.ema_decay, s.microbatches),
      compat=ctx.compat(), evaluate=evaluate, seeds=trainer.stage_seeds(cfg.seed, stage),
      legacy_seeds=(cfg.seed, cfg.seed, cfg.seed + 1),
      tokens_per_step=s.batch_size * cfg.data.seq_len, meta={'k': 0})


def run_stage(ctx, stage: str = 'teacher') -> dict:
  return trainer.run(ctx, spec(ctx, stage))



def compile_teacher_step(model, tx, abstract, shardings, mesh, global_batch: int, seq_len: int,
                         microbatches: int = 1) -> dict | None:
  """XLA's per-device buffer sizes (memory.compiled_bytes) of the real teacher step."""
  step = trainer.jit_step(make_train_step(model, tx, 0.0, microbatches), shardings, mesh)
  bs = sharding_lib.batch_sharding(mesh)
  batch = {'tokens': jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=bs),
           'mask': jax.ShapeDtypeStruct((global_batch, seq_len), jnp.bool_, sharding=bs)}
  with sharding_lib.mesh_context(mesh):
    compiled = step.lower(abstract, batch, jax.random.key(0)).compile()
  return memory.compiled_bytes(compiled)
