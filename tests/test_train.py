import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.training import checkpoint as ckpt_lib
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.training import optim
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.pipeline import run_dir
from kforcing_jax.training import teacher
from kforcing_jax.training import trainer
from kforcing_jax.training import writers
from tests.conftest import synthetic_config


def run_steps(cfg, mesh_shape, n_steps, microbatches=1):
  """n train steps on a mesh; returns (losses, params on host)."""
  t = cfg.stages.teacher
  # Adam with a tiny eps turns a ~1e-9 reduction-order difference in a near-zero gradient
  # into a full-size step; a larger eps keeps the comparison about the sharding itself.
  t.opt.eps = 1e-3
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  source = data_lib.make_source(cfg)
  arch, exe = arch_lib.configs_from_run(cfg, source.tokenizer.vocab_size,
                                         source.tokenizer.never_emit_ids)
  mesh = sharding_lib.make_mesh(cfg.mesh)
  model = model_lib.build(arch, exe)
  tx = optim.make_optimizer(t.opt, t.steps)
  state, _, shardings = trainer.create_state(
      model_lib.init_fn(model, cfg.data.seq_len), tx, mesh, jax.random.key(0), False)
  step = trainer.jit_step(teacher.make_train_step(model, tx, 0.0, microbatches), shardings, mesh)
  it = data_lib.BatchIterator(source, 'train', t.batch_size, sharding_lib.batch_sharding(mesh), 0)
  losses = []
  with sharding_lib.mesh_context(mesh):
    for _ in range(n_steps):
      state, m = step(state, next(it), jax.random.key(1))
      losses.append(float(m['loss']))
  return losses, jax.device_get(state.params), state


def run_batch8(mesh_shape, n_steps, microbatches=1):
  cfg = synthetic_config(steps=n_steps)
  cfg.stages.teacher.batch_size = 8
  return run_steps(cfg, mesh_shape, n_steps, microbatches)


def assert_same_run(a_losses, a_params, b_losses, b_params):
  np.testing.assert_allclose(a_losses, b_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(a_params), jax.tree.leaves(b_params)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_sharded_train_step_matches_one_device():
  one_losses, one_params, _ = run_batch8((1, 1, 1), 3)
  many_losses, many_params, state = run_batch8((2, 2, 2), 3)
  # parameters really are sharded over fsdp and tensor
  emb = state.params['embed']['embedding']
  assert emb.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
  assert len(emb.addressable_shards) == 8
  assert_same_run(many_losses, many_params, one_losses, one_params)
  assert one_losses[-1] < one_losses[0]


def test_microbatched_step_matches_whole_batch():
  """4 microbatches of 2 rows (interleaved, on a 2-device mesh) == one batch of 8 rows."""
  whole_losses, whole_params, _ = run_batch8((1, 1, 1), 2)
  micro_losses, micro_params, _ = run_batch8((2, 1, 1), 2, microbatches=4)
  assert_same_run(micro_losses, micro_params, whole_losses, whole_params)


def read_metrics(stage_dir):
  with open(os.path.join(stage_dir, 'logs', 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(l) for l in f]


def final_params(workdir, stage):
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  return jax.device_get(run_dir.load_model_stage(workdir, stage, mesh)[1])


def test_stop_and_resume_equals_uninterrupted(tmp_path):
  cfg = synthetic_config(steps=4)
  cfg.stages.teacher.checkpoint_every = 2
  pipeline.run(cfg, str(tmp_path / 'a'))
  calls = {'n': 0}
  real_next = data_lib.BatchIterator.__next__

  def dying_next(self):
    if self.split == 'train':
      calls['n'] += 1
      if calls['n'] == 4:  # steps 1-3 ran and were logged; the last checkpoint is step 2
        raise KeyboardInterrupt('simulated preemption')
    return real_next(self)

  with mock.patch.object(data_lib.BatchIterator, '__next__', dying_next):
    with pytest.raises(KeyboardInterrupt):
      pipeline.run(cfg, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'b' / 'teacher' / 'summary.json')
  pipeline.run(cfg, str(tmp_path / 'b'))  # resumes at step 2
  a_loss = [m['train/loss'] for m in read_metrics(tmp_path / 'a' / 'teacher') if 'train/loss' in m]
  b_loss = [m['train/loss'] for m in read_metrics(tmp_path / 'b' / 'teacher') if 'train/loss' in m]
  # steps 1-2 before the stop + 3-4 after the resume: step 3's record from before the stop
  # (past the checkpoint the run resumed from) is not kept twice
  steps = [m['step'] for m in read_metrics(tmp_path / 'b' / 'teacher') if 'train/loss' in m]
  assert steps == [1, 2, 3, 4] and len(a_loss) == 4
  np.testing.assert_allclose(b_loss, a_loss, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(final_params(tmp_path / 'a', 'teacher')),
                  jax.tree.leaves(final_params(tmp_path / 'b', 'teacher'))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # a finished stage is skipped on rerun, without building the data source
  with mock.patch.object(data_lib, 'make_source', side_effect=AssertionError('data read')):
    out = pipeline.run(cfg, str(tmp_path / 'b'))
  assert out['teacher']['steps'] == 4


def test_resuming_with_an_incompatible_config_is_refused(tmp_path):
  cfg = synthetic_config(steps=2)
  cfg.stages.teacher.checkpoint_every = 1
  calls = {'n': 0}
  real_next = data_lib.BatchIterator.__next__

  def dying_next(self):
    calls['n'] += 1
    if calls['n'] == 2:
      raise KeyboardInterrupt
    return real_next(self)

  with mock.patch.object(data_lib.BatchIterator, '__next__', dying_next):
    with pytest.raises(KeyboardInterrupt):
      pipeline.run(cfg, str(tmp_path))
  cfg.model.d_model = 64
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='model.d_model'):
    pipeline.run(cfg, str(tmp_path))
  cfg.model.d_model = 32
  cfg.data.synthetic.n_symbols = 40  # another vocabulary / tokenizer
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError,
                     match=r'model.vocab_size: checkpoint has 32, config asks for 42'):
    pipeline.run(cfg, str(tmp_path))


def test_nan_guard_stops_with_a_clear_message(tmp_path):
  cfg = synthetic_config(steps=3)
  cfg.stages.teacher.opt.learning_rate = 1e30
  cfg.stages.teacher.opt.grad_clip = 0.0
  with pytest.raises(trainer.NonFiniteLossError, match='not finite'):
    pipeline.run(cfg, str(tmp_path))


def test_teacher_summary_and_learning(tmp_path):
  cfg = synthetic_config(steps=30)
  cfg.stages.teacher.opt.learning_rate = 3e-3
  cfg.stages.teacher.eval_every = 30
  cfg.stages.teacher.opt.ema_decay = 0.9
  out = pipeline.run(cfg, str(tmp_path))['teacher']
  with open(tmp_path / 'teacher' / 'summary.json', encoding='utf-8') as f:
    summary = json.load(f)
  for key in ('val_nll', 'source_entropy_rate', 'steps', 'seconds'):
    assert key in summary
  assert summary == json.loads(json.dumps(out))
  losses = [m['train/loss'] for m in read_metrics(tmp_path / 'teacher') if 'train/loss' in m]
  assert losses[-1] < losses[0] - 0.5
  assert summary['val_nll'] < np.log(32)  # better than uniform over the vocabulary


def test_shift_targets_masks_padding():
  tokens = jnp.asarray([[5, 6, 7, 0, 0]])
  mask = jnp.asarray([[True, True, True, False, False]])
  targets, w = teacher.shift_targets(tokens, mask)
  np.testing.assert_array_equal(targets, [[6, 7, 0, 0, 0]])
  np.testing.assert_array_equal(w, [[1, 1, 0, 0, 0]])


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path, monkeypatch):
  """metrics.jsonl always; TensorBoard summaries through clu unless KFORCING_TENSORBOARD=0
  (the tests' setting, conftest.py)."""
  pytest.importorskip('clu.metric_writers')
  monkeypatch.delenv('KFORCING_TENSORBOARD', raising=False)
  for name, env in (('on', None), ('off', '0')):
    if env is not None:
      monkeypatch.setenv('KFORCING_TENSORBOARD', env)
    w = writers.MetricWriter(str(tmp_path / name / 'logs'))
    w.write_scalars(3, {'train/loss': np.float32(1.5)})
    w.close()
    assert read_metrics(tmp_path / name) == [{'step': 3, 'train/loss': 1.5}]
  on = tmp_path / 'on' / 'logs'
  events = [f for f in os.listdir(on) if f.startswith('events.out.tfevents')]
  assert len(events) == 1 and os.path.getsize(on / events[0]) > 0
  assert os.listdir(tmp_path / 'off' / 'logs') == ['metrics.jsonl']
