"""The attention layouts of one push-forward model (docs/design.md section 2.3).

Window layout, for N context tokens, A real window tokens and H hints per window:
  sequence = [ctx_0..ctx_{N-1} | w(0,1..A) .. w(N-1,1..A) | h(0,1..H) .. h(N-1,1..H)]
  ctx_i     attends ctx_s, s <= i                         (position i)
  w(t,j)    attends ctx_s, s <= t; w(t,j'), j' <= j       (position t + j)
  h(t,i)    attends ctx_s, s <= t; all w(t,.); h(t,i'), i' <= i   (position t + A + i)
A=0, H=k is the training (staircase) layout; A=H=k/2 the rollout (double pass) layout;
H=0 lets an AR teacher roll windows out token by token. The inference layout is plain
causal attention over a KV cache (see kforcing_jax.decode).
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from kforcing_jax.models import quantize


@functools.lru_cache(maxsize=32)
def window_mask(n: int, a: int, h: int) -> np.ndarray:
  """[Q, Q] bool, Q = n * (1 + a + h); identical for every row of a batch."""
  t_ctx = np.arange(n)
  kind = np.concatenate([np.zeros(n, int), np.ones(n * a, int), np.full(n * h, 2)])
  win = np.concatenate([t_ctx, np.repeat(t_ctx, a), np.repeat(t_ctx, h)])
  idx = np.concatenate([np.zeros(n, int), np.tile(np.arange(1, a + 1), n),
                        np.tile(np.arange(1, h + 1), n)])
  kq, kk = kind[:, None], kind[None, :]
  wq, wk = win[:, None], win[None, :]
  iq, ik = idx[:, None], idx[None, :]
  see_ctx = (kk == 0) & (wk <= wq)
  see_win = (kk == 1) & (kq >= 1) & (wk == wq) & ((kq == 2) | (ik <= iq))
  see_hint = (kk == 2) & (kq == 2) & (wk == wq) & (ik <= iq)
  return see_ctx | see_win | see_hint


def window_inputs(ctx_BxN: jnp.ndarray, win_BxNxA: jnp.ndarray | None, h: int):
  """Token ids, their positions, hint positions and the mask of the window layout.

  Returns dict(tokens [B, N(1+A)], positions [B, N(1+A)], hint_pos [B, N*H],
  logits_from = N(1+A))."""
  B, n = ctx_BxN.shape
  a = 0 if win_BxNxA is None else win_BxNxA.shape[-1]
  t = jnp.arange(n, dtype=jnp.int32)
  tokens, positions = [ctx_BxN], [t]
  if a:
    tokens.append(win_BxNxA.reshape(B, n * a))
    positions.append((t[:, None] + jnp.arange(1, a + 1, dtype=jnp.int32)).reshape(-1))
  hint_pos = (t[:, None] + a + jnp.arange(1, h + 1, dtype=jnp.int32)).reshape(-1)
  positions = jnp.concatenate(positions)
  return dict(tokens=jnp.concatenate(tokens, axis=1),
              positions=jnp.broadcast_to(positions, (B, positions.shape[0])),
              hint_pos=jnp.broadcast_to(hint_pos, (B, n * h)),
              logits_from=n * (1 + a))


def apply_window(model, params, ctx_BxN, win_BxNxA, u_BxNxH, tau_B=None, dense=False):
  """Logits of the window layout: hints' logits [B, N, H, V] when H > 0, else the
  last real token of each window ([B, N, V]; the context token itself when A = 0).

  dense=True runs the same layout through the explicit [Q, Q] mask (the reference the
  structured attention is tested against); only then is that mask built."""
  B, n = ctx_BxN.shape
  h = 0 if u_BxNxH is None else u_BxNxH.shape[-1]
  a = 0 if win_BxNxA is None else win_BxNxA.shape[-1]
  inp = window_inputs(ctx_BxN, win_BxNxA, h)
  kw = {'window': (n, a, h)}
  if dense:
    kw['dense_mask_BxQxQ'] = jnp.asarray(window_mask(n, a, h))[None]
  if h:
    logits = model.apply(quantize.variables(params), inp['tokens'], inp['positions'],
                         hint_u_BxH=u_BxNxH.reshape(B, n * h), hint_pos_BxH=inp['hint_pos'],
                         tau_B=tau_B, logits_from=inp['logits_from'],
                         method=type(model).window_forward, **kw)
    return logits.reshape(B, n, h, -1)
  logits = model.apply(quantize.variables(params), inp['tokens'], inp['positions'],
                       logits_from=0 if a == 0 else n, method=type(model).window_forward, **kw)
  if a == 0:
    return logits
  return logits.reshape(B, n, a, -1)[:, :, -1]
