import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kforcing_jax import model as model_lib
from kforcing_jax import stages
from tests.helpers import causal_logits, jit_apply, tiny_model


def test_paper_parameter_counts():
  for vocab, expected in ((50258, 162.2e6), (30522, 131.9e6)):
    cfg = model_lib.ModelConfig(vocab_size=vocab)
    model = model_lib.Transformer(cfg)
    shapes = jax.eval_shape(stages.model_init_fn(model, cfg, 8), jax.random.key(0))
    n = model_lib.count_params(nn.unbox(shapes))
    assert abs(n - expected) < 0.05e6, (vocab, n)


def test_causality_by_gradients():
  _, model, params = tiny_model()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 12)))
  emb = params['embed']['embedding']

  def out_at(e, t):
    p = {**params, 'embed': {'embedding': e}}
    return causal_logits(model, p, tokens)[0, t].sum()

  for t in (0, 5, 11):
    g = jax.grad(lambda e: out_at(e, t))(emb)
    used = np.abs(np.asarray(g)).sum(1) > 0
    before = set(np.asarray(tokens[0, :t + 1]).tolist())
    after_only = set(np.asarray(tokens[0, t + 1:]).tolist()) - before
    assert not any(used[v] for v in after_only), f'position {t} sees the future'
    assert all(used[v] for v in before)


def test_cached_step_by_step_equals_full_forward():
  cfg, model, params = tiny_model()
  B, T, S = 2, 10, 16
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (B, T)))
  full = causal_logits(model, params, tokens)
  cache = model_lib.init_cache(cfg, B, S)
  steps = []
  for t in range(T):
    mask = jnp.broadcast_to(jnp.arange(S)[None, None, :] <= t, (B, 1, S))
    logits, cache = jit_apply(model)({'params': params}, tokens[:, t:t + 1],
                                     jnp.full((B, 1), t), mask, cache=cache,
                                     cache_slot=jnp.int32(t))
    steps.append(logits[:, 0])
  np.testing.assert_allclose(np.stack(steps, 1), full, atol=2e-5, rtol=1e-5)


def test_never_emitted_ids_are_blocked():
  _, model, params = tiny_model(never_emit=(7, 52))
  logits = causal_logits(model, params, jnp.ones((1, 4), jnp.int32))
  assert np.all(np.asarray(logits[..., 7]) <= -1e8) and np.all(np.asarray(logits[..., 52]) <= -1e8)
  assert np.all(np.asarray(jax.nn.softmax(logits)[..., 7]) == 0)


def test_noise_encoder_separates_neighbouring_cdf_intervals():
  """u values 1e-6 apart (neighbouring intervals of a 50k vocabulary) give different
  hint embeddings; the sinusoid keeps float32 precision of u."""
  u = jnp.asarray([0.123456, 0.123457, 0.999998, 0.999999], jnp.float32)
  feats = model_lib.sinusoid(u, 768)
  assert float(jnp.abs(feats[0] - feats[1]).max()) > 1e-6
  assert float(jnp.abs(feats[2] - feats[3]).max()) > 1e-6
  ref = np.concatenate([np.cos(2 * np.pi * np.float64(u)[:, None] * 10000.0 ** (
      -np.arange(384) / 384)), np.sin(2 * np.pi * np.float64(u)[:, None] * 10000.0 ** (
          -np.arange(384) / 384))], -1)
  np.testing.assert_allclose(feats, ref, atol=2e-6)


def test_bf16_compute_keeps_float32_params():
  cfg = model_lib.ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2)
  model = model_lib.Transformer(cfg)
  params = nn.unbox(stages.model_init_fn(model, cfg, 8)(jax.random.key(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = causal_logits(model, params, jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32


def _dots_in(jaxpr):
  """(operand dtypes, result dtype) of every dot_general in a closed jaxpr, nested ones too."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(eqn.outvars[0].aval.dtype)))
    for v in eqn.params.values():
      if hasattr(v, 'jaxpr') and hasattr(v, 'consts'):
        found += _dots_in(v.jaxpr)
  return found


def test_bf16_dot_operands_with_float32_results():
  """dot_dtype='bfloat16' with dtype='float32': every weight product takes bf16 operands
  and returns float32; attention stays float32; the logits stay within bf16 rounding of the
  float32 model's."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  cfg, model, params = tiny_model(noise=0.5)
  mixed = dataclasses.replace(cfg, dot_dtype='bfloat16', param_dtype='bfloat16')
  mixed_model = model_lib.Transformer(mixed)
  mixed_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 9)))
  dots = _dots_in(jax.make_jaxpr(
      lambda p: causal_logits(mixed_model, p, tokens))(mixed_params).jaxpr)
  # per layer: qkv, output, fc_in, fc_out in bf16 -> f32; plus the head
  assert dots.count((('bfloat16', 'bfloat16'), 'float32')) == 4 * cfg.n_layers + 1, dots
  assert all(d == (('float32', 'float32'), 'float32') for d in dots
             if d != (('bfloat16', 'bfloat16'), 'float32')), dots
  ref = causal_logits(model, params, tokens)
  out = causal_logits(mixed_model, mixed_params, tokens)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 1e-4 < err < 5e-2, err  # bf16 rounding, not float32, not garbage
