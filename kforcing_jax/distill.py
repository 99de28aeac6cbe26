"""Progressive self-forcing distillation stages `distill_k<K>` (design.md section 3).

Each stage trains a push-forward student of window K against a frozen teacher: the AR
teacher (inverse-CDF targets) or a PFLM of window K/2 (argmax + rollout targets). The
teacher's parameters are a separate, non-donated argument of the jitted step and never
differentiated or re-saved; the student starts from a copy of the teacher's weights.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kforcing_jax import checkpoint as ckpt_lib
from kforcing_jax import config_lib
from kforcing_jax import data as data_lib
from kforcing_jax import layouts
from kforcing_jax import memory
from kforcing_jax import model as model_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import stages as stages_lib
from kforcing_jax import targets as targets_lib
from kforcing_jax import train as train_lib
from kforcing_jax import writers


StageError = stages_lib.StageError


def teacher_stage_of(stage: str, names: list[str], override: str = '') -> str:
  if override:
    return override
  model_stages = [s for s in names if s == 'teacher' or s.startswith('distill_k')]
  i = model_stages.index(stage)
  if i > 0:
    return model_stages[i - 1]
  k = config_lib.stage_k(stage)
  return 'teacher' if k == 1 else f'distill_k{k // 2}'


def make_targets_fn(teacher_model, teacher_k: int):
  if teacher_k == 0:
    return lambda params, ctx, u, tau: targets_lib.ar_teacher_targets(
        teacher_model, params, ctx, u, tau)
  return lambda params, ctx, u, tau: targets_lib.pflm_teacher_targets(
      teacher_model, params, ctx, u, tau)


def sample_noise(rng, batch: int, n: int, k: int, tau_min: float, tau_max: float):
  r_u, r_tau = jax.random.split(rng)
  u = targets_lib.uniform_noise(r_u, (batch, n, k))
  tau = jax.random.uniform(r_tau, (batch,), minval=tau_min, maxval=tau_max)
  return u, tau


def window_weights(mask_BxN, y_BxNxK, never_emit_ids) -> jax.Array:
  """1 where the window's context token is real and the target is emittable."""
  w = jnp.broadcast_to(mask_BxN[:, :, None], y_BxNxK.shape)
  for i in never_emit_ids:
    w = w & (y_BxNxK != i)
  return w.astype(jnp.float32)


def agreement_stats(pred_BxNxK, y_BxNxK, w_BxNxK):
  """Sums for per-position accuracy and the all-k exact-match rate."""
  hit = (pred_BxNxK == y_BxNxK).astype(jnp.float32)
  win_valid = jnp.min(w_BxNxK, axis=-1)
  return {'hits_k': jnp.sum(hit * w_BxNxK, axis=(0, 1)), 'count_k': jnp.sum(w_BxNxK, axis=(0, 1)),
          'all_hits': jnp.sum(jnp.min(hit, axis=-1) * win_valid), 'all_count': jnp.sum(win_valid)}


def make_distill_step(student, targets_fn, tx, k: int, tau_range, never_emit, ema_decay,
                      microbatches: int = 1):
  def distill_step(state: train_lib.TrainState, teacher_params, batch, rng):
    ctx = batch['tokens']
    B, n = ctx.shape
    # noise for the whole batch first, so microbatching leaves every row's draw unchanged
    u, tau = sample_noise(rng, B, n, k, *tau_range)

    def grad_fn(params, mb, j):
      del j
      y = jax.lax.stop_gradient(targets_fn(teacher_params, mb['tokens'], mb['u'], mb['tau']))
      w = window_weights(mb['mask'], y, never_emit)

      def loss_fn(p):
        logits = layouts.apply_window(student, p, mb['tokens'], None, mb['u'], mb['tau'])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * w), logits

      (total, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return grads, {'total': total, **agreement_stats(jnp.argmax(logits, -1), y, w)}

    inputs = {'tokens': ctx, 'mask': batch['mask'], 'u': u, 'tau': tau}
    grad_sums, sums = train_lib.sum_over_microbatches(grad_fn, state.params, inputs,
                                                      microbatches)
    count = jnp.maximum(jnp.sum(sums['count_k']), 1.0)
    loss = sums['total'] / count
    grads = jax.tree.map(lambda g: g / count, grad_sums)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = train_lib.apply_update(state, grads, tx, ema_decay, finite)
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'nonfinite': 1.0 - finite.astype(jnp.float32),
               'acc_all': sums['all_hits'] / jnp.maximum(sums['all_count'], 1.0)}
    for i in range(k):
      metrics[f'acc_{i + 1}'] = sums['hits_k'][i] / jnp.maximum(sums['count_k'][i], 1.0)
    return new_state, metrics
  return distill_step


def make_agreement_step(student, targets_fn, k: int, never_emit):
  def agreement_step(params, teacher_params, batch, rng, tau_B):
    ctx, mask = batch['tokens'], batch['mask']
    B, n = ctx.shape
    u = targets_lib.uniform_noise(rng, (B, n, k))
    y = targets_fn(teacher_params, ctx, u, tau_B)
    pred = jnp.argmax(layouts.apply_window(student, params, ctx, None, u, tau_B), -1)
    return agreement_stats(pred, y, window_weights(mask, y, never_emit))
  return agreement_step


def copy_matching(student_params, teacher_params):
  """Teacher values wherever path and shape match; returns (params, copied, new)."""
  flat_t = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(teacher_params)[0]}
  copied, new = [], []

  def pick(path, s):
    key = jax.tree_util.keystr(path)
    t = flat_t.get(key)
    if t is not None and t.shape == s.shape:
      copied.append(key)
      # a fresh buffer: the student's state is donated, the teacher's must survive
      return jnp.copy(jax.device_put(t.astype(s.dtype), s.sharding))
    new.append(key)
    return s
  out = jax.tree_util.tree_map_with_path(pick, student_params)
  return out, copied, new


def run_stage(ctx: train_lib.StageContext, stage: str, names: list[str]) -> dict:
  cfg, ds = ctx.cfg, ctx.cfg.distill
  k = config_lib.stage_k(stage)
  stage_dir = os.path.join(ctx.workdir, stage)
  if train_lib.stage_done(stage_dir):
    print(f'{stage}: {stage_dir}/summary.json exists, stage skipped')
    return train_lib.read_summary(stage_dir)
  t_start = time.time()
  teacher_stage = teacher_stage_of(stage, names, ds.teacher_stage)
  teacher_k = config_lib.stage_k(teacher_stage)
  if teacher_k > 0 and k != 2 * teacher_k:
    raise StageError(f'{stage}: a PFLM teacher of window {teacher_k} ({teacher_stage}) can only '
                     f'teach window {2 * teacher_k}, not {k}; allowed: distill_k{2 * teacher_k} '
                     'after it, or an AR teacher (teacher) for any K')
  t_mcfg, t_params, t_meta, t_shardings = stages_lib.load_model_stage(
      ctx.workdir, teacher_stage, ctx.mesh)
  mcfg = dataclasses.replace(ctx.model_cfg, pflm=True)
  diffs = {f: (t_mcfg.backbone_shape()[f], v) for f, v in mcfg.backbone_shape().items()
           if t_mcfg.backbone_shape()[f] != v}
  if diffs:
    raise StageError(f'{stage}: the student backbone differs from its teacher '
                     f'{teacher_stage}: ' + ', '.join(f'model.{f}: teacher {a}, student {b}'
                                                     for f, (a, b) in diffs.items()) +
                     '; a stage copies its teacher, so the shapes must match')
  if t_meta['compat']['tokenizer'] != ctx.tokenizer.identity():
    raise StageError(f'{stage}: the teacher {teacher_stage} was trained with tokenizer '
                     f'{t_meta["compat"]["tokenizer"]}, the config gives '
                     f'{ctx.tokenizer.identity()}')
  teacher = model_lib.Transformer(t_mcfg)
  student = model_lib.Transformer(mcfg)
  steps = config_lib.stage_steps(cfg, stage)
  tx = train_lib.make_optimizer(cfg.train, steps, ds.learning_rate, ds.warmup_steps)
  batch_size = ds.batch_size if ds.batch_size > 0 else cfg.data.batch_size
  sharding_lib.check_batch(batch_size, ctx.mesh, 'distill.batch_size', ds.microbatches,
                           'distill.microbatches')
  state, abstract, shardings = train_lib.create_state(
      train_lib.model_init_fn(student, mcfg, cfg.data.seq_len), tx, ctx.mesh,
      jax.random.key(cfg.seed + 17 * k), cfg.train.ema_decay > 0)
  params, copied, new = copy_matching(state.params, t_params)
  state = state.replace(params=params, ema_params=None if state.ema_params is None
                        else jax.tree.map(jnp.copy, params))
  print(f'{stage}: teacher {teacher_stage}; copied {len(copied)} tensors, new '
        f'{len(new)}: {", ".join(n for n in new) if len(new) < 12 else len(new)}')
  batch_s = sharding_lib.batch_sharding(ctx.mesh)
  train_it = data_lib.BatchIterator(ctx.source, 'train', batch_size, batch_s, cfg.seed + k,
                                    cfg.data.shuffle)
  eval_it = data_lib.BatchIterator(ctx.source, 'eval', cfg.data.eval_batch_size, batch_s,
                                   cfg.seed, cfg.data.shuffle)
  meta = {'stage': stage, 'k': k, 'teacher_stage': teacher_stage,
          'model': dataclasses.asdict(mcfg),
          'compat': train_lib.compat_fields(ctx, k=k, teacher_stage=teacher_stage),
          'config': cfg.to_dict()}
  mngr = ckpt_lib.manager(os.path.join(stage_dir, 'checkpoints'), cfg.train.keep_checkpoints)
  state = train_lib.resume(mngr, meta, abstract, train_it, stage_dir) or state
  start = int(state.step)

  memory.report(stage, memory.estimate(mcfg, abstract, ctx.mesh, batch_size, cfg.data.seq_len,
                                       ds.microbatches, window=k))
  targets_fn = make_targets_fn(teacher, teacher_k)
  never_emit = tuple(mcfg.never_emit_ids)
  rep = sharding_lib.replicated(ctx.mesh)
  bsh = {'tokens': batch_s, 'mask': batch_s}
  step_fn = jax.jit(
      make_distill_step(student, targets_fn, tx, k, (ds.tau_min, ds.tau_max), never_emit,
                        cfg.train.ema_decay, ds.microbatches),
      in_shardings=(shardings, t_shardings, bsh, rep), out_shardings=(shardings, rep),
      donate_argnums=(0,))
  writer = writers.MetricWriter(os.path.join(stage_dir, 'logs'))
  progress = writers.Progress(stage, steps, batch_size * cfg.data.seq_len * k, start)
  base_rng = jax.random.key(cfg.seed + 1000 * k)
  pending = None
  try:
    with sharding_lib.mesh_context(ctx.mesh):
      for step in range(start, steps):
        state, metrics = step_fn(state, t_params, next(train_it), jax.random.fold_in(base_rng, step))
        if pending is not None:
          train_lib.check_finite(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == steps:
          m = {n: float(v) for n, v in metrics.items() if n != 'nonfinite'}
          writer.write_scalars(done, {f'distill/{n}': v for n, v in m.items()})
          progress.report(done, {'loss': m['loss'], 'acc_all': m['acc_all']})
        if done % cfg.train.checkpoint_every == 0 or done == steps:
          ckpt_lib.save(mngr, done, state, train_it.state(), meta)
      if pending is not None:
        train_lib.check_finite(*pending)
      params = state.ema_params if state.ema_params is not None else state.params
      agree = measure_agreement(ctx, student, targets_fn, k, params, t_params, shardings.params,
                                t_shardings, eval_it, ds.eval_batches)
  finally:
    # an interrupted run keeps every checkpoint it started writing
    mngr.wait_until_finished()
  mngr.close()
  writer.write_scalars(steps, {'eval/agreement_all': agree['agreement_all'],
                               **{f'eval/agreement_{i + 1}': a for i, a in
                                  enumerate(agree['agreement_per_position'])}})
  writer.close()
  summary = {'stage': stage, 'k': k, 'teacher_stage': teacher_stage, 'steps': steps,
             'seconds': time.time() - t_start, **agree}
  print(f'{stage}: held-out agreement with {teacher_stage} targets: all-{k} '
        f'{agree["agreement_all"]:.4f}, per position '
        f'{[round(a, 4) for a in agree["agreement_per_position"]]}')
  writers.write_json(os.path.join(stage_dir, 'summary.json'), summary)
  return summary


def measure_agreement(ctx, student, targets_fn, k, params, t_params, p_shardings, t_shardings,
                      eval_it, num_batches: int, seed: int = 12345) -> dict:
  """Agreement with fresh teacher targets on held-out contexts (tau = 1)."""
  cfg = ctx.cfg
  rep = sharding_lib.replicated(ctx.mesh)
  batch_s = sharding_lib.batch_sharding(ctx.mesh)
  fn = jax.jit(make_agreement_step(student, targets_fn, k, tuple(student.cfg.never_emit_ids)),
               in_shardings=(p_shardings, t_shardings, {'tokens': batch_s, 'mask': batch_s},
                             rep, batch_s))
  eval_it.restore({'step': 0, 'global_batch': eval_it.global_batch})
  tot = None
  tau = jax.device_put(jnp.ones((cfg.data.eval_batch_size,), jnp.float32), batch_s)
  for b in range(num_batches):
    out = jax.device_get(fn(params, t_params, next(eval_it),
                            jax.random.fold_in(jax.random.key(seed), b), tau))
    tot = out if tot is None else jax.tree.map(np.add, tot, out)
  per = (np.asarray(tot['hits_k']) / np.maximum(np.asarray(tot['count_k']), 1)).tolist()
  return {'agreement_per_position': per,
          'agreement_all': float(tot['all_hits'] / max(float(tot['all_count']), 1.0)),
          'eval_windows': float(tot['all_count'])}
