"""Process start-up (multi-host initialisation from the environment) and facts about the
machine: device memory, CPU model and features."""
from __future__ import annotations

import functools
import os
import platform

from absl import flags as absl_flags
from absl import logging as absl_logging
import jax
from jax._src import xla_bridge  # backends_are_initialized: no public equivalent

from kforcing_jax import errors


def quiet_library_logs() -> None:
  """For command-line entry points: absl INFO lines of the libraries (Orbax writes several
  per checkpoint) hidden unless asked for with -v / --verbosity."""
  if not absl_flags.FLAGS['verbosity'].present:
    absl_logging.set_verbosity(absl_logging.WARNING)


def persistent_compilation_cache(path: str) -> None:
  """XLA programs cached in `path` across processes (a server's restart loads its
  warm-up's programs); every program, however quick to compile, is kept."""
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def reserve_host_cpus(n: int) -> str:
  """Splits this process's cores between XLA and the Python threads of a server: the CPU
  backend's compute threads on all but the first `n` cores, the calling thread -- and the
  threads it starts afterwards (a server's scheduler, HTTP event loop and tokenizer) -- on
  those `n`. Python runs one thread at a time, so one core holds all of its host work; left
  on the compute cores it stalls a step's intra-op threads whenever it runs, which costs
  more than the core it takes away (CPU benchmarks in BENCHMARKS.md). Linux threads inherit
  their creator's affinity, and XLA starts its thread pools with the backend, sized to the
  cores it may use: so this must run before anything starts the JAX backend. On an
  accelerator backend the calling thread gets every core back. n = 0 leaves everything as
  it is. Returns a line saying what was done."""
  if n < 0:
    raise errors.UserError(f'host_cpus={n}: must be >= 0 (0: the host threads share every '
                           'core with the compute threads)')
  if not hasattr(os, 'sched_setaffinity') or n == 0:
    return 'host and compute threads share every core'
  if xla_bridge.backends_are_initialized():
    return (f'host_cpus={n} not applied: the JAX backend had already started (its threads '
            'share every core)')
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) <= n:
    return (f'host and compute threads share the process\'s {len(cpus)} core'
            f'{"s" if len(cpus) > 1 else ""} (host_cpus={n} leaves none to compute on)')
  host, compute = cpus[:n], cpus[n:]
  os.sched_setaffinity(0, compute)
  backend = None
  try:
    backend = jax.default_backend()  # starts the backends and their thread pools here
  finally:
    os.sched_setaffinity(0, host if backend == 'cpu' else cpus)
  if backend != 'cpu':
    return f'the {backend} backend computes; host threads on every core'
  return split_line(host, compute)


def split_line(host, compute) -> str:
  """How reserve_host_cpus reports a split of the cores."""
  cpus = lambda xs: ','.join(map(str, xs))
  return f'XLA compute threads on CPUs {cpus(compute)}, host threads on {cpus(host)}'


def initialize() -> None:
  """Calls jax.distributed.initialize when a multi-process launch is detected.

  KFORCING_COORDINATOR (host:port), KFORCING_NUM_PROCESSES and KFORCING_PROCESS_ID set it
  explicitly; otherwise JAX's own auto-detection (Cloud TPU, SLURM, Open MPI) runs when
  KFORCING_DISTRIBUTED=1. A plain single-process run does nothing.
  """
  coord = os.environ.get('KFORCING_COORDINATOR')
  if coord:
    kw = {}
    if os.environ.get('KFORCING_LOCAL_DEVICE_IDS'):
      kw['local_device_ids'] = [int(i) for i in os.environ['KFORCING_LOCAL_DEVICE_IDS'].split(',')]
    jax.distributed.initialize(coordinator_address=coord,
                               num_processes=int(os.environ['KFORCING_NUM_PROCESSES']),
                               process_id=int(os.environ['KFORCING_PROCESS_ID']), **kw)
  elif os.environ.get('KFORCING_DISTRIBUTED') == '1':
    jax.distributed.initialize()


@functools.lru_cache(maxsize=1)
def device_memory_bytes() -> int | None:
  """The first device's memory limit, or the host's RAM on CPU (None if unknown)."""
  try:
    stats = jax.devices()[0].memory_stats()
    if stats and 'bytes_limit' in stats:
      return int(stats['bytes_limit'])
  except Exception:  # pylint: disable=broad-except  (backends without memory_stats)
    pass
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
  """The host CPU's feature flags (x86 `flags`, Arm `Features` in /proc/cpuinfo)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):
          return frozenset(value.split())
  except OSError:
    pass
  return frozenset()


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          return value.strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def machine() -> dict:
  """What a benchmark's JSON records about where it ran: the CPU model and its SIMD
  features (AVX/AMX), the jax version and the devices."""
  return {'cpu': cpu_model(), 'cpu_features': sorted(
      f for f in cpu_features() if f.startswith(('avx', 'amx'))), 'jax': jax.__version__,
          'devices': str(jax.devices())}


BF16_DOT_FLAGS = ('avx512_bf16', 'amx_bf16', 'bf16')  # x86 AVX-512 BF16 / AMX, Arm BF16


def native_bf16_dot(features=None) -> tuple[bool, str]:
  """Whether this CPU multiplies bf16 natively (else XLA:CPU emulates bf16 dots, slower
  than float32), and why."""
  features = cpu_features() if features is None else features
  have = [f for f in BF16_DOT_FLAGS if f in features]
  if have:
    return True, f'the CPU has {"/".join(have)}'
  return False, ('the CPU has none of ' + ', '.join(BF16_DOT_FLAGS) +
                 ': bf16 products would be emulated')
