"""Small random models and a pipeline crash shared by the tests."""
import functools
import queue
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from kforcing_jax.data import datasets as data_lib
from kforcing_jax.models import layouts
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.serving import engine as engine_lib
from kforcing_jax.serving import scheduler as scheduler_lib


# Architecture families the model tests run over (ArchConfig fields beyond the shape):
#   gpt_like    the paper's backbone (scale-only LayerNorm, fused qkv, tanh-GELU MLP, head
#               with bias);
#   llama_gqa   Llama: RMSNorm, SwiGLU of explicit width, no biases, grouped-query
#               attention (2 KV heads), tied embeddings, llama3 RoPE scaling (whose
#               wavelength bands all occur at head dim 8);
#   qwen3_like  Qwen: q/k norms, q/k/v and output biases, head dim 16 != d / heads,
#               grouped-query attention, linear RoPE scaling;
#   mha_biased  fused qkv with q/k/v biases, head dim 16, erf-GELU MLP without biases.
FAMILIES = {
    'gpt_like': {},
    'llama_gqa': dict(norm='rmsnorm', mlp_activations=('silu', 'linear'), mlp_dim=48,
                      mlp_bias=False, n_kv_heads=2, tie_embeddings=True, head_bias=False,
                      rope_scaling=('llama3', 8.0, 1.0, 4.0, 64)),
    'qwen3_like': dict(norm='rmsnorm', norm_eps=1e-6, mlp_activations=('silu', 'linear'),
                       mlp_bias=False, n_kv_heads=2, head_dim=16, qkv_bias=True,
                       out_bias=True, qk_norm=True, head_bias=False,
                       rope_scaling=('linear', 2.0)),
    'mha_biased': dict(head_dim=16, qkv_bias=True, mlp_activations=('gelu',), mlp_bias=False),
}


def tiny_model(pflm=False, vocab=53, d=32, layers=2, heads=4, never_emit=(), seed=0,
               max_len=64, noise=0.3, exe=None, family='gpt_like'):
  """(ArchConfig, model, params) of a FAMILIES architecture: float32 unless `exe` says
  otherwise, every parameter (the zero-initialised head too) perturbed."""
  arch = arch_lib.ArchConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                             pflm=pflm, max_seq_len=max_len, never_emit_ids=tuple(never_emit),
                             **FAMILIES[family])
  model = model_lib.build(arch, exe)

  @jax.jit
  def init(key):
    params = nn.unbox(model_lib.init_fn(model)(key))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)
  return arch, model, init(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def jit_forward(model):
  """The causal forward compiled once per shape (eager Flax calls are slow on CPU)."""
  return jax.jit(lambda params, tokens, positions: model.apply(
      {'params': params}, tokens, positions, method=model_lib.Transformer.forward))


@functools.lru_cache(maxsize=None)
def jit_decode_step(model):
  return jax.jit(lambda params, tokens, cache, attend, rope_cs, hints=None, logits_from=0:
                 model.apply({'params': params}, tokens, cache, attend, rope_cs,
                             hints_BxHxD=hints, logits_from=logits_from,
                             method=model_lib.Transformer.decode_step),
                 static_argnames=('logits_from',))


@functools.lru_cache(maxsize=None)
def jit_encode(model):
  return jax.jit(lambda params, u, tau: model.apply(
      {'params': params}, u, tau, method=model_lib.Transformer.encode_noise))


@functools.lru_cache(maxsize=None)
def jit_window(model):
  return jax.jit(lambda params, ctx, win, u, tau=None, dense=False: layouts.apply_window(
      model, params, ctx, win, u, tau, dense), static_argnames=('dense',))


def causal_logits(model, params, tokens):
  B, T = tokens.shape
  return jit_forward(model)(params, tokens, jnp.broadcast_to(jnp.arange(T), (B, T)))


def run_until_train_batch(cfg, workdir: str, n: int) -> None:
  """Runs the pipeline and kills it (KeyboardInterrupt) as it draws its n-th training batch,
  counted over every stage that trains: a crash mid-stage, after the checkpoints so far."""
  real_next = data_lib.BatchIterator.__next__
  calls = {'n': 0}

  def dying_next(self):
    if self.split == 'train':
      calls['n'] += 1
      if calls['n'] == n:
        raise KeyboardInterrupt
    return real_next(self)

  with mock.patch.object(data_lib.BatchIterator, '__next__', dying_next):
    with pytest.raises(KeyboardInterrupt):
      pipeline.run(cfg, workdir)


def staggered_requests(n: int = 5):
  """n AR requests of 1-3 prompt tokens and growing lengths, greedy and sampled in turn."""
  return [scheduler_lib.Request([5 + i, 6, 7][:1 + i % 3], 4 + 2 * i, engine_lib.SamplingParams(
      temperature=(0.0, 1.0)[i % 2], seed=30 + i), None) for i in range(n)]


def serve_staggered(engine, requests) -> list[list[int]]:
  """The tokens a scheduler over `engine` streams for each request, submitted 20 ms apart."""
  sched = scheduler_lib.Scheduler(engine, eos_id=-1).start()
  queues = []
  try:
    for r in requests:
      queues.append(queue.Queue())
      r.emit = queues[-1].put
      sched.submit(r)
      time.sleep(0.02)
    got = []
    for q in queues:
      toks = []
      while True:
        ev = q.get(timeout=120)
        toks += ev.token_ids
        if ev.finish_reason:
          break
      got.append(toks)
  finally:
    sched.shutdown()
  return got
