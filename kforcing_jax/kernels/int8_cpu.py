"""The CPU int8 weight-product kernel (int8_matmul.cc): built once per machine, registered
with XLA as an FFI target, called from jitted code.

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

PANEL = 16  # output columns per packed panel (int8_matmul.cc's kPanel)
SOURCE = os.path.join(os.path.dirname(__file__), 'int8_matmul.cc')
FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC')

_lock = threading.Lock()
_targets: dict[str, str] = {}  # -march value -> its registered FFI target


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
  return os.path.join(cache_dir(), f'int8_matmul-{h.hexdigest()[:16]}.so')


def build(march: str | None = None) -> str:
  """The kernel library's path for -march=`march` (default: default_march()), compiled
  first if this machine has none cached."""
  march = march or default_march()
  cxx = compiler()
  if cxx is None:
    why = (f'CXX={os.environ["CXX"]!r} is not an executable' if os.environ.get('CXX') else
           'none found: set CXX or install g++')
    raise KernelBuildError(
        f'int8 weights on the CPU need a C++ compiler to build their kernel ({why}), or choose '
        'another precision (--dtype=mixed|float32)')
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
      raise KernelBuildError(f'building the int8 kernel failed ({" ".join(cmd)}):\n'
                             f'{proc.stderr[-4000:]}')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def register(march: str | None = None) -> str:
  """Builds (once per machine) and registers (once per process) the kernel for -march=
  `march`; returns its FFI target's name."""
  march = march or default_march()
  with _lock:
    if march not in _targets:
      lib = ctypes.cdll.LoadLibrary(build(march))
      target = 'kf_int8_matmul_' + ''.join(c if c.isalnum() else '_' for c in march)
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.KfInt8Matmul), platform='cpu')
      _targets[march] = target
    return _targets[march]


def matmul(x_MxK: jax.Array, packed_PxKx16: jax.Array, scale_Np: jax.Array, n: int,
           march: str | None = None) -> jax.Array:
  """[M, n] float32 = x @ (q * scale) with q panel-packed int8 (quantize.quantize)."""
  call = jax.ffi.ffi_call(register(march), jax.ShapeDtypeStruct((x_MxK.shape[0], n),
                                                                jnp.float32))
  return call(x_MxK.astype(jnp.float32), packed_PxKx16, scale_Np)
