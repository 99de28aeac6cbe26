"""The three layouts of one model agree (docs/design.md section 2.3), in float32."""
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models import layouts
from kforcing_jax.models import transformer as model_lib
from tests.helpers import FAMILIES, jit_decode_step, jit_encode, jit_window, tiny_model


def test_window_mask_pattern():
  m = layouts.window_mask(3, 1, 2)  # ctx 0..2 | w(t,1) | h(t,1..2)
  ctx = lambda t: t
  w = lambda t: 3 + t
  h = lambda t, i: 6 + 2 * t + (i - 1)
  assert m[ctx(2), ctx(0)] and not m[ctx(0), ctx(1)]
  assert m[w(1), ctx(1)] and not m[w(1), ctx(2)] and not m[w(1), w(0)]
  assert m[h(1, 2), w(1)] and m[h(1, 2), h(1, 1)] and not m[h(1, 1), h(1, 2)]
  assert not m[h(1, 1), h(0, 1)] and not m[ctx(2), h(0, 1)] and not m[w(2), h(2, 1)]


@pytest.mark.parametrize('a,h,family', [(0, 1, 'gpt_like'), (0, 4, 'gpt_like'),
                                        (2, 2, 'gpt_like'), (3, 0, 'gpt_like')] +
                         [(2, 2, f) for f in FAMILIES if f != 'gpt_like'])
def test_structured_attention_equals_dense_mask(a, h, family):
  _, model, params = tiny_model(pflm=True, family=family)
  rng = np.random.default_rng(a * 10 + h)
  ctx = jnp.asarray(rng.integers(0, 50, (2, 9)))
  win = jnp.asarray(rng.integers(0, 50, (2, 9, a))) if a else None
  u = jnp.asarray(rng.random((2, 9, h)), jnp.float32) if h else None
  dense = jit_window(model)(params, ctx, win, u, dense=True)
  fast = jit_window(model)(params, ctx, win, u)
  np.testing.assert_allclose(fast, dense, atol=2e-5, rtol=1e-5)


def inference_step(model, cfg, params, ctx_1xT, u_1xK, prefill_to):
  """Prefill ctx[:prefill_to] into a cache, then one decoding step feeding
  [ctx[prefill_to:] | K hints] with causal attention over the cache."""
  T, K = ctx_1xT.shape[1], u_1xK.shape[1]
  S = T + K
  step = jit_decode_step(model)
  cache = model_lib.init_cache(cfg, model.exe, 1, S)

  def attend(start, q):
    mask = jnp.arange(S)[None, None, :] <= (start + jnp.arange(q))[None, :, None]
    return attn_lib.Cached(jnp.int32(start), mask, jnp.zeros((1,), jnp.int32),
                           products=model.exe.cache_products)

  def rope(start, q):
    return model_lib.arch_rope_cos_sin(cfg, (start + jnp.arange(q))[None])

  if prefill_to:
    _, cache = step(params, ctx_1xT[:, :prefill_to], cache, attend(0, prefill_to),
                    rope(0, prefill_to), logits_from=prefill_to)
  feed = T - prefill_to
  hints = jit_encode(model)(params, u_1xK, jnp.ones((1,), jnp.float32))
  logits, _ = step(params, ctx_1xT[:, prefill_to:], cache, attend(prefill_to, feed + K),
                   rope(prefill_to, feed + K), hints, logits_from=feed)
  return logits[0]


@pytest.mark.parametrize('k,family', [(1, 'gpt_like'), (2, 'gpt_like'), (4, 'gpt_like')] +
                         [(2, f) for f in FAMILIES if f != 'gpt_like'])
def test_training_layout_equals_inference_layout(k, family):
  cfg, model, params = tiny_model(pflm=True, family=family)
  rng = np.random.default_rng(k)
  N = 10
  ctx = jnp.asarray(rng.integers(0, 50, (1, N)))
  u = jnp.asarray(rng.random((1, N, k)), jnp.float32)
  train_logits = jit_window(model)(params, ctx, None, u)  # [1, N, k, V]
  for t in (3, N - 1):
    for prefill_to in sorted({0, max(t + 1 - k, 0)}):
      inf = inference_step(model, cfg, params, ctx[:, :t + 1], u[:, t], prefill_to)
      np.testing.assert_allclose(train_logits[0, t], inf, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize('k,family', [(2, 'gpt_like'), (4, 'gpt_like'), (2, 'llama_gqa'),
                                      (2, 'qwen3_like')])
def test_rollout_layout_equals_two_sequential_inference_steps(k, family):
  cfg, model, params = tiny_model(pflm=True, family=family)
  h = k // 2
  rng = np.random.default_rng(10 + k)
  N = 8
  ctx = jnp.asarray(rng.integers(0, 50, (1, N)))
  first = jnp.asarray(rng.integers(0, 50, (1, N, h)))
  u = jnp.asarray(rng.random((1, N, h)), jnp.float32)
  roll = jit_window(model)(params, ctx, first, u)  # [1, N, h, V]
  for t in (2, N - 1):
    # step 1 consumed ctx[:t+1] (+ its hints, overwritten); step 2 feeds [first | hints]
    seq = jnp.concatenate([ctx[:, :t + 1], first[:, t]], axis=1)
    inf = inference_step(model, cfg, params, seq, u[:, t], prefill_to=t + 1)
    np.testing.assert_allclose(roll[0, t], inf, atol=3e-5, rtol=1e-5)


def test_window_output_depends_only_on_its_context_and_noise():
  """The output for (t, i) depends only on x_<=t and u_t,1..i."""
  _, model, params = tiny_model(pflm=True)
  rng = np.random.default_rng(3)
  ctx = jnp.asarray(rng.integers(0, 50, (1, 8)))
  u = jnp.asarray(rng.random((1, 8, 2)), jnp.float32)
  base = np.asarray(jit_window(model)(params, ctx, None, u))
  ctx2 = ctx.at[0, 5].set((ctx[0, 5] + 1) % 50)
  out = np.asarray(jit_window(model)(params, ctx2, None, u))
  np.testing.assert_allclose(out[0, :5], base[0, :5], atol=1e-6)
  assert not np.allclose(out[0, 5:], base[0, 5:])
  u2 = u.at[0, 2, 1].set(0.5)
  out = np.asarray(jit_window(model)(params, ctx, None, u2))
  np.testing.assert_allclose(out[0, 2, 0], base[0, 2, 0], atol=1e-6)  # hint 1 cannot see u_2
  assert not np.allclose(out[0, 2, 1], base[0, 2, 1])
  mask = np.ones(out.shape[:3], bool)
  mask[0, 2, 1] = False
  np.testing.assert_allclose(out[mask], base[mask], atol=1e-6)
