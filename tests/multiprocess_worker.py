"""One process of the multi-process test (tests/test_multiprocess.py).

argv: PROCESS_ID NUM_PROCESSES PORT WORKDIR. Each process has 4 local CPU devices; the
mesh (data=2, fsdp=2, tensor=2) spans both processes."""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # noqa: E402

pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
os.environ.update(KFORCING_COORDINATOR=f'127.0.0.1:{port}', KFORCING_NUM_PROCESSES=str(nproc),
                  KFORCING_PROCESS_ID=str(pid))
from kforcing_jax import runtime  # noqa: E402

runtime.initialize()
assert jax.process_count() == nproc and jax.device_count() == 4 * nproc

from kforcing_jax.pipeline import run as pipeline  # noqa: E402
from tests.conftest import two_process_config  # noqa: E402

cfg = two_process_config()
cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
pipeline.run(cfg, workdir)
print(f'process {pid} done', flush=True)
