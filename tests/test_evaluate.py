"""Evaluation metrics against hand-computed values, a planted bad student, report files."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import data as data_lib
from kforcing_jax import evaluate
from kforcing_jax import pipeline
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import stages
from tests.conftest import synthetic_config


def test_unigram_entropy_by_hand():
  assert evaluate.unigram_entropy([3, 3, 3]) == 0.0
  assert evaluate.unigram_entropy([1, 2]) == pytest.approx(math.log(2))
  p = np.array([2, 1, 1]) / 4
  assert evaluate.unigram_entropy([5, 5, 6, 7]) == pytest.approx(-(p * np.log(p)).sum())


def test_sequence_nll_by_hand():
  logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3] * 3]))
  tokens = [0, 1, 2]
  # tokens[1] under logits[0], tokens[2] under logits[1]
  assert evaluate.sequence_nll(logits, tokens, 1) == pytest.approx(
      -(math.log(0.25) + math.log(0.8)) / 2, rel=1e-6)
  assert evaluate.sequence_nll(logits, tokens, 2) == pytest.approx(-math.log(0.8), rel=1e-6)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  d = tmp_path_factory.mktemp('eval')
  cfg = synthetic_config(steps=150, pipeline='teacher,distill_k1,evaluate')
  cfg.train.learning_rate = 3e-3
  cfg.distill.learning_rate = 3e-3
  cfg.distill.batch_size = 8
  cfg.train.log_every = 50
  cfg.evaluate.num_prompts = 4
  cfg.evaluate.max_new_tokens = 12
  cfg.evaluate.agreement_rows = 8
  pipeline.run(cfg, str(d))
  return d, cfg


def test_report_files_are_complete(trained):
  d, _ = trained
  with open(d / 'evaluate' / 'report.json', encoding='utf-8') as f:
    report = json.load(f)
  assert report['source_entropy_rate'] > 1.5
  models = [(r['model'], r['K']) for r in report['rows']]
  assert models == [('teacher', 1), ('k1', 1)]
  for r in report['rows']:
    assert set(r['gen_nll']) == {'exact', 'teacher'}
    assert all(np.isfinite(v) for v in r['gen_nll'].values())
    assert r['nfe_per_token'] == 1.0 and r['entropy'] > 0
  assert report['rows'][0]['agreement_all'] is None
  assert 0 <= report['rows'][1]['agreement_all'] <= 1
  assert report['protocol']['seed'] == 2024
  md = (d / 'evaluate' / 'report.md').read_text()
  assert '| k1 | 1 |' in md and 'gen NLL (exact)' in md
  assert (d / 'evaluate' / 'report.png').stat().st_size > 1000


def test_planted_bad_student_is_caught(trained):
  """A student whose noise encoder is re-randomised agrees far less with the teacher on
  shared noise, and its samples leave the teacher's (exact NLL, entropy) point: it
  collapses onto a few tokens. (With a source that gives every sample a finite
  likelihood, such repetition has a *lower* exact NLL than real samples, so NLL alone
  cannot flag it -- the report reads NLL next to entropy for this reason.)"""
  d, cfg = trained
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  t_cfg, t_params, _, _ = stages.load_model_stage(str(d), 'teacher', mesh)
  s_cfg, s_params, _, _ = stages.load_model_stage(str(d), 'distill_k1', mesh)
  bad = dict(s_params)
  leaves, tree = jax.tree.flatten(s_params['noise_encoder'])
  keys = jax.random.split(jax.random.key(0), len(leaves))
  bad['noise_encoder'] = jax.tree.unflatten(
      tree, [jax.random.normal(k, x.shape) * (jnp.std(x) + 0.1) for x, k in zip(leaves, keys)])
  source = data_lib.make_source(cfg)
  batch = data_lib.BatchIterator(source, 'eval', 16, None, 0, False).local_batch(0)
  good = evaluate.shared_noise_agreement(s_cfg, s_params, t_cfg, t_params, batch, 1, 0, ())
  planted = evaluate.shared_noise_agreement(s_cfg, bad, t_cfg, t_params, batch, 1, 0, ())
  print('agreement trained', good, 'planted', planted)
  assert good[0] > planted[0] + 0.2
  from kforcing_jax import decode  # pylint: disable=g-import-not-at-top
  prompts = [list(r[:4]) for r in batch['tokens']]
  ev = evaluate.Evaluators(source, t_cfg, t_params)
  point = {}
  for name, mcfg, params, pflm in (('teacher', t_cfg, t_params, False),
                                   ('good', s_cfg, s_params, True),
                                   ('bad', s_cfg, bad, True)):
    spec = decode.DecodeSpec(K=1, pflm=pflm, max_new_tokens=20)
    out, _ = decode.Engine(mcfg, params).generate(prompts, spec, seed=1, k_model=1)
    point[name] = (ev(prompts, out.tolist())['exact'],
                   float(np.mean([evaluate.unigram_entropy(r) for r in out.tolist()])))
  print('(exact gen NLL, entropy)', point)
  dist = {n: abs(p[0] / point['teacher'][0] - 1) + abs(p[1] / point['teacher'][1] - 1)
          for n, p in point.items()}
  assert dist['good'] < 0.3
  assert dist['bad'] > dist['good'] + 0.5
  assert point['bad'][1] < 0.5 * point['teacher'][1]  # collapsed onto a few tokens
