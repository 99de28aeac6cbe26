"""The serving precision `auto` follows the hardware, and says why."""
import os
import platform

import pytest

from kforcing_jax.models import precision
from kforcing_jax import runtime

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
