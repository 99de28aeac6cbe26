"""Distillation stages (kind 'distill', docs/design.md section 3).

Each stage trains a push-forward student of window k, copied from a frozen teacher (the AR
teacher or a PFLM of window k/2), on the targets of its objective (objectives.py: the
paper's progressive targets, the AR teacher's own rollout, mixtures, on-policy targets).
Frozen parameters (the teacher's, and the AR model's where the objective needs it) are a
separate, non-donated argument of the jitted step, never differentiated or re-saved.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.data import datasets as data_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import layouts
from kforcing_jax.models import transformer as model_lib
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import errors
from kforcing_jax.training import checkpoint as ckpt_lib
from kforcing_jax.models import sampling
from kforcing_jax.training import objectives as objectives_lib
from kforcing_jax.training import trainer


# Architecture fields a student takes from its teacher whatever the run's config says
# (its depth too: the teacher's blocks plus the stage's extra_layers).
STUDENT_COPIES = arch_lib.V4_FIELDS + ('rope_base', 'n_layers')
# The parameters through which a block writes into the residual stream: zero, the block is
# the identity.
_BLOCK_OUTPUTS = ('out_kernel', 'out_bias', 'fc_out')


def sample_noise(rng, batch: int, n: int, k: int, tau_min: float, tau_max: float):
  r_u, r_tau = jax.random.split(rng)
  u = sampling.uniform_noise(r_u, (batch, n, k))
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


def make_distill_step(student, objective, targets_fn, tx, *, k: int, settings, never_emit):
  """step(state, batch, rng, frozen) -> (state, metrics) of a distill stage.

  settings: the stage section (tau_min, tau_max, microbatches, steps, opt.ema_decay and
  the objective's fields); frozen: {'teacher': params[, 'ar': params]}."""
  tau_range = (settings.tau_min, settings.tau_max)
  steps = max(int(settings.steps), 1)

  def distill_step(state: trainer.TrainState, batch, rng, frozen):
    ctx = batch['tokens']
    B, n = ctx.shape
    # every per-row draw for the whole batch first, so microbatching changes none of them
    u, tau = sample_noise(rng, B, n, k, *tau_range)
    r = jax.random.uniform(jax.random.fold_in(rng, 1), (B, n))
    progress = jnp.minimum(state.step.astype(jnp.float32) / steps, 1.0)

    def grad_fn(params, mb, j):
      del j
      # one student forward serves the targets (on-policy ones read it) and the loss
      logits, pullback = jax.vjp(lambda p: layouts.apply_window(
          student, p, mb['tokens'], None, mb['u'], mb['tau']), params)
      y, q = objectives_lib.split(jax.lax.stop_gradient(targets_fn(
          frozen, jax.lax.stop_gradient(logits), mb['tokens'], mb['u'], mb['tau'], mb['r'],
          progress)))
      w = window_weights(mb['mask'], y, never_emit)
      total, d_logits = jax.value_and_grad(
          lambda l: objective.loss(l, y, w, settings, q))(logits)
      grads, = pullback(d_logits)
      mine = sampling.pflm_readout(student.arch.readout, logits, mb['u'])
      return grads, {'total': total, **agreement_stats(mine, y, w)}

    inputs = {'tokens': ctx, 'mask': batch['mask'], 'u': u, 'tau': tau, 'r': r}
    grad_sums, sums = trainer.sum_over_microbatches(grad_fn, state.params, inputs,
                                                    settings.microbatches)
    new_state, metrics = trainer.finish_update(state, tx, settings.opt.ema_decay, grad_sums,
                                               sums['total'], jnp.sum(sums['count_k']))
    metrics['acc_all'] = sums['all_hits'] / jnp.maximum(sums['all_count'], 1.0)
    for i in range(k):
      metrics[f'acc_{i + 1}'] = sums['hits_k'][i] / jnp.maximum(sums['count_k'][i], 1.0)
    return new_state, metrics
  return distill_step


def make_agreement_step(student, targets_fn, k: int, never_emit):
  """Agreement sums of the student's tokens (by its readout) with its objective's targets
  (at the end of any curriculum) on a batch."""
  def agreement_step(params, frozen, batch, rng, tau_B):
    ctx, mask = batch['tokens'], batch['mask']
    B, n = ctx.shape
    u = sampling.uniform_noise(rng, (B, n, k))
    r = jax.random.uniform(jax.random.fold_in(rng, 1), (B, n))
    logits = layouts.apply_window(student, params, ctx, None, u, tau_B)
    y, _ = objectives_lib.split(targets_fn(frozen, logits, ctx, u, tau_B, r, jnp.float32(1.0)))
    pred = sampling.pflm_readout(student.arch.readout, logits, u)
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


def identity_blocks(params, first: int):
  """params with the residual-stream outputs of blocks first, first + 1, ... zero: a
  student deeper than its teacher then computes exactly its teacher's function at the
  start (pre-norm blocks add their outputs to the stream), and its new blocks learn from
  there."""
  def zero(path, v):
    names = [getattr(p, 'key', None) for p in path]
    block = names[0] if names and isinstance(names[0], str) else ''
    if (block.startswith('block_') and int(block[len('block_'):]) >= first
        and any(n in _BLOCK_OUTPUTS for n in names)):
      return jnp.zeros_like(v)
    return v
  return jax.tree_util.tree_map_with_path(zero, params)


def student_arch(run_arch, t_arch, stage: str, extra_layers: int = 0):
  """The student's architecture: the run's, with a noise encoder, never emitting what the
  teacher never emits either, with the teacher's Llama-family form (norms, MLP, attention
  heads and biases, embeddings tying, RoPE: e.g. an imported Llama teacher), its depth plus
  extra_layers blocks, and a PFLM teacher's noise encoder form (the student starts from a
  copy of the teacher's weights)."""
  arch = dataclasses.replace(run_arch, pflm=True, never_emit_ids=tuple(sorted(
      set(run_arch.never_emit_ids) | set(t_arch.never_emit_ids))))
  copied = STUDENT_COPIES + (('noise_encoder', 'noise_freq_scale', 'readout') if t_arch.pflm
                             else ())
  keep = {f: getattr(t_arch, f) for f in copied}
  changed = {f: v for f, v in keep.items() if getattr(arch, f) != v}
  if changed:
    print(f'{stage}: the student keeps its teacher\'s ' +
          ', '.join(f'model.{f}={v!r}' for f, v in changed.items()) +
          (f' (stages.{stage}.extra_layers adds blocks)' if 'n_layers' in changed else ''))
  keep['n_layers'] += extra_layers
  return dataclasses.replace(arch, **keep)


def check_teacher_tokenizer(stage: str, teacher: str, t_identity: dict, tokenizer) -> None:
  """The teacher's vocabulary must be the data's; an imported model that names no
  tokenizer ('none') needs only the same vocabulary size."""
  mine = tokenizer.identity()
  if t_identity.get('name') == 'none':
    if t_identity['vocab_size'] != mine['vocab_size']:
      raise errors.StageError(
          f'{stage}: the teacher {teacher} has {t_identity["vocab_size"]} ids, the data\'s '
          f'tokenizer {mine["name"]} {mine["vocab_size"]}')
    print(f'{stage}: the teacher {teacher} names no tokenizer; using {mine["name"]} ids as '
          'its ids (same vocabulary size)')
  elif t_identity != mine:
    raise errors.StageError(f'{stage}: the teacher {teacher} was trained with tokenizer '
                                f'{t_identity}, the config gives {mine}')


def load_checked_teacher(ctx, stage: str, ref: str, what: str):
  """(arch, params, info, shardings) of a teacher of `stage`, its tokenizer checked."""
  arch, params, info, shardings = ctx.load_teacher(ref)
  check_teacher_tokenizer(stage, f'{what} {ref}', info['tokenizer'], ctx.tokenizer)
  return arch, params, info, shardings


def check_window(stage: str, k: int, teacher_k: int, teacher_stage: str, objective) -> None:
  """A student of window k may learn from a teacher of window teacher_k under `objective`."""
  if teacher_k > 0 and k != 2 * teacher_k and objective.uses_stage_teacher_targets:
    raise errors.StageError(
        f'{stage}: a PFLM teacher of window {teacher_k} ({teacher_stage}) can only teach '
        f'window {2 * teacher_k} under objective {objective.name!r}, not {k}; allowed: '
        f'stages.{stage}.k={2 * teacher_k}, an AR teacher, or an objective whose targets '
        'come from the AR model (' + ', '.join(
            n for n, o in objectives_lib.OBJECTIVES.items()
            if not o.uses_stage_teacher_targets) + ')')
  if teacher_k > k:
    raise errors.StageError(f'{stage}: window {k} is narrower than its teacher '
                            f'{teacher_stage}\'s {teacher_k}')


def check_student(stage: str, arch, t_arch, teacher_stage: str, objective) -> None:
  """The student reads out as its objective trains, and copies its teacher's backbone (its
  depth aside: extra_layers)."""
  if arch.readout != objective.readout:
    raise errors.StageError(
        f'{stage}: objective {objective.name!r} trains a student with model.readout='
        f'{objective.readout!r}; this student reads out by {arch.readout!r}' +
        (' (its PFLM teacher\'s)' if t_arch.pflm else '') + '; allowed objectives for it: ' +
        ', '.join(objectives_lib.training(arch.readout)))
  t_backbone = t_arch.backbone()
  diffs = {f: (t_backbone[f], v) for f, v in arch.backbone().items()
           if t_backbone[f] != v and f != 'n_layers'}
  if diffs:
    raise errors.StageError(
        f'{stage}: the student backbone differs from its teacher {teacher_stage}: ' +
        ', '.join(f'model.{f}: teacher {a}, student {b}' for f, (a, b) in diffs.items()) +
        '; a stage copies its teacher, so its backbone must match')


def load_ar_model(ctx, stage: str, objective):
  """(reference, model, params, shardings) of the AR model whose rollouts make the targets
  of an objective that uses one."""
  ar_ref = ctx.ar_ref(stage)
  a_arch, a_params, a_info, a_shardings = load_checked_teacher(ctx, stage, ar_ref,
                                                               'the AR model')
  if a_info['k'] != 0:
    raise errors.StageError(f'{stage}: stages.{stage}.ar_teacher={ar_ref} is a PFLM of '
                            f'window {a_info["k"]}; objective {objective.name!r} needs an '
                            'AR model (the run\'s teacher stage or an AR export)')
  return ar_ref, model_lib.build(a_arch, ctx.exe), a_params, a_shardings


def spec(ctx, stage: str) -> trainer.StageSpec:
  """The distill stage `stage` (stages.<stage>: kind 'distill', window k, an objective): a
  student of window k copied from its frozen teacher (a finished stage of the run or an
  export), trained on its objective's targets."""
  cfg, s = ctx.cfg, ctx.cfg.stages[stage]
  k = int(s.k)
  objective = objectives_lib.get(s.objective)
  teacher_stage = ctx.teacher_ref(stage)
  t_arch, t_params, t_info, t_shardings = load_checked_teacher(ctx, stage, teacher_stage,
                                                               'the teacher')
  teacher_k = t_info['k']
  check_window(stage, k, teacher_k, teacher_stage, objective)
  extra_layers = int(s.get('extra_layers', 0))
  arch = student_arch(ctx.arch, t_arch, stage, extra_layers)
  check_student(stage, arch, t_arch, teacher_stage, objective)
  teacher = model_lib.build(t_arch, ctx.exe)
  student = model_lib.build(arch, ctx.exe)
  frozen, frozen_shardings = {}, {}
  ar_model, ar_ref = None, None
  if objective.uses_ar and teacher_k > 0:
    ar_ref, ar_model, frozen['ar'], frozen_shardings['ar'] = load_ar_model(ctx, stage,
                                                                           objective)
  # a PFLM teacher whose targets the objective does not use only starts the student's
  # weights: the step does not take it, and nothing holds it on the device while it trains
  if objective.takes_stage_teacher(teacher_k):
    frozen['teacher'], frozen_shardings['teacher'] = t_params, t_shardings
  t_fingerprint = ckpt_lib.params_fingerprint(t_params)
  del t_params
  models = objectives_lib.Models(teacher=teacher, teacher_k=teacher_k, ar=ar_model,
                                 student=student, k=k)
  targets_fn = objective.make_targets(models, s)
  never_emit = tuple(arch.never_emit_ids)

  def start_params(fresh):
    weights = frozen.get('teacher') or ctx.load_teacher(teacher_stage)[1]
    params, copied, new = copy_matching(fresh, weights)
    print(f'{stage}: teacher {teacher_stage}; objective {objective.name}' +
          (f' (AR model {ar_ref})' if ar_ref else '') + f'; copied {len(copied)} tensors, '
          f'new {len(new)}' + (f': {", ".join(new)}' if len(new) < 12 else ''))
    if extra_layers:
      print(f'{stage}: blocks {t_arch.n_layers}..{arch.n_layers - 1} added on top of the '
            f'teacher\'s {t_arch.n_layers}, starting as identities')
    return identity_blocks(params, t_arch.n_layers)

  agreement_fn = jax.jit(make_agreement_step(student, targets_fn, k, never_emit))

  def evaluate(params):
    agree = measure_agreement(ctx, agreement_fn, params, frozen, s.eval_batches)
    if jax.process_index() == 0:
      print(f'{stage}: held-out agreement with its {objective.name} targets: all-{k} '
            f'{agree["agreement_all"]:.4f}, per position '
            f'{[round(a, 4) for a in agree["agreement_per_position"]]}', flush=True)
    return agree

  compat = ctx.compat(k=k, teacher_stage=teacher_stage, objective=objective.name,
                      teacher_fingerprint=t_fingerprint)
  compat['model.n_layers'] = arch.n_layers  # the student's: its teacher's + extra_layers
  if ar_ref:
    compat['ar_fingerprint'] = ckpt_lib.params_fingerprint(frozen['ar'])
  if objective.soft:
    compat['cdf_margin'] = float(s.cdf_margin)
  passes = objective.target_passes(models)
  return trainer.StageSpec(
      name=stage, arch=arch, settings=s,
      init_params=model_lib.init_fn(student, cfg.data.seq_len),
      make_step=lambda tx: make_distill_step(student, objective, targets_fn, tx, k=k,
                                             settings=s, never_emit=never_emit),
      compat=compat, evaluate=evaluate, seeds=trainer.stage_seeds(cfg.seed, stage),
      legacy_seeds=(cfg.seed + 17 * k, cfg.seed + k, cfg.seed + 1000 * k),
      tokens_per_step=s.batch_size * cfg.data.seq_len * k, window=k,
      target_factor=objective.target_memory(models),
      frozen=(frozen,), frozen_shardings=(frozen_shardings,), start_params=start_params,
      progress_keys=('loss', 'acc_all'),
      meta={'k': k, 'teacher_stage': teacher_stage, 'objective': objective.name},
      summary={'k': k, 'teacher_stage': teacher_stage, 'objective': objective.name,
               'target_passes_per_window': passes})


def run_stage(ctx, stage: str) -> dict:
  return trainer.run(ctx, spec(ctx, stage))


def measure_agreement(ctx, fn, params, frozen, num_batches: int, seed: int = 12345) -> dict:
  """Agreement with fresh targets on held-out contexts (tau = 1); fn: the jitted
  make_agreement_step."""
  cfg = ctx.cfg
  batch_s = sharding_lib.batch_sharding(ctx.mesh)
  eval_it = data_lib.BatchIterator(ctx.source, 'eval', cfg.data.eval_batch_size, batch_s,
                                   cfg.seed, cfg.data.shuffle)
  tot = None
  tau = jax.device_put(jnp.ones((cfg.data.eval_batch_size,), jnp.float32), batch_s)
  with sharding_lib.mesh_context(ctx.mesh):
    for b in range(num_batches):
      out = jax.device_get(fn(params, frozen, next(eval_it),
                              jax.random.fold_in(jax.random.key(seed), b), tau))
      tot = out if tot is None else jax.tree.map(np.add, tot, out)
  per = (np.asarray(tot['hits_k']) / np.maximum(np.asarray(tot['count_k']), 1)).tolist()
  return {'agreement_per_position': per,
          'agreement_all': float(tot['all_hits'] / max(float(tot['all_count']), 1.0)),
          'eval_windows': float(tot['all_count'])}
