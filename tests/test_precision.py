"""What the runtime reads of the machine and does with it: the serving precision `auto`
follows the hardware and says why; a server's cores are split between XLA and Python."""
import json
import os
import platform
import subprocess
import sys

import pytest

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax.models import precision

AVX2_EPYC = frozenset({'sse4_2', 'avx', 'avx2', 'fma', 'bmi2'})
ZEN4 = AVX2_EPYC | {'avx512f', 'avx512_bf16'}
SAPPHIRE_RAPIDS = AVX2_EPYC | {'avx512f', 'amx_bf16', 'amx_tile'}


def test_auto_on_cpu_needs_native_bf16_dots():
  name, why = precision.choose('auto', 'cpu', AVX2_EPYC)
  assert name == 'float32' and 'emulated' in why
  assert precision.choose('auto', 'cpu', ZEN4)[0] == 'mixed'
  name, why = precision.choose('auto', 'cpu', SAPPHIRE_RAPIDS)
  assert name == 'mixed' and 'amx_bf16' in why
  assert precision.choose('auto', 'cpu', frozenset({'fp', 'asimd', 'bf16'}))[0] == 'mixed'
  assert precision.choose('auto', 'gpu')[0] == 'bfloat16'
  assert precision.choose('mixed', 'cpu', AVX2_EPYC) == ('mixed', 'requested')
  with pytest.raises(precision.PrecisionError, match="--dtype='fp16': allowed: auto, bfloat16"):
    precision.choose('fp16')


@pytest.mark.skipif(not os.path.exists('/proc/cpuinfo'), reason='no /proc/cpuinfo')
def test_this_machine_is_read():
  """The feature flags and model name come from this machine's /proc/cpuinfo (every x86-64
  CPU has fpu and sse2 and names its model; every 64-bit Arm one has fp), and `auto`
  decides from them."""
  features = runtime.cpu_features()
  if platform.machine() in ('x86_64', 'AMD64'):
    assert {'fpu', 'sse2'} <= features
    assert runtime.cpu_model() not in ('', 'unknown CPU', platform.processor())
  elif platform.machine() in ('aarch64', 'arm64'):
    assert 'fp' in features
  native, _ = runtime.native_bf16_dot()
  assert precision.choose('auto', 'cpu') == precision.choose('auto', 'cpu', features)
  assert precision.choose('auto', 'cpu')[0] == ('mixed' if native else 'float32')


_SPLIT_PROBE = """
import json, os, sys
from kforcing_jax import runtime
line = runtime.reserve_host_cpus(int(sys.argv[1]))
import jax
jax.numpy.ones(8).sum().block_until_ready()
xla = set()
for tid in os.listdir('/proc/self/task'):
  with open(f'/proc/self/task/{tid}/comm') as f:
    if f.read().startswith('tf_'):  # XLA:CPU's thread pools
      xla |= os.sched_getaffinity(int(tid))
print(json.dumps({'line': line, 'main': sorted(os.sched_getaffinity(0)), 'xla': sorted(xla),
                  'again': runtime.reserve_host_cpus(1)}))
"""


def _split(n: int) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', _SPLIT_PROBE, str(n)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_host_cpus_put_xla_threads_on_the_other_cores():
  """reserve_host_cpus(1) before the backend starts: XLA's pools on cores 1.., the calling
  thread on core 0; once the backend runs, a second call changes nothing and says so."""
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < 2:
    pytest.skip('needs two cores')
  got = _split(1)
  assert got['main'] == cpus[:1] and got['xla'] == cpus[1:], got
  assert got['line'].startswith('XLA compute threads on CPUs')
  assert 'not applied' in got['again']
  shared = _split(0)
  assert shared['main'] == cpus and shared['xla'] == cpus, shared


def test_host_cpus_must_not_be_negative():
  with pytest.raises(errors.UserError, match='host_cpus=-1: must be >= 0'):
    runtime.reserve_host_cpus(-1)
