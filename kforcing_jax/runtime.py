"""Process start-up: multi-host initialisation from the environment, logging."""
from __future__ import annotations

import logging
import os

import jax


def initialize() -> None:
  """Calls jax.distributed.initialize when a multi-process launch is detected.

  KFORCING_COORDINATOR (host:port), KFORCING_NUM_PROCESSES and KFORCING_PROCESS_ID set it
  explicitly; otherwise JAX's own auto-detection (Cloud TPU, SLURM, Open MPI) runs when
  KFORCING_DISTRIBUTED=1. A plain single-process run does nothing.
  """
  logging.getLogger('absl').setLevel(logging.WARNING)
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
