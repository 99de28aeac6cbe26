"""The Transformer backbone shared by the AR teacher and the push-forward student.

design.md 2.1: untied token embedding, pre-LN blocks with bias-free fused QKV / output
projections, RoPE (rotate-half) on q and k, a tanh-GELU MLP with biases, scale-only
LayerNorm in float32, and a zero-initialised output head with bias. With `pflm=True` a
noise encoder (design.md 2.2) turns (u, tau) into hint embeddings. One module serves
every layout: the caller passes token ids, hint noise, RoPE positions and the boolean
attention mask, and optionally an explicit KV cache to read from and write into.

Sequence = [token embeddings (T) | hint embeddings (H)].
Parameters carry logical axis names (see kforcing_jax.sharding for the mesh rules).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import flash_decode

NEG_INF = -1e9
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
DECODE_ATTENTION = ('xla', 'pallas')  # ModelConfig.decode_attention


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  mlp_ratio: int = 4
  max_seq_len: int = 1024
  rope_base: float = 10000.0
  dtype: str = 'bfloat16'
  param_dtype: str = 'float32'
  dropout: float = 0.0
  never_emit_ids: tuple[int, ...] = ()
  attention_impl: str = 'auto'
  # Operand dtype of the weight products ('' = dtype). 'bfloat16' with dtype 'float32':
  # bf16 operands, float32 results (and float32 everything else) -- the fast mixed mode of
  # CPUs with bf16 dot instructions, where bf16 results and elementwise math are slow.
  dot_dtype: str = ''
  # Cached (decoding) attention: 'xla' = masked attention over the whole preallocated cache
  # (cached_attention); 'pallas' = JAX's Pallas flash-decoding kernel over the filled slots
  # only, plus the step's own block (kforcing_jax.flash_decode; GPU; CPU runs it in Pallas'
  # interpret mode, for tests). Also sets the cache layout (init_cache).
  decode_attention: str = 'xla'
  pflm: bool = False  # adds the noise encoder (push-forward student)
  noise_freq_scale: float = 1.0  # multiplies the noise sinusoid's frequencies (1 = paper)

  def __post_init__(self):
    if self.decode_attention not in DECODE_ATTENTION:
      raise ValueError(f'ModelConfig.decode_attention={self.decode_attention!r}: allowed: '
                       f'{", ".join(DECODE_ATTENTION)}')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def backbone_shape(self) -> dict:
    return {k: getattr(self, k) for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads',
                                           'mlp_ratio')}


def _dot_dtypes(cfg: ModelConfig, dtype=None):
  """(operand dtype, result dtype) of the weight products; dtype overrides the config's."""
  result = dtype or DTYPES[cfg.dtype]
  return (dtype or DTYPES[cfg.dot_dtype or cfg.dtype]), result


def _dense(cfg: ModelConfig, features: int, name: str, kernel_axes, bias_axes, dtype=None,
           kernel_init=None):
  operand, result = _dot_dtypes(cfg, dtype)
  extra = {}
  if operand != result:  # e.g. bf16 operands with float32 results
    extra['dot_general'] = functools.partial(jax.lax.dot_general, preferred_element_type=result)
  return nn.Dense(features, dtype=operand, param_dtype=DTYPES[cfg.param_dtype], name=name,
                  kernel_init=_init(kernel_init or nn.initializers.xavier_uniform(), kernel_axes),
                  bias_init=_init(nn.initializers.zeros, bias_axes), **extra)


def _init(init_fn, axes):
  return nn.with_logical_partitioning(init_fn, axes)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, base: float):
  """Rotate-half RoPE's (cos, sin), each [B, T, head_dim / 2] float32, for every layer."""
  inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BxTxF), jnp.sin(angles_BxTxF)


def rope(x_BxTxHxD: jax.Array, cos_sin) -> jax.Array:
  """Rotate-half RoPE over the whole head dim, in float32; cos_sin from rope_cos_sin."""
  cos, sin = cos_sin[0][:, :, None], cos_sin[1][:, :, None]
  d = x_BxTxHxD.shape[-1]
  x = x_BxTxHxD.astype(jnp.float32)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxD.dtype)


def sinusoid(z_B: jax.Array, dim: int, freq_scale: float = 1.0) -> jax.Array:
  """[cos(2 pi z f_j), sin(2 pi z f_j)], f_j = freq_scale * 10000^(-j/(dim/2)), in float32.

  The fractional part of z*f_j is taken before scaling by 2 pi, so the argument keeps
  float32's full relative precision of z (u values of neighbouring CDF intervals differ
  in their 6th decimal; float32 resolves ~1e-7)."""
  half = dim // 2
  freqs = (freq_scale * 10000.0 ** (-np.arange(half, dtype=np.float64) / half)).astype(
      np.float32)
  zf = z_B.astype(jnp.float32)[..., None] * freqs
  arg = (2 * np.pi) * (zf - jnp.floor(zf))
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


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
  w = a + h

  def split(x):
    ctx = x[:, :n]
    parts = [x[:, n:n + n * a].reshape(B, n, a, nh, d)] if a else []
    parts.append(x[:, n + n * a:].reshape(B, n, h, nh, d))
    return ctx, jnp.concatenate(parts, axis=2)  # [B, N, ...], [B, N, W, nh, d]

  q_c, q_w = split(q)
  k_c, k_w = split(k)
  v_c, v_w = split(v)
  out_c = jax.nn.dot_product_attention(q_c, k_c, v_c, is_causal=True, implementation='xla')
  scale = 1.0 / np.sqrt(d)
  s_ctx = jnp.einsum('btwhd,bshd->btwhs', q_w, k_c,
                     preferred_element_type=jnp.float32) * scale  # [B, N, W, nh, N]
  s_win = jnp.einsum('btwhd,btvhd->btwhv', q_w, k_w,
                     preferred_element_type=jnp.float32) * scale  # [B, N, W, nh, W]
  t_idx = np.arange(n)
  ctx_ok = (t_idx[None, :] <= t_idx[:, None])[None, :, None, None, :]  # s <= t
  win_ok = np.tril(np.ones((w, w), bool))[None, None, :, None, :]  # v <= w
  s_ctx = jnp.where(ctx_ok, s_ctx, NEG_INF)
  s_win = jnp.where(win_ok, s_win, NEG_INF)
  m = jnp.maximum(s_ctx.max(-1, keepdims=True), s_win.max(-1, keepdims=True))
  p_ctx, p_win = jnp.exp(s_ctx - m), jnp.exp(s_win - m)
  denom = p_ctx.sum(-1, keepdims=True) + p_win.sum(-1, keepdims=True)
  out_w = (jnp.einsum('btwhs,bshd->btwhd', (p_ctx / denom).astype(v.dtype), v_c) +
           jnp.einsum('btwhv,btvhd->btwhd', (p_win / denom).astype(v.dtype), v_w))
  parts = [out_c]
  if a:
    parts.append(out_w[:, :, :a].reshape(B, n * a, nh, d))
  parts.append(out_w[:, :, a:].reshape(B, n * h, nh, d))
  return jnp.concatenate(parts, axis=1)


def reduce_attention(n_queries: int) -> bool:
  """Whether cached_attention multiplies-and-reduces (True) or uses dots (False) for a
  step of n_queries queries per row (a module-level function so that experiments, e.g.
  launch/decode_profile.py, can swap the rule)."""
  return jax.default_backend() == 'cpu' and 1 < n_queries <= 16


def cached_attention(q_BxTxHxD, kt_BxHxDxS, v_BxHxSxD, mask_BxTxS):
  """Decode-time attention over the cache: keys stored [B, heads, head_dim, S], values
  [B, heads, S, head_dim].

  Both products are batched over (B, heads) and read the cache in its stored layout; the
  [B, heads, T, head_dim] result is transposed afterwards. On CPU (XNNPACK/YNNPACK dots)
  this is 2-3x faster than the seq-major [B, S, heads, head_dim] cache, whose per-step
  transposed copies dominated the decode step. Keys are stored transposed because that made
  the multi-query (PFLM, T = 2K) score product ~1.7x faster; on CPU those few queries now
  use the multiply-reduce below."""
  d = q_BxTxHxD.shape[-1]
  q = q_BxTxHxD.astype(kt_BxHxDxS.dtype)
  # A few queries per row (a PFLM step's 2K) on CPU: broadcast-multiply-reduce loops read
  # the cache once and beat XLA:CPU's batched [T, head_dim] x [head_dim, S] dots by ~15% of
  # the whole step (measured at D=256, B=16, K=4); one query (AR) or many (a prefill) stay
  # dots, which are far faster there.
  elementwise = reduce_attention(q.shape[1])
  if elementwise:
    s = jnp.sum(jnp.swapaxes(q, 1, 2)[..., None].astype(jnp.float32) * kt_BxHxDxS[:, :, None],
                axis=-2) / np.sqrt(d)
  else:
    s = jnp.einsum('bthd,bhds->bhts', q, kt_BxHxDxS,
                   preferred_element_type=jnp.float32) / np.sqrt(d)
  s = jnp.where(mask_BxTxS[:, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  if elementwise:
    out = jnp.sum(p[..., None] * v_BxHxSxD[:, :, None].astype(jnp.float32), axis=-2).astype(
        v_BxHxSxD.dtype)
  else:
    out = jnp.einsum('bhts,bhsd->bhtd', p.astype(v_BxHxSxD.dtype), v_BxHxSxD)
  return jnp.swapaxes(out, 1, 2).astype(q_BxTxHxD.dtype)


class LayerNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=1e-5, use_bias=False, dtype=jnp.float32,
                        param_dtype=DTYPES[self.cfg.param_dtype],
                        scale_init=_init(nn.initializers.ones, ('embed',)))(
                            x.astype(jnp.float32))


class Mlp(nn.Module):
  cfg: ModelConfig
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = _dense(cfg, cfg.mlp_ratio * cfg.d_model, 'fc_in', ('embed', 'mlp'), ('mlp',),
               self.dtype)(x)
    h = nn.gelu(h, approximate=True)
    return _dense(cfg, cfg.d_model, 'fc_out', ('mlp', 'embed'), ('embed',), self.dtype)(h)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, rope_cs, mask, cache_kv=None, cache_slot=None, window=None,
               query_from: int = 0, cache_start_B=None):
    """rope_cs: the inputs' RoPE (cos, sin) from rope_cos_sin.
    mask: [B, T, S] bool (query may attend key) or None for plain causal attention;
    window=(N, A, H): the window layout's structured attention (see window_attention).

    cache_kv: (k, v): this layer's cache, k [B, H, Dh, S_max] and v [B, H, S_max, Dh] (see
    cached_attention); the new keys/values are written in place at slots
    cache_slot:cache_slot + T and attention runs over the whole (masked) cache. One array
    per layer (not one [L, ...] array) lets attention read the cache without a per-step
    slice copy. With decode_attention='pallas' both are [B, H, S_max, Dh] and attention reads
    row b's slots cache_start_B[b]:cache_slot plus the new ones (flash_decode.attention;
    the mask is not used)."""
    cfg = self.cfg
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    w_qkv = self.param('qkv_kernel', _init(nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=(1, 2, 3)),
        ('embed', None, 'heads', 'kv')), (cfg.d_model, 3, cfg.n_heads, cfg.head_dim), pdt)
    dot, _ = _dot_dtypes(cfg)
    qkv = jnp.einsum('btd,dchk->btchk', x.astype(dot), w_qkv.astype(dot),
                     preferred_element_type=dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = rope(q, rope_cs)
    k = rope(k, rope_cs)
    new_kv = None
    if cache_kv is not None and cfg.decode_attention == 'pallas':
      ck, cv = cache_kv
      ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2).astype(ck.dtype),
                                        (0, 0, cache_slot, 0))
      cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype),
                                        (0, 0, cache_slot, 0))
      new_kv = (ck, cv)
      # the kernel reads the updated cache (not its new slots): reading the old one would
      # make XLA copy the cache to keep it alive past the in-place update
      out = flash_decode.attention(q[:, query_from:], k, v, ck, cv, cache_slot, cache_start_B,
                                   query_from)
    elif cache_kv is not None:
      ck, cv = cache_kv
      ck = jax.lax.dynamic_update_slice(ck, jnp.transpose(k, (0, 2, 3, 1)).astype(ck.dtype),
                                        (0, 0, 0, cache_slot))
      cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype),
                                        (0, 0, cache_slot, 0))
      new_kv = (ck, cv)
      # query_from > 0 (cache path only): inputs before it only write their keys/values
      out = cached_attention(q[:, query_from:], ck, cv, mask[:, query_from:])
    elif window is not None:
      out = window_attention(q, k, v, window)
    elif mask is None:
      # cuDNN's fused kernel for plain causal attention on GPU; masks go through XLA.
      impl = cfg.attention_impl
      if impl == 'auto':
        impl = 'cudnn' if jax.default_backend() == 'gpu' and dt == jnp.bfloat16 else 'xla'
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    else:
      impl = 'xla' if cfg.attention_impl == 'auto' else cfg.attention_impl
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
    w_out = self.param('out_kernel', _init(nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=(0, 1), out_axis=2),
        ('heads', 'kv', 'embed')), (cfg.n_heads, cfg.head_dim, cfg.d_model), pdt)
    out = jnp.einsum('bthk,hkd->btd', out.astype(dot), w_out.astype(dot),
                     preferred_element_type=dt)
    return out, new_kv


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, rope_cs, mask, cache_kv=None, cache_slot=None, train=False,
               window=None, query_from: int = 0, cache_start_B=None):
    """query_from > 0 (cached decoding): returns only positions query_from: -- the last
    block of a step whose earlier inputs are needed only as keys/values."""
    cfg = self.cfg
    h, new_kv = Attention(cfg, name='attn')(
        LayerNorm(cfg, name='ln1')(x).astype(DTYPES[cfg.dtype]), rope_cs, mask,
        cache_kv, cache_slot, window, query_from, cache_start_B)
    h = nn.Dropout(cfg.dropout)(h, deterministic=not train)
    x = x[:, query_from:] + h.astype(x.dtype)
    h = Mlp(cfg, name='mlp')(LayerNorm(cfg, name='ln2')(x).astype(DTYPES[cfg.dtype]))
    h = nn.Dropout(cfg.dropout)(h, deterministic=not train)
    x = x + h.astype(x.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


class NoiseEncoder(nn.Module):
  """h = W_c [sinus(u); sinus(tau)] + b_c; h = h + MLP(LayerNorm(h)), all in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, u_BxH, tau_B):
    cfg = self.cfg
    feats = jnp.concatenate(
        [sinusoid(u_BxH, cfg.d_model, cfg.noise_freq_scale),
         jnp.broadcast_to(sinusoid(tau_B, cfg.d_model)[:, None], u_BxH.shape + (cfg.d_model,))],
        axis=-1)
    h = nn.Dense(cfg.d_model, dtype=jnp.float32, param_dtype=jnp.float32, name='proj',
                 precision=jax.lax.Precision.HIGHEST,
                 kernel_init=_init(nn.initializers.xavier_uniform(), (None, 'embed')),
                 bias_init=_init(nn.initializers.zeros, ('embed',)))(feats)
    return h + Mlp(cfg, dtype=jnp.float32, name='mlp')(LayerNorm(cfg, name='ln')(h))


class Transformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, mask_BxQxS=None, *, hint_u_BxH=None,
               hint_pos_BxH=None, tau_B=None, cache=None, cache_slot=None,
               logits_from: int = 0, train: bool = False, window=None, hint_emb_BxHxD=None,
               rope_cs=None, cache_start_B=None):
    """Returns (logits [B, Q - logits_from, V] float32, new cache or None).

    hint_emb_BxHxD: hint embeddings already computed by encode_noise (the decoding loop
    encodes the noise of a whole generation at once); replaces hint_u_BxH and tau_B.
    rope_cs: the inputs' RoPE (cos, sin) [B, Q, head_dim / 2], gathered by the decoding loop
    from a table made once per generation (computed here from the positions otherwise: XLA
    fuses cos/sin into every consumer and re-evaluates them per head, layer and cache write,
    ~10% of a CPU decoding step).

    mask_BxQxS=None means plain causal attention over the Q = T + H inputs, unless
    window=(N, A, H) selects the window layout's structured attention.
    cache = init_cache's {'k': L x [B, H, Dh, S_max], 'v': L x [B, H, S_max, Dh]}; inputs
    are written at cache_slot. cache_start_B: row b's first valid cache slot (its left
    padding), needed by decode_attention='pallas', which reads slots cache_start_B:cache_slot
    instead of masking the whole cache.
    """
    cfg = self.cfg
    dt, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pdt, dtype=jnp.float32,
                     name='embed',
                     embedding_init=_init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    x = embed(tokens_BxT)
    positions = positions_BxT
    if hint_emb_BxHxD is not None:
      x = jnp.concatenate([x, hint_emb_BxHxD.astype(x.dtype)], axis=1)
      positions = jnp.concatenate([positions, hint_pos_BxH], axis=1)
    elif hint_u_BxH is not None:
      if not cfg.pflm:
        raise ValueError('hint noise was given to a model without a noise encoder '
                         '(ModelConfig.pflm=False)')
      if tau_B is None:
        tau_B = jnp.ones(hint_u_BxH.shape[:1], jnp.float32)
      hints = NoiseEncoder(cfg, name='noise_encoder')(hint_u_BxH, tau_B)
      x = jnp.concatenate([x, hints], axis=1)
      positions = jnp.concatenate([positions, hint_pos_BxH], axis=1)
    elif cfg.pflm and self.is_initializing():
      NoiseEncoder(cfg, name='noise_encoder')(jnp.zeros((1, 1)), jnp.ones((1,)))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if cache is not None and mask_BxQxS is None:
      raise ValueError('decoding with a cache needs an explicit [B, Q, S_max] mask')
    if cache is not None and cfg.decode_attention == 'pallas' and cache_start_B is None:
      raise ValueError("decode_attention='pallas' needs cache_start_B (each row's first slot)")
    if rope_cs is None:
      rope_cs = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
    new_k, new_v = [], []
    for layer in range(cfg.n_layers):
      kv = None if cache is None else (cache['k'][layer], cache['v'][layer])
      # with a cache, the last block skips the inputs whose logits are not wanted (the
      # tokens re-fed by a PFLM step, a prefill): their keys/values are all that is needed
      last_from = logits_from if (cache is not None and layer == cfg.n_layers - 1) else 0
      x, kv = Block(cfg, name=f'block_{layer}')(x, rope_cs, mask_BxQxS, kv, cache_slot,
                                                 train, window, last_from, cache_start_B)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    if cache is None:
      x = x[:, logits_from:]
    x = LayerNorm(cfg, name='ln_f')(x)
    logits = _dense(cfg, cfg.vocab_size, 'head', ('embed', 'vocab'), ('vocab',),
                    kernel_init=nn.initializers.zeros)(x.astype(_dot_dtypes(cfg)[0]))
    logits = logits.astype(jnp.float32)
    if cfg.never_emit_ids:
      blocked = np.zeros((cfg.vocab_size,), bool)
      blocked[list(cfg.never_emit_ids)] = True
      logits = jnp.where(blocked, NEG_INF, logits)
    new_cache = None if cache is None else {'k': tuple(new_k), 'v': tuple(new_v)}
    return logits, new_cache


def encode_noise(cfg: ModelConfig, params, u_BxH, tau_B) -> jax.Array:
  """Hint embeddings [B, H, D] of a PFLM's noise encoder, outside a forward pass."""
  return NoiseEncoder(cfg).apply({'params': params['noise_encoder']}, u_BxH, tau_B)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """{'k': n_layers x [B, n_heads, head_dim, length], 'v': n_layers x [B, n_heads, length,
  head_dim]} (layouts chosen for the decode-time products, see cached_attention); with
  decode_attention='pallas' keys are [B, n_heads, length, head_dim] too (the kernel's)."""
  dtype = dtype or DTYPES[cfg.dtype]
  v_shape = (batch, cfg.n_heads, length, cfg.head_dim)
  k_shape = v_shape if cfg.decode_attention == 'pallas' else (batch, cfg.n_heads,
                                                              cfg.head_dim, length)
  return {'k': tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.n_layers)),
          'v': tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.n_layers))}


def grow_cache(cache: dict, length: int) -> dict:
  """The cache (decode_attention='xla' layout) with its slot axis zero-padded to `length`."""
  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)
  return {'k': tuple(pad(x, 3) for x in cache['k']), 'v': tuple(pad(x, 2) for x in cache['v'])}


def cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
  return 2 * cfg.n_layers * batch * length * cfg.d_model * jnp.dtype(DTYPES[cfg.dtype]).itemsize


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def model_config(cfg, vocab_size: int, never_emit_ids=(), pflm: bool = False) -> ModelConfig:
  m = cfg.model
  return ModelConfig(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                     n_heads=m.n_heads, mlp_ratio=m.mlp_ratio,
                     max_seq_len=m.max_seq_len if m.max_seq_len > 0 else cfg.data.seq_len,
                     rope_base=m.rope_base, dtype=m.dtype, param_dtype=m.param_dtype,
                     dot_dtype=m.dot_dtype,
                     dropout=m.dropout, never_emit_ids=tuple(int(i) for i in never_emit_ids),
                     attention_impl=m.attention_impl, pflm=pflm,
                     noise_freq_scale=m.noise_freq_scale)
