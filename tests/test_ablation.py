"""The ablation harness and stages named freely (kind and k in their sections)."""
import json
import os
import shutil
from unittest import mock

import pytest

from kforcing_jax import ablate
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.configs import base as base_config
from kforcing_jax.pipeline import ablation
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.pipeline import run_dir
from kforcing_jax.training import checkpoint as ckpt_lib
from kforcing_jax.training import trainer
from tests.conftest import synthetic_config


def test_variants_share_the_stages_they_leave_equal_and_rerun_skips(tmp_path):
  cfg = synthetic_config(steps=2, pipeline=('teacher', 'distill_k1', 'distill_k2',
                                            'evaluate'))
  table = ablation.run(cfg, str(tmp_path), ['progressive', 'on_policy'], [0])
  seed_dir = tmp_path / 'seed0'
  for v in ('progressive', 'on_policy'):
    # teacher and k1 trained once, linked; k2 and evaluate the variant's own
    assert os.readlink(seed_dir / v / 'teacher') == os.path.join('..', 'shared', 'teacher')
    assert os.readlink(seed_dir / v / 'distill_k1') == os.path.join('..', 'shared',
                                                                    'distill_k1')
    assert not os.path.islink(seed_dir / v / 'distill_k2')
    assert run_dir.read_summary(str(seed_dir / v / 'distill_k2'))['objective'] == v
  rows = {r['variant']: r for r in table['rows']}
  assert set(rows) == {'progressive', 'on_policy'}
  for r in rows.values():
    assert r['model'] == 'k2' and r['K'] == 2 and r['nll_key'] == 'exact'
    assert list(r['stage_agreement']) == ['distill_k2'] and r['steps'] == 2
    report = json.loads((seed_dir / r['variant'] / 'evaluate' / 'report.json').read_text())
    teacher = next(x for x in report['rows'] if x['model'] == 'teacher')
    k2 = next(x for x in report['rows'] if x['model'] == 'k2' and x['K'] == 2 and
              x['freq_penalty'] == 0.0)
    assert r['nll_ratio'] == k2['gen_nll']['exact'] / teacher['gen_nll']['exact']
    assert r['entropy_ratio'] == k2['entropy'] / teacher['entropy']
  for f in ('ablation.json', 'ablation.md', 'ablation.png'):
    assert (tmp_path / f).stat().st_size > 0
  assert '| on_policy | 1 |' in (tmp_path / 'ablation.md').read_text()
  # a rerun trains nothing and gives the same table
  with mock.patch.object(trainer, 'run', side_effect=AssertionError('retrained')):
    again = ablation.run(cfg, str(tmp_path), ['progressive', 'on_policy'], [0])
  assert again['rows'] == table['rows']


def test_ablation_refusals(tmp_path):
  cfg = synthetic_config(steps=2, pipeline=('teacher', 'distill_k1', 'distill_k2'))
  with pytest.raises(SystemExit, match='must end with evaluate'):
    ablate.main(['ablate', '--config=synthetic', f'--workdir={tmp_path}',
                 '--config.pipeline=teacher,distill_k1'])
  with pytest.raises(SystemExit, match="'kl' is not known; allowed: progressive"):
    ablate.main(['ablate', '--config=synthetic', f'--workdir={tmp_path}', '--variants=kl'])
  with pytest.raises(SystemExit, match='--seeds'):
    ablate.main(['ablate', '--config=synthetic', f'--workdir={tmp_path}', '--seeds=a'])
  cfg.pipeline = cfg.pipeline + ('evaluate',)
  with pytest.raises(Exception, match='name each variant once'):
    ablation.run(cfg, str(tmp_path), ['mixed', 'mixed'], [0])


def test_a_stage_under_a_new_name(distilled_run, tmp_path):
  """A second k=2 stage under another objective needs only its section: it trains from
  distill_k1 on the run teacher's rollout, and is found among the run's model stages."""
  d, _ = distilled_run
  run = tmp_path / 'run'
  shutil.copytree(d, run, symlinks=True)
  cfg = synthetic_config(steps=2, pipeline=('teacher', 'distill_k1', 'ar_k2'))
  cfg.stages.ar_k2 = base_config.distill_stage(2, 'ar_rollout')
  cfg.stages.ar_k2.update({'steps': 2, 'batch_size': cfg.stages.distill_k2.batch_size,
                           'checkpoint_every': 1})
  pipeline.run(cfg, str(run))
  summary = run_dir.read_summary(str(run / 'ar_k2'))
  assert summary['objective'] == 'ar_rollout' and summary['teacher_stage'] == 'distill_k1'
  assert summary['target_passes_per_window'] == 2.0
  saved = run_dir.load_run_config(str(run))  # its config.json re-creates the section
  assert saved.stages.ar_k2.objective == 'ar_rollout' and saved.stages.ar_k2.k == 2
  assert run_dir.finished_model_stages(str(run)) == ['teacher', 'distill_k1', 'ar_k2',
                                                      'distill_k2']
  mngr = ckpt_lib.manager(str(run / 'ar_k2' / 'checkpoints'), create=False)
  meta = ckpt_lib.restore_meta(mngr)
  mngr.close()
  assert meta['seeds'] == list(trainer.stage_seeds(cfg.seed, 'ar_k2'))
  # the AR model it rolls out (the run's teacher, found along the chain) is recorded
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  t_params = run_dir.load_model_stage(str(run), 'teacher', mesh)[1]
  assert meta['compat']['objective'] == 'ar_rollout'
  assert meta['compat']['ar_fingerprint'] == ckpt_lib.params_fingerprint(t_params)


def test_resume_keeps_the_seeds_a_checkpoint_was_written_with():
  spec = mock.Mock(seeds=(1, 2, 3), legacy_seeds=(4, 5, 6))
  fresh = mock.Mock(latest_step=lambda: None)
  assert trainer.resume_seeds(fresh, spec) == (1, 2, 3)
  old = mock.Mock(latest_step=lambda: 10)
  with mock.patch.object(ckpt_lib, 'restore_meta', return_value={'compat': {}}):
    assert trainer.resume_seeds(old, spec) == (4, 5, 6)  # written before seeds were saved
  with mock.patch.object(ckpt_lib, 'restore_meta', return_value={'seeds': [7, 8, 9]}):
    assert trainer.resume_seeds(old, spec) == (7, 8, 9)
  # a checkpoint from before objectives were named resumes as a progressive one
  meta = {'compat': {'k': 2}, 'k': 2}
  assert ckpt_lib.saved_compat(meta)['objective'] == 'progressive'


def test_a_readout_variant_edits_every_distill_stage_and_shares_only_the_teacher():
  cfg = synthetic_config(steps=2, pipeline=('teacher', 'distill_k1', 'distill_k2',
                                            'evaluate'))
  kl = ablation.variant_config(cfg, 'inverse_cdf_kl', 0)
  assert kl.model.readout == 'inverse_cdf'
  assert [kl.stages[s].objective for s in ('distill_k1', 'distill_k2')] == ['on_policy_kl'] * 2
  assert kl.stages.distill_k2.position_power == 1.0
  back = ablation.variant_config(kl, 'on_policy', 0)  # an argmax variant of that config
  assert back.model.readout == 'argmax'
  assert [back.stages[s].objective for s in ('distill_k1', 'distill_k2')] == [
      'progressive', 'on_policy']
  plain = ablation.variant_config(cfg, 'on_policy', 0)
  assert ablation.shared_stages([plain, kl]) == ['teacher']
  assert ablation.shared_stages([plain, ablation.variant_config(cfg, 'progressive', 0)]) == [
      'teacher', 'distill_k1']
