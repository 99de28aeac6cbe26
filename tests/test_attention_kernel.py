"""Decode-time attention through the CPU kernel (ExecConfig.cache_products='kernel'): its
batched products equal the float64 products, one-query cached attention equals the batched
dots', AR decoding and serving write the dot products' tokens, 'auto' picks the kernel only
where it runs, and it is refused where it cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax import sharding as sharding_lib
from kforcing_jax.decoding import engine as decode
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.decoding import step as step_lib
from kforcing_jax.kernels import cpu as cpu_kernels
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import attention as attn_lib
from kforcing_jax.serving import engine as engine_lib
from tests.helpers import serve_staggered, staggered_requests, tiny_model

KERNEL = arch_lib.ExecConfig(cache_products='kernel')
DOT = arch_lib.ExecConfig(cache_products='dot')


@pytest.mark.parametrize('b,m,k,n', [(1, 1, 64, 192), (48, 3, 64, 37), (5, 7, 13, 16),
                                     (3, 24, 192, 64), (2, 1, 5, 3), (4, 2, 0, 5)])
def test_batched_kernel_equals_the_float64_products(b, m, k, n):
  """One and several row blocks, partial and single-column panels, odd and zero K."""
  rng = np.random.default_rng(b * 100 + n)
  x = rng.standard_normal((b, m, k)).astype(np.float32)
  w = rng.standard_normal((b, k, n)).astype(np.float32)
  got = np.asarray(jax.jit(cpu_kernels.batched_matmul)(x, w))
  want = np.einsum('bmk,bkn->bmn', x.astype(np.float64), w.astype(np.float64))
  assert got.shape == (b, m, n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize('B,H,K,d,S', [(3, 6, 2, 16, 37), (2, 4, 4, 8, 16), (16, 9, 3, 64, 200)])
def test_one_query_attention_equals_the_batched_dots(B, H, K, d, S):
  rng = np.random.default_rng(S)
  q = jnp.asarray(rng.standard_normal((B, 1, H, d)), jnp.float32)
  kt = jnp.asarray(rng.standard_normal((B, K, d, S)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, K, S, d)), jnp.float32)
  mask = rng.random((B, 1, S)) > 0.4
  mask[:, :, 0] = True
  run = {p: np.asarray(jax.jit(lambda *a, p=p: attn_lib.cached_attention(*a, products=p))(
      q, kt, v, jnp.asarray(mask))) for p in ('dot', 'kernel')}
  np.testing.assert_allclose(run['kernel'], run['dot'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', ['gpt_like', 'llama_gqa'])
def test_ar_tokens_equal_the_dot_products_tokens(family):
  """Greedy and sampled AR decoding of ragged prompts (left padding masked) through the kernel
  write the batched dots' tokens."""
  arch, _, params = tiny_model(family=family, seed=6, vocab=59)
  prompts = [[3, 4, 5, 6, 7], [8, 9], [10]]
  for temperature in (0.0, 1.0):
    spec = decode.DecodeSpec(K=1, pflm=False, max_new_tokens=12, temperature=temperature)
    out = {name: decode.Engine(arch, params, exe).generate(prompts, spec, seed=3)[0]
           for name, exe in (('kernel', KERNEL), ('dot', DOT))}
    np.testing.assert_array_equal(out['kernel'], out['dot'])


def test_served_tokens_equal_alone_tokens_with_the_kernel():
  """The slot engine with the kernel (AR, two slots, five staggered requests, sampled and
  greedy) writes the offline engine's tokens for each request."""
  arch, _, params = tiny_model(family='llama_gqa', seed=2, vocab=57)
  sampler = sampler_lib.Sampler(arch, params, k=0, exe=KERNEL)
  eng = engine_lib.SlotEngine(arch, sampler.params, KERNEL, k=0, K=1, max_slots=2)
  assert eng.exe.cache_products == 'kernel'
  reqs = staggered_requests()
  for r, toks in zip(reqs, serve_staggered(eng, reqs)):
    want = sampler.generate_ids([r.prompt], r.max_tokens, temperature=r.params.temperature,
                                seed=r.params.seed, stop_at_eos=False)[0].tolist()
    assert toks == want, r.prompt


def test_auto_picks_the_kernel_only_where_it_runs(monkeypatch):
  """auto: the kernel on a one-device CPU with a compiler, whatever the weights; reduce on a
  CPU with several devices or with no compiler; dot on a GPU, where an explicit 'kernel' is
  refused by name."""
  auto = arch_lib.ExecConfig()
  monkeypatch.setattr(jax, 'device_count', lambda: 1)
  assert auto.resolved('cpu').cache_products == 'kernel'
  assert arch_lib.ExecConfig(weights='int8').resolved('cpu').cache_products == 'kernel'
  assert auto.resolved('gpu').cache_products == 'dot'
  monkeypatch.setattr(cpu_kernels, 'compiler', lambda: None)
  assert auto.resolved('cpu').cache_products == 'reduce'
  monkeypatch.undo()
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  assert auto.resolved('cpu').cache_products == 'reduce'
  with pytest.raises(arch_lib.ArchitectureError, match="cache_products='kernel'.*gpu"):
    KERNEL.resolved('gpu')
  with pytest.raises(arch_lib.ArchitectureError, match='cache_products.*kernel'):
    arch_lib.ExecConfig(cache_products='flash')


def test_the_slot_engine_refuses_the_kernel_on_a_mesh():
  arch, _, params = tiny_model(seed=1)
  mesh = sharding_lib.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1})
  with pytest.raises(step_lib.DecodeError, match="cache_products='kernel' runs on one device"):
    engine_lib.SlotEngine(arch, params, KERNEL, k=0, K=1, max_slots=2, mesh=mesh)
