"""The CPU kernels of cpu_matmul.cc -- weight-only int8 products (`int8_matmul`) and batched
small float32 products for decode-time attention (`batched_matmul`): built once per
machine, registered with XLA as FFI targets, called from jitted code.

The shared library is compiled on first use with the system C++ compiler for this CPU
(-march=native: AVX-512, AVX2 + FMA or portable code; $KFORCING_KERNEL_MARCH overrides
`native`) against the installed jaxlib's FFI headers, and cached under
$KFORCING_KERNEL_CACHE (default ~/.cache/kforcing_jax/kernels), keyed by the source, the
compiler, the flags, jaxlib's version and the CPU's flags; the file is written under a
temporary name and renamed, so concurrent first uses are safe.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib

from kforcing_jax import errors
from kforcing_jax import runtime

PANEL = 16  # output columns per packed panel (cpu_matmul.cc's kPanel)
SOURCE = os.path.join(os.path.dirname(__file__), 'cpu_matmul.cc')
# FFI handler symbols of the library -> the name part of their targets
_HANDLERS = {'KfInt8Matmul': 'int8_matmul', 'KfBatchedMatmul': 'batched_matmul'}
FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC')

_lock = threading.Lock()
_targets: dict[str, dict[str, str]] = {}  # -march value -> {handler: its FFI target}


class KernelBuildError(errors.UserError):
  pass


def cache_dir() -> str:
  return os.environ.get('KFORCING_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'kforcing_jax', 'kernels')


def compiler() -> str | None:
  """$CXX if set (None if it is not an executable), else g++ or clang++ on PATH."""
  if os.environ.get('CXX'):
    return shutil.which(os.environ['CXX'])
  return shutil.which('g++') or shutil.which('clang++')


def default_march() -> str:
  return os.environ.get('KFORCING_KERNEL_MARCH') or 'native'


def _flags(march: str) -> tuple[str, ...]:
  return FLAGS + (f'-march={march}',)


def _library_path(cxx: str, march: str) -> str:
  h = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    h.update(f.read())
  version = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
  cpu = ' '.join(sorted(runtime.cpu_features()))
  for part in (version, ' '.join(_flags(march)), jaxlib.__version__, platform.machine(), cpu):
    h.update(part.encode())
  return os.path.join(cache_dir(), f'cpu_matmul-{h.hexdigest()[:16]}.so')


def build(march: str | None = None) -> str:
  """The kernels' library path for -march=`march` (default: default_march()), compiled
  first if this machine has none cached."""
  march = march or default_march()
  cxx = compiler()
  if cxx is None:
    why = (f'CXX={os.environ["CXX"]!r} is not an executable' if os.environ.get('CXX') else
           'none found: set CXX or install g++')
    raise KernelBuildError(
        f'the CPU kernels (int8 weights, ExecConfig.cache_products=kernel) need a C++ '
        f'compiler ({why}); or choose another precision (--dtype=mixed|float32) and '
        'cache_products (dot|reduce)')
  path = _library_path(cxx, march)
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  cmd = [cxx, *_flags(march), f'-I{jax.ffi.include_dir()}', SOURCE, '-o', tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise KernelBuildError(f'building the CPU kernels failed ({" ".join(cmd)}):\n'
                             f'{proc.stderr[-4000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def register(march: str | None = None, handler: str = 'KfInt8Matmul') -> str:
  """Builds (once per machine) and registers (once per process) the kernels for -march=
  `march`; returns `handler`'s FFI target name."""
  march = march or default_march()
  with _lock:
    if march not in _targets:
      lib = ctypes.cdll.LoadLibrary(build(march))
      suffix = ''.join(c if c.isalnum() else '_' for c in march)
      _targets[march] = {}
      for symbol, name in _HANDLERS.items():
        target = f'kf_{name}_{suffix}'
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform='cpu')
        _targets[march][symbol] = target
    return _targets[march][handler]


def int8_matmul(x_MxK: jax.Array, packed_PxKx16: jax.Array, scale_Np: jax.Array, n: int,
                march: str | None = None) -> jax.Array:
  """[M, n] float32 = x @ (q * scale) with q panel-packed int8 (quantize.quantize)."""
  call = jax.ffi.ffi_call(register(march), jax.ShapeDtypeStruct((x_MxK.shape[0], n),
                                                                jnp.float32))
  return call(x_MxK.astype(jnp.float32), packed_PxKx16, scale_Np)


def batched_matmul(x: jax.Array, w: jax.Array, march: str | None = None) -> jax.Array:
  """float32 x[..., M, K] @ w[..., K, N] -> [..., M, N] over equal leading (batch) axes, w
  row-major as stored."""
  call = jax.ffi.ffi_call(register(march, 'KfBatchedMatmul'),
                          jax.ShapeDtypeStruct(x.shape[:-1] + w.shape[-1:], jnp.float32))
  return call(x.astype(jnp.float32), w.astype(jnp.float32))
