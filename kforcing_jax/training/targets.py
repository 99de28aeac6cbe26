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
  k = u_BxNxK.shape[-1]
  tau = None if tau_B is None else tau_B[:, None, None]
  ys = []
  for i in range(k):
    win = jnp.stack(ys, axis=-1) if ys else None
    logits_BxNxV = layouts.apply_window(model, params, ctx_BxN, win, None)
    ys.append(sampling.inverse_cdf(logits_BxNxV, u_BxNxK[..., i], tau))
  return jnp.stack(ys, axis=-1)


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
