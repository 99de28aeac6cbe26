"""Metric writing: clu's TensorBoard writer when importable, always a JSONL file, and
a progress line. Only process 0 writes (docs/design.md section 8: accelerator images may lack
clu/TensorFlow, so the JSONL path must work alone)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax

log = logging.getLogger('kforcing_jax')


def _is_main() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """write_scalars(step, {name: value}) to TensorBoard (clu) and metrics.jsonl.

  resume_step: a run resumed from this step's checkpoint; records of later steps (written
  before the interruption, and about to be written again) are dropped from metrics.jsonl.
  use_tensorboard: None = unless the environment sets KFORCING_TENSORBOARD=0 (clu imports
  TensorFlow, ~10-20 s at start-up)."""

  def __init__(self, logdir: str, use_tensorboard: bool | None = None,
               resume_step: int | None = None):
    if use_tensorboard is None:
      use_tensorboard = os.environ.get('KFORCING_TENSORBOARD', '1') != '0'
    self.logdir = logdir
    self._clu = None
    self._jsonl = None
    if not _is_main():
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, 'metrics.jsonl')
    if resume_step is not None and os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        kept = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
      with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(kept)
      os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if use_tensorboard:
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self._clu = metric_writers.SummaryWriter(logdir)
      except Exception as e:  # pylint: disable=broad-except  (ImportError and TF issues)
        log.info('TensorBoard summaries off (%s); metrics go to metrics.jsonl only', e)

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._jsonl is None:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': int(step), **clean}) + '\n')
    self._jsonl.flush()
    if self._clu is not None:
      self._clu.write_scalars(int(step), clean)

  def flush(self) -> None:
    if self._clu is not None:
      self._clu.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._clu is not None:
      self._clu.close()
      self._clu = None


class Progress:
  """Prints 'stage step/total | loss | steps/s | tokens/s | ETA' lines."""

  def __init__(self, stage: str, total_steps: int, tokens_per_step: int, start_step: int):
    self.stage, self.total, self.tps = stage, total_steps, tokens_per_step
    self._t0, self._s0 = time.time(), start_step

  def line(self, step: int, metrics: dict) -> str:
    dt = max(time.time() - self._t0, 1e-9)
    sps = (step - self._s0) / dt
    eta = (self.total - step) / sps if sps > 0 else float('inf')
    parts = [f'{self.stage} {step}/{self.total}']
    parts += [f'{k} {v:.4f}' for k, v in metrics.items()]
    parts += [f'{sps:.2f} steps/s', f'{sps * self.tps:,.0f} tok/s', f'ETA {_fmt(eta)}']
    return ' | '.join(parts)

  def report(self, step: int, metrics: dict) -> None:
    if _is_main():
      print(self.line(step, metrics), file=sys.stdout, flush=True)


def _fmt(seconds: float) -> str:
  if seconds == float('inf'):
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}'


def write_json(path: str, obj) -> None:
  """Atomic JSON write from process 0."""
  if not _is_main():
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)
