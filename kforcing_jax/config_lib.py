"""Config validation: every enumerated or ranged field is checked up front so a bad
value is reported by name with its allowed values, not deep inside JAX."""
from __future__ import annotations

from kforcing_jax import errors

import os
import re

from kforcing_jax import data as data_lib
from kforcing_jax import model as model_lib


class ConfigError(errors.UserError):
  pass


STAGE_RE = re.compile(r'^distill_k(\d+)$')
FIXED_STAGES = ('teacher', 'sample', 'evaluate')


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}={value!r} is not allowed; allowed: '
                      f'{", ".join(repr(a) if a == "" else str(a) for a in allowed)}')


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
  _choice('model.dot_dtype', m.dot_dtype, ('',) + tuple(model_lib.DTYPES))
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
            'checkpoint_every', 'keep_checkpoints', 'microbatches'):
    _positive(f'train.{f}', t[f])
  if not 0.0 <= t.ema_decay < 1.0:
    raise ConfigError(f'train.ema_decay must be in [0, 1), got {t.ema_decay}')
  ds = cfg.distill
  for f in ('steps', 'learning_rate', 'eval_batches', 'microbatches'):
    _positive(f'distill.{f}', ds[f])
  if not 0 < ds.tau_min <= ds.tau_max:
    raise ConfigError(f'distill.tau_min/tau_max must satisfy 0 < tau_min <= tau_max, got '
                      f'{ds.tau_min}, {ds.tau_max}')
  if ds.teacher_stage:
    stage_k(ds.teacher_stage)
  stage_steps(cfg, 'teacher')


def stage_steps(cfg, stage: str) -> int:
  """distill.steps, or the stage's entry in distill.stage_steps."""
  out = {}
  for item in [x.strip() for x in cfg.distill.stage_steps.split(',') if x.strip()]:
    name, _, value = item.partition('=')
    if not STAGE_RE.match(name.strip()) or not value.strip().isdigit() or int(value) <= 0:
      raise ConfigError(f'distill.stage_steps entry {item!r} must look like distill_k2=400')
    out[name.strip()] = int(value)
  return out.get(stage, cfg.distill.steps)


def load_config_file(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = path.split(':')[0]
  if not os.path.exists(path):
    raise ConfigError(f'--config={path!r} does not exist; the files in configs/ are '
                      f'{", ".join(sorted(f for f in os.listdir("configs") if f.endswith(".py") and not f.startswith("_"))) if os.path.isdir("configs") else "?"}')
  spec = importlib.util.spec_from_file_location('kforcing_user_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_cli_overrides(argv: list[str]) -> None:
  """Names an unknown --config.a.b=... key and the keys that do exist, before absl's
  flag parser fails with a bare AttributeError."""
  paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  if not paths:
    return
  cfg = load_config_file(paths[0])
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = arg[len('--config.'):].split('=', 1)[0]
    node, walked = cfg, []
    for part in key.split('.'):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(walked) or 'the top level'
        known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(a leaf value)'
        raise ConfigError(f'unknown config key {key!r}: {where} has no field {part!r}; '
                          f'known fields there: {known}')
      node = node[part]
      walked.append(part)
