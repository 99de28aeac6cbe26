"""Distillation targets (design.md section 3).

AR teacher: y = min{v : CDF(v) >= u}, the inverse CDF of the (tempered) softmax in
token-id order, so the push-forward of U(0,1) is exactly the teacher's distribution.
The CDF is a prefix sum in double-float ("float-float") arithmetic: every partial sum
is carried as an unevaluated pair hi + lo of float32 numbers combined with error-free
TwoSum steps in a parallel (associative) scan. Its error is below ~V * 2^-46 absolute
(measured < 1e-11 for a 50,258-token vocabulary, see tests/test_targets.py), i.e. far
below float32's own resolution of u (2^-24), on every backend, without float64.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kforcing_jax import layouts

U_BITS = 24


def uniform_noise(rng, shape) -> jax.Array:
  """u on the open interval (0, 1): (integer + 1/2) / 2^24, exactly uniform on that grid."""
  ints = jax.random.randint(rng, shape, 0, 2 ** U_BITS)
  return (ints.astype(jnp.float32) + 0.5) / float(2 ** U_BITS)


def _two_sum(a, b):
  s = a + b
  bb = s - a
  err = (a - (s - bb)) + (b - bb)
  return s, err


def _ff_add(x, y):
  s, e = _two_sum(x[0], y[0])
  e = e + (x[1] + y[1])
  hi = s + e
  lo = e - (hi - s)
  return hi, lo


def _split12(x):
  """x = hi + lo exactly, each with at most 12 significant bits (so products of two such
  halves are exact in float32, with or without fused multiply-adds)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  hi = jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)
  return hi, x - hi


def _mul_ff(u, t_hi, t_lo):
  """u * (t_hi + t_lo) as a float-float pair, from exact partial products."""
  u1, u2 = _split12(u)
  t1, t2 = _split12(t_hi)
  acc = (u1 * t1, jnp.zeros_like(u1 * t1))
  for term in (u1 * t2, u2 * t1, u2 * t2, u * t_lo):
    acc = _ff_add(acc, (term, jnp.zeros_like(term)))
  return acc


def cumsum_ff(p_xV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inclusive prefix sums along the last axis as (hi, lo) float32 pairs."""
  p = p_xV.astype(jnp.float32)
  return jax.lax.associative_scan(_ff_add, (p, jnp.zeros_like(p)), axis=-1)


def inverse_cdf(logits_xV: jax.Array, u_x: jax.Array, tau=None) -> jax.Array:
  """min{v : CDF(v) >= u} for softmax(logits / tau); leading dims broadcast with u."""
  logits = logits_xV.astype(jnp.float32)
  if tau is not None:
    logits = logits / tau
  p = jax.nn.softmax(logits, axis=-1)
  hi, lo = cumsum_ff(p)
  # u * total without rounding u (the total differs from 1 by float32 softmax error)
  tgt_hi, tgt_lo = _mul_ff(u_x[..., None].astype(jnp.float32), hi[..., -1:], lo[..., -1:])
  below = ((hi - tgt_hi) + (lo - tgt_lo)) < 0  # CDF(v) < u, to float-float precision
  y = jnp.sum(below, axis=-1, dtype=jnp.int32)
  # rounding can push u*total past the last partial sum: fall back to the last token
  # with non-zero probability (never a blocked id).
  last = p.shape[-1] - 1 - jnp.argmax(jnp.flip(p > 0, axis=-1), axis=-1).astype(jnp.int32)
  return jnp.minimum(y, last)


def ar_teacher_targets(model, params, ctx_BxN, u_BxNxK, tau_B=None) -> jax.Array:
  """k tokens per window from an AR teacher by sequential inverse-CDF sampling: pass i
  feeds the i-1 tokens already drawn as real tokens (window layout, H = 0)."""
  k = u_BxNxK.shape[-1]
  tau = None if tau_B is None else tau_B[:, None, None]
  ys = []
  for i in range(k):
    win = jnp.stack(ys, axis=-1) if ys else None
    logits_BxNxV = layouts.apply_window(model, params, ctx_BxN, win, None)
    ys.append(inverse_cdf(logits_BxNxV, u_BxNxK[..., i], tau))
  return jnp.stack(ys, axis=-1)


def pflm_teacher_targets(model, params, ctx_BxN, u_BxNxK, tau_B=None) -> jax.Array:
  """2h tokens per window from a PFLM teacher of window h: the first h by argmax of its
  training layout, the second h by argmax of the rollout (double-pass) layout."""
  h = u_BxNxK.shape[-1] // 2
  first = jnp.argmax(layouts.apply_window(model, params, ctx_BxN, None, u_BxNxK[..., :h],
                                          tau_B), axis=-1).astype(jnp.int32)
  second = jnp.argmax(layouts.apply_window(model, params, ctx_BxN, first, u_BxNxK[..., h:],
                                           tau_B), axis=-1).astype(jnp.int32)
  return jnp.concatenate([first, second], axis=-1)
