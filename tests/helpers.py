"""Small random models shared by the tests."""
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
  params = nn.unbox(stages.model_init_fn(model, cfg, 8)(jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + noise * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return cfg, model, jax.tree.unflatten(tree, leaves)


def causal_logits(model, params, tokens):
  B, T = tokens.shape
  logits, _ = model.apply({'params': params}, tokens, jnp.broadcast_to(jnp.arange(T), (B, T)))
  return logits
