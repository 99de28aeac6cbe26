"""Small random models shared by the tests."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kforcing_jax import model as model_lib
from kforcing_jax import stages


def tiny_model(pflm=False, vocab=53, d=32, layers=2, heads=4, never_emit=(), seed=0,
               max_len=64, noise=0.3):
  """A float32 model with every parameter (the zero-initialised head too) perturbed."""
  cfg = model_lib.ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads,
                              dtype='float32', pflm=pflm, max_seq_len=max_len,
                              never_emit_ids=tuple(never_emit))
  model = model_lib.Transformer(cfg)

  @jax.jit
  def init(key):
    params = nn.unbox(stages.model_init_fn(model, cfg, 8)(key))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)
  return cfg, model, init(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def jit_apply(model):
  """model.apply compiled once per shape (eager Flax calls are slow on CPU)."""
  return jax.jit(model.apply, static_argnames=('logits_from', 'train', 'window'))


@functools.lru_cache(maxsize=None)
def jit_window(model):
  from kforcing_jax import layouts  # pylint: disable=g-import-not-at-top
  return jax.jit(lambda params, ctx, win, u, tau=None, dense=False: layouts.apply_window(
      model, params, ctx, win, u, tau, dense), static_argnames=('dense',))


def causal_logits(model, params, tokens):
  B, T = tokens.shape
  logits, _ = jit_apply(model)({'params': params}, tokens,
                               jnp.broadcast_to(jnp.arange(T), (B, T)))
  return logits
