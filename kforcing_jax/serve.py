"""Serve one model over an OpenAI-compatible HTTP API with continuous batching.

  python -m kforcing_jax.serve --export=DIR [--K=4] [--max_slots=16] [--port=8000]
  python -m kforcing_jax.serve --workdir=RUN --stage=distill_k4 ...
  python -m kforcing_jax.serve --config=synthetic --random_init --model=pflm --K=4
      [--config.model.d_model=256 ...]     (random weights, model fields used as given)

A model whose export carries a chat template (an imported chat model) also answers
/v1/chat/completions; its answers end at its EOS and at the template's end-of-turn token.
One process serves one model on its devices (parameters sharded by their logical axes
over --mesh, slots along its data axis); for more capacity run one server per host behind
any HTTP load balancer (every server is stateless between requests). If the decoding step
fails the server stops and the process exits with status 1, for a supervisor to restart.
On a CPU backend the server's Python threads keep the first core to themselves and XLA
computes on the others (--host_cpus; kforcing_jax.runtime.reserve_host_cpus).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import flags
import fastapi
import jax
from ml_collections import config_flags
import uvicorn

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.data import datasets as data_lib
from kforcing_jax.data import tokenization
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.evaluation import benchmark as benchmark_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.models import precision
from kforcing_jax.models import random_init
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import run_dir
from kforcing_jax.serving import api
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import server
from kforcing_jax.training import checkpoint as ckpt_lib

# Special tokens that end an assistant turn in the chat templates of common model families
# (ChatML, Llama 3, Phi-3, Gemma): where a template writes one that the tokenizer has as a
# single id, a chat answer ends there as at EOS.
END_OF_TURN = ('<|im_end|>', '<|eot_id|>', '<|end|>', '<end_of_turn>')


def define_flags(fv: flags.FlagValues) -> None:
  d = dict(flag_values=fv)
  flags.DEFINE_string('export', None, 'an exported or imported model directory', **d)
  flags.DEFINE_string('workdir', None, 'a run directory (with --stage)', **d)
  flags.DEFINE_string('stage', None, 'teacher | distill_k<K>', **d)
  flags.DEFINE_bool('random_init', False, 'random weights at the config\'s model fields', **d)
  flags.DEFINE_string('model', None, 'with --random_init: ar | pflm', **d)
  flags.DEFINE_integer('K', None, 'PFLM tokens per step (1..k; default k; not for AR models)',
                       **d)
  flags.DEFINE_integer('max_slots', 16, 'requests decoded at once', **d)
  flags.DEFINE_integer('max_queue', 256, 'waiting requests before 429', **d)
  flags.DEFINE_integer('max_len', None, 'longest prompt + completion (default: the model\'s)',
                       **d)
  flags.DEFINE_integer('steps_per_call', 1, 'decoding steps per host round-trip', **d)
  flags.DEFINE_string('dtype', 'auto',
                      'serving precision: float32 | mixed | bfloat16 | int8 | auto', **d)
  flags.DEFINE_string('decode_attention', 'xla', 'xla (masked attention over the whole '
                      'cache) | pallas (GPU: the flash-decoding kernel reads each slot\'s '
                      'filled cache slots only)', **d)
  flags.DEFINE_integer('mesh_data', 1, 'devices along the data axis (slots)', **d)
  flags.DEFINE_integer('mesh_tensor', 1, 'devices along the tensor axis (parameters)', **d)
  flags.DEFINE_string('host', '127.0.0.1', 'address to bind', **d)
  flags.DEFINE_integer('port', 8000, 'port', **d)
  flags.DEFINE_string('served_name', None, 'model name in the API (default: the export\'s)',
                      **d)
  flags.DEFINE_float('request_timeout', 600.0, 'seconds before a request is cancelled (504)',
                     **d)
  flags.DEFINE_float('drain_timeout', 30.0, 'seconds to finish in-flight requests at shutdown',
                     **d)
  flags.DEFINE_bool('warmup', True, 'compile every program a request can reach (each length '
                    'bucket, slot-count bucket and path) before accepting requests', **d)
  flags.DEFINE_string('compilation_cache_dir', '~/.cache/kforcing_jax/xla',
                      'persistent XLA compilation cache (a restart loads the warm-up\'s '
                      'programs instead of compiling them); empty: none', **d)
  flags.DEFINE_string('log_level', 'warning', 'uvicorn log level', **d)
  flags.DEFINE_integer('host_cpus', 1, 'on a CPU backend, cores kept for the server\'s Python '
                       'threads (HTTP, scheduler, tokenizer); XLA computes on the others '
                       '(0: all threads share every core; no effect with a single core)', **d)
  config_flags.DEFINE_config_file('config', None, 'config file or shipped config name (with '
                                  '--random_init)', lock_config=True, **d)


def check_flags(f) -> None:
  """Usage errors: SystemExit with one line naming the flags."""
  sources = sum(map(bool, (f.export, f.workdir, f.random_init)))
  if sources != 1 or bool(f.workdir) != bool(f.stage):
    raise SystemExit('error: give one of --export=DIR, --workdir=RUN --stage=STAGE, or '
                     '--config=CONFIG --random_init --model=ar|pflm')
  if f.random_init and (f.config is None or f.model not in ('ar', 'pflm')):
    raise SystemExit('error: --random_init needs --config=CONFIG and --model=ar|pflm')
  if f.random_init and f.model == 'ar' and f.K is not None:
    raise SystemExit(f'error: --K={f.K} is a PFLM setting; --model=ar decodes one token per '
                     'step (leave --K out)')


def load_model(f, mesh) -> tuple[sampler_lib.Sampler, str]:
  """(Sampler, name) of the served model."""
  dtype = precision.choose(f.dtype)[0]
  benchmark_lib.check_decode_attention(f.decode_attention, jax.default_backend() != 'cpu')
  attn = f.decode_attention
  if f.export:
    return (export_lib.load(f.export, mesh, dtype=dtype, decode_attention=attn),
            f.export.rstrip('/').split('/')[-1])
  if f.workdir:
    return (run_dir.load_sampler(f.workdir, f.stage, dtype=dtype, mesh=mesh,
                                 decode_attention=attn), f.stage)
  cfg = f.config
  arch, params = random_init.random_model(cfg, data_lib.model_vocab_size(cfg))
  k = (f.K or 4) if f.model == 'pflm' else 0
  if f.model == 'ar':
    arch = dataclasses.replace(arch, pflm=False)
    params = {n: v for n, v in params.items() if n != 'noise_encoder'}
  params = jax.device_put(params, ckpt_lib.abstract_params(arch, mesh)[1])
  s = sampler_lib.Sampler(arch, params, k=k, tokenizer=data_lib.make_tokenizer(cfg),
                          exe=precision.exec_config(dtype, attn), max_len=cfg.data.seq_len)
  return s, f'random-{f.model}'


def end_of_turn_ids(tok: tokenization.Tokenizer) -> tuple[int, ...]:
  """The END_OF_TURN tokens the tokenizer's chat template writes, as single ids."""
  around = tokenization.encode_prompt(tok, '')  # what encoding adds (e.g. a BOS)
  out = []
  for marker in END_OF_TURN:
    if marker in tok.chat_template:
      ids = tokenization.encode_prompt(tok, marker)
      ids = ids[len(around):] if ids[:len(around)] == around else ids
      if len(ids) == 1 and ids[0] != tok.eos_id:
        out.append(ids[0])
  return tuple(out)


def served_model(s: sampler_lib.Sampler, name: str, K: int, max_len: int) -> api.Model:
  """The facts the protocol checks requests against: text ends at the tokenizer's EOS and
  at the other EOS ids of an imported model's config; chat for a tokenizer with a template,
  whose answers also end at its end-of-turn token."""
  tok = s.tokenizer
  chat = tok is not None and bool(tok.chat_template)
  eos = tok.eos_id if tok is not None else -1
  eos_ids = s.description.get('special_ids', {}).get('eos_ids', [])  # an import's EOS list
  return api.Model(name=name, k=s.k, K=K, vocab_size=s.arch.vocab_size, max_len=max_len,
                   tokenizer=tok, eos_id=eos, eos_ids=tuple(i for i in eos_ids if i != eos),
                   chat_template=tok.chat_template if chat else None,
                   encode_chat=tok.encode_chat if chat else None,
                   end_of_turn_ids=end_of_turn_ids(tok) if chat else ())


def build(f, loaded: tuple[sampler_lib.Sampler, str] | None = None) -> fastapi.FastAPI:
  """The app for the flags (its scheduler: app.state.scheduler); `loaded`: a (Sampler,
  name) to serve instead of the one the flags name."""
  mesh = sharding_lib.make_mesh({'data': f.mesh_data, 'fsdp': 1, 'tensor': f.mesh_tensor})
  s, name = loaded or load_model(f, mesh)
  if not s.k and f.K is not None:
    raise errors.UserError(f'--K={f.K}: {name} is an autoregressive model (one token per '
                           'step); leave --K out')
  K = (f.K or s.k) if s.k else 1
  eng = engine_lib.SlotEngine(s.arch, s.params, s.engine.exe, k=s.k, K=K,
                              max_slots=f.max_slots, max_len=f.max_len or s.engine.max_len,
                              mesh=mesh, steps_per_call=f.steps_per_call)
  model = served_model(s, f.served_name or name, K, eng.max_len)
  if f.warmup:
    t0 = time.perf_counter()
    n = eng.warmup()
    print(f'compiled {n} programs in {time.perf_counter() - t0:.1f} s (slot buckets '
          f'{eng.buckets})', file=sys.stderr, flush=True)
  return server.make_app(eng, model, max_queue=f.max_queue, request_timeout=f.request_timeout,
                         drain_timeout=f.drain_timeout)


def uvicorn_server(app: fastapi.FastAPI, f) -> uvicorn.Server:
  """The HTTP server of the app; a fatal engine error stops it (app.state.server)."""
  srv = uvicorn.Server(uvicorn.Config(app, host=f.host, port=f.port, log_level=f.log_level,
                                      timeout_graceful_shutdown=int(f.drain_timeout)))
  app.state.server = srv
  return srv


def run(f) -> None:
  check_flags(f)
  if f.compilation_cache_dir:
    runtime.persistent_compilation_cache(os.path.expanduser(f.compilation_cache_dir))
  cores = runtime.reserve_host_cpus(f.host_cpus)  # before anything starts the backend
  app = build(f)
  sched = app.state.scheduler
  print(f'serving on http://{f.host}:{f.port} ({sched.engine.max_slots} slots, K='
        f'{sched.engine.K}; {cores})', file=sys.stderr, flush=True)
  uvicorn_server(app, f).run()
  if sched.error is not None:
    raise SystemExit(f'error: the decoding step failed ({type(sched.error).__name__}: '
                     f'{sched.error}); the server stopped')


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv, before_run=runtime.quiet_library_logs)


if __name__ == '__main__':
  main()
