"""The Transformer backbone shared by the AR teacher and the push-forward student.

docs/design.md section 2.1 (ArchConfig's defaults): untied token embedding, pre-LN blocks with
bias-free fused QKV / output projections, RoPE (rotate-half) on q and k, a tanh-GELU MLP
with biases, scale-only LayerNorm in float32, and a zero-initialised output head with bias
whose logits are computed with a float32 result whatever the compute dtype. ArchConfig's
version-4 fields make the same modules Llama-family models: RMSNorm, gated MLPs (SwiGLU),
grouped-query attention, q/k/v/output biases, Qwen3's q/k norms, tied embeddings, scaled
RoPE. With `pflm=True` a noise encoder (docs/design.md section 2.2) turns (u, tau) into
hint embeddings.

The model is described by kforcing_jax.models.arch's ArchConfig (what the weights mean)
and ExecConfig (how a run computes with them).
The module's entry points are `forward` (causal), `window_forward` (the window layouts of
kforcing_jax.layouts), `decode_step` (one step over an explicit KV cache) and
`encode_noise`; each picks its attention strategy (kforcing_jax.attention) from the
resolved ExecConfig. Parameters carry logical axis names (kforcing_jax.sharding).
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models import quantize
from kforcing_jax.models.arch import ACTIVATIONS, ArchConfig, ExecConfig

NEG_INF = attn_lib.NEG_INF


def build(arch: ArchConfig, exe: ExecConfig | None = None) -> Transformer:
  """The model module with its execution choices resolved for this backend."""
  return Transformer(arch, (exe or ExecConfig()).resolved())


def _init(init_fn, axes):
  return nn.with_logical_partitioning(init_fn, axes)


def _weight(module: nn.Module, name: str, init, shape, dtype):
  """A weight product's kernel: its QuantizedKernel where the model decodes on int8 weights
  (the 'quantized' collection: quantize.variables), else the parameter."""
  if module.has_variable(quantize.COLLECTION, name):
    return module.get_variable(quantize.COLLECTION, name)
  return module.param(name, init, shape, dtype)


def _product(exe: ExecConfig, spec: str, x, kernel, result=None):
  """einsum(spec, x, kernel) with exe's operand dtype and a `result`-dtype (default: the
  compute dtype) result; an int8 QuantizedKernel multiplies through quantize.product."""
  result = exe.compute if result is None else result
  if quantize.is_quantized(kernel):
    return quantize.product(x, kernel, exe.int8_products).astype(result)
  return jnp.einsum(spec, x.astype(exe.operand), kernel.astype(exe.operand),
                    preferred_element_type=result)


class Dense(nn.Module):
  """nn.Dense's parameters (kernel [in, out], bias [out]) and arithmetic: exe's operand dtype
  and compute-dtype results (dtype overrides both); the kernel may be int8 (_weight)."""
  exe: ExecConfig
  features: int
  kernel_axes: tuple
  bias_axes: tuple
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    exe = self.exe
    operand, result = (self.dtype, self.dtype) if self.dtype else (exe.operand, exe.compute)
    kernel = _weight(self, 'kernel', _init(nn.initializers.xavier_uniform(), self.kernel_axes),
                     (x.shape[-1], self.features), exe.params)
    if quantize.is_quantized(kernel):
      y = quantize.product(x, kernel, exe.int8_products).astype(result)
    else:
      y = jax.lax.dot_general(x.astype(operand), kernel.astype(operand),
                              (((x.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=None if operand == result else result)
    if self.use_bias:
      bias = self.param('bias', _init(nn.initializers.zeros, self.bias_axes), (self.features,),
                        exe.params)
      y = y + bias.astype(operand)
    return y


def _dense(exe: ExecConfig, features: int, kernel_axes, bias_axes, name=None, dtype=None,
           use_bias: bool = True):
  return Dense(exe, features, kernel_axes, bias_axes, use_bias, dtype, name=name)


def rope_inv_freq(head_dim: int, base: float, scaling: tuple = ()) -> np.ndarray:
  """RoPE's inverse frequencies [head_dim / 2] float32, with ArchConfig.rope_scaling applied
  in float32 as transformers computes them (its linear and llama3 rope types)."""
  inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if not scaling:
    return inv_freq
  kind, factor = scaling[0], scaling[1]
  if kind == 'linear':
    return (inv_freq / factor).astype(np.float32)
  low, high, original = scaling[2:]
  wavelen = 2 * math.pi / inv_freq
  # long wavelengths (beyond original / low) are slowed down by `factor`, short ones
  # (below original / high) kept, the ones between interpolated smoothly
  scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  between = ~(wavelen < original / high) & ~(wavelen > original / low)
  return np.where(between, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, base: float, scaling: tuple = ()):
  """Rotate-half RoPE's (cos, sin), each [B, T, head_dim / 2] float32, for every layer."""
  angles_BxTxF = (positions_BxT.astype(jnp.float32)[..., None] *
                  rope_inv_freq(head_dim, base, scaling))
  return jnp.cos(angles_BxTxF), jnp.sin(angles_BxTxF)


def arch_rope_cos_sin(arch: ArchConfig, positions_BxT: jax.Array):
  """rope_cos_sin with the model's head dim, base and scaling: the rope_cs argument of
  Transformer.decode_step."""
  return rope_cos_sin(positions_BxT, arch.head_dim, arch.rope_base, arch.rope_scaling)


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
  """Float32 LayerNorm: scale-only (the backbone's) or with a bias (the released noise
  encoder's). Its parameters live under <name>/LayerNorm_0/ (the checkpoints' path)."""
  exe: ExecConfig
  eps: float = 1e-5
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=self.eps, use_bias=self.use_bias, dtype=jnp.float32,
                        param_dtype=self.exe.params,
                        scale_init=_init(nn.initializers.ones, ('embed',)),
                        bias_init=_init(nn.initializers.zeros, ('embed',)))(
                            x.astype(jnp.float32))


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32 (<name>/scale)."""
  exe: ExecConfig
  eps: float = 1e-5
  axis_name: str = 'embed'  # logical axis of the scale ('kv' for the per-head q/k norms)

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', _init(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.exe.params)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return x * scale.astype(jnp.float32)


NORMS = {'layernorm': LayerNorm, 'rmsnorm': RMSNorm}  # ArchConfig.norm


def make_norm(arch: ArchConfig, exe: ExecConfig, **kw) -> nn.Module:
  return NORMS[arch.norm](exe, arch.norm_eps, **kw)


class Mlp(nn.Module):
  """fc_out(prod_i act_i(fc_in_i(x))): one input projection per activation (named fc_in
  when there is one), e.g. ('gelu_tanh',) for the paper's MLP, ('silu', 'linear') for
  SwiGLU's gate and up projections."""
  exe: ExecConfig
  width: int
  activations: tuple[str, ...]
  use_bias: bool = True
  dtype: Any = None  # overrides the exec dtypes (the noise encoder computes in float32)

  @nn.compact
  def __call__(self, x):
    acts = self.activations
    names = ['fc_in'] if len(acts) == 1 else [f'fc_in_{i}' for i in range(len(acts))]
    h = functools.reduce(operator.mul, [
        ACTIVATIONS[act](_dense(self.exe, self.width, ('embed', 'mlp'), ('mlp',), name,
                                self.dtype, self.use_bias)(x))
        for act, name in zip(acts, names)])
    return _dense(self.exe, x.shape[-1], ('mlp', 'embed'), ('embed',), 'fc_out', self.dtype,
                  self.use_bias)(h)


class Attention(nn.Module):
  """Grouped-query attention: n_heads query heads, n_kv_heads key/value heads (query head
  h reads KV head h // (n_heads / n_kv_heads)). One fused qkv projection when the head
  counts are equal, else q and kv projections; RoPE after the optional q/k norms."""
  arch: ArchConfig
  exe: ExecConfig

  def _project(self, x, name: str, shape: tuple[int, ...], axes: tuple, bias: bool):
    """x [B, T, D] through <name>_kernel [D, *shape] (+ <name>_bias [*shape])."""
    exe = self.exe
    kernel = _weight(self, f'{name}_kernel', _init(nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=tuple(range(1, len(shape) + 1))),
        ('embed',) + axes), (x.shape[-1],) + shape, exe.params)
    dims = 'chk'[-len(shape):]
    y = _product(exe, f'btd,d{dims}->bt{dims}', x, kernel)
    if bias:
      y = y + self.param(f'{name}_bias', _init(nn.initializers.zeros, axes), shape,
                         exe.params).astype(y.dtype)
    return y

  @nn.compact
  def __call__(self, x, rope_cs, attend, kv=None, query_from: int = 0):
    """rope_cs: the inputs' RoPE (cos, sin); attend: a kforcing_jax.attention strategy;
    kv: this layer's cache (Cached strategies). Returns (out, new kv or None)."""
    a, exe = self.arch, self.exe
    H, Hkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
    if Hkv == H:
      qkv = self._project(x, 'qkv', (3, H, hd), (None, 'heads', 'kv'), a.qkv_bias)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q = self._project(x, 'q', (H, hd), ('heads', 'kv'), a.qkv_bias)
      kv_new = self._project(x, 'kv', (2, Hkv, hd), (None, 'kv_heads', 'kv'), a.qkv_bias)
      k, v = kv_new[:, :, 0], kv_new[:, :, 1]
    if a.qk_norm:
      q = RMSNorm(exe, a.norm_eps, 'kv', name='q_norm')(q).astype(exe.compute)
      k = RMSNorm(exe, a.norm_eps, 'kv', name='k_norm')(k).astype(exe.compute)
    out, new_kv = attend(rope(q, rope_cs), rope(k, rope_cs), v, kv, query_from)
    w_out = _weight(self, 'out_kernel', _init(nn.initializers.variance_scaling(
        1.0, 'fan_avg', 'uniform', in_axis=(0, 1), out_axis=2),
        ('heads', 'kv', 'embed')), (H, hd, a.d_model), exe.params)
    out = _product(exe, 'bthk,hkd->btd', out, w_out)
    if a.out_bias:
      out = out + self.param('out_bias', _init(nn.initializers.zeros, ('embed',)),
                             (a.d_model,), exe.params).astype(out.dtype)
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
        make_norm(a, exe, name='ln1')(x).astype(exe.compute), rope_cs, attend, kv, query_from)
    h = nn.Dropout(exe.dropout)(h, deterministic=not train)
    x = x[:, query_from:] + h.astype(x.dtype)
    h = Mlp(exe, a.mlp_dim, a.mlp_activations, a.mlp_bias, name='mlp')(
        make_norm(a, exe, name='ln2')(x).astype(exe.compute))
    h = nn.Dropout(exe.dropout)(h, deterministic=not train)
    x = x + h.astype(x.dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), new_kv


class Head(nn.Module):
  """Normalised features -> logits [.., V]: operands in the exec operand dtype, a float32
  result and a float32 bias whatever the compute dtype (the inverse-CDF targets, the loss
  and the evaluators read these logits). With tie_embeddings the kernel is the embedding
  table [V, D] the caller passes; with int8 weights it is the head's own quantized kernel
  (quantize.quantize_params), tied or not."""
  arch: ArchConfig
  exe: ExecConfig

  @nn.compact
  def __call__(self, x, embedding_VxD=None):
    a, exe = self.arch, self.exe
    if self.has_variable(quantize.COLLECTION, 'kernel'):  # int8, tied or not
      logits = quantize.product(x, self.get_variable(quantize.COLLECTION, 'kernel'),
                                exe.int8_products)
    elif a.tie_embeddings:
      logits = _product(exe, 'btd,vd->btv', x, embedding_VxD, jnp.float32)
    else:
      kernel = self.param('kernel', _init(nn.initializers.zeros, ('embed', 'vocab')),
                          (a.d_model, a.vocab_size), exe.params)
      logits = _product(exe, 'btd,dv->btv', x, kernel, jnp.float32)
    if a.head_bias:
      logits = logits + self.param('bias', _init(nn.initializers.zeros, ('vocab',)),
                                   (a.vocab_size,), exe.params).astype(jnp.float32)
    return logits


class NoiseEncoder(nn.Module):
  """h = W_c [sinus(u); sinus(tau)] + b_c; h = h + MLP(LayerNorm(h)), all in float32;
  arch.noise_encoder picks the LayerNorm's bias and the MLP's GELU (NOISE_ENCODERS). The
  MLP (width mlp_ratio * d_model, with biases) and LayerNorm (eps 1e-5) are the encoder's
  own whatever the backbone's."""
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
    # the encoder's own MLP form whatever the backbone's
    mlp = Mlp(self.exe, a.mlp_ratio * a.d_model, ('gelu',) if released else ('gelu_tanh',),
              dtype=jnp.float32, name='mlp')
    return h + mlp(LayerNorm(self.exe, use_bias=released, name='ln')(h))


class Transformer(nn.Module):
  """Sequence = [token embeddings (T) | hint embeddings (H)]; build it with `build`."""
  arch: ArchConfig
  exe: ExecConfig

  def setup(self):
    a, exe = self.arch, self.exe
    if 'auto' in (exe.attention_impl, exe.cache_products, exe.int8_products):
      raise ValueError('Transformer needs a resolved ExecConfig: use model.build(arch, exe)')
    self.embed = nn.Embed(a.vocab_size, a.d_model, param_dtype=exe.params, dtype=jnp.float32,
                          embedding_init=_init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    for layer in range(a.n_layers):
      setattr(self, f'block_{layer}', Block(a, exe))
    self.ln_f = make_norm(a, exe)
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
    (cos, sin) [B, T + H, head_dim / 2] (arch_rope_cos_sin). Returns (logits [B, T + H - logits_from, V], new
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
    return arch_rope_cos_sin(self.arch, positions_BxT)

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
    logits = self.head(self.ln_f(x), self.embed.embedding if a.tie_embeddings else None)
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
  """{'k': n_layers x [B, n_kv_heads, head_dim, length], 'v': n_layers x [B, n_kv_heads,
  length, head_dim]} in the compute dtype (layouts chosen for the decode-time products, see
  attention.cached_attention); with decode_attention='pallas' keys are [B, n_kv_heads,
  length, head_dim] too (the kernel's)."""
  v_shape = (batch, arch.n_kv_heads, length, arch.head_dim)
  k_shape = v_shape if exe.decode_attention == 'pallas' else (batch, arch.n_kv_heads,
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
  """Bytes of init_cache(arch, exe, batch, length)."""
  return (2 * arch.n_layers * batch * length * arch.n_kv_heads * arch.head_dim *
          jnp.dtype(exe.compute).itemsize)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
