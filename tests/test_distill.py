"""Distillation stages: initialisation, teacher handling, summaries, bad stage graphs."""
import json
import os

import jax
import numpy as np
import pytest

from kforcing_jax import distill
from kforcing_jax import pipeline
from kforcing_jax import sharding as sharding_lib
from kforcing_jax import stages
from tests.conftest import synthetic_config


@pytest.fixture
def run_dir(distilled_run):
  """teacher -> k1 -> k2 with 3 steps each (conftest's run, shared across test files)."""
  return distilled_run


def test_stage_outputs_and_frozen_teacher(run_dir):
  d, _ = run_dir
  for k in (1, 2):
    with open(d / f'distill_k{k}' / 'summary.json', encoding='utf-8') as f:
      s = json.load(f)
    assert s['k'] == k and len(s['agreement_per_position']) == k
    assert 0 <= s['agreement_all'] <= min(s['agreement_per_position']) + 1e-9
    for key in ('steps', 'seconds', 'teacher_stage'):
      assert key in s
  # the teacher's checkpoint directory holds only its own steps (never re-saved)
  assert sorted(os.listdir(d / 'teacher' / 'checkpoints')) == ['3']
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  t_cfg, t_params, _, _ = stages.load_model_stage(str(d), 'teacher', mesh)
  s_cfg, s_params, meta, _ = stages.load_model_stage(str(d), 'distill_k1', mesh)
  assert not t_cfg.pflm and s_cfg.pflm and meta['teacher_stage'] == 'teacher'
  assert 'noise_encoder' in s_params and 'noise_encoder' not in t_params


def test_microbatched_distill_step_matches_whole_batch(run_dir):
  """Same noise per row, same targets, same update with 2 microbatches as with one batch."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from kforcing_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from kforcing_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from kforcing_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  d, cfg = run_dir
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  t_cfg, t_params, _, _ = stages.load_model_stage(str(d), 'teacher', mesh)
  s_cfg = dataclasses.replace(t_cfg, pflm=True)
  student = model_lib.Transformer(s_cfg)
  tx = train_lib.make_optimizer(cfg.train, 10)
  source = data_lib.make_source(cfg)
  batch = next(data_lib.BatchIterator(source, 'train', 4, sharding_lib.batch_sharding(mesh), 0))
  outs = []
  for micro in (1, 2):
    state, _, _ = train_lib.create_state(
        stages.model_init_fn(student, s_cfg, cfg.data.seq_len), tx, mesh, jax.random.key(0),
        False)
    step = jax.jit(distill.make_distill_step(
        student, distill.make_targets_fn(model_lib.Transformer(t_cfg), 0), tx, 2, (0.5, 1.5),
        (), 0.0, micro))
    new_state, metrics = step(state, t_params, batch, jax.random.key(3))
    outs.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = outs
  for key in ('loss', 'acc_all', 'acc_1', 'acc_2', 'grad_norm'):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_copy_matching_copies_backbone_and_keeps_encoder():
  student = {'a': np.ones((2, 3)), 'noise_encoder': {'w': np.zeros(4)}, 'b': np.ones(5)}
  teacher = {'a': np.full((2, 3), 7.0), 'b': np.ones(6)}
  student = jax.tree.map(jax.numpy.asarray, student)
  teacher = jax.tree.map(jax.numpy.asarray, teacher)
  out, copied, new = distill.copy_matching(student, teacher)
  assert np.all(out['a'] == 7.0) and np.all(out['b'] == 1.0)
  assert copied == ["['a']"] and sorted(new) == ["['b']", "['noise_encoder']['w']"]


def test_teacher_stage_resolution():
  names = ['teacher', 'distill_k1', 'distill_k2', 'distill_k4']
  assert distill.teacher_stage_of('distill_k1', names) == 'teacher'
  assert distill.teacher_stage_of('distill_k4', names) == 'distill_k2'
  assert distill.teacher_stage_of('distill_k4', ['teacher', 'distill_k4']) == 'teacher'
  assert distill.teacher_stage_of('distill_k2', ['distill_k2']) == 'distill_k1'


def test_missing_teacher_stage(tmp_path):
  cfg = synthetic_config(pipeline='distill_k2')
  with pytest.raises(stages.StageError, match="'distill_k1' has no finished checkpoint"):
    pipeline.run(cfg, str(tmp_path))


def test_window_must_double_the_pflm_teacher(run_dir, tmp_path):
  d, _ = run_dir
  cfg = synthetic_config(steps=3, pipeline='distill_k4')
  cfg.distill.teacher_stage = 'distill_k1'
  with pytest.raises(stages.StageError, match='can only teach window 2, not 4'):
    pipeline.run(cfg, str(d))


def test_student_shape_must_match_teacher(run_dir):
  d, _ = run_dir
  cfg = synthetic_config(steps=3, pipeline='distill_k4')
  cfg.model.n_layers = 3
  with pytest.raises(stages.StageError, match='model.n_layers: teacher 2, student 3'):
    pipeline.run(cfg, str(d))
