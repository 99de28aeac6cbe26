"""Every file in configs/ builds, shrinks and runs; bad settings give clear errors."""
import glob
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import context as context_lib
from kforcing_jax.interop import released as import_official
from kforcing_jax.pipeline import run as pipeline
from tests.conftest import shrink, synthetic_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3]
                 for p in glob.glob(os.path.join(config_lib.CONFIG_DIR, '*.py'))
                 if not os.path.basename(p).startswith('_'))


def test_config_files_are_all_covered():
  assert {'base', 'synthetic', 'lm1b', 'owt'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_builds_shrinks_and_runs(name, tmp_path):
  cfg = config_lib.load_config_file(name)
  config_lib.validate(cfg)
  shrink(cfg, steps=1)
  patches = []
  if cfg.data.source != 'synthetic':
    testdata = os.environ.get('KFORCING_TESTDATA', '')
    if not testdata:
      pytest.skip('set KFORCING_TESTDATA to run the LM1B/OWT configs on real samples')
    tok_dir = {'bert-base-uncased': 'bert-base-uncased', 'gpt2': 'gpt2'}
    cfg.data.tokenizer_path = os.path.join(
        testdata, 'tokenizers', tok_dir[cfg.data.tokenizer or ('bert-base-uncased'
                                                               if cfg.data.source == 'lm1b'
                                                               else 'gpt2')])
    if cfg.data.source == 'lm1b':
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      cfg.data.tfds_data_dir = str(tmp_path / 'tfds')
      patches.append(mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                                       return_value=os.path.join(testdata, 'lm1b', 'tfds_layout')))
    elif cfg.data.source == 'openwebtext':
      cfg.data.path = os.path.join(testdata, 'owt', 'hf_dummy')
      cfg.data.cache_dir = ''
      cfg.data.eval_fraction = 0.25
    else:
      cfg.data.path = os.path.join(testdata, 'lm1b', 'lingvo_lm1b_100.txt')
      cfg.data.eval_fraction = 0.1
  if name.endswith('_from_released'):
    # the released checkpoint's layout at the shrunk shape, imported as the config expects
    teacher = cfg.stages.distill_k8.teacher_stage
    assert cfg.pipeline == ('distill_k8',) and teacher.startswith('released/')
    vocab = 50258 if cfg.data.tokenizer == 'gpt2' else 30522
    ckpt = str(tmp_path / 'pflm_k4.npz')
    np.savez(ckpt, **import_official.random_state(vocab, cfg.model.d_model, cfg.model.n_layers,
                                                  cfg.model.d_model // cfg.model.n_heads, True))
    cfg.stages.distill_k8.teacher_stage = str(tmp_path / teacher)
    import_official.import_checkpoint(ckpt, cfg.stages.distill_k8.teacher_stage,
                                      tokenizer=cfg.data.tokenizer,
                                      tokenizer_path=cfg.data.tokenizer_path)
  elif name != 'synthetic':
    cfg.pipeline = ('teacher',)  # the synthetic run covers every distillation stage
  with mock.patch.object(sys, 'argv', ['x']):
    for p in patches:
      p.start()
    try:
      out = pipeline.run(cfg, str(tmp_path / 'run'))
    finally:
      for p in patches:
        p.stop()
  for stage in config_lib.stages(cfg):
    assert os.path.exists(tmp_path / 'run' / stage / 'summary.json'), stage
  assert out[cfg.pipeline[0]]['steps'] == 1


def test_every_key_is_declared_and_commented_in_base():
  """Every field any config file sets exists in base.py (a typo would add a new key)."""
  from kforcing_jax.configs import base  # pylint: disable=g-import-not-at-top
  known = set(flatten(base.get_config()))
  for name in CONFIGS:
    keys = set(flatten(config_lib.load_config_file(name)))
    assert keys <= known, (name, keys - known)


def flatten(cfg, prefix=''):
  for k, v in cfg.items():
    if hasattr(v, 'items'):
      yield from flatten(v, f'{prefix}{k}.')
    else:
      yield prefix + k


def run_main(*args, cwd=ROOT, script='main.py'):
  return subprocess.run([sys.executable] + ([script] if script else []) + list(args), cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_unknown_config_key_is_named(tmp_path):
  r = run_main('--config=configs/synthetic.py', f'--workdir={tmp_path}',
               '--config.model.d_modle=64')
  assert r.returncode != 0
  assert '--config.model.d_modle' in r.stderr and 'Did you mean "d_model"' in r.stderr
  assert 'Traceback' not in r.stderr


def test_bad_value_is_named_without_a_traceback(tmp_path):
  # a package config by name, from another directory
  r = run_main(os.path.join(ROOT, 'main.py'), '--config=synthetic', f'--workdir={tmp_path}',
               '--config.stages.teacher.opt.schedule=exponential', cwd=str(tmp_path), script='')
  assert r.returncode != 0
  assert ("stages.teacher.opt.schedule='exponential' is not allowed; allowed: cosine, linear, "
          "constant") in r.stderr
  assert 'Traceback' not in r.stderr


def test_pipeline_from_a_comma_separated_override(tmp_path):
  r = run_main('--config=synthetic', f'--workdir={tmp_path}',
               '--config.pipeline=teacher,distill_k3')
  assert r.returncode != 0 and "pipeline stage 'distill_k3' is not known" in r.stderr


@pytest.mark.parametrize('field,value,match', [
    ('pipeline', ('teacher', 'distill_k3'), 'distill_k3'),
    ('pipeline', ('teacher', 'distill_k16'), 'no stages.distill_k16 section'),
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
])
def test_validation_names_field_and_allowed_values(field, value, match, tmp_path):
  cfg = synthetic_config()
  section, _, key = field.rpartition('.')
  node = cfg
  for part in section.split('.') if section else []:
    node = node[part]
  node[key] = value
  with pytest.raises(Exception, match=match):
    context_lib.build(cfg, str(tmp_path))


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
