"""A Hugging Face `config.json` of a Llama-family model as ArchConfig fields.

Fields a config.json leaves out take the defaults of transformers' config class of that
family (transformers 5.x), so that the imported model computes what transformers computes
from the same file. RoPE is read in both forms: v4 (`rope_theta`, `rope_scaling`) and v5
(`rope_parameters`). Anything the architecture cannot represent exactly (another
activation, another RoPE scaling, a sliding window shorter than the served length) is a
UserError naming the config field, never a silently different model.
"""
from __future__ import annotations

from kforcing_jax import errors

# config.json "architectures" -> family
SUPPORTED = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'mistral',
             'Qwen2ForCausalLM': 'qwen2', 'Qwen3ForCausalLM': 'qwen3'}
# transformers' class defaults of the fields a config.json may omit
_DEFAULTS = {
    'llama': {'num_key_value_heads': None, 'head_dim': None, 'hidden_act': 'silu',
              'max_position_embeddings': 2048, 'rms_norm_eps': 1e-6,
              'tie_word_embeddings': False, 'attention_bias': False, 'mlp_bias': False,
              'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': None},
    'mistral': {'num_key_value_heads': 8, 'head_dim': None, 'hidden_act': 'silu',
                'max_position_embeddings': 4096 * 32, 'rms_norm_eps': 1e-6,
                'tie_word_embeddings': False, 'sliding_window': 4096,
                'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': None},
    'qwen2': {'num_key_value_heads': 32, 'hidden_act': 'silu',
              'max_position_embeddings': 32768, 'rms_norm_eps': 1e-6,
              'tie_word_embeddings': False, 'use_sliding_window': False,
              'sliding_window': 4096, 'max_window_layers': 28,
              'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': None},
    'qwen3': {'num_key_value_heads': 32, 'head_dim': 128, 'hidden_act': 'silu',
              'max_position_embeddings': 32768, 'rms_norm_eps': 1e-6,
              'tie_word_embeddings': False, 'attention_bias': False,
              'use_sliding_window': False, 'sliding_window': 4096, 'max_window_layers': 28,
              'bos_token_id': None, 'eos_token_id': None, 'pad_token_id': None},
}
_REQUIRED = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
             'num_attention_heads')
DEFAULT_ROPE_THETA = 10000.0
# the served length when --max_seq_len is not given: the model's own, at most this (the
# slot engine and the memory estimates size caches by it)
DEFAULT_MAX_SEQ_LEN_CAP = 8192


class ConfigError(errors.UserError):
  pass


def family(cfg: dict) -> str:
  archs = cfg.get('architectures') or []
  name = archs[0] if archs else f'model_type={cfg.get("model_type")!r}'
  if len(archs) != 1 or archs[0] not in SUPPORTED:
    raise ConfigError(f'config.json architectures={archs}: {name} is not supported; '
                      f'supported: {", ".join(SUPPORTED)}')
  return SUPPORTED[archs[0]]


def _get(cfg: dict, fam: str, key: str):
  return cfg[key] if key in cfg else _DEFAULTS[fam].get(key)


def rope(cfg: dict) -> tuple[float, tuple]:
  """(rope_theta, ArchConfig.rope_scaling) from either config form."""
  params = cfg.get('rope_parameters') or cfg.get('rope_scaling') or {}
  if not isinstance(params, dict):
    raise ConfigError(f'config.json rope_parameters={params!r} must be a dict')
  if any(isinstance(v, dict) for v in params.values()):
    raise ConfigError('config.json rope_parameters are given per layer type '
                      f'({", ".join(params)}); one RoPE for all layers is supported')
  theta = params.get('rope_theta', cfg.get('rope_theta', DEFAULT_ROPE_THETA))
  kind = params.get('rope_type', params.get('type', 'default'))
  partial = params.get('partial_rotary_factor', cfg.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1, 1.0):
    raise ConfigError(f'config.json partial_rotary_factor={partial}: only 1.0 (RoPE over the '
                      'whole head) is supported')
  if kind == 'default':
    return float(theta), ()
  if kind == 'linear':
    return float(theta), ('linear', float(params['factor']))
  if kind == 'llama3':
    orig = params.get('original_max_position_embeddings', cfg.get('max_position_embeddings'))
    try:
      return float(theta), ('llama3', float(params['factor']), float(params['low_freq_factor']),
                            float(params['high_freq_factor']), int(orig))
    except (KeyError, TypeError) as e:
      raise ConfigError(f'config.json rope_type=llama3 needs {e}') from None
  raise ConfigError(f'config.json rope_type={kind!r} is not supported; supported: default, '
                    'linear, llama3')


def _sliding_window(cfg: dict, fam: str) -> int | None:
  """The attention window transformers applies to some layer, or None."""
  if fam == 'mistral':
    return _get(cfg, fam, 'sliding_window')
  if fam in ('qwen2', 'qwen3'):
    if not _get(cfg, fam, 'use_sliding_window'):
      return None
    layer_types = cfg.get('layer_types')
    n = int(cfg['num_hidden_layers'])
    if layer_types is None:
      layer_types = ['sliding_attention' if i >= _get(cfg, fam, 'max_window_layers')
                     else 'full_attention' for i in range(n)]
    return _get(cfg, fam, 'sliding_window') if 'sliding_attention' in layer_types else None
  return None


def served_length(cfg: dict, max_seq_len: int = 0) -> int:
  longest = int(_get(cfg, family(cfg), 'max_position_embeddings'))
  if max_seq_len <= 0:
    return min(longest, DEFAULT_MAX_SEQ_LEN_CAP)
  if max_seq_len > longest:
    raise ConfigError(f'--max_seq_len={max_seq_len} is longer than the model\'s '
                      f'max_position_embeddings={longest}; allowed: 1..{longest}')
  return max_seq_len


def arch_fields(cfg: dict, max_seq_len: int = 0) -> dict:
  """ArchConfig keyword arguments (architecture version 4) of a config.json dict."""
  fam = family(cfg)
  missing = [k for k in _REQUIRED if cfg.get(k) is None]
  if missing:
    raise ConfigError(f'config.json has no {", ".join(missing)}')
  D, H = int(cfg['hidden_size']), int(cfg['num_attention_heads'])
  Hkv = int(_get(cfg, fam, 'num_key_value_heads') or H)
  head_dim = int(_get(cfg, fam, 'head_dim') or D // H)
  act = _get(cfg, fam, 'hidden_act')
  if act not in ('silu', 'swish'):
    raise ConfigError(f'config.json hidden_act={act!r}: supported: silu (SwiGLU)')
  theta, scaling = rope(cfg)
  seq = served_length(cfg, max_seq_len)
  window = _sliding_window(cfg, fam)
  if window is not None and window < seq:
    raise ConfigError(f'config.json sliding_window={window} is shorter than the served length '
                      f'{seq}: sliding-window attention is not supported; import with '
                      f'--max_seq_len={window} (or less), where it equals full attention')
  bias = bool(_get(cfg, fam, 'attention_bias'))
  return dict(
      vocab_size=int(cfg['vocab_size']), d_model=D, n_layers=int(cfg['num_hidden_layers']),
      n_heads=H, n_kv_heads=Hkv, head_dim=head_dim, mlp_dim=int(cfg['intermediate_size']),
      mlp_activations=('silu', 'linear'), mlp_bias=bool(_get(cfg, fam, 'mlp_bias')),
      norm='rmsnorm', norm_eps=float(_get(cfg, fam, 'rms_norm_eps')),
      # Qwen2 always has q/k/v biases and no output bias; Llama and Qwen3 put
      # attention_bias on all four projections, Mistral on none
      qkv_bias=True if fam == 'qwen2' else bias, out_bias=bias if fam in ('llama', 'qwen3')
      else False,
      qk_norm=fam == 'qwen3', tie_embeddings=bool(_get(cfg, fam, 'tie_word_embeddings')),
      head_bias=False, rope_base=theta, rope_scaling=scaling, max_seq_len=seq,
      never_emit_ids=(), pflm=False)


def _first(x):
  if isinstance(x, (list, tuple)):
    return int(x[0]) if x else None
  return None if x is None else int(x)


def special_ids(cfg: dict) -> dict:
  """{'bos_id', 'eos_ids', 'pad_id'} of a config.json (eos may be a list; None: unset)."""
  fam = family(cfg)
  eos = _get(cfg, fam, 'eos_token_id')
  eos_ids = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else (
      [] if eos is None else [int(eos)])
  return {'bos_id': _first(_get(cfg, fam, 'bos_token_id')), 'eos_ids': eos_ids,
          'pad_id': _first(_get(cfg, fam, 'pad_token_id'))}

