import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pytest

from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from tests.helpers import FAMILIES, causal_logits, jit_decode_step, tiny_model


def test_paper_parameter_counts():
  for vocab, expected in ((50258, 162.2e6), (30522, 131.9e6)):
    model = model_lib.build(arch_lib.ArchConfig(vocab_size=vocab))
    shapes = jax.eval_shape(model_lib.init_fn(model), jax.random.key(0))
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


@pytest.mark.parametrize('family', list(FAMILIES))
@pytest.mark.parametrize('products, F', [('dot', 2), ('reduce', 2), ('kernel', 1)])
def test_cached_steps_equal_full_forward(products, F, family):
  """F tokens per step over an explicit cache == one causal forward: two (so 'reduce', the
  CPU multiply-reduce, and 'dot', the GPU's batched dots, both run), and one through the CPU
  kernel ('kernel')."""
  exe = arch_lib.ExecConfig(cache_products=products)
  arch, model, params = tiny_model(exe=exe, family=family)
  B, T, S = 2, 10, 16
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (B, T)))
  full = causal_logits(model, params, tokens)
  cache = model_lib.init_cache(arch, model.exe, B, S)
  steps = []
  for t in range(0, T, F):
    slots = t + jnp.arange(F)
    mask = jnp.broadcast_to(jnp.arange(S)[None, None, :] <= slots[None, :, None], (B, F, S))
    attend = attn_lib.Cached(jnp.int32(t), mask, jnp.zeros((B,), jnp.int32),
                             products=model.exe.cache_products)
    rope_cs = model_lib.arch_rope_cos_sin(arch, jnp.broadcast_to(slots, (B, F)))
    logits, cache = jit_decode_step(model)(params, tokens[:, t:t + F], cache, attend, rope_cs)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5, rtol=1e-5)


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


def test_bf16_compute_gives_float32_logits():
  """Under bf16 compute the head multiplies bf16 operands into a float32 result: logits of
  magnitude up to 10-40 stay within 1e-3 of the float32 product of the same operands, where a
  bf16-rounded result is off by up to 0.06, and the model's logits are not bf16 numbers."""
  arch = arch_lib.ArchConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2)
  exe = arch_lib.ExecConfig(dtype='bfloat16').resolved()
  head = model_lib.Head(arch, exe)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(32, 64)) * 1.3, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(64,)), jnp.float32)
  out = head.apply({'params': {'kernel': kernel, 'bias': bias}}, x)
  assert out.dtype == jnp.float32
  ref = np.einsum('btd,dv->btv', np.asarray(x.astype(jnp.bfloat16), np.float64),
                  np.asarray(kernel.astype(jnp.bfloat16), np.float64)) + np.asarray(bias)
  assert 10 < np.abs(ref).max() < 40 and np.abs(ref).mean() > 4
  assert np.abs(np.asarray(out) - ref).max() < 1e-3
  rounded = np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16), np.float64)
  assert np.abs(rounded - ref).max() > 1e-2  # what a bf16 result would lose
  model = model_lib.build(arch, exe)
  params = jax.tree.map(lambda p: p + 0.5, nn.unbox(model_lib.init_fn(model)(jax.random.key(0))))
  logits = np.asarray(causal_logits(model, params, jnp.ones((1, 8), jnp.int32)))
  as_bf16 = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(logits == as_bf16) < 0.05


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


@pytest.mark.parametrize('family,dots_per_layer', [('gpt_like', 4), ('llama_gqa', 6)])
def test_bf16_dot_operands_with_float32_results(family, dots_per_layer):
  """dot_dtype='bfloat16' with dtype='float32': every weight product takes bf16 operands
  and returns float32 (the tied head's product with the embedding table too); attention
  stays float32; the logits stay within bf16 rounding of the float32 model's."""
  cfg, model, params = tiny_model(noise=0.5, family=family)
  mixed_model = model_lib.build(cfg, arch_lib.ExecConfig(dot_dtype='bfloat16',
                                                          param_dtype='bfloat16'))
  mixed_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 9)))
  dots = _dots_in(jax.make_jaxpr(
      lambda p: causal_logits(mixed_model, p, tokens))(mixed_params).jaxpr)
  # per layer: qkv (or q and kv), output, fc_in (or gate and up), fc_out in bf16 -> f32;
  # plus the head
  assert dots.count((('bfloat16', 'bfloat16'), 'float32')) == (
      dots_per_layer * cfg.n_layers + 1), dots
  assert all(d == (('float32', 'float32'), 'float32') for d in dots
             if d != (('bfloat16', 'bfloat16'), 'float32')), dots
  ref = causal_logits(model, params, tokens)
  out = causal_logits(mixed_model, mixed_params, tokens)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert 1e-4 < err < 5e-2, err  # bf16 rounding, not float32, not garbage


@pytest.mark.parametrize('kernel', ['xla', 'pallas'])
def test_slot_attention_over_the_first_rows_of_a_larger_cache(kernel):
  """A serving step over the first R of B cache rows (a slot-count bucket) writes those
  rows' keys and values at their own slots in place, leaves rows R.. untouched, and
  attends as the same step on a cache of exactly R rows."""
  B, R, T, H, D, S = 5, 2, 3, 2, 8, 64  # S: a whole block of the pallas kernel
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(keys[i], (R, T, H, D)) for i in range(3))
  ck = jax.random.normal(keys[3], (B, H, D, S) if kernel == 'xla' else (B, H, S, D))
  cv = jax.random.normal(keys[4], (B, H, S, D))
  slot_R = jnp.asarray([4, 17])
  start_R = jnp.asarray([0, 3])
  mask = ((jnp.arange(S)[None, None] <= slot_R[:, None, None] + jnp.arange(T)[None, :, None])
          & (jnp.arange(S)[None, None] >= start_R[:, None, None]))
  attend = attn_lib.SlotCached(slot_R, mask, start_R, kernel)
  out, (ck_B, cv_B) = attend(q, k, v, (ck, cv))
  want, (ck_R, cv_R) = attend(q, k, v, (ck[:R], cv[:R]))
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  for got_B, got_R, old in ((ck_B, ck_R, ck), (cv_B, cv_R, cv)):
    np.testing.assert_array_equal(got_B[:R], got_R)
    np.testing.assert_array_equal(got_B[R:], old[R:])
  # the new keys landed at each row's slot (the cache's slot axis: last for xla keys)
  new_k = jnp.transpose(k, (0, 2, 3, 1)) if kernel == 'xla' else jnp.swapaxes(k, 1, 2)
  for r in range(R):
    s = int(slot_R[r])
    got = ck_B[r, ..., s:s + T] if kernel == 'xla' else ck_B[r, :, s:s + T]
    np.testing.assert_array_equal(got, new_k[r])
