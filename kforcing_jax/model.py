"""The Transformer backbone shared by the AR teacher and the push-forward student.

design.md 2.1: untied token embedding, pre-LN blocks with bias-free fused QKV / output
projections, RoPE (rotate-half) on q and k, a tanh-GELU MLP with biases, scale-only
LayerNorm in float32, and a zero-initialised output head with bias whose logits are
computed with a float32 result whatever the compute dtype. With `pflm=True` a noise
encoder (design.md 2.2) turns (u, tau) into hint embeddings.

Two configs describe a model:
  ArchConfig  what the weights mean (shapes, vocabulary, RoPE base, noise encoder, the
              never-emitted ids); frozen, versioned, the only model config saved in
              checkpoints and exports;
  ExecConfig  how a run computes with them (dtypes, attention kernels, dropout), chosen
              when a trainer, engine or sampler is built.
The module's entry points are `forward` (causal), `window_forward` (the window layouts of
kforcing_jax.layouts), `decode_step` (one step over an explicit KV cache) and
`encode_noise`; each picks its attention strategy (kforcing_jax.attention) from the
resolved ExecConfig. Parameters carry logical axis names (kforcing_jax.sharding).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import attention as attn_lib
from kforcing_jax import errors

NEG_INF = attn_lib.NEG_INF
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')  # ExecConfig.attention_impl
DECODE_ATTENTION = ('xla', 'pallas')  # ExecConfig.decode_attention
CACHE_PRODUCTS = ('auto',) + attn_lib.CACHE_PRODUCTS  # ExecConfig.cache_products
ARCH_VERSION = 3
# ArchConfig.noise_encoder: 'released' is the released K-Forcing checkpoints' form (its
# LayerNorm has a bias, its MLP the exact erf GELU); 'scale_only_tanh' is the form that
# kforcing_jax wrote before architecture version 3 (scale-only LayerNorm, tanh GELU, as
# in the backbone).
NOISE_ENCODERS = ('released', 'scale_only_tanh')
# Fields of the first on-disk format (one ModelConfig for everything) that are execution
# settings, not architecture: dropped when such a checkpoint is read.
_V1_EXEC_FIELDS = ('dtype', 'param_dtype', 'dropout', 'attention_impl', 'dot_dtype',
                   'decode_attention')


class ArchitectureError(errors.UserError):
  pass


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    shown = ', '.join(repr(a) if a == '' else str(a) for a in allowed)
    raise ArchitectureError(f'{field}={value!r} is not allowed; allowed: {shown}')


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """What the weights mean. Saved in every checkpoint and export (see to_dict)."""
  vocab_size: int
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  mlp_ratio: int = 4
  max_seq_len: int = 1024  # longest sequence the model is trained and served at
  rope_base: float = 10000.0
  never_emit_ids: tuple[int, ...] = ()  # logits forced to NEG_INF
  pflm: bool = False  # adds the noise encoder (push-forward student)
  noise_freq_scale: float = 1.0  # multiplies the noise sinusoid's frequencies (1 = paper)
  noise_encoder: str = 'released'  # NOISE_ENCODERS (only read when pflm=True)
  version: int = ARCH_VERSION

  def __post_init__(self):
    for f in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'mlp_ratio', 'max_seq_len'):
      if int(getattr(self, f)) <= 0:
        raise ArchitectureError(f'model.{f} must be > 0, got {getattr(self, f)}')
    if self.d_model % self.n_heads or self.head_dim % 2:
      raise ArchitectureError(f'model.d_model={self.d_model} must divide by model.n_heads='
                              f'{self.n_heads} into an even head dim (RoPE)')
    _choice('model.noise_encoder', self.noise_encoder, NOISE_ENCODERS)
    if self.version != ARCH_VERSION:
      raise ArchitectureError(f'architecture version {self.version} is not known to this '
                              f'code (it reads versions 2 and {ARCH_VERSION} and the '
                              'unversioned first format)')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  def backbone_shape(self) -> dict:
    return {k: getattr(self, k) for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads',
                                           'mlp_ratio')}

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out['never_emit_ids'] = list(self.never_emit_ids)
    return out

  @classmethod
  def from_dict(cls, d: dict) -> ArchConfig:
    """Reads to_dict's output, version 2's (no noise_encoder field: its PFLMs have the
    'scale_only_tanh' encoder), or the first format's ModelConfig dict (no 'version': its
    execution fields are dropped, its encoder as version 2's); an unknown field is an
    error naming it."""
    d = dict(d)
    if 'version' not in d:
      for f in _V1_EXEC_FIELDS:
        d.pop(f, None)
      d['version'] = 2
    if d['version'] == 2:
      if 'noise_encoder' in d:
        raise ArchitectureError('an architecture of version 2 cannot name a noise_encoder '
                                '(the field came with version 3)')
      d['noise_encoder'] = 'scale_only_tanh'
      d['version'] = ARCH_VERSION
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ArchitectureError(f'the saved architecture has fields this code does not know: '
                              f'{", ".join(unknown)} (known: {", ".join(sorted(known))}); '
                              'it was written by a newer kforcing_jax')
    d['never_emit_ids'] = tuple(int(i) for i in d.get('never_emit_ids', ()))
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ExecConfig:
  """How a run computes (never saved with the weights)."""
  dtype: str = 'float32'  # compute dtype; LayerNorm, softmax and logits stay float32
  param_dtype: str = 'float32'
  # Operand dtype of the weight products ('' = dtype). 'bfloat16' with dtype 'float32':
  # bf16 operands, float32 results and float32 everything else -- the fast mixed mode of
  # CPUs with native bf16 dot instructions.
  dot_dtype: str = ''
  attention_impl: str = 'auto'  # full causal attention: auto (cuDNN on GPU for bf16) | xla | cudnn
  decode_attention: str = 'xla'  # cached attention: xla (masked, whole cache) | pallas
  cache_products: str = 'auto'  # xla cached attention: auto (reduce on CPU) | dot | reduce
  dropout: float = 0.0

  def __post_init__(self):
    _choice('dtype', self.dtype, tuple(DTYPES))
    _choice('param_dtype', self.param_dtype, tuple(DTYPES))
    _choice('dot_dtype', self.dot_dtype, ('',) + tuple(DTYPES))
    _choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _choice('decode_attention', self.decode_attention, DECODE_ATTENTION)
    _choice('cache_products', self.cache_products, CACHE_PRODUCTS)
    if not 0.0 <= self.dropout < 1.0:
      raise ArchitectureError(f'dropout must be in [0, 1), got {self.dropout}')

  def resolved(self, backend: str | None = None) -> ExecConfig:
    """The 'auto' choices made for `backend` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    impl = self.attention_impl
    if impl == 'auto':
      impl = 'cudnn' if backend == 'gpu' and self.dtype == 'bfloat16' else 'xla'
    products = self.cache_products
    if products == 'auto':
      products = 'reduce' if backend == 'cpu' else 'dot'
    return dataclasses.replace(self, attention_impl=impl, cache_products=products)

  @property
  def compute(self):
    return DTYPES[self.dtype]

  @property
  def params(self):
    return DTYPES[self.param_dtype]

  @property
  def operand(self):
    return DTYPES[self.dot_dtype or self.dtype]


def configs_from_run(cfg, vocab_size: int, never_emit_ids=(), pflm: bool = False):
  """(ArchConfig, ExecConfig) of a run config's `model` section: the one mapping."""
  m = cfg.model
  arch = ArchConfig(vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                    n_heads=m.n_heads, mlp_ratio=m.mlp_ratio,
                    max_seq_len=m.max_seq_len if m.max_seq_len > 0 else cfg.data.seq_len,
                    rope_base=m.rope_base, never_emit_ids=tuple(int(i) for i in never_emit_ids),
                    pflm=pflm, noise_freq_scale=m.noise_freq_scale,
                    noise_encoder=m.noise_encoder)
  exe = ExecConfig(dtype=m.dtype, param_dtype=m.param_dtype, dot_dtype=m.dot_dtype,
                   attention_impl=m.attention_impl, decode_attention=m.decode_attention,
                   cache_products=m.cache_products, dropout=m.dropout)
  return arch, exe


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
