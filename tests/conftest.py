"""Test set-up: 8 virtual CPU devices (sharding tests), tiny configs, the testdata path."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def testdata_dir():
  path = os.environ.get('KFORCING_TESTDATA', '')
  if not path or not os.path.isdir(path):
    pytest.skip('set KFORCING_TESTDATA to the shared testdata folder (../shared/testdata) '
                'to run tests on real LM1B/OWT samples and tokenizer files')
  return os.path.abspath(path)


@pytest.fixture
def testdata():
  return testdata_dir()


@pytest.fixture(scope='session')
def distilled_run(tmp_path_factory):
  """(workdir, config) of teacher -> distill_k1 -> distill_k2 (3 steps each) and the sample
  stage: one pipeline run shared by the distillation, sampling, benchmark and export tests."""
  from kforcing_jax import pipeline  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('distilled')
  cfg = synthetic_config(steps=3, pipeline='teacher,distill_k1,distill_k2,sample')
  pipeline.run(cfg, str(d))
  return d, cfg


def shrink(cfg, steps: int = 2):
  """Makes any config tiny: 1 device, a 2-layer 32-wide float32 model, 2 steps."""
  cfg.model.d_model = 32
  cfg.model.n_layers = 2
  cfg.model.n_heads = 2
  cfg.model.dtype = 'float32'
  cfg.model.max_seq_len = -1
  cfg.data.seq_len = 32
  cfg.data.batch_size = 4
  cfg.data.eval_batch_size = 4
  cfg.train.steps = steps
  cfg.train.warmup_steps = 1
  cfg.train.log_every = 1
  cfg.train.eval_every = steps
  cfg.train.eval_batches = 1
  cfg.train.checkpoint_every = steps
  cfg.train.microbatches = 1
  cfg.distill.steps = steps
  cfg.distill.stage_steps = ''
  cfg.distill.warmup_steps = 1
  cfg.distill.batch_size = -1
  cfg.distill.microbatches = 1
  cfg.distill.eval_batches = 1
  cfg.sample.num_prompts = 2
  cfg.sample.max_new_tokens = 8
  cfg.sample.num_samples = 1
  cfg.evaluate.num_prompts = 2
  cfg.evaluate.num_samples = 1
  cfg.evaluate.max_new_tokens = 8
  cfg.evaluate.freq_penalty = 0.0
  cfg.evaluate.agreement_rows = 2
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  return cfg


def synthetic_config(steps: int = 2, pipeline: str = 'teacher'):
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  cfg = shrink(synthetic.get_config(), steps)
  cfg.pipeline = pipeline
  cfg.data.synthetic.n_states = 8
  cfg.data.synthetic.n_symbols = 30
  return cfg
