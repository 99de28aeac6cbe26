"""What a model's weights mean and how a run computes with them.

  ArchConfig  what the weights mean (shapes, vocabulary, norms, MLP form, attention heads
              and biases, RoPE, noise encoder, the never-emitted ids); frozen,
              versioned, the only model config saved in checkpoints and exports;
  ExecConfig  how a run computes with them (dtypes, attention kernels, dropout), chosen
              when a trainer, engine or sampler is built.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kforcing_jax import errors
from kforcing_jax.kernels import cpu as cpu_kernels

DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')  # ExecConfig.attention_impl
DECODE_ATTENTION = ('xla', 'pallas')  # ExecConfig.decode_attention
CACHE_PRODUCTS = ('auto', 'dot', 'reduce', 'kernel')  # ExecConfig.cache_products
WEIGHTS = ('float', 'int8')  # ExecConfig.weights
INT8_PRODUCTS = ('auto', 'kernel', 'xla')  # ExecConfig.int8_products
ARCH_VERSION = 4
# ArchConfig.noise_encoder: 'released' is the released K-Forcing checkpoints' form (its
# LayerNorm has a bias, its MLP the exact erf GELU); 'scale_only_tanh' is the form that
# kforcing_jax wrote before architecture version 3 (scale-only LayerNorm, tanh GELU, as
# in the backbone).
NOISE_ENCODERS = ('released', 'scale_only_tanh')
# ArchConfig.readout: how a PFLM turns position i's logits into its token. 'argmax' is the
# paper's (the noise only enters through the encoder); 'inverse_cdf' reads the token as
# min{v : CDF(v) >= u_i} of the position's softmax, so the logits are a distribution over
# the next token given the context and the noise of the earlier positions: the student
# learns the teacher's distributions (objective 'on_policy_kl') instead of where each
# token's CDF interval begins and ends.
READOUTS = ('argmax', 'inverse_cdf')
NORMS = ('layernorm', 'rmsnorm')  # ArchConfig.norm
# ArchConfig.mlp_activations: one per input projection of the MLP; their outputs are
# multiplied ('linear' is the identity: ('silu', 'linear') is SwiGLU's gate and up).
ACTIVATIONS = {
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
    'linear': lambda x: x,
}
# ArchConfig.rope_scaling kinds and the numbers that follow the kind (transformers'
# rope_parameters of the same names).
ROPE_SCALINGS = {
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
               'original_max_position_embeddings'),
}
# Fields that came with version 4; older files get their defaults (the earlier model).
V4_FIELDS = ('n_kv_heads', 'head_dim', 'mlp_dim', 'mlp_activations', 'mlp_bias', 'norm',
             'norm_eps', 'qkv_bias', 'out_bias', 'qk_norm', 'tie_embeddings', 'head_bias',
             'rope_scaling')
# Fields that say nothing about the backbone's computation (ArchConfig.backbone).
_NOT_BACKBONE = ('pflm', 'noise_freq_scale', 'noise_encoder', 'readout', 'never_emit_ids',
                 'max_seq_len', 'version')
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


def _rope_scaling(value) -> tuple:
  """model.rope_scaling as a tuple of the kind and its numbers (typed), or an error."""
  value = tuple(value)
  if not value:
    return ()
  kind, numbers = value[0], value[1:]
  _choice('model.rope_scaling[0]', kind, tuple(ROPE_SCALINGS))
  names = ROPE_SCALINGS[kind]
  if len(numbers) != len(names):
    raise ArchitectureError(f'model.rope_scaling={list(value)}: {kind!r} takes '
                            f'({kind!r}, {", ".join(names)})')
  try:
    typed = tuple(int(x) if n == 'original_max_position_embeddings' else float(x)
                  for n, x in zip(names, numbers))
  except (TypeError, ValueError):
    raise ArchitectureError(f'model.rope_scaling={list(value)}: {", ".join(names)} must be '
                            'numbers') from None
  bad = [f'{n}={x}' for n, x in zip(names, typed) if x <= 0]
  if bad:
    raise ArchitectureError(f'model.rope_scaling: {", ".join(bad)} must be > 0')
  if kind == 'llama3' and typed[1] == typed[2]:
    raise ArchitectureError('model.rope_scaling: llama3 low_freq_factor and high_freq_factor '
                            'must differ')
  return (kind,) + typed


@dataclasses.dataclass(frozen=True)
class ArchConfig:
  """What the weights mean. Saved in every checkpoint and export (see to_dict).

  The defaults are the paper's backbone; the version-4 fields describe Llama-family
  models (Llama, SmolLM2, Qwen2/3, Mistral). n_kv_heads, head_dim and mlp_dim are
  resolved in __post_init__ (0 = derived), so they are always concrete ints."""
  vocab_size: int
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  mlp_ratio: int = 4  # MLP width when mlp_dim = 0; the noise encoder's MLP width always
  max_seq_len: int = 1024  # longest sequence the model is trained and served at
  rope_base: float = 10000.0  # RoPE theta
  never_emit_ids: tuple[int, ...] = ()  # logits forced to NEG_INF
  pflm: bool = False  # adds the noise encoder (push-forward student)
  noise_freq_scale: float = 1.0  # multiplies the noise sinusoid's frequencies (1 = paper)
  noise_encoder: str = 'released'  # NOISE_ENCODERS (only read when pflm=True)
  readout: str = 'argmax'  # READOUTS: a PFLM's token from its logits (only read when pflm)
  n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 -> n_heads
  head_dim: int = 0  # 0 -> d_model // n_heads
  mlp_dim: int = 0  # MLP hidden width; 0 -> mlp_ratio * d_model
  mlp_activations: tuple[str, ...] = ('gelu_tanh',)  # ACTIVATIONS, one per input projection
  mlp_bias: bool = True  # biases of the MLP's projections
  norm: str = 'layernorm'  # NORMS: scale-only LayerNorm | RMSNorm (both in float32)
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # q/k/v projection biases (Qwen2)
  out_bias: bool = False  # attention output projection bias
  qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3), eps = norm_eps
  tie_embeddings: bool = False  # the head multiplies by the embedding table
  head_bias: bool = True  # the head's bias
  # () | ('linear', factor) | ('llama3', factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings): inv_freq as transformers computes it
  rope_scaling: tuple = ()
  version: int = ARCH_VERSION

  def __post_init__(self):
    for f in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'mlp_ratio', 'max_seq_len'):
      if int(getattr(self, f)) <= 0:
        raise ArchitectureError(f'model.{f} must be > 0, got {getattr(self, f)}')
    for f in ('n_kv_heads', 'head_dim', 'mlp_dim'):
      if int(getattr(self, f)) < 0:
        raise ArchitectureError(f'model.{f} must be > 0 (or 0: derived), got '
                                f'{getattr(self, f)}')
    if self.version != ARCH_VERSION:
      raise ArchitectureError(f'architecture version {self.version} is not known to this '
                              f'code (it reads versions 2 to {ARCH_VERSION} and the '
                              'unversioned first format)')
    if not self.head_dim and self.d_model % self.n_heads:
      raise ArchitectureError(f'model.d_model={self.d_model} must divide by model.n_heads='
                              f'{self.n_heads} (or set model.head_dim)')
    resolved = {'n_kv_heads': int(self.n_kv_heads or self.n_heads),
                'head_dim': int(self.head_dim or self.d_model // self.n_heads),
                'mlp_dim': int(self.mlp_dim or self.mlp_ratio * self.d_model),
                'mlp_activations': (tuple(self.mlp_activations.split(','))
                                    if isinstance(self.mlp_activations, str) else
                                    tuple(self.mlp_activations)),
                'rope_scaling': _rope_scaling(self.rope_scaling),
                'never_emit_ids': tuple(int(i) for i in self.never_emit_ids)}
    for f, v in resolved.items():
      object.__setattr__(self, f, v)
    if self.head_dim % 2:
      raise ArchitectureError(f'model.head_dim={self.head_dim} must be even (RoPE rotates '
                              'its two halves)')
    if self.n_heads % self.n_kv_heads:
      raise ArchitectureError(f'model.n_kv_heads={self.n_kv_heads} must divide '
                              f'model.n_heads={self.n_heads}')
    if not self.mlp_activations:
      raise ArchitectureError('model.mlp_activations is empty: give one activation per MLP '
                              f'input projection; allowed: {", ".join(ACTIVATIONS)}')
    for act in self.mlp_activations:
      _choice('model.mlp_activations', act, tuple(ACTIVATIONS))
    _choice('model.norm', self.norm, NORMS)
    if not self.norm_eps > 0:
      raise ArchitectureError(f'model.norm_eps must be > 0, got {self.norm_eps}')
    _choice('model.noise_encoder', self.noise_encoder, NOISE_ENCODERS)
    _choice('model.readout', self.readout, READOUTS)

  @property
  def q_per_kv(self) -> int:
    """Query heads per key/value head (G): query head h reads KV head h // G."""
    return self.n_heads // self.n_kv_heads

  def backbone(self) -> dict:
    """What a student copied from this model's weights must share with it: every field
    but the noise encoder's, the never-emitted ids, the length and the version (values as
    to_dict writes them, so the dict survives JSON)."""
    return {k: v for k, v in self.to_dict().items() if k not in _NOT_BACKBONE}

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    for f in ('never_emit_ids', 'mlp_activations', 'rope_scaling'):
      out[f] = list(out[f])
    return out

  @classmethod
  def from_dict(cls, d: dict) -> ArchConfig:
    """Reads to_dict's output; version 3's (no version-4 fields: the paper's backbone);
    version 2's (no noise_encoder field either: its PFLMs have the 'scale_only_tanh'
    encoder); or the first format's ModelConfig dict (no 'version': its execution fields
    are dropped, its encoder as version 2's). An unknown field is an error naming it."""
    d = dict(d)
    if 'version' not in d:
      for f in _V1_EXEC_FIELDS:
        d.pop(f, None)
      d['version'] = 2
    if d['version'] in (2, 3):
      newer = [f for f in V4_FIELDS + (('noise_encoder',) if d['version'] == 2 else ())
               if f in d]
      if newer:
        raise ArchitectureError(f'an architecture of version {d["version"]} cannot name '
                                f'{", ".join(newer)} (fields of later versions)')
      if d['version'] == 2:
        d['noise_encoder'] = 'scale_only_tanh'
      d['version'] = ARCH_VERSION
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ArchitectureError(f'the saved architecture has fields this code does not know: '
                              f'{", ".join(unknown)} (known: {", ".join(sorted(known))}); '
                              'it was written by a newer kforcing_jax')
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
  # Products of the xla cached attention: dot | reduce (multiply-reduce for steps of 2..16
  # queries) | kernel (as reduce, and one-query steps through the CPU kernel,
  # kforcing_jax.kernels.cpu) | auto: kernel on a one-device CPU with a C++ compiler to
  # build it, reduce on other CPUs, dot elsewhere.
  cache_products: str = 'auto'
  # Weight-product kernels when decoding: 'float' (param_dtype) or 'int8' (weight-only, one
  # float32 scale per output column: kforcing_jax.models.quantize; activations float32).
  weights: str = 'float'
  # How int8 products run: auto (the CPU kernel on CPU, else xla) | kernel | xla
  int8_products: str = 'auto'
  dropout: float = 0.0

  def __post_init__(self):
    _choice('dtype', self.dtype, tuple(DTYPES))
    _choice('param_dtype', self.param_dtype, tuple(DTYPES))
    _choice('dot_dtype', self.dot_dtype, ('',) + tuple(DTYPES))
    _choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _choice('decode_attention', self.decode_attention, DECODE_ATTENTION)
    _choice('cache_products', self.cache_products, CACHE_PRODUCTS)
    _choice('weights', self.weights, WEIGHTS)
    _choice('int8_products', self.int8_products, INT8_PRODUCTS)
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
      products = 'dot'
      if backend == 'cpu':
        # the kernel runs on one device: a mesh of several would gather its operands
        one = jax.device_count() == 1 and cpu_kernels.compiler() is not None
        products = 'kernel' if one else 'reduce'
    if products == 'kernel' and backend != 'cpu':
      raise ArchitectureError(f"cache_products='kernel' runs on the CPU, not on {backend}: "
                              'choose auto, dot or reduce')
    int8 = self.int8_products
    if int8 == 'auto':
      int8 = 'kernel' if backend == 'cpu' else 'xla'
    return dataclasses.replace(self, attention_impl=impl, cache_products=products,
                               int8_products=int8)

  @property
  def compute(self):
    return DTYPES[self.dtype]

  @property
  def params(self):
    return DTYPES[self.param_dtype]

  @property
  def operand(self):
    return DTYPES[self.dot_dtype or self.dtype]


# ArchConfig fields that a run config's `model` section does not set: the vocabulary and
# the never-emitted ids come from the tokenizer, `pflm` from the stage, the version from
# this code; max_seq_len is resolved against data.seq_len.
_FROM_RUN_ELSEWHERE = ('vocab_size', 'never_emit_ids', 'pflm', 'max_seq_len', 'version')
# ExecConfig fields a run config sets (`weights` and `int8_products` are decoding choices).
_EXEC_FROM_RUN = ('dtype', 'param_dtype', 'dot_dtype', 'attention_impl', 'decode_attention',
                  'cache_products', 'dropout')


def configs_from_run(cfg, vocab_size: int, never_emit_ids=(), pflm: bool = False):
  """(ArchConfig, ExecConfig) of a run config's `model` section: the one mapping, by field
  name, so a new architecture field needs only its ArchConfig field and its default in
  configs/base.py. A bad value raises ArchitectureError naming `model.<field>`."""
  m = cfg.model
  arch = ArchConfig(vocab_size=vocab_size,
                    max_seq_len=m.max_seq_len if m.max_seq_len > 0 else cfg.data.seq_len,
                    never_emit_ids=tuple(int(i) for i in never_emit_ids), pflm=pflm,
                    **{f.name: m[f.name] for f in dataclasses.fields(ArchConfig)
                       if f.name not in _FROM_RUN_ELSEWHERE})
  try:
    exe = ExecConfig(**{f: m[f] for f in _EXEC_FROM_RUN})
  except ArchitectureError as e:  # ExecConfig's own messages name the bare field
    raise ArchitectureError(f'model.{e}') from None
  return arch, exe
