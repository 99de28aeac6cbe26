"""Two processes on 127.0.0.1 (CPU collectives), 4 devices each, train the teacher and a
distillation stage on one mesh spanning both; they agree with a single process on the
same global batches, and their checkpoint restores in one process on another mesh."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from kforcing_jax.pipeline import run as pipeline
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.pipeline import run_dir
from tests.conftest import two_process_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def losses(stage_dir):
  with open(os.path.join(stage_dir, 'logs', 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(l) for l in f]
  return [r.get('train/loss', r.get('distill/loss')) for r in rows
          if 'train/loss' in r or 'distill/loss' in r]


def test_two_processes_match_one(tmp_path):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT  # the worker imports tests.conftest
  logs = [tmp_path / f'process_{i}.log' for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, 'w', encoding='utf-8') as out:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.join('tests', 'multiprocess_worker.py'), str(i), '2',
           str(port), str(tmp_path / 'multi')], cwd=ROOT, env=env, stdout=out,
          stderr=subprocess.STDOUT))
  # the same job in this process, on one device, while the two processes run (their
  # compiles and collectives leave a core free)
  try:
    pipeline.run(two_process_config(), str(tmp_path / 'single'))
  finally:
    for p in procs:
      p.wait(timeout=600)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log.read_text()[-3000:]
  for stage in ('teacher', 'distill_k1'):
    np.testing.assert_allclose(losses(tmp_path / 'multi' / stage),
                               losses(tmp_path / 'single' / stage), rtol=1e-5)
  # the two-process checkpoint restores here on a different mesh (tensor=2)
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 2})
  for stage in ('teacher', 'distill_k1'):
    _, multi, _, _ = run_dir.load_model_stage(str(tmp_path / 'multi'), stage, mesh)
    _, single, _, _ = run_dir.load_model_stage(str(tmp_path / 'single'), stage, mesh)
    assert len(multi['head']['kernel'].sharding.device_set) == 2
    for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
