"""Test set-up: 8 virtual CPU devices (sharding tests), the optional persistent compilation
cache, tiny configs, the testdata path."""
import gc
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Most tests compile many small programs once each: XLA's optimisation passes cost more
# than they save there (flax's lm1b tests do the same). Set before JAX is imported, so it
# holds here and in the CLIs the tests start as subprocesses, which inherit the
# environment. Tests that time or compare compiled buffer sizes turn the passes back on
# (test_memory).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# Metrics go to metrics.jsonl only: clu's TensorBoard writer imports TensorFlow (~10-20 s
# per process); test_train checks the TensorBoard path once.
os.environ.setdefault('KFORCING_TENSORBOARD', '0')
# JAX's persistent compilation cache (CPU included) serves programs that fresh jit closures
# or subprocesses compile again; it is used only when JAX_COMPILATION_CACHE_DIR is set (then
# kept across runs; subprocesses inherit it). It is off by default: jaxlib 0.10.2 crashed
# (SIGSEGV in the cache write of an executable) in one full run here.
if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax  # noqa: E402
import pytest  # noqa: E402

from kforcing_jax.configs import synthetic  # noqa: E402
from kforcing_jax.pipeline import run as pipeline  # noqa: E402

if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


MAX_MAPPINGS = 30_000


def memory_mappings() -> int:
  try:
    with open('/proc/self/maps', 'rb') as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Frees the compiled programs after a test module once they hold many memory mappings.
  Every XLA:CPU executable keeps three mappings for its code while referenced, and the
  suite compiles thousands of programs: in one process they reached the kernel's
  vm.max_map_count (65,530) and the next compile crashed with SIGSEGV. Clearing after
  every module would recompile what later modules share (the session's pipeline run)."""
  yield
  if memory_mappings() > MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()


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
  d = tmp_path_factory.mktemp('distilled')
  cfg = synthetic_config(steps=3, pipeline=('teacher', 'distill_k1', 'distill_k2', 'sample'))
  pipeline.run(cfg, str(d))
  return d, cfg


def shrink(cfg, steps: int = 2):
  """Makes any config tiny: 1 device, a 2-layer 32-wide float32 model, 2 steps a stage."""
  cfg.model.d_model = 32
  cfg.model.n_layers = 2
  cfg.model.n_heads = 2
  cfg.model.dtype = 'float32'
  cfg.model.max_seq_len = -1
  cfg.data.seq_len = 32
  cfg.data.eval_batch_size = 4
  for name, s in cfg.stages.items():
    s.steps = steps
    s.batch_size = 4
    s.microbatches = 1
    s.log_every = 1
    s.checkpoint_every = steps
    s.eval_batches = 1
    s.opt.warmup_steps = 1
    if name == 'teacher':
      s.eval_every = steps
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


def synthetic_config(steps: int = 2, pipeline=('teacher',)):
  cfg = shrink(synthetic.get_config(), steps)
  cfg.pipeline = (pipeline,) if isinstance(pipeline, str) else tuple(pipeline)
  cfg.data.synthetic.n_states = 8
  cfg.data.synthetic.n_symbols = 30
  return cfg


def two_process_config():
  """teacher -> distill_k1, 2 steps of batch 8: the multi-process test's job."""
  cfg = synthetic_config(steps=2, pipeline=('teacher', 'distill_k1'))
  cfg.data.eval_batch_size = 8
  for s in cfg.stages.values():
    s.batch_size = 8
    # Adam with a tiny eps turns a ~1e-9 reduction-order difference in a near-zero gradient
    # into a full-size step; a larger eps keeps the comparison about the sharding itself.
    s.opt.eps = 1e-3
  return cfg
