"""One process of the multi-process test (tests/test_multiprocess.py).

argv: PROCESS_ID NUM_PROCESSES PORT WORKDIR. Each process has 4 local CPU devices; the
mesh (data=2, fsdp=2, tensor=2) spans both processes."""
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
os.environ.update(KFORCING_COORDINATOR=f'127.0.0.1:{port}', KFORCING_NUM_PROCESSES=str(nproc),
                  KFORCING_PROCESS_ID=str(pid))
from kforcing_jax import runtime  # noqa: E402

runtime.initialize()
assert jax.process_count() == nproc and jax.device_count() == 4 * nproc

from kforcing_jax import pipeline  # noqa: E402
from tests.conftest import synthetic_config  # noqa: E402

cfg = synthetic_config(steps=2, pipeline='teacher,distill_k1')
cfg.data.batch_size = 8
cfg.data.eval_batch_size = 8
cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
cfg.train.eps = 1e-3  # see tests/test_train.py::run_steps
pipeline.run(cfg, workdir)
print(f'process {pid} done', flush=True)
