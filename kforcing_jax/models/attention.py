"""Attention strategies: how one layer's queries meet its keys in each layout.

The model computes q, k, v (RoPE applied) and hands them to a strategy chosen once by the
caller (`Transformer.forward`, `window_forward`, `decode_step`) from the execution config,
never by sniffing the backend inside the model:

  Causal    plain causal attention over the inputs (teacher training, AR scoring);
  Masked    an explicit [B, Q, S] mask (the dense reference of the window layout);
  Window    the window layout's structured attention (distillation, rollout targets);
  Cached    decoding over an explicit KV cache: masked attention over the whole cache
            (`kernel='xla'`), or the flash-decoding kernel over the filled slots only
            (`kernel='pallas'`, kforcing_jax.flash_decode).

Each strategy is a pytree (it can cross a jit boundary) called as
`attend(q, k, v, kv, query_from) -> (out, new_kv)`; q is [B, T, heads, head_dim], k and v
[B, T, kv_heads, head_dim] (grouped-query attention: query head h reads KV head h // G,
G = heads / kv_heads, transformers' repeat_kv order; the KV heads are never repeated);
kv is the layer's cache (Cached only); query_from > 0 (Cached only) means the first
inputs are fed only for their keys/values.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.kernels import cpu as cpu_kernels
from kforcing_jax.models import flash_decode

NEG_INF = -1e9
CACHE_PRODUCTS = ('dot', 'reduce', 'kernel')  # resolved values of ExecConfig.cache_products


def group_queries(q_BxTxHxD, n_kv_heads: int):
  """[B, T, heads, D] -> [B, T, kv_heads, G, D]: query head h = kv * G + g."""
  B, T, H, D = q_BxTxHxD.shape
  return q_BxTxHxD.reshape(B, T, n_kv_heads, H // n_kv_heads, D)


def window_attention(q, k, v, window: tuple[int, int, int]):
  """Attention of the window layout without materialising its [Q, Q] mask.

  Sequence order [ctx (N) | w (N*A, window-major) | h (N*H, window-major)]. Context
  queries are causal over the context; each window's W = A + H queries attend to
  ctx_s (s <= t) and causally to their own window [w(t,1..A), h(t,1..H)] -- exactly the
  mask of kforcing_jax.layouts.window_mask, at O(N^2 + N*W*(N + W)) cost instead of
  O((N(1+W))^2).
  """
  n, a, h = window
  B, _, nh, d = q.shape
  nkv = k.shape[2]
  w = a + h

  def split(x):
    ctx = x[:, :n]
    parts = [x[:, n:n + n * a].reshape(B, n, a, *x.shape[2:])] if a else []
    parts.append(x[:, n + n * a:].reshape(B, n, h, *x.shape[2:]))
    return ctx, jnp.concatenate(parts, axis=2)  # [B, N, ...], [B, N, W, heads, d]

  q_c, q_w = split(q)
  k_c, k_w = split(k)
  v_c, v_w = split(v)
  out_c = jax.nn.dot_product_attention(q_c, k_c, v_c, is_causal=True, implementation='xla')
  q_w = q_w.reshape(B, n, w, nkv, nh // nkv, d)  # query head = kv head * G + g
  scale = 1.0 / np.sqrt(d)
  s_ctx = jnp.einsum('btwkgd,bskd->btwkgs', q_w, k_c,
                     preferred_element_type=jnp.float32) * scale  # [B, N, W, nkv, G, N]
  s_win = jnp.einsum('btwkgd,btvkd->btwkgv', q_w, k_w,
                     preferred_element_type=jnp.float32) * scale  # [B, N, W, nkv, G, W]
  t_idx = np.arange(n)
  ctx_ok = (t_idx[None, :] <= t_idx[:, None])[None, :, None, None, None, :]  # s <= t
  win_ok = np.tril(np.ones((w, w), bool))[None, None, :, None, None, :]  # v <= w
  s_ctx = jnp.where(ctx_ok, s_ctx, NEG_INF)
  s_win = jnp.where(win_ok, s_win, NEG_INF)
  m = jnp.maximum(s_ctx.max(-1, keepdims=True), s_win.max(-1, keepdims=True))
  p_ctx, p_win = jnp.exp(s_ctx - m), jnp.exp(s_win - m)
  denom = p_ctx.sum(-1, keepdims=True) + p_win.sum(-1, keepdims=True)
  out_w = (jnp.einsum('btwkgs,bskd->btwkgd', (p_ctx / denom).astype(v.dtype), v_c) +
           jnp.einsum('btwkgv,btvkd->btwkgd', (p_win / denom).astype(v.dtype), v_w))
  out_w = out_w.reshape(B, n, w, nh, d)
  parts = [out_c]
  if a:
    parts.append(out_w[:, :, :a].reshape(B, n * a, nh, d))
  parts.append(out_w[:, :, a:].reshape(B, n * h, nh, d))
  return jnp.concatenate(parts, axis=1)


def cached_attention(q_BxTxHxD, kt_BxKxDxS, v_BxKxSxD, mask_BxTxS, products: str = 'dot'):
  """Decode-time attention over the cache: keys stored [B, kv_heads, head_dim, S], values
  [B, kv_heads, S, head_dim]; the queries [B, T, heads, head_dim] grouped by KV head.

  Both products are batched over (B, kv_heads), with a KV head's G query heads and T
  inputs as the G * T rows of one product, and read the cache in its stored layout; the
  [B, kv_heads, G * T, head_dim] result is transposed afterwards. On CPU (XNNPACK/YNNPACK
  dots) this is much faster than a seq-major [B, S, heads, head_dim] cache, whose per-step
  transposed copies dominate the step there. products='reduce' computes the products of a
  step with a few queries (1 < T <= 16: a PFLM step's 2K) as broadcast-multiply-reduce
  loops that read the cache once -- faster than XLA:CPU's small batched dots; many queries
  (a prefill) stay dots. products='kernel' does the same, and for one query (an AR step) runs
  both products in the CPU kernel (kforcing_jax.kernels.cpu) on a float32 cache: XLA:CPU's
  batched dots with G rows each reach a fraction of memory speed there."""
  B, T, H, d = q_BxTxHxD.shape
  K = kt_BxKxDxS.shape[1]
  # [B, K, G * T, D]: a KV head's query heads and inputs as the rows of one product
  q = jnp.transpose(group_queries(q_BxTxHxD.astype(kt_BxKxDxS.dtype), K),
                    (0, 2, 3, 1, 4)).reshape(B, K, H // K * T, d)
  if products == 'kernel' and T == 1 and kt_BxKxDxS.dtype == jnp.float32:
    return _kernel_attention(q, kt_BxKxDxS, v_BxKxSxD, mask_BxTxS).reshape(
        B, 1, H, d).astype(q_BxTxHxD.dtype)
  elementwise = products in ('reduce', 'kernel') and 1 < T <= 16
  if elementwise:
    s = jnp.sum(q[..., None].astype(jnp.float32) * kt_BxKxDxS[:, :, None], axis=-2) / np.sqrt(d)
  else:
    s = jnp.einsum('bkqd,bkds->bkqs', q, kt_BxKxDxS,
                   preferred_element_type=jnp.float32) / np.sqrt(d)
  mask = jnp.tile(mask_BxTxS, (1, H // K, 1))  # rows (g, t) as q's
  s = jnp.where(mask[:, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  if elementwise:
    out = jnp.sum(p[..., None] * v_BxKxSxD[:, :, None].astype(jnp.float32), axis=-2).astype(
        v_BxKxSxD.dtype)
  else:
    out = jnp.einsum('bkqs,bksd->bkqd', p.astype(v_BxKxSxD.dtype), v_BxKxSxD)
  out = jnp.transpose(out.reshape(B, K, H // K, T, d), (0, 3, 1, 2, 4))
  return out.reshape(B, T, H, d).astype(q_BxTxHxD.dtype)


def _kernel_attention(q_BxKxGxD, kt_BxKxDxS, v_BxKxSxD, mask_Bx1xS):
  """One query's cached attention with both products in the CPU kernel, the softmax in
  XLA; [B, K, G, D] float32. The cache goes in as stored: a reshape of it would fuse with
  its in-place update and copy it every step."""
  s = cpu_kernels.batched_matmul(q_BxKxGxD, kt_BxKxDxS)
  s = jnp.where(mask_Bx1xS[:, None], s / np.sqrt(q_BxKxGxD.shape[-1]), NEG_INF)
  return cpu_kernels.batched_matmul(jax.nn.softmax(s, axis=-1), v_BxKxSxD)


def _no_cache(name, kv, query_from):
  if kv is not None or query_from:
    raise ValueError(f'{name} attention takes no cache and no query_from')


@flax.struct.dataclass
class Causal:
  impl: str = flax.struct.field(pytree_node=False, default='xla')  # xla | cudnn

  def __call__(self, q, k, v, kv=None, query_from: int = 0):
    _no_cache('causal', kv, query_from)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl), None


@flax.struct.dataclass
class Masked:
  mask_BxQxS: Any  # bool: query may attend key

  def __call__(self, q, k, v, kv=None, query_from: int = 0):
    _no_cache('masked', kv, query_from)
    return jax.nn.dot_product_attention(q, k, v, mask=self.mask_BxQxS[:, None],
                                        implementation='xla'), None


@flax.struct.dataclass
class Window:
  # (N context tokens, A window tokens, H hints per window)
  window: tuple[int, int, int] = flax.struct.field(pytree_node=False)

  def __call__(self, q, k, v, kv=None, query_from: int = 0):
    _no_cache('window', kv, query_from)
    return window_attention(q, k, v, self.window), None


@flax.struct.dataclass
class Cached:
  """Writes the step's keys/values into the layer's cache at `slot` and attends over it.

  kernel='xla': kv = (keys [B, Hkv, Dh, S], values [B, Hkv, S, Dh]); `mask_BxTxS` says
  which slots each input sees. kernel='pallas': both [B, Hkv, S, Dh]; row b reads slots
  start_B[b]:slot plus the step's own (the mask is not used)."""
  slot: Any  # [] int32: cache slot of the step's first input
  mask_BxTxS: Any = None
  start_B: Any = None  # [B] int32: each row's first valid slot (its left padding)
  kernel: str = flax.struct.field(pytree_node=False, default='xla')
  products: str = flax.struct.field(pytree_node=False, default='dot')

  def __call__(self, q, k, v, kv, query_from: int = 0):
    ck, cv = kv
    if self.kernel == 'pallas':
      ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2).astype(ck.dtype),
                                        (0, 0, self.slot, 0))
      cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype),
                                        (0, 0, self.slot, 0))
      # the kernel reads the updated cache (not its new slots): reading the old one would
      # make XLA copy the cache to keep it alive past the in-place update
      out = flash_decode.attention(q[:, query_from:], k, v, ck, cv, self.slot, self.start_B,
                                   query_from)
      return out, (ck, cv)
    ck = jax.lax.dynamic_update_slice(ck, jnp.transpose(k, (0, 2, 3, 1)).astype(ck.dtype),
                                      (0, 0, 0, self.slot))
    cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype),
                                      (0, 0, self.slot, 0))
    out = cached_attention(q[:, query_from:], ck, cv, self.mask_BxTxS[:, query_from:],
                           self.products)
    return out, (ck, cv)


def _write_rows(cache, new, slot_B, axis: int):
  """cache with `new` written at each row's own slot along `axis`: new's R rows go to the
  cache's rows 0..R-1, of its B >= R, in place (one scatter). A serving step over the
  first R slots writes the whole cache: slicing the rows out and writing them back would
  copy every live row's whole cache twice per step."""
  R, Q = new.shape[0], new.shape[axis]
  index = [slice(None)] * cache.ndim
  index[0] = jnp.arange(R)[:, None]
  index[axis] = slot_B[:, None] + jnp.arange(Q)[None]
  # the two index arrays broadcast to [R, Q]; with the slices between them, the indexed
  # values are [R, Q, <the other axes in order>]
  return cache.at[tuple(index)].set(jnp.moveaxis(new.astype(cache.dtype), axis, 1),
                                    indices_are_sorted=True, unique_indices=True)


@flax.struct.dataclass
class SlotCached:
  """Cached attention where every row (a serving slot) writes at its own slot: kv and
  kernel as Cached's; slot_B[b] is the cache slot of row b's first input this step,
  mask_BxTxS what each input sees (kernel='xla'), start_B each row's first valid slot
  (kernel='pallas': row b reads slots start_B[b]:slot_B[b] plus the step's own). The
  step's R rows are the cache's first R (a cache of B >= R slots: the others untouched)."""
  slot_B: Any
  mask_BxTxS: Any
  start_B: Any = None
  kernel: str = flax.struct.field(pytree_node=False, default='xla')
  products: str = flax.struct.field(pytree_node=False, default='dot')

  def __call__(self, q, k, v, kv, query_from: int = 0):
    ck, cv = kv
    if self.kernel == 'pallas':
      ck = _write_rows(ck, jnp.swapaxes(k, 1, 2), self.slot_B, axis=2)
      cv = _write_rows(cv, jnp.swapaxes(v, 1, 2), self.slot_B, axis=2)
      R = q.shape[0]
      out = flash_decode.attention(q[:, query_from:], k, v, ck[:R], cv[:R], self.slot_B,
                                   self.start_B, query_from)
      return out, (ck, cv)
    ck = _write_rows(ck, jnp.transpose(k, (0, 2, 3, 1)), self.slot_B, axis=3)
    cv = _write_rows(cv, jnp.swapaxes(v, 1, 2), self.slot_B, axis=2)
    R = q.shape[0]
    out = cached_attention(q[:, query_from:], ck[:R], cv[:R], self.mask_BxTxS[:, query_from:],
                           self.products)
    return out, (ck, cv)
