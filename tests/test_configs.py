"""Every file in configs/ loads, validates and builds at a shrunk shape: its data source,
tokenizer and the traced, sharded step of each stage (the synthetic config runs every
stage end to end, the OWT config runs through main.py offline). --config takes a path or
a shipped config's name from any directory, installed or not; bad settings give one
clear line."""
import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from unittest import mock

import jax
import numpy as np
import pytest

from kforcing_jax.configs import base
from kforcing_jax.data import datasets as data_lib
from kforcing_jax import errors
from kforcing_jax.interop import released
from kforcing_jax.pipeline import cli
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import context as context_lib
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.pipeline import run_dir
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.training import distill
from kforcing_jax.training import optim
from kforcing_jax.training import teacher
from kforcing_jax.training import trainer
from tests.conftest import shrink, synthetic_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3]
                 for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('_'))
TOKENIZER_DIRS = {'lm1b': 'bert-base-uncased', 'text': 'bert-base-uncased',
                  'openwebtext': 'gpt2'}


def local_data(cfg, testdata, tmp_path):
  """Points a real-data config at the fixtures in testdata; the patches its source needs."""
  cfg.data.tokenizer_path = os.path.join(
      testdata, 'tokenizers', cfg.data.tokenizer or TOKENIZER_DIRS[cfg.data.source])
  if cfg.data.source == 'lm1b':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (lm1b extra)
    cfg.data.tfds_data_dir = str(tmp_path / 'tfds')
    return [mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                              return_value=os.path.join(testdata, 'lm1b', 'tfds_layout'))]
  if cfg.data.source == 'openwebtext':
    cfg.data.path = os.path.join(testdata, 'owt', 'hf_dummy')
    cfg.data.cache_dir = str(tmp_path / 'owt_cache')
    cfg.data.eval_fraction = 0.25
  else:
    cfg.data.path = os.path.join(testdata, 'lm1b', 'lingvo_lm1b_100.txt')
    cfg.data.eval_fraction = 0.1
  return []


def lower_stage_step(ctx, spec):
  """The stage's jitted, sharded, donating train step lowered on a real batch of its data
  source (no compile); (output state shapes, abstract state, metric names)."""
  s = spec.settings
  tx = optim.make_optimizer(s.opt, s.steps)
  abstract, shardings, _ = trainer.abstract_state(spec.init_params, tx, ctx.mesh,
                                                  s.opt.ema_decay > 0)
  batch = next(data_lib.BatchIterator(ctx.source, 'train', s.batch_size,
                                      sharding_lib.batch_sharding(ctx.mesh), 0))
  assert batch['tokens'].shape == (s.batch_size, ctx.cfg.data.seq_len)
  assert int(batch['tokens'].max()) < spec.arch.vocab_size
  step = trainer.jit_step(spec.make_step(tx), shardings, ctx.mesh, spec.frozen_shardings)
  with sharding_lib.mesh_context(ctx.mesh):
    lowered = step.lower(abstract, batch, jax.random.key(0), *spec.frozen)
  state_info, metrics_info = lowered.out_info
  return state_info, abstract, set(metrics_info)


def shapes(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


# smollm2_135m distils an imported export from a built context set: tests/test_contexts.py
# runs it (at a tiny export's shape) through distillation and evaluation
@pytest.mark.parametrize('name', [c for c in CONFIGS if c not in ('synthetic', 'smollm2_135m')])
def test_every_config_builds_at_a_shrunk_shape(name, tmp_path):
  """The config validates; shrunk, its tokenizer and data source build on real samples and
  each stage's step traces and lowers on the mesh (a released recipe's imported teacher is
  loaded and checked against the data)."""
  cfg = config_lib.load_config_file(name)
  config_lib.validate(cfg)
  shrink(cfg, steps=1)
  patches = []
  if cfg.data.source != 'synthetic':
    testdata = os.environ.get('KFORCING_TESTDATA', '')
    if not testdata:
      pytest.skip('set KFORCING_TESTDATA to build the LM1B/OWT configs on real samples')
    patches = local_data(cfg, testdata, tmp_path)
  if name.endswith('_from_released'):
    # the released checkpoint's layout at the shrunk shape, imported as the config expects
    stage = 'distill_k8'
    ref = cfg.stages[stage].teacher_stage
    assert cfg.pipeline == (stage,) and ref.startswith('released/')
    vocab = 50258 if cfg.data.tokenizer == 'gpt2' else 30522
    ckpt = str(tmp_path / 'pflm_k4.npz')
    np.savez(ckpt, **released.random_state(vocab, cfg.model.d_model, cfg.model.n_layers,
                                           cfg.model.d_model // cfg.model.n_heads, True))
    cfg.stages[stage].teacher_stage = str(tmp_path / ref)
    released.import_checkpoint(ckpt, cfg.stages[stage].teacher_stage,
                               tokenizer=cfg.data.tokenizer,
                               tokenizer_path=cfg.data.tokenizer_path)
  else:
    stage = 'teacher'  # the synthetic run covers every distillation stage
  for p in patches:
    p.start()
  try:
    ctx = context_lib.build(cfg, str(tmp_path / 'run'))
    if stage == 'teacher':
      spec = teacher.spec(ctx)
    else:
      spec = distill.spec(ctx, stage)
      assert spec.arch.pflm and spec.window == 8
      assert spec.arch.never_emit_ids == ctx.tokenizer.never_emit_ids
    state_info, abstract, metrics = lower_stage_step(ctx, spec)
  finally:
    for p in patches:
      p.stop()
  assert shapes(state_info) == shapes(abstract)  # the step keeps the state's layout
  assert {'loss', 'grad_norm', 'nonfinite'} <= metrics


def test_synthetic_config_runs_every_stage(distilled_run, tmp_path):
  """The default job, shrunk (conftest.synthetic_config), as its documented k=8 variant (its
  k=4 student a block deeper than its k=2 teacher, its k=8 student a block deeper still):
  teacher, distill_k1 and distill_k2 are the session's shared run of the same config; in a
  copy of it the pipeline of configs/synthetic.py plus distill_k8 skips them and runs
  distill_k4, distill_k8 (on-policy targets from the run's AR teacher) and evaluate."""
  shared, shared_cfg = distilled_run
  run = tmp_path / 'run'
  shutil.copytree(shared, run)
  default = config_lib.load_config_file('synthetic').pipeline
  assert default == ('teacher', 'distill_k1', 'distill_k2', 'distill_k4', 'evaluate')
  cfg = synthetic_config(steps=3, pipeline=default[:-1] + ('distill_k8', 'evaluate'))
  assert cfg.to_dict() == dict(shared_cfg.to_dict(), pipeline=cfg.pipeline)  # the same job
  cfg.evaluate.windows = (1, 3, 8)  # each K is a decoding compile; 1..k: test_evaluate
  finished = {s: run_dir.read_summary(str(run / s)) for s in ('teacher', 'distill_k1',
                                                               'distill_k2')}
  out = pipeline.run(cfg, str(run))
  assert list(out) == list(cfg.pipeline)
  assert {s: out[s] for s in finished} == finished  # skipped, not rerun
  assert out['distill_k4']['k'] == 4 and out['distill_k4']['teacher_stage'] == 'distill_k2'
  assert out['distill_k8']['k'] == 8 and out['distill_k8']['teacher_stage'] == 'distill_k4'
  assert out['distill_k8']['objective'] == 'on_policy'
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  depth = {s: run_dir.load_model_stage(str(run), s, mesh)[0].n_layers
           for s in ('distill_k4', 'distill_k8')}
  assert depth == {'distill_k4': 3, 'distill_k8': 4}  # one block on top of each teacher's
  assert os.path.exists(run / 'evaluate' / 'report.md')
  assert [(r['model'], r['K']) for r in out['evaluate']['rows']] == [
      ('teacher', 1), ('k1', 1), ('k2', 1), ('k2', 2), ('k4', 1), ('k4', 3), ('k4', 4),
      ('k8', 1), ('k8', 3), ('k8', 8)]


def config_overrides(before, after) -> list[str]:
  """--config.<field>=<value> flags that turn config `before` into `after`."""
  flat_a, flat_b = dict(flatten_items(before)), dict(flatten_items(after))
  return [f'--config.{k}={v}' for k, v in flat_b.items() if flat_a[k] != v]


def flatten_items(cfg, prefix=''):
  for k, v in cfg.items():
    if hasattr(v, 'items'):
      yield from flatten_items(v, f'{prefix}{k}.')
    else:
      yield prefix + k, v


def test_owt_config_runs_offline_through_main_py(testdata, tmp_path):
  """The card's command, python main.py --config=configs/owt.py, from the checkout, on the
  local OWT documents with the GPT-2 tokenizer files, shrunk to 2 teacher steps."""
  cfg = config_lib.load_config_file('owt')
  small = shrink(config_lib.load_config_file('owt'), steps=2)
  local_data(small, testdata, tmp_path)
  flags = config_overrides(cfg, small)
  assert '--config.data.tokenizer_path=' + os.path.join(testdata, 'tokenizers', 'gpt2') in flags
  r = subprocess.run([sys.executable, 'main.py', '--config=configs/owt.py',
                      f'--workdir={tmp_path / "run"}', '--config.pipeline=teacher', *flags],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'run' / 'teacher' / 'summary.json', encoding='utf-8') as f:
    summary = json.load(f)
  assert summary['steps'] == 2 and np.isfinite(summary['val_nll'])
  assert summary['source_entropy_rate'] is None  # a real corpus: no exact entropy
  with open(tmp_path / 'run' / 'config.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['data']['source'] == 'openwebtext' and saved['model']['d_model'] == 32
  assert os.listdir(tmp_path / 'owt_cache')  # tokenized once into the cache


def test_every_key_is_declared_in_base():
  """Every field any config file sets exists in base.py (a typo would add a new key)."""
  known = set(k for k, _ in flatten_items(base.get_config()))
  for name in CONFIGS:
    keys = set(k for k, _ in flatten_items(config_lib.load_config_file(name)))
    assert keys <= known, (name, keys - known)


def main_error(*args) -> str:
  """main.py's one-line error for these flags (run in this process)."""
  with pytest.raises(SystemExit) as e:
    cli.main(['main.py', *args])
  text = str(e.value)
  assert text.startswith('error: ') and '\n' not in text, text
  return text


def test_bad_config_is_one_line_listing_the_shipped_configs(tmp_path):
  assert os.path.samefile(config_lib.CONFIG_DIR, os.path.join(ROOT, 'configs'))
  for bad in ('configs/nope.py', 'nope'):
    text = main_error(f'--config={bad}', f'--workdir={tmp_path}')
    assert f"--config='{bad}' does not exist" in text
    assert f'the shipped configs are {", ".join(CONFIGS)} ' in text


def test_unknown_config_key_is_named(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  text = main_error('--config=configs/synthetic.py', f'--workdir={tmp_path}',
                    '--config.model.d_modle=64')
  assert '(--config.model.d_modle)' in text and 'Did you mean "d_model"' in text


def test_missing_flag_and_stray_arguments_are_named(tmp_path):
  assert '--workdir' in main_error('--config=synthetic')
  assert 'unexpected arguments: extra' in main_error('--config=synthetic',
                                                     f'--workdir={tmp_path}', 'extra')
  assert "Unknown command line flag 'wrokdir'" in main_error('--config=synthetic',
                                                             f'--wrokdir={tmp_path}')


def test_bad_value_is_named(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a shipped config by name, from another directory
  text = main_error('--config=synthetic', f'--workdir={tmp_path / "run"}',
                    '--config.stages.teacher.opt.schedule=exponential')
  assert text == ("error: stages.teacher.opt.schedule='exponential' is not allowed; "
                  'allowed: cosine, linear, constant')


def test_pipeline_from_a_comma_separated_override(tmp_path):
  assert "pipeline stage 'distill_k3' is not known" in main_error(
      '--config=synthetic', f'--workdir={tmp_path}', '--config.pipeline=teacher,distill_k3')
  f = config_lib.cli_flags(cli.define_flags, ['main.py', '--config', 'synthetic',
                                              '--workdir=w', '--config.pipeline=teacher,sample'])
  assert config_lib.stages(f.config) == ['teacher', 'sample']


def test_config_by_name_or_path_from_any_directory_installed(tmp_path, monkeypatch):
  """Installed (the editable install maps kforcing_jax.configs to configs/), a shipped
  config's name works from any directory, and equals the file's path from the checkout."""
  monkeypatch.chdir(tmp_path)
  by_name = config_lib.cli_flags(cli.define_flags, ['main.py', '--config=owt_from_released',
                                                    '--workdir=w']).config
  monkeypatch.chdir(ROOT)
  by_path = config_lib.cli_flags(cli.define_flags, [
      'main.py', '--config=configs/owt_from_released.py', '--workdir=w']).config
  assert by_name.to_dict() == by_path.to_dict()
  assert by_name.data.source == 'openwebtext' and by_name.pipeline == ('distill_k8',)


def test_console_scripts_are_the_command_line_tools(capsys):
  """Every [project.scripts] entry is a tool's main(argv): --help prints the tool's usage
  and flags, all of them defined in one process (a fresh set of flags per call)."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert scripts['kforcing-run'] == 'kforcing_jax.pipeline.cli:main'
  for name, target in scripts.items():
    module_name, _, attr = target.partition(':')
    module = importlib.import_module(module_name)
    with pytest.raises(SystemExit) as e:
      getattr(module, attr)([name, '--help'])
    assert e.value.code == 0, name
    usage = capsys.readouterr().out
    assert usage.startswith(module.__doc__.strip().splitlines()[0]), name
    assert '--verbosity' in usage and usage.count('\n  --') >= 2, name


NOT_INSTALLED = textwrap.dedent('''
    import json, os, sys
    copy = sys.argv[1]
    # without the editable install's finder, as in a checkout that was never installed
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, '__module__', '').startswith('__editable__')]
    sys.path.insert(0, copy)
    import kforcing_jax
    from kforcing_jax.pipeline import cli, config_lib
    from kforcing_jax.configs import base
    f = config_lib.cli_flags(cli.define_flags, ['main.py', '--config=lm1b_from_released',
                                                '--workdir=w'])
    try:
      config_lib.cli_flags(cli.define_flags, ['main.py', '--config=nope', '--workdir=w'])
    except SystemExit as e:
      error = str(e)
    print(json.dumps({'package': kforcing_jax.__file__, 'configs': config_lib.CONFIG_DIR,
                      'base': base.__file__, 'source': f.config.data.source,
                      'tokenizer': f.config.data.tokenizer, 'error': error}))
''')


def test_config_by_name_from_any_directory_not_installed(tmp_path):
  """A copy of the checkout that is not installed, run from another directory: the
  package registers the checkout's configs/ as kforcing_jax.configs."""
  copy = tmp_path / 'checkout'
  ignore = shutil.ignore_patterns('__pycache__', '*.egg-info')
  for part in ('kforcing_jax', 'configs'):
    shutil.copytree(os.path.join(ROOT, part), copy / part, ignore=ignore)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  r = subprocess.run([sys.executable, '-c', NOT_INSTALLED, str(copy)], cwd=elsewhere, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out['package'] == str(copy / 'kforcing_jax' / '__init__.py')
  assert out['configs'] == str(copy / 'configs')
  assert out['base'] == str(copy / 'configs' / 'base.py')
  assert (out['source'], out['tokenizer']) == ('lm1b', 'bert-base-uncased')
  assert f'the shipped configs are {", ".join(CONFIGS)} (in {copy / "configs"})' in out['error']


@pytest.mark.parametrize('field,value,match', [
    ('pipeline', ('teacher', 'distill_k3'), 'distill_k3'),
    ('pipeline', ('teacher', 'distill_k16'),
     'add a section for a new stage, e.g. c.stages.distill_k16'),
    ('pipeline', ('teacher,teacher',), 'lists a stage twice'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.dot_dtype', 'int8', "model.dot_dtype='int8' is not allowed; allowed: '', bfloat16, float32"),
    ('model.decode_attention', 'flash', "model.decode_attention='flash' is not allowed"),
    ('data.source', 'c4', 'data.source'),
    ('model.n_heads', 3, 'model.n_heads'),
    ('stages.distill_k2.steps', 0, 'stages.distill_k2.steps must be > 0'),
    ('stages.distill_k1.opt.ema_decay', 1.5, r'stages.distill_k1.opt.ema_decay must be in \[0, 1\)'),
    ('stages.distill_k4.tau_min', 2.0, 'stages.distill_k4.tau_min/tau_max'),
    ('mesh.data', 0, 'mesh.data'),
    ('evaluate.num_prompts', 0, 'evaluate.num_prompts must be > 0'),
    ('evaluate.windows', (4, 0), r'evaluate.windows must hold K values >= 1 .* got \(4, 0\)'),
])
def test_validation_names_field_and_allowed_values(field, value, match, tmp_path):
  cfg = synthetic_config()
  section, _, key = field.rpartition('.')
  node = cfg
  for part in section.split('.') if section else []:
    node = node[part]
  node[key] = value
  with pytest.raises(errors.UserError, match=match):
    context_lib.build(cfg, str(tmp_path))


@pytest.mark.parametrize('field,value,match', [
    ('norm', 'batchnorm', "model.norm='batchnorm' is not allowed; allowed: layernorm, rmsnorm"),
    ('n_kv_heads', 3, 'model.n_kv_heads=3 must divide model.n_heads=2'),
    ('mlp_activations', ('swish',), "model.mlp_activations='swish' is not allowed"),
    ('attention_impl', 'flash', "model.attention_impl='flash' is not allowed; allowed: auto"),
    ('dropout', -0.1, r'model.dropout must be in \[0, 1\)'),
])
def test_validate_refuses_what_the_model_refuses(field, value, match):
  """config_lib.validate, which every entry point runs before loading a tokenizer or writing
  anything, applies ArchConfig's and ExecConfig's own checks to the model section."""
  cfg = synthetic_config()
  cfg.model[field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(cfg)


def test_vocab_and_length_mismatches(tmp_path):
  cfg = synthetic_config()
  cfg.model.vocab_size = 1000
  with pytest.raises(config_lib.ConfigError, match='model.vocab_size=1000 does not match'):
    context_lib.build(cfg, str(tmp_path))
  cfg = synthetic_config()
  cfg.model.max_seq_len = 16
  with pytest.raises(config_lib.ConfigError, match='longer than model.max_seq_len'):
    context_lib.build(cfg, str(tmp_path))
  cfg = synthetic_config()
  cfg.stages.teacher.batch_size = 3
  cfg.mesh.data = 2
  with pytest.raises(Exception, match='stages.teacher.batch_size=3 must divide'):
    context_lib.build(cfg, str(tmp_path))
