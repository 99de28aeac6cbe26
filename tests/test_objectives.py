"""Distillation objectives (training/objectives.py): their targets against the rules they
state, mixtures and curricula, position weighting, stage kinds and seeds, and refusals."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kforcing_jax.configs import base as base_config
from kforcing_jax.models import layouts
from kforcing_jax.models import sampling
from kforcing_jax.pipeline import config_lib
from kforcing_jax.training import objectives
from kforcing_jax.training import targets
from kforcing_jax.training import trainer
from tests.conftest import synthetic_config
from tests.helpers import causal_logits, tiny_model


@pytest.fixture(scope='module')
def models():
  """An AR model, a PFLM 'teacher' of window 2 and a PFLM 'student' (random weights)."""
  _, ar, ar_params = tiny_model(seed=0)
  _, pflm, t_params = tiny_model(pflm=True, seed=1)
  _, student, s_params = tiny_model(pflm=True, seed=2)
  ctx = jnp.asarray(np.random.default_rng(3).integers(0, 50, (2, 7)))
  return ar, ar_params, pflm, t_params, student, s_params, ctx


def settings(**kw):
  s = base_config.distill_stage(4)
  s.update(kw)
  return s


def test_ar_window_logits_are_the_causal_next_token_logits(models):
  """One pass over [context | window] gives, per window position, the logits a plain causal
  forward gives after the context and the window tokens before it."""
  ar, params, *_ , ctx = models
  win = jnp.asarray(np.random.default_rng(4).integers(0, 50, (2, 7, 3)))
  got = jax.jit(lambda p: objectives.ar_window_logits(ar, p, ctx, win))(params)
  assert got.shape == (2, 7, 4, 53)
  for b, t in ((0, 6), (1, 2)):
    row = jnp.concatenate([ctx[b, :t + 1], win[b, t]])[None]
    full = causal_logits(ar, params, row)[0]
    np.testing.assert_allclose(got[b, t], full[t:t + 4], atol=2e-4, rtol=2e-4)


def test_on_policy_targets_follow_the_prefix_they_are_given(models):
  """After the AR model's own rollout as the prefix, on-policy targets are that rollout;
  after another prefix, target i is the inverse-CDF token after that prefix's first i-1."""
  ar, params, *_, ctx = models
  u = sampling.uniform_noise(jax.random.key(5), (2, 7, 4))
  rollout = targets.ar_teacher_targets(ar, params, ctx, u)
  on = objectives.on_policy_targets(ar, params, ctx, rollout, u)
  np.testing.assert_array_equal(on, rollout)
  other = (rollout + 1) % 50
  on = objectives.on_policy_targets(ar, params, ctx, other, u)
  np.testing.assert_array_equal(on[..., 0], rollout[..., 0])  # no prefix yet
  for i in range(1, 4):
    logits = layouts.apply_window(ar, params, ctx, other[..., :i], None)
    np.testing.assert_array_equal(on[..., i], sampling.inverse_cdf(logits, u[..., i]))
  assert np.mean(np.asarray(on[..., 1:]) != np.asarray(rollout[..., 1:])) > 0.3


def test_targets_of_each_objective(models):
  ar, ar_params, pflm, t_params, student, s_params, ctx = models
  m = objectives.Models(teacher=pflm, teacher_k=2, ar=ar, student=student, k=4)
  frozen = {'teacher': t_params, 'ar': ar_params}
  u = sampling.uniform_noise(jax.random.key(6), (2, 7, 4))
  r = jax.random.uniform(jax.random.key(7), (2, 7))

  s_logits = layouts.apply_window(student, s_params, ctx, None, u)

  def run(name, progress=0.0, **kw):
    fn = objectives.get(name).make_targets(m, settings(**kw))
    return np.asarray(fn(frozen, s_logits, ctx, u, None, r, jnp.float32(progress)))
  prog = np.asarray(targets.pflm_teacher_targets(pflm, t_params, ctx, u))
  roll = np.asarray(targets.ar_teacher_targets(ar, ar_params, ctx, u))
  assert np.mean(prog != roll) > 0.3  # random models: the two rules differ
  np.testing.assert_array_equal(run('progressive'), prog)
  np.testing.assert_array_equal(run('ar_rollout'), roll)
  np.testing.assert_array_equal(run('mixed', ar_fraction=0.0), prog)
  np.testing.assert_array_equal(run('mixed', ar_fraction=1.0), roll)
  # per window (all k positions) one rule or the other, chosen by r < fraction
  half = run('mixed', ar_fraction=0.5)
  pick = np.asarray(r)[..., None] < 0.5
  np.testing.assert_array_equal(half, np.where(pick, roll, prog))
  # a curriculum: the fraction moves from ar_fraction to ar_fraction_end with progress
  np.testing.assert_array_equal(run('mixed', 0.0, ar_fraction=0.0, ar_fraction_end=1.0), prog)
  np.testing.assert_array_equal(run('mixed', 1.0, ar_fraction=0.0, ar_fraction_end=1.0), roll)
  mine = jnp.argmax(s_logits, -1)
  np.testing.assert_array_equal(run('on_policy'),
                                objectives.on_policy_targets(ar, ar_params, ctx, mine, u))


def cdf_window_reference(logits, u, margin, tau=1.0, blocked=()):
  """The soft-target rule in float64 numpy, token by token."""
  z = np.asarray(logits, np.float64) / tau
  p = np.exp(z - z.max())
  p /= p.sum()
  upper = np.cumsum(p)
  lower = upper - p
  a, b = max(u - margin, 0.0), min(u + margin, 1.0)
  q = np.array([max(min(hi, b) - max(lo, a), 0.0) for lo, hi in zip(lower, upper)])
  q[list(blocked)] = 0.0
  return q / q.sum()


def test_cdf_window_soft_targets():
  """Each token's mass is the share of [u - m, u + m] ∩ [0, 1] its CDF interval covers;
  blocked ids get none; the inverse-CDF token always gets some, all of it when u sits
  deeper than the margin inside its interval."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 17)) * 2, jnp.float32)
  u = jnp.asarray(rng.uniform(size=(3, 5)), jnp.float32).at[0, 0].set(0.001)
  tau = jnp.asarray([1.0, 0.5, 2.0])[:, None, None]
  for margin, blocked in ((0.05, ()), (0.2, (3, 9)), (0.5, ())):
    q = np.asarray(objectives.cdf_window(logits, u, margin, tau, blocked))
    y = np.asarray(sampling.inverse_cdf(logits, u, tau))
    for b in range(3):
      for n in range(5):
        ref = cdf_window_reference(logits[b, n], float(u[b, n]), margin, float(tau[b, 0, 0]),
                                   blocked)
        np.testing.assert_allclose(q[b, n], ref, atol=2e-6)
        if y[b, n] not in blocked:
          assert q[b, n, y[b, n]] > 0
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    assert np.all(q[..., list(blocked)] == 0)
  # a narrow margin is the hard target wherever u is deeper than it inside the interval
  narrow = np.asarray(objectives.cdf_window(logits, u, 1e-4))
  y = np.asarray(sampling.inverse_cdf(logits, u))
  hard = np.take_along_axis(narrow, y[..., None], -1)[..., 0]
  assert np.mean(hard > 0.999) > 0.9


def test_on_policy_soft_targets_and_loss(models):
  """on_policy_soft: on_policy's hard targets (agreement counts them) beside the soft
  targets of the same AR distributions; the loss is the cross-entropy against the soft."""
  ar, ar_params, pflm, t_params, student, s_params, ctx = models
  m = objectives.Models(teacher=pflm, teacher_k=2, ar=ar, student=student, k=4)
  u = sampling.uniform_noise(jax.random.key(9), (2, 7, 4))
  s_logits = layouts.apply_window(student, s_params, ctx, None, u)
  obj = objectives.get('on_policy_soft')
  assert obj.soft and not objectives.get('on_policy').soft
  got = obj.make_targets(m, settings(cdf_margin=0.1))(
      {'teacher': t_params, 'ar': ar_params}, s_logits, ctx, u, None, jnp.zeros((2, 7)), 0.0)
  y, q = objectives.split(got)
  mine = jnp.argmax(s_logits, -1)
  np.testing.assert_array_equal(y, objectives.on_policy_targets(ar, ar_params, ctx, mine, u))
  ar_logits = objectives.ar_window_logits(ar, ar_params, ctx, mine[..., :-1])
  np.testing.assert_allclose(q, objectives.cdf_window(ar_logits, u, 0.1), atol=1e-6)
  assert np.mean(np.asarray(q).max(-1) < 0.999) > 0.3  # soft: mass beside the hard target
  w = jnp.ones(y.shape)
  ce = -jnp.sum(q * jax.nn.log_softmax(s_logits), -1)
  np.testing.assert_allclose(obj.loss(s_logits, y, w, settings(), q), jnp.sum(ce), rtol=1e-5)
  assert objectives.split(y)[1] is None


def test_on_policy_kl_targets_are_the_ar_distributions_after_the_students_tokens(models):
  """on_policy_kl: the student's own tokens are the inverse CDF of its u under its logits
  (its readout); the hard targets are on_policy's after those tokens, the soft ones the AR
  model's tempered distributions there, without the ids the student never emits."""
  ar, ar_params, pflm, t_params, student, s_params, ctx = models
  student_icdf = type(student)(dataclasses.replace(student.arch, readout='inverse_cdf',
                                                   never_emit_ids=(7,)), student.exe)
  m = objectives.Models(teacher=ar, teacher_k=0, ar=None, student=student_icdf, k=4)
  u = sampling.uniform_noise(jax.random.key(10), (2, 7, 4))
  tau = jnp.asarray([1.0, 0.7])
  s_logits = layouts.apply_window(student_icdf, s_params, ctx, None, u, tau)
  obj = objectives.get('on_policy_kl')
  assert obj.soft and obj.readout == 'inverse_cdf' and objectives.get('on_policy').readout == 'argmax'
  y, q = obj.make_targets(m, settings())({'teacher': ar_params}, s_logits, ctx, u, tau,
                                         jnp.zeros((2, 7)), 0.0)
  mine = sampling.inverse_cdf(s_logits, u)
  assert np.mean(np.asarray(mine) != np.asarray(jnp.argmax(s_logits, -1))) > 0.3
  np.testing.assert_array_equal(y, objectives.on_policy_targets(ar, ar_params, ctx, mine, u, tau))
  ar_logits = objectives.ar_window_logits(ar, ar_params, ctx, mine[..., :-1])
  p = np.asarray(jax.nn.softmax(ar_logits / tau[:, None, None, None]), np.float64)
  p[..., 7] = 0.0
  np.testing.assert_allclose(q, p / p.sum(-1, keepdims=True), atol=1e-6)
  w = jnp.ones(y.shape)
  ce = -jnp.sum(q * jax.nn.log_softmax(s_logits), -1)
  np.testing.assert_allclose(obj.loss(s_logits, y, w, settings(), q), jnp.sum(ce), rtol=1e-5)


def test_an_ar_stage_teacher_is_the_ar_model(models):
  """With an AR stage teacher (k=1 or a first stage) every AR-based objective uses it."""
  ar, ar_params, _, _, student, s_params, ctx = models
  m = objectives.Models(teacher=ar, teacher_k=0, ar=None, student=student, k=2)
  u = sampling.uniform_noise(jax.random.key(8), (2, 7, 2))
  roll = np.asarray(targets.ar_teacher_targets(ar, ar_params, ctx, u))
  for name in ('progressive', 'ar_rollout', 'mixed'):
    fn = objectives.get(name).make_targets(m, settings(k=2))
    got = fn({'teacher': ar_params}, None, ctx, u, None, jnp.zeros((2, 7)), 0.0)
    np.testing.assert_array_equal(got, roll, err_msg=name)


def test_position_weighted_cross_entropy():
  w = np.asarray(objectives.position_weights(4, 1.0))
  np.testing.assert_allclose(w, np.array([1, 2, 3, 4]) / 2.5)
  np.testing.assert_allclose(objectives.position_weights(4, 0.0), np.ones(4))
  logits = jax.random.normal(jax.random.key(0), (2, 3, 4, 11))
  y = jax.random.randint(jax.random.key(1), (2, 3, 4), 0, 11)
  mask = jnp.ones((2, 3, 4))
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
  obj = objectives.get('progressive')
  np.testing.assert_allclose(obj.loss(logits, y, mask, settings(position_power=1.0)),
                             jnp.sum(ce * w), rtol=1e-5)
  np.testing.assert_allclose(obj.loss(logits, y, mask, settings()), jnp.sum(ce), rtol=1e-5)


def test_target_passes_per_window():
  m = lambda k, tk: objectives.Models(None, tk, None, None, k)
  passes = {n: o.target_passes(m(4, 2)) for n, o in objectives.OBJECTIVES.items()}
  assert passes == {'progressive': 2.0, 'ar_rollout': 4.0, 'mixed': 6.0, 'on_policy': 1.0,
                    'on_policy_soft': 1.0, 'on_policy_kl': 1.0}
  assert objectives.get('progressive').target_passes(m(1, 0)) == 1.0


def test_stage_seeds_come_from_the_stage_name():
  a = trainer.stage_seeds(0, 'distill_k4')
  assert a == trainer.stage_seeds(0, 'distill_k4')
  assert len(set(a)) == 3 and all(0 <= x < 2**31 for x in a)
  others = [trainer.stage_seeds(0, 'ar_k4'), trainer.stage_seeds(1, 'distill_k4'),
            trainer.stage_seeds(0, 'distill_k2')]
  assert all(set(a).isdisjoint(o) for o in others)


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.stages.distill_k2.update({'objective': 'kl'}),
     "stages.distill_k2.objective='kl' is not allowed; allowed: progressive, ar_rollout, "
     'mixed, on_policy, on_policy_soft, on_policy_kl'),
    (lambda c: c.stages.distill_k2.update({'objective': 'on_policy_kl'}),
     "stages.distill_k2.objective='on_policy_kl' trains students with "
     "model.readout='inverse_cdf', the config has model.readout='argmax'; allowed "
     'objectives for it: progressive, ar_rollout, mixed, on_policy, on_policy_soft'),
    (lambda c: c.model.update({'readout': 'inverse_cdf'}),
     "stages.distill_k1.objective='progressive' trains students with model.readout="
     "'argmax', the config has model.readout='inverse_cdf'; allowed objectives for it: "
     'on_policy_kl'),
    (lambda c: c.model.update({'readout': 'sample'}),
     "model.readout='sample' is not allowed; allowed: argmax, inverse_cdf"),
    (lambda c: c.stages.distill_k2.update({'cdf_margin': 0.0}),
     r'stages.distill_k2.cdf_margin must be in \(0, 0.5\], got 0.0'),
    (lambda c: c.stages.distill_k2.update({'k': 3}),
     'stages.distill_k2.k=3 is not allowed; allowed: a power of two'),
    (lambda c: c.stages.distill_k2.update({'kind': 'kl'}),
     "stages.distill_k2.kind='kl' is not allowed; allowed: teacher, distill"),
    (lambda c: c.stages.distill_k2.update({'ar_fraction': 1.5}),
     r'stages.distill_k2.ar_fraction must be in \[0, 1\]'),
    (lambda c: c.stages.distill_k2.update({'ar_fraction_end': 2.0}),
     'stages.distill_k2.ar_fraction_end must be -1'),
    (lambda c: c.stages.distill_k2.update({'position_power': -1.0}),
     'stages.distill_k2.position_power must be in'),
    (lambda c: c.stages.distill_k2.update({'ar_teacher': 'nowhere'}),
     "stages.distill_k2.ar_teacher='nowhere' is neither a model stage"),
    (lambda c: c.update({'pipeline': ('teacher', 'kl_k4')}),
     "pipeline stage 'kl_k4' is not known; allowed: the sections of `stages`"),
])
def test_bad_stage_fields_are_refused_by_name(edit, message):
  cfg = synthetic_config(pipeline=('teacher', 'distill_k1', 'distill_k2'))
  with cfg.unlocked():
    edit(cfg)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(cfg)


def test_a_new_stage_needs_only_its_section():
  cfg = synthetic_config(pipeline=('teacher', 'distill_k1', 'distill_k2', 'ar_k4'))
  with cfg.unlocked():
    cfg.stages.ar_k4 = base_config.distill_stage(4, 'ar_rollout')
  config_lib.validate(cfg)
  assert isinstance(cfg.stages.ar_k4, ml_collections.ConfigDict)


def test_objective_cost_benchmark(tmp_path):
  """launch/objective_cost.py times every objective's step and writes its JSON."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run(
      [sys.executable, os.path.join(root, 'launch', 'objective_cost.py'), '--k=2',
       '--objectives=progressive,mixed',
       '--steps=1', '--repeats=1', '--config.stages.distill_k2.batch_size=2',
       '--config.model.n_layers=1', '--config.data.seq_len=16', f'--out={tmp_path}'],
      cwd=root, capture_output=True, text=True, check=True, timeout=300,
      env={**{k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'},
           'JAX_PLATFORMS': 'cpu'})  # one CPU device, whatever the test process fakes
  with open(tmp_path / 'objective_cost.json', encoding='utf-8') as f:
    result = json.load(f)
  rows = {r['objective']: r for r in result['rows']}
  assert set(rows) == {'progressive', 'mixed'}
  assert rows['progressive']['vs_progressive'] == 1.0
  assert all(r['ms_per_step'] > 0 and r['k'] == 2 for r in rows.values())
  assert rows['mixed']['target_passes_per_window'] == 4.0
