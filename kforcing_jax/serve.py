"""Serve one model over an OpenAI-compatible HTTP API with continuous batching.

  python -m kforcing_jax.serve --export=DIR [--K=4] [--max_slots=16] [--port=8000]
  python -m kforcing_jax.serve --workdir=RUN --stage=distill_k4 ...
  python -m kforcing_jax.serve --config=synthetic --random_init --model=pflm --K=4 \
      [--config.model.d_model=256 ...]     # random weights, model fields used as given

One process serves one model on its devices (parameters sharded by their logical axes
over --mesh, slots along its data axis); for more capacity run one server per host behind
any HTTP load balancer (every server is stateless between requests).
"""
from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.models import precision
from kforcing_jax.models import random_init
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run_dir
from kforcing_jax.serving import api
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import scheduler as scheduler_lib
from kforcing_jax.serving import server
from kforcing_jax.training import checkpoint as ckpt_lib

FLAGS = flags.FLAGS


def load_model(f, cfg, mesh):
  """(Sampler, name) of the served model."""
  dtype = precision.choose(f.dtype)[0]
  if f.export:
    return export_lib.load(f.export, mesh, dtype=dtype), f.export.rstrip('/').split('/')[-1]
  if f.workdir:
    return (run_dir.load_sampler(f.workdir, f.stage, dtype=dtype, mesh=mesh),
            f.stage)
  vocab = cfg.model.vocab_size
  arch, params = random_init.random_model(
      cfg, vocab if vocab > 0 else data_lib.make_tokenizer(cfg).vocab_size)
  k = f.K if f.model == 'pflm' else 0
  if f.model == 'ar':
    arch = dataclasses.replace(arch, pflm=False)
    params = {n: v for n, v in params.items() if n != 'noise_encoder'}
  params = jax.device_put(params, ckpt_lib.abstract_params(arch, mesh)[1])
  s = sampler_lib.Sampler(arch, params, k=k, tokenizer=data_lib.make_tokenizer(cfg),
                          exe=precision.exec_config(dtype), max_len=cfg.data.seq_len)
  return s, f'random-{f.model}'


def build(f, cfg):
  """(app, scheduler) for the flags."""
  mesh = sharding_lib.make_mesh({'data': f.mesh_data, 'fsdp': 1, 'tensor': f.mesh_tensor})
  s, name = load_model(f, cfg, mesh)
  K = (f.K or s.k) if s.k else 1
  eng = engine_lib.SlotEngine(s.arch, s.params, s.engine.exe, k=s.k, K=K,
                              max_slots=f.max_slots, max_len=f.max_len or s.engine.max_len,
                              mesh=mesh, steps_per_call=f.steps_per_call)
  metrics = api.Metrics()
  tok = s.tokenizer
  sched = scheduler_lib.Scheduler(eng, eos_id=tok.eos_id if tok else -1,
                                  max_queue=f.max_queue, metrics=metrics)
  model = api.Model(name=f.served_name or name, k=s.k, K=K, vocab_size=s.arch.vocab_size,
                    max_len=eng.max_len, never_emit=s.arch.never_emit_ids, tokenizer=tok)
  if f.warmup:
    warm(eng)
  sched.start()
  return server.make_app(sched, model, metrics, request_timeout=f.request_timeout,
                         drain_timeout=f.drain_timeout), sched


def warm(eng) -> None:
  """Compiles the decode step and the smallest prefill bucket before serving."""
  state = eng.init_state()
  state = eng.insert(state, eng.prefill([0]), 0, engine_lib.SamplingParams())
  state, toks = eng.generate(state)
  toks.block_until_ready()


def main(argv):
  del argv
  runtime.quiet_library_logs()
  f = FLAGS
  sources = sum(map(bool, (f.export, f.workdir, f.random_init)))
  if sources != 1 or bool(f.workdir) != bool(f.stage):
    raise app.UsageError('give one of --export=DIR, --workdir=RUN --stage=STAGE, or '
                         '--config=CONFIG --random_init --model=ar|pflm')
  if f.random_init and (_CONFIG.value is None or f.model not in ('ar', 'pflm')):
    raise app.UsageError('--random_init needs --config and --model=ar|pflm')
  try:
    application, sched = build(f, _CONFIG.value)
  except (errors.UserError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  import uvicorn  # pylint: disable=g-import-not-at-top
  print(f'serving on http://{f.host}:{f.port} ({sched.engine.max_slots} slots, K='
        f'{sched.engine.K})', file=sys.stderr, flush=True)
  uvicorn.run(application, host=f.host, port=f.port, log_level=f.log_level,
              timeout_graceful_shutdown=int(f.drain_timeout))


if __name__ == '__main__':
  flags.DEFINE_string('export', None, 'an exported or imported model directory')
  flags.DEFINE_string('workdir', None, 'a run directory (with --stage)')
  flags.DEFINE_string('stage', None, 'teacher | distill_k<K>')
  flags.DEFINE_bool('random_init', False, 'random weights at the config\'s model fields')
  flags.DEFINE_string('model', None, 'with --random_init: ar | pflm')
  flags.DEFINE_integer('K', None, 'PFLM tokens per step (1..k; default k)')
  flags.DEFINE_integer('max_slots', 16, 'requests decoded at once')
  flags.DEFINE_integer('max_queue', 256, 'waiting requests before 429')
  flags.DEFINE_integer('max_len', None, 'longest prompt + completion (default: the model\'s)')
  flags.DEFINE_integer('steps_per_call', 1, 'decoding steps per host round-trip')
  flags.DEFINE_string('dtype', 'auto', 'serving precision: float32 | mixed | bfloat16 | auto')
  flags.DEFINE_integer('mesh_data', 1, 'devices along the data axis (slots)')
  flags.DEFINE_integer('mesh_tensor', 1, 'devices along the tensor axis (parameters)')
  flags.DEFINE_string('host', '127.0.0.1', 'address to bind')
  flags.DEFINE_integer('port', 8000, 'port')
  flags.DEFINE_string('served_name', None, 'model name in the API (default: the export\'s)')
  flags.DEFINE_float('request_timeout', 600.0, 'seconds before a request is cancelled (504)')
  flags.DEFINE_float('drain_timeout', 30.0, 'seconds to finish in-flight requests at shutdown')
  flags.DEFINE_bool('warmup', True, 'compile before accepting requests')
  flags.DEFINE_string('log_level', 'warning', 'uvicorn log level')
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (with --random_init)',
                                            lock_config=True)
  app.run(main, flags_parser=config_lib.parse_flags)
