"""Distillation targets (docs/design.md section 3): the AR teacher's k tokens by sequential
inverse-CDF sampling (kforcing_jax.models.sampling.inverse_cdf), or a PFLM teacher's 2h
tokens read out from its training and rollout layouts."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kforcing_jax.models import layouts
from kforcing_jax.models import sampling

def ar_teacher_targets(model, params, ctx_BxN, u_BxNxK, tau_B=None) -> jax.Array:
  """k tokens per window from an AR teacher by sequential inverse-CDF sampling: pass i
  feeds the i-1 tokens already drawn as real tokens (window layout, H = 0)."""
  return ar_teacher_rollout(model, params, ctx_BxN, u_BxNxK, tau_B)[0]


def ar_teacher_rollout(model, params, ctx_BxN, u_BxNxK, tau_B=None):
  """ar_teacher_targets' tokens [B, N, K] int32, with where each u fell in its token's CDF
  interval: the teacher's probability of the token [B, N, K] and the distance from u to
  the interval's nearer end [B, N, K] (a student must place u within the interval, so
  these say how hard each target is to hit; unused outputs cost nothing under jit)."""
  k = u_BxNxK.shape[-1]
  tau = None if tau_B is None else tau_B[:, None, None]
  ys, probs, edges = [], [], []
  for i in range(k):
    win = jnp.stack(ys, axis=-1) if ys else None
    logits_BxNxV = layouts.apply_window(model, params, ctx_BxN, win, None)
    p, hi, lo = sampling.softmax_cdf(logits_BxNxV, tau)
    u = u_BxNxK[..., i]
    y = sampling.inverse_cdf_of(p, hi, lo, u)
    total = hi[..., -1] + lo[..., -1]
    pick = lambda a: jnp.take_along_axis(a, y[..., None], axis=-1)[..., 0]
    upper = (pick(hi) + pick(lo)) / total
    p_y = pick(p) / total
    ys.append(y)
    probs.append(p_y)
    edges.append(jnp.maximum(jnp.minimum(u - (upper - p_y), upper - u), 0.0))
  return tuple(jnp.stack(a, axis=-1) for a in (ys, probs, edges))


def pflm_teacher_targets(model, params, ctx_BxN, u_BxNxK, tau_B=None) -> jax.Array:
  """2h tokens per window from a PFLM teacher of window h, read out as it reads (its
  arch.readout): the first h from its training layout, the second h from the rollout
  (double-pass) layout."""
  h = u_BxNxK.shape[-1] // 2
  u_first, u_second = u_BxNxK[..., :h], u_BxNxK[..., h:]
  first = sampling.pflm_readout(model.arch.readout, layouts.apply_window(
      model, params, ctx_BxN, None, u_first, tau_B), u_first)
  second = sampling.pflm_readout(model.arch.readout, layouts.apply_window(
      model, params, ctx_BxN, first, u_second, tau_B), u_second)
  return jnp.concatenate([first, second], axis=-1)
