"""The Transformer backbone shared by the AR teacher and the push-forward student.

design.md 2.1: untied token embedding, pre-LN blocks with bias-free fused QKV / output
projections, RoPE (rotate-half) on q and k, a tanh-GELU MLP with biases, scale-only
LayerNorm in float32, and a zero-initialised output head with bias whose logits are
computed with a float32 result whatever the compute dtype. With `pflm=True` a noise
encoder (design.md 2.2) turns (u, tau) into hint embeddings.

The model is described by kforcing_jax.models.arch's ArchConfig (what the weights mean)
and ExecConfig (how a run computes with them).
The module's entry points are `forward` (causal), `window_forward` (the window layouts of
kforcing_jax.layouts), `decode_step` (one step over an explicit KV cache) and
`encode_noise`; each picks its attention strategy (kforcing_jax.attention) from the
resolved ExecConfig. Parameters carry logical axis names (kforcing_jax.sharding).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models.arch import ArchConfig, ExecConfig

NEG_INF = attn_lib.NEG_INF


def build(arch: ArchConfig, exe: ExecConfig | None = None) -> Transformer:
  """The model module with its execution choices resolved for this backend."""
  return Transformer(arch, (exe or ExecConfig()).resolved())


def _init(init_fn, axes):
  return nn.with_logical_partitioning(init_fn, axes)


def _dense(exe: ExecConfig, features: int, kernel_axes, bias_axes, name=None, dtype=None):
  """Dense with `exe`'s operand dtype and compute-dtype results (dtype overrides both)."""
  operand, result = (dtype, dtype) if dtype else (exe.operand, exe.compute)
  extra = {}
  if operand != result:  # e.g. bf16 operands with float32 results
    extra['dot_general'] = functools.partial(jax.lax.dot_general, preferred_element_type=result)
  return nn.Dense(features, dtype=operand, param_dtype=exe.params, name=name,
                  kernel_init=_init(nn.initializers.xavier_uniform(), kernel_axes),
                  bias_init=_init(nn.initializers.zeros, bias_axes), **extra)


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


class LayerNorm(nn.Module):
  exe: ExecConfig
  use_bias: bool = False  # the backbone's are scale-only; the released noise encoder's not

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=1e-5, use_bias=self.use_bias, dtype=jnp.float32,
                        param_dtype=self.exe.params,
                        scale_init=_init(nn.initializers.ones, ('embed',)),
                        bias_init=_init(nn.initializers.zeros, ('embed',)))(
                            x.astype(jnp.float32))


class Mlp(nn.Module):
  arch: ArchConfig
  exe: ExecConfig
  dtype: Any = None  # overrides the exec dtypes (the noise encoder computes in float32)
  exact_gelu: bool = False  # erf GELU (the released noise encoder); else tanh (backbone)

  @nn.compact
  def __call__(self, x):
    a = self.arch
    h = _dense(self.exe, a.mlp_ratio * a.d_model, ('embed', 'mlp'), ('mlp',), 'fc_in',
               self.dtype)(x)
    h = nn.gelu(h, approximate=not self.exact_gelu)
    return _dense(self.exe, a.d_model, ('mlp', 'embed'), ('embed',), 'fc_out', self.dtype)(h)


class Attention(nn.Module):
  arch: ArchConfig
  exe: ExecConfig

  @nn.compact
  def __call__(self, x, rope_cs, attend, kv=None, query_from: int = 0):
    """rope_cs: the inputs' RoPE (cos, sin); attend: a kforcing_jax.attention strategy;
    kv: this layer's cache (Cached strategies). Returns (out, new kv or None)."""
    a, exe = self.arch, self.exe
    w_qkv = self.param('qkv_kernel', _init(nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=(1, 2, 3)),
        ('embed', None, 'heads', 'kv')), (a.d_model, 3, a.n_heads, a.head_dim), exe.params)
    qkv = jnp.einsum('btd,dchk->btchk', x.astype(exe.operand), w_qkv.astype(exe.operand),
                     preferred_element_type=exe.compute)
    q, k, v = rope(qkv[:, :, 0], rope_cs), rope(qkv[:, :, 1], rope_cs), qkv[:, :, 2]
    out, new_kv = attend(q, k, v, kv, query_from)
    w_out = self.param('out_kernel', _init(nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=(0, 1), out_axis=2),
        ('heads', 'kv', 'embed')), (a.n_heads, a.head_dim, a.d_model), exe.params)
    out = jnp.einsum('bthk,hkd->btd', out.astype(exe.operand), w_out.astype(exe.operand),
                     preferred_element_type=exe.compute)
    return out, new_kv


class Block(nn.Module):
  arch: ArchConfig
  exe: ExecConfig

  @nn.compact
  def __call__(self, x, rope_cs, attend, kv=None, train: bool = False, query_from: int = 0):
    """query_from > 0 (decoding): returns only positions query_from: -- the last block of
    a step whose earlier inputs are needed only as keys/values."""
    a, exe = self.arch, self.exe
    h, new_kv = Attention(a, exe, name='attn')(
        LayerNorm(exe, name='ln1')(x).astype(exe.compute), rope_cs, attend, kv, query_from)
    h = nn.Dropout(exe.dropout)(h, deterministic=not train)
    x = x[:, query_from:] + h.astype(x.dtype)
    h = Mlp(a, exe, name='mlp')(LayerNorm(exe, name='ln2')(x).astype(exe.compute))
    h = nn.Dropout(exe.dropout)(h, deterministic=not train)
    x = x + h.astype(x.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


class Head(nn.Module):
  """LayerNorm'd features -> logits [.., V]: operands in the exec operand dtype, a float32
  result and a float32 bias whatever the compute dtype (the inverse-CDF targets, the loss
  and the evaluators read these logits)."""
  arch: ArchConfig
  exe: ExecConfig

  @nn.compact
  def __call__(self, x):
    a, exe = self.arch, self.exe
    kernel = self.param('kernel', _init(nn.initializers.zeros, ('embed', 'vocab')),
                        (a.d_model, a.vocab_size), exe.params)
    bias = self.param('bias', _init(nn.initializers.zeros, ('vocab',)), (a.vocab_size,),
                      exe.params)
    logits = jnp.einsum('btd,dv->btv', x.astype(exe.operand), kernel.astype(exe.operand),
                        preferred_element_type=jnp.float32)
    return logits + bias.astype(jnp.float32)


class NoiseEncoder(nn.Module):
  """h = W_c [sinus(u); sinus(tau)] + b_c; h = h + MLP(LayerNorm(h)), all in float32;
  arch.noise_encoder picks the LayerNorm's bias and the MLP's GELU (NOISE_ENCODERS)."""
  arch: ArchConfig
  exe: ExecConfig

  @nn.compact
  def __call__(self, u_BxH, tau_B):
    a = self.arch
    feats = jnp.concatenate(
        [sinusoid(u_BxH, a.d_model, a.noise_freq_scale),
         jnp.broadcast_to(sinusoid(tau_B, a.d_model)[:, None], u_BxH.shape + (a.d_model,))],
        axis=-1)
    h = nn.Dense(a.d_model, dtype=jnp.float32, param_dtype=jnp.float32, name='proj',
                 precision=jax.lax.Precision.HIGHEST,
                 kernel_init=_init(nn.initializers.xavier_uniform(), (None, 'embed')),
                 bias_init=_init(nn.initializers.zeros, ('embed',)))(feats)
    released = a.noise_encoder == 'released'
    return h + Mlp(a, self.exe, dtype=jnp.float32, exact_gelu=released, name='mlp')(
        LayerNorm(self.exe, use_bias=released, name='ln')(h))


class Transformer(nn.Module):
  """Sequence = [token embeddings (T) | hint embeddings (H)]; build it with `build`."""
  arch: ArchConfig
  exe: ExecConfig

  def setup(self):
    a, exe = self.arch, self.exe
    if 'auto' in (exe.attention_impl, exe.cache_products):
      raise ValueError('Transformer needs a resolved ExecConfig: use model.build(arch, exe)')
    self.embed = nn.Embed(a.vocab_size, a.d_model, param_dtype=exe.params, dtype=jnp.float32,
                          embedding_init=_init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    for layer in range(a.n_layers):
      setattr(self, f'block_{layer}', Block(a, exe))
    self.ln_f = LayerNorm(exe)
    self.head = Head(a, exe)
    if a.pflm:
      self.noise_encoder = NoiseEncoder(a, exe)

  # ---- entry points ----------------------------------------------------------------------
  def forward(self, tokens_BxT, positions_BxT, *, train: bool = False):
    """Causal next-token logits [B, T, V] float32."""
    x = self.embed(tokens_BxT)
    return self._backbone(x, self._rope(positions_BxT), attn_lib.Causal(self.exe.attention_impl),
                          train=train)[0]

  def window_forward(self, tokens_BxT, positions_BxT, window: tuple[int, int, int], *,
                     hint_u_BxH=None, hint_pos_BxH=None, tau_B=None, logits_from: int = 0,
                     dense_mask_BxQxQ=None, train: bool = False):
    """Logits [B, Q - logits_from, V] of a window layout (kforcing_jax.layouts): tokens
    then hints from (u, tau) at hint_pos; dense_mask_BxQxQ runs the same layout through an
    explicit mask (the reference the structured attention is tested against)."""
    x = self.embed(tokens_BxT)
    positions = positions_BxT
    if hint_u_BxH is not None:
      if tau_B is None:
        tau_B = jnp.ones(hint_u_BxH.shape[:1], jnp.float32)
      x = jnp.concatenate([x, self.encode_noise(hint_u_BxH, tau_B)], axis=1)
      positions = jnp.concatenate([positions, hint_pos_BxH], axis=1)
    attend = (attn_lib.Masked(dense_mask_BxQxQ) if dense_mask_BxQxQ is not None else
              attn_lib.Window(window) if window[1] + window[2] else
              attn_lib.Causal(self.exe.attention_impl))
    logits, _ = self._backbone(x, self._rope(positions), attend, train=train)
    return logits[:, logits_from:]

  def decode_step(self, tokens_BxT, cache, attend: attn_lib.Cached, rope_cs, *,
                  hints_BxHxD=None, logits_from: int = 0):
    """One decoding step: [tokens | hint embeddings] written into `cache` (init_cache's
    {'k': L x .., 'v': L x ..}) by the Cached strategy `attend`; rope_cs: the inputs' RoPE
    (cos, sin) [B, T + H, head_dim / 2]. Returns (logits [B, T + H - logits_from, V], new
    cache); the last block skips the inputs before logits_from (they only write K/V)."""
    x = self.embed(tokens_BxT)
    if hints_BxHxD is not None:
      x = jnp.concatenate([x, hints_BxHxD.astype(x.dtype)], axis=1)
    return self._backbone(x, rope_cs, attend, cache=cache, last_from=logits_from)

  def encode_noise(self, u_BxH, tau_B):
    """Hint embeddings [B, H, D] float32 of a PFLM's noise encoder."""
    if not self.arch.pflm:
      raise ValueError('hint noise was given to a model without a noise encoder '
                       '(ArchConfig.pflm=False)')
    return self.noise_encoder(u_BxH, tau_B)

  def init_all(self, tokens_BxT, positions_BxT):
    """Touches every parameter (model.init with method=Transformer.init_all)."""
    if self.arch.pflm:
      self.encode_noise(jnp.zeros((1, 1)), jnp.ones((1,)))
    return self.forward(tokens_BxT, positions_BxT)

  # ---- internals ---------------------------------------------------------------------------
  def _rope(self, positions_BxT):
    return rope_cos_sin(positions_BxT, self.arch.head_dim, self.arch.rope_base)

  def _backbone(self, x, rope_cs, attend, *, cache=None, last_from: int = 0,
                train: bool = False):
    a = self.arch
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    new_k, new_v = [], []
    for layer in range(a.n_layers):
      kv = None if cache is None else (cache['k'][layer], cache['v'][layer])
      query_from = last_from if layer == a.n_layers - 1 else 0
      x, kv = getattr(self, f'block_{layer}')(x, rope_cs, attend, kv, train, query_from)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    logits = self.head(self.ln_f(x))
    if a.never_emit_ids:
      blocked = np.zeros((a.vocab_size,), bool)
      blocked[list(a.never_emit_ids)] = True
      logits = jnp.where(blocked, NEG_INF, logits)
    return logits, (None if cache is None else {'k': tuple(new_k), 'v': tuple(new_v)})


def init_fn(model: Transformer, seq_len: int = 8):
  """rng -> boxed parameters (LogicallyPartitioned leaves) of `model`."""
  def init_params(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens, tokens, method=Transformer.init_all)['params']
  return init_params


def init_cache(arch: ArchConfig, exe: ExecConfig, batch: int, length: int) -> dict:
  """{'k': n_layers x [B, n_heads, head_dim, length], 'v': n_layers x [B, n_heads, length,
  head_dim]} in the compute dtype (layouts chosen for the decode-time products, see
  attention.cached_attention); with decode_attention='pallas' keys are [B, n_heads,
  length, head_dim] too (the kernel's)."""
  v_shape = (batch, arch.n_heads, length, arch.head_dim)
  k_shape = v_shape if exe.decode_attention == 'pallas' else (batch, arch.n_heads,
                                                              arch.head_dim, length)
  return {'k': tuple(jnp.zeros(k_shape, exe.compute) for _ in range(arch.n_layers)),
          'v': tuple(jnp.zeros(v_shape, exe.compute) for _ in range(arch.n_layers))}


def grow_cache(cache: dict, length: int) -> dict:
  """The cache (decode_attention='xla' layout) with its slot axis zero-padded to `length`."""
  def pad(x, axis):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths)
  return {'k': tuple(pad(x, 3) for x in cache['k']), 'v': tuple(pad(x, 2) for x in cache['v'])}


def cache_bytes(arch: ArchConfig, exe: ExecConfig, batch: int, length: int) -> int:
  return 2 * arch.n_layers * batch * length * arch.d_model * jnp.dtype(exe.compute).itemsize


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
