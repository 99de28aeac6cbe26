"""Distillation objectives: what a distill stage trains its student to output.

An `Objective` is chosen by name in a stage section (`stages.<name>.objective`) and
supplies the targets of every window (token ids, one per position), the loss the student
minimises against them, and the cost of drawing them (teacher passes per window, for the
memory estimate). Held-out agreement is measured against the same targets. Registered:

  progressive  the paper's: a PFLM teacher of window k/2 by argmax of its training and
               rollout layouts; an AR teacher by inverse-CDF sampling of k tokens.
  ar_rollout   the AR teacher's own k-token inverse-CDF rollout at every stage, whatever
               the stage teacher (no compounding of the chain's errors; k AR passes).
  mixed        per window, ar_rollout's targets with probability `ar_fraction` (moving
               linearly to `ar_fraction_end` over the stage: a curriculum), else
               progressive's.
  on_policy    self-forcing in the strict sense: target i is the AR teacher's inverse-CDF
               token for noise u_i given the context and the student's own tokens 1..i-1
               (from the step's own student forward, plus one AR pass); its fixed point
               is ar_rollout's, and a wrong early token is followed by the teacher's
               continuation of it rather than of a token the student did not emit.
  on_policy_soft
               on_policy's targets, learnt as soft targets: the share of the noise
               neighbourhood [u_i - cdf_margin, u_i + cdf_margin] that each token's CDF
               interval covers under the same AR distribution. A neighbour in CDF order is a
               token the teacher itself would emit for a nearby u; the hard target carries
               most of the mass whenever u sits inside its interval by more than the margin.
  on_policy_kl for a student with the inverse-CDF readout (model.readout='inverse_cdf'),
               whose logits at position i are a distribution: the cross-entropy of the AR
               teacher's whole next-token distribution after the context and the
               student's own tokens 1..i-1 (read out from its u's), at the window's tau.
               Its fixed point is on_policy's (the inverse CDF of u_i under that
               distribution is the AR rollout's token), but every window teaches V
               probabilities instead of one interval's id.

Every objective's cross-entropy can weight window position i (1-based) by i^position_power
(normalised to mean 1): a power > 0 spends more of the gradient on the later, harder
positions.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from kforcing_jax.models import layouts
from kforcing_jax.models import sampling
from kforcing_jax.training import targets as targets_lib


@dataclasses.dataclass(frozen=True)
class Models:
  """What an objective's targets may use: the stage teacher (window teacher_k: 0 for an AR
  teacher), the AR model at the root of the chain (`ar` None: the stage teacher is it) and
  the student of window k."""
  teacher: object
  teacher_k: int
  ar: object | None
  student: object
  k: int


# targets(frozen, student_logits_BxNxKxV, ctx_BxN, u_BxNxK, tau_B, r_BxN, progress) ->
# y_BxNxK int32, or for a soft objective (y_BxNxK, q_BxNxKxV): the soft targets the loss
# reads beside the hard ones held-out agreement counts. student_logits: the step's own
# forward of the student on (ctx, u, tau), computed once for the loss too (the on-policy
# objectives read its tokens out of it); frozen: {'teacher': params, 'ar': params (only
# when Models.ar is set)};
# r_BxN: per-window uniforms drawn with the noise (for per-window choices); progress: the
# stage's fraction done, a traced float in [0, 1].
TargetsFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  uses_ar: bool  # needs the chain's AR model beside a PFLM stage teacher
  # its targets come from the stage teacher (a PFLM teacher of window h then teaches 2h
  # only); False: the stage teacher is only where the student's weights start
  uses_stage_teacher_targets: bool
  make_targets: Callable[[Models, object], TargetsFn]  # (models, stage settings) -> targets
  # teacher and student forward passes per window spent on targets (their cost)
  target_passes: Callable[[Models], float]
  soft: bool = False  # targets are (hard ids, soft distributions); the loss reads the soft
  # the student readout it trains (model.readout): hard ids teach an argmax, distributions
  # an inverse CDF
  readout: str = 'argmax'
  # the [N, k, V] arrays its targets hold at the step's peak, in units of an AR teacher's
  # k-token rollout (logits and CDF); None: target_passes / k
  target_arrays: Callable[[Models], float] | None = None

  def takes_stage_teacher(self, teacher_k: int) -> bool:
    """Whether the step reads the stage teacher's weights: its targets come from it, or it
    is the AR model itself (teacher_k 0). Otherwise the teacher only starts the student."""
    return teacher_k == 0 or not self.uses_ar or self.uses_stage_teacher_targets

  def target_memory(self, models: Models) -> float:
    """training.memory's target term: the [N, k, V] arrays the targets hold at the step's
    peak, in units of an AR teacher's k-token rollout (tests/test_memory holds it to XLA)."""
    if self.target_arrays is not None:
      return self.target_arrays(models)
    return self.target_passes(models) / models.k

  def loss(self, logits_BxNxKxV, y_BxNxK, w_BxNxK, settings, q_BxNxKxV=None) -> jax.Array:
    """The summed weighted cross-entropy (divided by the summed weights by the trainer):
    against the ids y, or against the distributions q where the objective is soft."""
    if q_BxNxKxV is None:
      ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxKxV, y_BxNxK)
    else:
      ce = optax.softmax_cross_entropy(logits_BxNxKxV, q_BxNxKxV)
    return jnp.sum(ce * w_BxNxK * position_weights(y_BxNxK.shape[-1],
                                                   settings.get('position_power', 0.0)))


def split(targets) -> tuple[jax.Array, jax.Array | None]:
  """(hard ids, soft distributions or None) of a TargetsFn's result."""
  return targets if isinstance(targets, tuple) else (targets, None)


def position_weights(k: int, power: float) -> jax.Array:
  """[k] weights i^power for positions i = 1..k, mean 1."""
  w = jnp.arange(1, k + 1, dtype=jnp.float32) ** power
  return w * (k / jnp.sum(w))


def _ar(models: Models, frozen):
  """The AR model and its parameters."""
  if models.ar is None:
    return models.teacher, frozen['teacher']
  return models.ar, frozen['ar']


def _progressive(models: Models, settings) -> TargetsFn:
  del settings
  if models.teacher_k == 0:
    fn = targets_lib.ar_teacher_targets
  else:
    fn = targets_lib.pflm_teacher_targets
  return lambda frozen, s_logits, ctx, u, tau, r, progress: fn(models.teacher, frozen['teacher'],
                                                           ctx, u, tau)


def _ar_rollout(models: Models, settings) -> TargetsFn:
  del settings

  def targets(frozen, s_logits, ctx, u, tau, r, progress):
    model, params = _ar(models, frozen)
    return targets_lib.ar_teacher_targets(model, params, ctx, u, tau)
  return targets


def ar_fraction(settings, progress) -> jax.Array:
  start = settings.ar_fraction
  end = start if settings.ar_fraction_end < 0 else settings.ar_fraction_end
  return start + (end - start) * progress


def _mixed(models: Models, settings) -> TargetsFn:
  prog, roll = _progressive(models, settings), _ar_rollout(models, settings)
  if models.teacher_k == 0:  # an AR stage teacher: both rules are its rollout
    return prog

  def targets(frozen, s_logits, ctx, u, tau, r, progress):
    a = prog(frozen, s_logits, ctx, u, tau, r, progress)
    b = roll(frozen, s_logits, ctx, u, tau, r, progress)
    pick = r < ar_fraction(settings, progress)
    return jnp.where(pick[..., None], b, a)
  return targets


def _mine(models: Models, s_logits, u) -> jax.Array:
  """The student's own tokens, by its readout."""
  return sampling.pflm_readout(models.student.arch.readout, s_logits, u)


def _on_policy(models: Models, settings) -> TargetsFn:
  del settings

  def targets(frozen, s_logits, ctx, u, tau, r, progress):
    model, params = _ar(models, frozen)
    return on_policy_targets(model, params, ctx, _mine(models, s_logits, u), u, tau)
  return targets


def _on_policy_kl(models: Models, settings) -> TargetsFn:
  del settings
  blocked = tuple(models.student.arch.never_emit_ids)

  def targets(frozen, s_logits, ctx, u, tau, r, progress):
    model, params = _ar(models, frozen)
    return on_policy_targets(model, params, ctx, _mine(models, s_logits, u), u, tau,
                             distributions=True, blocked_ids=blocked)
  return targets


def _on_policy_soft(models: Models, settings) -> TargetsFn:
  margin = float(settings.cdf_margin)
  blocked = tuple(models.student.arch.never_emit_ids)

  def targets(frozen, s_logits, ctx, u, tau, r, progress):
    model, params = _ar(models, frozen)
    return on_policy_targets(model, params, ctx, _mine(models, s_logits, u), u, tau,
                             cdf_margin=margin, blocked_ids=blocked)
  return targets


def on_policy_targets(ar_model, ar_params, ctx_BxN, prefix_BxNxK, u_BxNxK, tau_B=None, *,
                      cdf_margin: float = 0.0, distributions: bool = False, blocked_ids=()):
  """Target i: the AR model's inverse-CDF token for u_i after the context and prefix
  tokens 1..i-1 (one pass over the window layout of the prefix). Also soft targets, never
  on blocked_ids: with cdf_margin > 0 those of cdf_window; with distributions, the
  tempered distributions themselves."""
  logits_BxNxKxV = ar_window_logits(ar_model, ar_params, ctx_BxN, prefix_BxNxK[..., :-1])
  tau = None if tau_B is None else tau_B[:, None, None, None]
  cdf = sampling.softmax_cdf(logits_BxNxKxV, tau)  # once for the hard and the soft targets
  y = sampling.inverse_cdf_of(*cdf, u_BxNxK)
  if distributions:
    return y, _normalised_without(cdf[0], blocked_ids)
  if cdf_margin <= 0:
    return y
  return y, _cover(*cdf, u_BxNxK, cdf_margin, blocked_ids)


def _normalised_without(w_xV, blocked_ids) -> jax.Array:
  """Non-negative weights w as a distribution, without blocked_ids (ids the student can
  never emit)."""
  if blocked_ids:
    w_xV = w_xV.at[..., jnp.asarray(blocked_ids)].set(0.0)
  # weights wholly on blocked ids keep nothing: such a window's weight is 0 (its hard
  # target is blocked too), so any finite distribution serves
  total = jnp.sum(w_xV, axis=-1, keepdims=True)
  return jnp.where(total > 0, w_xV / jnp.maximum(total, 1e-30), 1.0 / w_xV.shape[-1])


def cdf_window(logits_xV, u_x, margin: float, tau=None, blocked_ids=()) -> jax.Array:
  """[..., V]: the share of [u - margin, u + margin] ∩ [0, 1] covered by each token's
  interval [CDF(v-1), CDF(v)) under softmax(logits / tau), renormalised after dropping
  blocked_ids (ids the student can never emit)."""
  return _cover(*sampling.softmax_cdf(logits_xV, tau), u_x, margin, blocked_ids)


def _cover(p, hi, lo, u_x, margin: float, blocked_ids) -> jax.Array:
  """cdf_window from softmax_cdf's (p, hi, lo)."""
  upper = (hi + lo) / (hi[..., -1:] + lo[..., -1:])
  lower = jnp.concatenate([jnp.zeros_like(upper[..., :1]), upper[..., :-1]], axis=-1)
  u = u_x[..., None].astype(jnp.float32)
  a, b = jnp.clip(u - margin, 0.0, 1.0), jnp.clip(u + margin, 0.0, 1.0)
  cover = jnp.maximum(jnp.minimum(upper, b) - jnp.maximum(lower, a), 0.0)
  return _normalised_without(cover, blocked_ids)


def ar_window_logits(model, params, ctx_BxN, win_BxNxA) -> jax.Array:
  """An AR model's next-token logits after the context token and after each of the A
  window tokens that follow it, in one pass: [B, N, A + 1, V]."""
  if win_BxNxA.shape[-1] == 0:
    return layouts.apply_window(model, params, ctx_BxN, None, None)[:, :, None]
  B, n = ctx_BxN.shape
  a = win_BxNxA.shape[-1]
  inp = layouts.window_inputs(ctx_BxN, win_BxNxA, 0)
  logits = model.apply({'params': params}, inp['tokens'], inp['positions'], logits_from=0,
                       method=type(model).window_forward, window=(n, a, 0))
  first = logits[:, :n, None]
  rest = logits[:, n:].reshape(B, n, a, -1)
  return jnp.concatenate([first, rest], axis=2)


def _passes_progressive(m: Models) -> float:
  return float(m.k) if m.teacher_k == 0 else 2.0


OBJECTIVES: dict[str, Objective] = {
    'progressive': Objective('progressive', False, True, _progressive, _passes_progressive),
    'ar_rollout': Objective('ar_rollout', True, False, _ar_rollout, lambda m: float(m.k)),
    'mixed': Objective('mixed', True, True, _mixed,
                       lambda m: _passes_progressive(m) + (m.k if m.teacher_k else 0)),
    # on-policy targets: the AR model's rollout (1) and the student's own logits they read
    # (0.5); soft ones also hold their distributions (0.5)
    'on_policy': Objective('on_policy', True, False, _on_policy, lambda m: 1.0,
                           target_arrays=lambda m: 1.5),
    'on_policy_soft': Objective('on_policy_soft', True, False, _on_policy_soft,
                                lambda m: 1.0, soft=True, target_arrays=lambda m: 2.0),
    'on_policy_kl': Objective('on_policy_kl', True, False, _on_policy_kl, lambda m: 1.0,
                              soft=True, readout='inverse_cdf', target_arrays=lambda m: 2.0),
}


def training(readout: str) -> list[str]:
  """The objectives that train students of this readout (the allowed ones for it)."""
  return [n for n, o in OBJECTIVES.items() if o.readout == readout]


def get(name: str) -> Objective:
  """The registered objective `name` (config validation names the allowed ones)."""
  return OBJECTIVES[name]
