"""Decode-time attention that reads only the filled part of the KV cache (GPU, opt-in).

`ExecConfig.decode_attention='pallas'` replaces the masked attention over the whole cache
(attention.cached_attention) by two parts combined exactly, as in flash attention:
- the prefix, cache slots [start_b, slot) of row b (its prompt after the left padding and
  every earlier step), through JAX's Pallas flash-decoding kernel
  (jax.experimental.pallas.ops.gpu.decode_attention.gqa): split-K blocks of the cache, each
  skipped or cut short past `slot`, so a step reads the slots filled so far instead of the
  whole preallocated cache, without cache_phases' growing copies;
- the step's own block: its T queries against the Q keys/values it writes this step (the
  fed tokens, a PFLM's hints), causal within the block, in plain XLA ([B, H, T, Q] scores).
A row's T queries share its keys, and so do the G = heads / kv_heads query heads of one KV
head (grouped-query models), so the kernel sees them as G * T query heads per KV head. Both parts return unnormalised outputs with their softmax max
and sum; the merge is a log-sum-exp combination, so the result equals softmax attention
over the union (tests/test_flash_decode.py checks it against model.cached_attention).

The cache layout is [B, kv_heads, S, head_dim] for keys and values (the kernel's); S is a
multiple of BLOCK_K (see cache_length), cut into k_splits equal parts per (row, head) --
as many as keep the GPU busy (k_splits), no more: each split's partial output is written
out and merged in XLA. On CPU the kernel runs in Pallas' interpret mode:
correct and slow, for tests only (the benchmark refuses it there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Cache slots per step of the kernel's inner loop (>= 16 for Triton's dot); every split-K
# part is a whole number of them.
BLOCK_K = 64
# Kernel programs (rows x KV heads x splits) to aim for: several per SM of a large GPU (an H100
# has 132). Fewer splits at large batches keep the partial outputs merged in XLA small.
PROGRAMS = 2048


def cache_length(slots: int) -> int:
  """The cache length the kernel accepts for `slots` needed slots (a multiple of BLOCK_K).
  The extra slots cost memory only: the kernel never reads past the filled part."""
  return -(-slots // BLOCK_K) * BLOCK_K


def k_splits(rows_x_heads: int, cache_len: int) -> int:
  """The fewest split-K parts (a divisor of the cache's BLOCK_K blocks) that give PROGRAMS
  kernel programs, or the most there are when even that falls short (small batches)."""
  blocks = cache_len // BLOCK_K
  divisors = [d for d in range(1, blocks + 1) if blocks % d == 0]
  return next((d for d in divisors if rows_x_heads * d >= PROGRAMS), divisors[-1])


def attention(q_BxTxHxD, k_new_BxQxKxD, v_new_BxQxKxD, ck_BxKxSxD, cv_BxKxSxD, slot,
              start_B, query_from: int = 0):
  """Softmax attention of T queries over cache slots [start_b, slot) and the Q new keys
  (slot: [] for every row, or [B]: each row's own, as a serving slot engine's).

  q: the step's queries (inputs query_from.. of the step, RoPE applied), H heads; k_new,
  v_new: all Q inputs' keys/values (K = kv heads, H a multiple of K: query head h reads
  KV head h // (H / K)), written at slots slot..slot+Q-1; ck, cv: the cache (the new
  block's slots may already hold it: they are not read). Query t (input query_from + t)
  sees block keys j <= query_from + t whose slot is >= start_b. Returns [B, T, H, D] in
  q's dtype; a query with no visible key gets zeros."""
  from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode  # pylint: disable=g-import-not-at-top
  B, T, H, D = q_BxTxHxD.shape
  Q, K = k_new_BxQxKxD.shape[1], k_new_BxQxKxD.shape[2]
  G = H // K
  S = ck_BxKxSxD.shape[2]
  if S % BLOCK_K:
    raise ValueError(f'flash_decode.attention: cache length {S} is not a multiple of '
                     f'{BLOCK_K} (allocate it with flash_decode.cache_length)')
  scale = 1.0 / np.sqrt(D)
  slot_B = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), (B,))
  # [B, K, G, T, D]: a KV head's G query heads and T inputs are its kernel query heads
  q_BxKxGxTxD = jnp.transpose(q_BxTxHxD.reshape(B, T, K, G, D), (0, 2, 3, 1, 4))
  # gqa takes keys [B, S, kv_heads, D] and swaps them to [B, kv_heads, S, D] itself: the two
  # transposes cancel, the kernel reads the cache in place
  o, (l, m) = pallas_decode.gqa(
      q_BxKxGxTxD.reshape(B, K * G * T, D).astype(ck_BxKxSxD.dtype),
      jnp.swapaxes(ck_BxKxSxD, 1, 2), jnp.swapaxes(cv_BxKxSxD, 1, 2),
      start_idx=start_B.astype(jnp.int32), kv_seq_len=slot_B,
      sm_scale=float(scale), block_k=BLOCK_K, k_splits=k_splits(B * K, S),
      interpret=jax.default_backend() == 'cpu', return_residuals=True, normalize_output=False)
  o_pre = o.reshape(B, K, G, T, D).astype(jnp.float32)
  l_pre, m_pre = l.reshape(B, K, G, T), m.reshape(B, K, G, T)

  s_blk = jnp.einsum('bkgtd,bjkd->bkgtj', q_BxKxGxTxD.astype(jnp.float32),
                     k_new_BxQxKxD.astype(jnp.float32)) * scale
  j, t = np.arange(Q), np.arange(T) + query_from
  visible = (jnp.asarray(j[None, :] <= t[:, None])[None, None, None] &
             ((slot_B[:, None] + j[None, :])[:, None, None, None, :] >=
              start_B[:, None, None, None, None]))
  s_blk = jnp.where(visible, s_blk, -jnp.inf)
  m_blk = jnp.max(s_blk, axis=-1)
  m_tot = jnp.maximum(m_pre, m_blk)  # finite: the kernel's empty prefix gives finfo.min
  p_blk = jnp.where(visible, jnp.exp(s_blk - m_tot[..., None]), 0.0)
  w_pre = jnp.exp(m_pre - m_tot)
  num = o_pre * w_pre[..., None] + jnp.einsum('bkgtj,bjkd->bkgtd', p_blk,
                                              v_new_BxQxKxD.astype(jnp.float32))
  den = l_pre * w_pre + jnp.sum(p_blk, axis=-1)
  out = num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)[..., None]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, D).astype(q_BxTxHxD.dtype)
