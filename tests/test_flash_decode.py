"""decode_attention='pallas' (flash_decode): the same attention and the same tokens as the
masked whole-cache attention, with left padding, EOS, the PFLM's blocks and AR sampling.
The Pallas kernel runs in interpret mode here (on a GPU it compiles through Triton)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.models import attention
from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import flash_decode
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from tests.helpers import tiny_model


@pytest.fixture(autouse=True)
def full_float32_products():
  # float32 products in the kernel and in XLA alike (a GPU would otherwise use TF32 for both)
  with jax.default_matmul_precision('float32'):
    yield


@pytest.mark.parametrize('T,Q,query_from,programs', [
    (8, 8, 0, 2048), (4, 8, 4, 2048), (1, 1, 0, 2048), (5, 5, 0, 1), (8, 8, 0, 12)])
def test_attention_equals_masked_whole_cache_attention(T, Q, query_from, programs,
                                                       monkeypatch):
  # programs: the split-K target -- 2048: all 4 blocks split apart; 1: one split; 12: two
  monkeypatch.setattr(flash_decode, 'PROGRAMS', programs)
  B, H, D, S = 3, 2, 16, 4 * flash_decode.BLOCK_K
  slot = 150  # the prefix crosses splits; the rest of the cache is never read
  start_B = jnp.asarray([0, 37, 149])  # row 2: one prefix slot
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, T, H, D))
  k_new = jax.random.normal(keys[1], (B, Q, H, D))
  v_new = jax.random.normal(keys[2], (B, Q, H, D))
  # slots past slot + Q hold huge values: reading one would change the result
  beyond = (np.arange(S) >= slot + Q)[None, None, :, None]
  ck = jnp.where(beyond, 1e4, jax.random.normal(keys[3], (B, H, S, D)))
  cv = jnp.where(beyond, 1e4, jax.random.normal(keys[4], (B, H, S, D)))
  ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k_new, 1, 2), (0, 0, slot, 0))
  cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v_new, 1, 2), (0, 0, slot, 0))
  got = flash_decode.attention(q, k_new, v_new, ck, cv, slot, start_B, query_from)
  q_slots = slot + query_from + np.arange(T)
  mask = ((np.arange(S)[None, None, :] <= q_slots[None, :, None]) &
          (np.arange(S)[None, None, :] >= np.asarray(start_B)[:, None, None]))
  # the whole-cache reference never reads those slots either: they are masked
  want = attention.cached_attention(q, jnp.swapaxes(ck, 2, 3), cv, jnp.asarray(mask))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_query_with_no_visible_key_gets_zeros():
  # a PFLM's fed tokens can sit in a short row's left padding: no prefix, no block key
  B, T, H, D, S = 1, 2, 1, 16, 2 * flash_decode.BLOCK_K
  q = jnp.ones((B, T, H, D))
  kv = jnp.ones((B, T, H, D))
  cache = jnp.zeros((B, H, S, D))
  out = flash_decode.attention(q, kv, kv, cache, cache, 4, jnp.asarray([9]), 0)
  assert np.all(np.isfinite(out)) and np.all(np.asarray(out) == 0)


def test_cache_length_and_splits():
  for slots in (1, 63, 64, 65, 1032):
    n = flash_decode.cache_length(slots)
    assert n >= slots and n % flash_decode.BLOCK_K == 0 and n - slots < flash_decode.BLOCK_K
  # split-K parts: a divisor of the cache's blocks, the fewest that give PROGRAMS kernel
  # programs (rows x heads x parts), or all blocks when even that falls short
  for rows_x_heads in (12, 768, 3072, 50_000):
    for cache_len in (1024, 1088, 64 * 12):
      blocks = cache_len // flash_decode.BLOCK_K
      d = flash_decode.k_splits(rows_x_heads, cache_len)
      assert blocks % d == 0
      reaching = [x for x in range(1, blocks + 1)
                  if blocks % x == 0 and rows_x_heads * x >= flash_decode.PROGRAMS]
      assert d == (reaching[0] if reaching else blocks), (rows_x_heads, cache_len, d)
  cfg = tiny_model(pflm=True, heads=2)[0]
  cache = model_lib.init_cache(cfg, arch_lib.ExecConfig(decode_attention='pallas'), 2, 256)
  assert cache['k'][0].shape == cache['v'][0].shape == (2, cfg.n_heads, 256, cfg.head_dim)
  with pytest.raises(ValueError, match="decode_attention='flash' is not allowed; allowed: xla, pallas"):
    arch_lib.ExecConfig(decode_attention='flash')
  with pytest.raises(ValueError, match='not a multiple of'):
    flash_decode.attention(jnp.ones((1, 1, 1, 16)), jnp.ones((1, 1, 1, 16)),
                           jnp.ones((1, 1, 1, 16)), jnp.zeros((1, 1, 100, 16)),
                           jnp.zeros((1, 1, 100, 16)), 0, jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize('pflm_mode', [True, False])
def test_engine_tokens_equal_whole_cache_engine(pflm_mode):
  # head_dim 16: Triton's smallest dot on a GPU
  cfg, _, params = tiny_model(pflm=True, never_emit=(52,), seed=7, noise=0.5, heads=2)
  xla = decode.Engine(cfg, params, k=4)
  pallas = decode.Engine(cfg, params, arch_lib.ExecConfig(decode_attention='pallas'), k=4)
  prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12]]  # ragged: left padding of 0, 5, 6
  kw = dict(K=4, pflm=True, freq_penalty=0.5) if pflm_mode else dict(K=1, temperature=1.0)
  spec = decode.DecodeSpec(max_new_tokens=16, **kw)
  want, steps = xla.generate(prompts, spec, seed=2)
  got, steps_p = pallas.generate(prompts, spec, seed=2)
  np.testing.assert_array_equal(got, want)
  assert steps_p == steps
  stop = dataclasses.replace(spec, eos_id=int(want[1, 5]), pad_id=0)
  np.testing.assert_array_equal(pallas.generate(prompts, stop, seed=2)[0],
                                xla.generate(prompts, stop, seed=2)[0])
  with pytest.raises(decode.DecodeError, match="cache_phases=2 with decode_attention='pallas'"):
    pallas.generate(prompts, dataclasses.replace(spec, cache_phases=2))


def test_attention_with_a_slot_per_row_equals_each_row_alone():
  """A serving step: every row at its own slot; each row equals the kernel run for that
  row alone with its scalar slot."""
  B, T, H, D, S = 3, 2, 2, 16, 3 * flash_decode.BLOCK_K
  slot_B = jnp.asarray([5, 70, 140])
  start_B = jnp.asarray([0, 12, 139])
  keys = jax.random.split(jax.random.key(1), 5)
  q = jax.random.normal(keys[0], (B, T, H, D))
  k_new = jax.random.normal(keys[1], (B, T, H, D))
  v_new = jax.random.normal(keys[2], (B, T, H, D))
  ck = jax.random.normal(keys[3], (B, H, S, D))
  cv = jax.random.normal(keys[4], (B, H, S, D))
  got = flash_decode.attention(q, k_new, v_new, ck, cv, slot_B, start_B)
  for b in range(B):
    want = flash_decode.attention(q[b:b + 1], k_new[b:b + 1], v_new[b:b + 1], ck[b:b + 1],
                                  cv[b:b + 1], int(slot_B[b]), start_B[b:b + 1])
    np.testing.assert_allclose(got[b:b + 1], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize('pflm', [True, False])
def test_slot_engine_with_the_kernel_serves_the_whole_cache_tokens(pflm):
  """The serving slot engine with decode_attention='pallas': slots at their own positions
  (ragged prompts, staggered inserts), the same tokens as with the whole-cache attention."""
  from kforcing_jax.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  cfg, _, params = tiny_model(pflm=pflm, never_emit=(52,), seed=7, noise=0.5, heads=2)
  k, K = (4, 4) if pflm else (0, 1)
  out = {}
  for kernel in ('xla', 'pallas'):
    eng = engine_lib.SlotEngine(cfg, params, arch_lib.ExecConfig(decode_attention=kernel),
                                k=k, K=K, max_slots=2)
    state = eng.init_state()
    toks = []
    state = eng.insert(state, eng.prefill([3, 4, 5, 6, 7, 8, 9]), 0,
                       engine_lib.SamplingParams(temperature=1.0, seed=1))
    for step in range(5):
      if step == 2:  # a second request joins two steps later, at its own position
        state = eng.insert(state, eng.prefill([10, 11]), 1,
                           engine_lib.SamplingParams(temperature=1.0, seed=2))
      state, t, _ = eng.generate(state)
      toks.append(np.asarray(t)[0])
    out[kernel] = np.concatenate(toks, axis=1)
  assert out['xla'].shape == (2, 5 * K)
  np.testing.assert_array_equal(out['pallas'][0], out['xla'][0])
  np.testing.assert_array_equal(out['pallas'][1, 2 * K:], out['xla'][1, 2 * K:])
