"""Config validation: every enumerated or ranged field is checked up front so a bad
value is reported by name with its allowed values, not deep inside JAX."""
from __future__ import annotations

import re

from kforcing_jax import data as data_lib
from kforcing_jax import model as model_lib


class ConfigError(ValueError):
  pass


STAGE_RE = re.compile(r'^distill_k(\d+)$')
FIXED_STAGES = ('teacher', 'sample', 'evaluate')


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}={value!r} is not allowed; allowed: '
                      f'{", ".join(str(a) for a in allowed)}')


def _positive(field: str, value) -> None:
  if value <= 0:
    raise ConfigError(f'{field} must be > 0, got {value}')


def stages(cfg) -> list[str]:
  names = [s.strip() for s in cfg.pipeline.split(',') if s.strip()]
  if not names:
    raise ConfigError('pipeline is empty; allowed stages: teacher, distill_k<K> '
                      '(K = 1, 2, 4, ...), sample, evaluate')
  for s in names:
    m = STAGE_RE.match(s)
    if s in FIXED_STAGES:
      continue
    if not m or int(m.group(1)) < 1 or int(m.group(1)) & (int(m.group(1)) - 1):
      raise ConfigError(f'pipeline stage {s!r} is not known; allowed: teacher, '
                        'distill_k<K> with K a power of two (distill_k1, distill_k2, '
                        'distill_k4, ...), sample, evaluate')
  if len(set(names)) != len(names):
    raise ConfigError(f'pipeline={cfg.pipeline!r} lists a stage twice')
  return names


def stage_k(stage: str) -> int:
  """0 for the AR teacher, K for distill_kK."""
  if stage == 'teacher':
    return 0
  m = STAGE_RE.match(stage)
  if not m:
    raise ConfigError(f'{stage!r} is not a model stage (teacher or distill_k<K>)')
  return int(m.group(1))


def validate(cfg) -> None:
  stages(cfg)
  m, d, t = cfg.model, cfg.data, cfg.train
  _choice('model.dtype', m.dtype, tuple(model_lib.DTYPES))
  _choice('model.param_dtype', m.param_dtype, tuple(model_lib.DTYPES))
  _choice('model.attention_impl', m.attention_impl, ('auto', 'xla', 'cudnn'))
  for f in ('d_model', 'n_layers', 'n_heads', 'mlp_ratio'):
    _positive(f'model.{f}', m[f])
  if m.d_model % m.n_heads:
    raise ConfigError(f'model.d_model={m.d_model} must divide by model.n_heads={m.n_heads}')
  if (m.d_model // m.n_heads) % 2:
    raise ConfigError('model.d_model / model.n_heads (the head dim) must be even for RoPE')
  if m.vocab_size != -1 and m.vocab_size < 2:
    raise ConfigError(f'model.vocab_size must be -1 (from the tokenizer) or >= 2, got '
                      f'{m.vocab_size}')
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f'model.dropout must be in [0, 1), got {m.dropout}')
  _choice('data.source', d.source, data_lib.SOURCES)
  if d.packing:
    _choice('data.packing', d.packing, data_lib.PACKINGS)
  if d.tokenizer:
    _choice('data.tokenizer', d.tokenizer, ('bert-base-uncased', 'gpt2', 'synthetic'))
  for f in ('seq_len', 'batch_size', 'eval_batch_size'):
    _positive(f'data.{f}', d[f])
  _choice('train.schedule', t.schedule, ('cosine', 'linear', 'constant'))
  for f in ('steps', 'learning_rate', 'log_every', 'eval_every', 'eval_batches',
            'checkpoint_every', 'keep_checkpoints'):
    _positive(f'train.{f}', t[f])
  if not 0.0 <= t.ema_decay < 1.0:
    raise ConfigError(f'train.ema_decay must be in [0, 1), got {t.ema_decay}')
  ds = cfg.distill
  for f in ('steps', 'learning_rate', 'eval_batches'):
    _positive(f'distill.{f}', ds[f])
  if not 0 < ds.tau_min <= ds.tau_max:
    raise ConfigError(f'distill.tau_min/tau_max must satisfy 0 < tau_min <= tau_max, got '
                      f'{ds.tau_min}, {ds.tau_max}')
  if ds.teacher_stage:
    stage_k(ds.teacher_stage)
