"""Config validation (every enumerated or ranged field is checked up front so a bad value
is reported by name with its allowed values, not deep inside JAX), config files, and the
command-line parser of the entry points (cli_flags)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
import importlib.util
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging

from kforcing_jax.data import datasets as data_lib
from kforcing_jax import errors
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.training import objectives as objectives_lib
from kforcing_jax.training import optim
from kforcing_jax.interop import export as export_lib
from kforcing_jax import pipeline as pipeline_pkg
from kforcing_jax.pipeline import run_dir

# stages without a `stages` section; every section of `stages` is a stage (its kind)
FIXED_STAGES = ('sample', 'evaluate')

CONFIG_DIR = pipeline_pkg.CONFIG_DIR


class ConfigError(errors.UserError):
  pass


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f'{field}={value!r} is not allowed; allowed: '
                      f'{", ".join(repr(a) if a == "" else str(a) for a in allowed)}')


def _positive(field: str, value) -> None:
  if value <= 0:
    raise ConfigError(f'{field} must be > 0, got {value}')


def stages(cfg) -> list[str]:
  """`pipeline` as a validated list of stage names (a tuple, or comma-separated strings)."""
  raw = cfg.pipeline if isinstance(cfg.pipeline, (tuple, list)) else (cfg.pipeline,)
  names = [s.strip() for item in raw for s in str(item).split(',') if s.strip()]
  known = sorted(cfg.stages.keys())
  if not names:
    raise ConfigError('pipeline is empty; allowed stages: ' + ', '.join(known) +
                      ', sample, evaluate')
  for s in names:
    if s not in FIXED_STAGES and s not in cfg.stages:
      raise ConfigError(f'pipeline stage {s!r} is not known; allowed: the sections of '
                        f'`stages` ({", ".join(known)}), sample, evaluate; add a section '
                        f'for a new stage, e.g. c.stages.{s} = base.distill_stage(k=4, '
                        "objective='ar_rollout')")
  if len(set(names)) != len(names):
    raise ConfigError(f'pipeline={names} lists a stage twice')
  return names


def _validate_stage(name: str, s, cfg) -> None:
  for f in ('steps', 'batch_size', 'microbatches', 'log_every', 'checkpoint_every',
            'keep_checkpoints', 'eval_batches'):
    _positive(f'stages.{name}.{f}', s[f])
  if 'eval_every' in s:
    _positive(f'stages.{name}.eval_every', s.eval_every)
  o = s.opt
  _choice(f'stages.{name}.opt.schedule', o.schedule, optim.SCHEDULES)
  _positive(f'stages.{name}.opt.learning_rate', o.learning_rate)
  if o.warmup_steps < 0 or o.grad_clip < 0:
    raise ConfigError(f'stages.{name}.opt.warmup_steps / grad_clip must be >= 0')
  if not 0.0 <= o.ema_decay < 1.0:
    raise ConfigError(f'stages.{name}.opt.ema_decay must be in [0, 1), got {o.ema_decay}')
  _choice(f'stages.{name}.kind', s.get('kind', ''), run_dir.MODEL_KINDS)
  if s.kind == 'distill':
    _validate_distill(name, s, cfg)


def _validate_distill(name: str, s, cfg) -> None:
  if not isinstance(s.k, int) or s.k < 1 or s.k & (s.k - 1):
    raise ConfigError(f'stages.{name}.k={s.k!r} is not allowed; allowed: a power of two '
                      '(1, 2, 4, 8, ...)')
  _choice(f'stages.{name}.objective', s.objective, tuple(objectives_lib.OBJECTIVES))
  wants = objectives_lib.get(s.objective).readout
  if wants != cfg.model.readout and name in stages(cfg):  # a section the run trains
    raise ConfigError(
        f'stages.{name}.objective={s.objective!r} trains students with model.readout='
        f'{wants!r}, the config has model.readout={cfg.model.readout!r}; allowed objectives '
        'for it: ' + ', '.join(objectives_lib.training(cfg.model.readout)))
  if not 0 < s.tau_min <= s.tau_max:
    raise ConfigError(f'stages.{name}.tau_min/tau_max must satisfy 0 < tau_min <= '
                      f'tau_max, got {s.tau_min}, {s.tau_max}')
  if not 0.0 <= s.ar_fraction <= 1.0:
    raise ConfigError(f'stages.{name}.ar_fraction must be in [0, 1], got {s.ar_fraction}')
  if s.ar_fraction_end != -1.0 and not 0.0 <= s.ar_fraction_end <= 1.0:
    raise ConfigError(f'stages.{name}.ar_fraction_end must be -1 (constant) or in [0, 1], '
                      f'got {s.ar_fraction_end}')
  if not 0.0 <= s.position_power <= 8.0:
    raise ConfigError(f'stages.{name}.position_power must be in [0, 8], got '
                      f'{s.position_power}')
  extra = s.get('extra_layers', 0)
  if isinstance(extra, bool) or not isinstance(extra, int) or not 0 <= extra <= 64:
    raise ConfigError(f'stages.{name}.extra_layers must be an integer in [0, 64], got '
                      f'{extra!r}')
  if not 0.0 < s.cdf_margin <= 0.5:
    raise ConfigError(f'stages.{name}.cdf_margin must be in (0, 0.5], got {s.cdf_margin}')
  models = run_dir.model_stages(cfg)
  for field in ('teacher_stage', 'ar_teacher'):
    ref = s[field]
    if ref and ref not in models and not export_lib.is_export(ref):
      raise ConfigError(f'stages.{name}.{field}={ref!r} is neither a model stage of the '
                        f'config ({", ".join(sorted(models))}) nor an export directory')
    if ref == name:
      raise ConfigError(f'stages.{name}.{field} names the stage itself')


def validate(cfg) -> None:
  stages(cfg)
  m, d = cfg.model, cfg.data
  if m.vocab_size != -1 and m.vocab_size < 2:
    raise ConfigError(f'model.vocab_size must be -1 (from the tokenizer) or >= 2, got '
                      f'{m.vocab_size}')
  _choice('data.source', d.source, data_lib.SOURCES)
  if d.packing:
    _choice('data.packing', d.packing, data_lib.PACKINGS)
  if d.tokenizer:
    _choice('data.tokenizer', d.tokenizer, data_lib.TOKENIZERS + ('synthetic',))
  for f in ('seq_len', 'eval_batch_size'):
    _positive(f'data.{f}', d[f])
  try:  # the model's own checks, up front (the vocabulary comes from the tokenizer later)
    arch_lib.configs_from_run(cfg, vocab_size=max(m.vocab_size, 2))
  except arch_lib.ArchitectureError as e:
    raise ConfigError(str(e)) from None
  for name, section in cfg.stages.items():
    _validate_stage(name, section, cfg)
  _validate_evaluate(cfg.evaluate)


def _validate_evaluate(e) -> None:
  for f in ('num_prompts', 'prompt_len', 'num_samples', 'max_new_tokens', 'agreement_rows'):
    _positive(f'evaluate.{f}', e[f])
  if e.freq_penalty < 0:
    raise ConfigError(f'evaluate.freq_penalty must be >= 0, got {e.freq_penalty}')
  windows = e.get('windows', ())  # a tuple (ConfigDict keeps the field's type)
  for K in windows:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
      raise ConfigError(f'evaluate.windows must hold K values >= 1 (tokens per pass; () = '
                        f'every K up to each student\'s window), got {tuple(windows)!r}')


def load_config_file(path: str):
  """get_config() of a config file; a bare name (e.g. 'synthetic') is looked up among the
  package's configs."""
  path = path.split(':')[0]
  if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path + '.py')):
    path = os.path.join(CONFIG_DIR, path + '.py')
  if not os.path.exists(path):
    raise ConfigError(unknown_config_message(path))
  spec = importlib.util.spec_from_file_location('kforcing_user_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def cli_flags(define: Callable[[flags.FlagValues], None],
              argv: Sequence[str] | None = None) -> flags.FlagValues:
  """The command-line parser of every entry point: a fresh FlagValues on which `define`
  declares the flags, parsed from argv (default sys.argv; argv[0] is the program).

  --config=NAME names a shipped config (configs/NAME.py) from any directory. A config file
  that does not exist, an unknown or bad flag, a missing required flag or a stray argument
  ends the program with one line (SystemExit); --help prints the module's usage and its
  flags. Library INFO logs are hidden unless -v / --verbosity asks for them. A fresh
  FlagValues per call lets tests run several entry points in one process."""
  argv = list(sys.argv if argv is None else argv)
  argv = argv[:1] + resolve_config_args(argv[1:])
  fv = flags.FlagValues()
  flags.DEFINE_integer('verbosity', -1, 'logging verbosity: -1 warnings, 0 library INFO '
                       'lines too, 1 and more debug lines', short_name='v', flag_values=fv)
  program_argv = sys.argv
  # ml_collections reads a config flag's --config.<field> overrides from sys.argv, when the
  # flag is defined and when it is parsed
  sys.argv = argv
  try:
    define(fv)
    if 'config' in fv:
      check_config_args(argv[1:])
    if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
      doc = (sys.modules[define.__module__].__doc__ or '').strip()
      print(f'{doc}\n\nflags:\n{fv.get_help(include_special_flags=False)}')
      raise SystemExit(0)
    try:
      rest = fv(argv)
    except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
      raise SystemExit(_one_line_flag_error(e, argv)) from None
  finally:
    sys.argv = program_argv
  if len(rest) > 1:
    raise SystemExit(f'error: unexpected arguments: {" ".join(rest[1:])}')
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # libraries that read absl's flags see their defaults
  absl_logging.set_verbosity(fv.verbosity)
  return fv


def cli_main(define: Callable[[flags.FlagValues], None], run: Callable[[flags.FlagValues], Any],
             argv: Sequence[str] | None = None, before_run: Callable[[], None] | None = None):
  """The body of every command-line tool's main(argv): parse (cli_flags), then run; a user
  error (errors.UserError, a missing file) ends the program with one 'error: ...' line
  instead of a traceback."""
  f = cli_flags(define, argv)
  if before_run is not None:
    before_run()
  try:
    return run(f)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


def parse_flags(argv):
  """absl's flag parsing over the global FLAGS (app.run's flags_parser) for scripts that
  define their flags there (launch/): --config resolved and errors in one line as in
  cli_flags."""
  argv = argv[:1] + resolve_config_args(argv[1:])
  if 'config' in flags.FLAGS:
    check_config_args(argv[1:])
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
    raise SystemExit(_one_line_flag_error(e, argv)) from None


def _one_line_flag_error(e: Exception, argv: Sequence[str]) -> str:
  text = str(e)
  missing = re.findall(r'Flag --(\w+) must have a value other than None', text)
  if missing:  # absl's required-flag validators
    return f'error: give {", ".join("--" + m for m in missing)} (see --help)'
  if not isinstance(e, flags.Error):  # ml_collections' override errors: a quoted repr
    text = text.replace('\\n', ' ').replace("\\'", "'").strip('\'" ')
  text = ' '.join(text.split())
  name = text.split()[0].strip("'") if text else ''
  bad = [a.split('=')[0] for a in argv[1:]
         if a.startswith('--config.') and name and name in a.split('=')[0]]
  return f'error: bad command line{" (" + bad[0] + ")" if bad else ""}: {text}'


def resolve_config_args(args: Sequence[str]) -> list[str]:
  """'--config NAME[:args]' / '--config=NAME[:args]' -> '--config=<the shipped file
  NAME.py>' when NAME is no file here."""
  out, args = [], list(args)
  while args:
    arg = args.pop(0)
    if arg == '--config' and args:
      arg = '--config=' + args.pop(0)
    out.append(resolve_config_arg(arg))
  return out


def check_config_args(args: Sequence[str]) -> None:
  """A --config file that exists nowhere: one line (SystemExit) naming the shipped configs."""
  for arg in args:
    path = arg[len('--config='):].partition(':')[0]
    if arg.startswith('--config=') and not os.path.exists(path):
      raise SystemExit(f'error: {unknown_config_message(path)}')


def resolve_config_arg(arg: str) -> str:
  """'--config=NAME[:args]' -> the shipped config file NAME.py when NAME is no file here."""
  if not arg.startswith('--config='):
    return arg
  path, sep, rest = arg[len('--config='):].partition(':')
  candidate = os.path.join(CONFIG_DIR, path + '.py')
  if not os.path.exists(path) and os.path.exists(candidate):
    return f'--config={candidate}{sep}{rest}'
  return arg


def unknown_config_message(path: str) -> str:
  return (f'--config={path!r} does not exist; the shipped configs are '
          f'{", ".join(known_configs())} (in {CONFIG_DIR}): give one by name '
          '(--config=NAME) or a config file\'s path (--config=configs/NAME.py)')


def known_configs() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith('.py') and not f.startswith('_'))
