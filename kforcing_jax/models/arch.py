"""What a model's weights mean and how a run computes with them.

  ArchConfig  what the weights mean (shapes, vocabulary, RoPE base, noise encoder, the
              never-emitted ids); frozen, versioned, the only model config saved in
              checkpoints and exports;
  ExecConfig  how a run computes with them (dtypes, attention kernels, dropout), chosen
              when a trainer, engine or sampler is built.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kforcing_jax import errors

DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')  # ExecConfig.attention_impl
DECODE_ATTENTION = ('xla', 'pallas')  # ExecConfig.decode_attention
CACHE_PRODUCTS = ('auto', 'dot', 'reduce')  # ExecConfig.cache_products
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
