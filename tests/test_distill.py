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


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """teacher -> k1 -> k2 with a few steps each (shared by the tests below)."""
  d = tmp_path_factory.mktemp('distill')
  cfg = synthetic_config(steps=3, pipeline='teacher,distill_k1,distill_k2')
  pipeline.run(cfg, str(d))
  return d, cfg


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
