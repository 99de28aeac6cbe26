"""Inverse-CDF targets of the AR teacher and rollout targets of a PFLM teacher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from kforcing_jax.models import transformer as model_lib
from kforcing_jax.models import sampling
from kforcing_jax.training import targets
from tests.helpers import causal_logits, tiny_model
from tests.test_layouts import inference_step


def test_inverse_cdf_samples_follow_the_softmax():
  logits = jnp.asarray([1.0, -0.5, 2.0, 0.1, -3.0, 0.7, 1.5, -1.0])
  u = sampling.uniform_noise(jax.random.key(0), (200_000,))
  y = jax.jit(sampling.inverse_cdf)(jnp.broadcast_to(logits, (200_000, 8)), u)
  counts = np.bincount(np.asarray(y), minlength=8)
  expected = np.asarray(jax.nn.softmax(logits), np.float64) * 200_000
  _, p = stats.chisquare(counts, expected * counts.sum() / expected.sum())
  assert p > 0.001, p


def test_temperature_and_blocked_ids():
  logits = jnp.asarray([[0.0, 1.0, model_lib.NEG_INF, 2.0]])
  u = sampling.uniform_noise(jax.random.key(1), (50_000,))
  y = np.asarray(sampling.inverse_cdf(jnp.broadcast_to(logits, (50_000, 4)), u, 0.5))
  assert not np.any(y == 2)
  p = np.asarray(jax.nn.softmax(logits[0] / 0.5), np.float64)
  np.testing.assert_allclose(np.bincount(y, minlength=4) / 50_000, p, atol=0.01)
  # u at the extremes of (0, 1) stays on emittable tokens
  ext = sampling.inverse_cdf(logits, jnp.asarray([0.5 / 2**24]))
  assert int(ext[0]) == 0
  ext = sampling.inverse_cdf(logits, jnp.asarray([1 - 0.5 / 2**24]))
  assert int(ext[0]) == 3


def test_gpt2_sized_peaked_distribution_lands_in_the_right_interval():
  V = 50258
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(4, V)) * 2).astype(np.float32)
  logits[:, 17] += 18.0  # one token with most of the mass, ~50k tiny intervals
  logits[:, -1] = model_lib.NEG_INF
  p64 = np.asarray(jax.nn.softmax(jnp.asarray(logits)), np.float64)
  cdf = np.cumsum(p64, -1)
  cdf /= cdf[:, -1:]
  # u at the midpoints of many intervals, including the narrowest ones
  idx = np.stack([rng.choice(V - 1, 256, replace=False) for _ in range(4)])
  lo = np.take_along_axis(np.concatenate([np.zeros((4, 1)), cdf[:, :-1]], 1), idx, 1)
  hi = np.take_along_axis(cdf, idx, 1)
  u = ((lo + hi) / 2).astype(np.float32)
  # each row's logits broadcast against its 256 u (one CDF per row)
  y = np.asarray(jax.jit(sampling.inverse_cdf)(jnp.asarray(logits)[:, None, :], jnp.asarray(u)))
  # every target lies in the interval that contains its (float32) u
  u64 = u.astype(np.float64)
  lo_y = np.take_along_axis(np.concatenate([np.zeros((4, 1)), cdf[:, :-1]], 1), y, 1)
  hi_y = np.take_along_axis(cdf, y, 1)
  assert np.all((lo_y <= u64 + 1e-12) & (u64 <= hi_y + 1e-12))
  wide = (hi - lo) > 1e-6  # where float32 u still falls inside the chosen interval
  assert np.mean(y[wide] == idx[wide]) == 1.0


def test_cdf_error_bound():
  """The double-float prefix sum is accurate to < 1e-11 over 50k tokens (a plain float32
  cumsum is off by ~1e-4 here)."""
  V = 50258
  rng = np.random.default_rng(1)
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, V)) * 3, jnp.float32))
  hi, lo = jax.jit(sampling.cumsum_ff)(p)
  exact = np.cumsum(np.asarray(p, np.float64), -1)
  err = np.abs(np.asarray(hi, np.float64) + np.asarray(lo, np.float64) - exact).max()
  naive = np.abs(np.cumsum(np.asarray(p), -1, dtype=np.float32) - exact).max()
  print(f'double-float CDF max error {err:.2e}, float32 cumsum {naive:.2e}')
  assert err < 1e-11


def test_ar_teacher_k_targets_are_sequential_sampling():
  _, model, params = tiny_model()
  rng = np.random.default_rng(2)
  ctx = jnp.asarray(rng.integers(0, 50, (1, 6)))
  u = sampling.uniform_noise(jax.random.key(3), (1, 6, 3))
  y = jax.jit(lambda p, c, uu: targets.ar_teacher_targets(model, p, c, uu))(params, ctx, u)
  t = 4
  seq = list(np.asarray(ctx[0, :t + 1]))
  draw = jax.jit(sampling.inverse_cdf)
  for i in range(3):
    # one causal forward at a fixed length: the logits at position len(seq) - 1 do not
    # depend on the filler after it
    row = jnp.asarray([seq + [0] * (t + 4 - len(seq))])
    logits = causal_logits(model, params, row)
    seq.append(int(draw(logits[0, len(seq) - 1], u[0, t, i])))
  assert list(np.asarray(y[0, t])) == seq[t + 1:]


def test_ar_rollout_intervals_hold_u():
  """The rollout's interval diagnostics, against float64 numpy from the same logits: the
  teacher's probability of its token, and u's distance to the nearer end of that token's
  CDF interval, with u inside the interval."""
  _, model, params = tiny_model()
  rng = np.random.default_rng(4)
  ctx = jnp.asarray(rng.integers(0, 50, (2, 7)))
  u = sampling.uniform_noise(jax.random.key(5), (2, 7, 2))
  y, prob, edge = jax.jit(lambda p, c, uu: targets.ar_teacher_rollout(model, p, c, uu))(
      params, ctx, u)
  np.testing.assert_array_equal(y, targets.ar_teacher_targets(model, params, ctx, u))
  y, prob, edge, u = (np.asarray(a) for a in (y, prob, edge, u))
  for b, t in ((0, 3), (1, 6)):
    seq = list(np.asarray(ctx[b, :t + 1]))
    for i in range(2):
      row = jnp.asarray([seq + [0] * (t + 3 - len(seq))])
      logits = np.asarray(causal_logits(model, params, row)[0, len(seq) - 1], np.float64)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      cdf = np.cumsum(p)
      tok = y[b, t, i]
      lower, upper = cdf[tok] - p[tok], cdf[tok]
      assert lower <= u[b, t, i] <= upper
      assert prob[b, t, i] == pytest.approx(p[tok], rel=1e-4, abs=1e-7)
      assert edge[b, t, i] == pytest.approx(min(u[b, t, i] - lower, upper - u[b, t, i]),
                                            abs=2e-6)
      seq.append(tok)
  assert np.all(edge >= 0) and np.all(edge <= prob / 2 + 1e-6)


def test_pflm_teacher_targets_equal_two_inference_steps():
  cfg, model, params = tiny_model(pflm=True, seed=4)
  rng = np.random.default_rng(5)
  ctx = jnp.asarray(rng.integers(0, 50, (1, 7)))
  for k in (2, 4):
    u = sampling.uniform_noise(jax.random.key(k), (1, 7, k))
    y = jax.jit(lambda p, c, uu: targets.pflm_teacher_targets(model, p, c, uu))(params, ctx, u)
    h = k // 2
    for t in (6,):
      step1 = inference_step(model, cfg, params, ctx[:, :t + 1], u[:, t, :h], prefill_to=0)
      first = jnp.argmax(step1, -1)
      seq = jnp.concatenate([ctx[:, :t + 1], first[None]], axis=1)
      step2 = inference_step(model, cfg, params, seq, u[:, t, h:], prefill_to=t + 1)
      expect = np.concatenate([np.asarray(first), np.asarray(jnp.argmax(step2, -1))])
      np.testing.assert_array_equal(np.asarray(y[0, t]), expect)
