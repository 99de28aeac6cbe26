"""Weight-only int8 decoding: the CPU kernel equals the exact product of its int8 weights,
quantization round-trips within half a step, the model on int8 weights gives the same
tokens through the kernel as through XLA's dequantize-and-dot, stays close to the float
model, serves what it decodes alone, and bad settings fail with the field's name."""
import dataclasses
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kforcing_jax.decoding import engine as decode
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.kernels import cpu as cpu_kernels
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import precision
from kforcing_jax.models import quantize
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.serving import engine as engine_lib
from tests.helpers import serve_staggered, staggered_requests, tiny_model

INT8 = precision.exec_config('int8')
INT8_XLA = dataclasses.replace(INT8, int8_products='xla')


@pytest.mark.parametrize('m,k,n', [(1, 576, 1536), (2, 37, 16), (5, 64, 130), (7, 96, 48),
                                   (13, 128, 33), (16, 40, 200), (70, 24, 17)])
def test_kernel_equals_the_exact_product_of_its_int8_weights(m, k, n):
  """Every row-block size (one block and several, with the widened-panel path), partial
  panels, odd K: float32 accumulation within 1e-5 of the float64 product."""
  rng = np.random.default_rng(m * 1000 + n)
  w = rng.standard_normal((k, n)).astype(np.float32)
  w[:, n // 2] = 0.0  # an all-zero column: scale 0, no division by zero
  qk = quantize.quantize(w)
  x = rng.standard_normal((m, k)).astype(np.float32)
  got = np.asarray(jax.jit(lambda x, w: quantize.product(x, w, 'kernel'))(x, qk))
  want = x.astype(np.float64) @ np.asarray(qk.dequantized(), np.float64)
  assert got.shape == (m, n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert np.all(got[:, n // 2] == 0.0)


@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'),
                    reason='the portable build is checked against x86-64 SIMD builds')
def test_portable_build_equals_this_cpus_build(monkeypatch, tmp_path):
  """The kernel compiled for plain x86-64 (the portable code path, as on a CPU without AVX2)
  gives this CPU's build's products to float32 rounding."""
  monkeypatch.setenv('KFORCING_KERNEL_CACHE', str(tmp_path))
  rng = np.random.default_rng(5)
  qk = quantize.quantize(rng.standard_normal((75, 40)).astype(np.float32))
  for m in (1, 3, 9, 20):
    x = jnp.asarray(rng.standard_normal((m, 75)), jnp.float32)
    got = {march: np.asarray(jax.jit(lambda x, w, march=march: cpu_kernels.int8_matmul(
        x, w.packed, w.scale, w.n, march))(x, qk)) for march in ('x86-64', None)}
    np.testing.assert_allclose(got['x86-64'], got[None], rtol=1e-5, atol=1e-5)


def test_quantization_round_trips_within_half_a_step():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 8, 5, 7)).astype(np.float32)  # contracted (3, 8)
  qk = quantize.quantize(w, n_in=2)
  assert qk.in_shape == (3, 8) and qk.out_shape == (5, 7) and qk.packed.dtype == jnp.int8
  assert qk.packed.shape == (3, 24, quantize.PANEL)  # 35 columns in 3 panels
  step = np.abs(w).reshape(24, 35).max(0).reshape(5, 7) / 127
  err = np.abs(np.asarray(qk.dequantized()) - w)
  assert np.all(err <= step / 2 + 1e-7)
  assert np.all(np.asarray(qk.scale)[35:] == 0)  # padded columns


@pytest.mark.parametrize('family', ['gpt_like', 'llama_gqa', 'qwen3_like'])
def test_int8_parameter_tree_quantizes_the_weight_products_only(family):
  arch, _, params = tiny_model(pflm=True, family=family, seed=1)
  q = precision.cast_params(params, INT8)
  flat = {'/'.join(str(getattr(p, 'key', p)) for p in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(q, is_leaf=quantize.is_quantized)[0]}
  quantized = sorted(k for k, v in flat.items() if quantize.is_quantized(v))
  assert 'head/kernel' in quantized  # tied or not
  assert not any(k.startswith('noise_encoder') or 'embed' in k or 'norm' in k or 'ln' in k
                 for k in quantized)
  want = {'gpt_like': ['attn/qkv_kernel', 'attn/out_kernel', 'mlp/fc_in/kernel',
                       'mlp/fc_out/kernel'],
          'llama_gqa': ['attn/q_kernel', 'attn/kv_kernel', 'attn/out_kernel',
                        'mlp/fc_in_0/kernel', 'mlp/fc_in_1/kernel', 'mlp/fc_out/kernel']}
  for name in want.get(family, []):
    assert f'block_0/{name}' in quantized and f'block_1/{name}' in quantized
  assert precision.cast_params(q, INT8) is q  # quantized once
  with pytest.raises(precision.PrecisionError, match='int8'):
    precision.cast_params(q, precision.exec_config('float32'))
  if arch.tie_embeddings:  # the lookup keeps the float table
    assert flat['embed/embedding'].dtype == jnp.float32
  # biases stay float and present
  assert all(not quantize.is_quantized(v) for k, v in flat.items() if k.endswith('bias'))


@pytest.mark.parametrize('family,pflm', [('gpt_like', True), ('llama_gqa', False),
                                         ('qwen3_like', True)])
def test_kernel_tokens_equal_xla_tokens_and_logits_stay_close_to_float(family, pflm):
  """Greedy AR / argmax PFLM decoding on int8 weights: the CPU kernel's tokens are XLA's
  dequantize-and-dot tokens; the int8 model's logits are within a few percent of the float
  model's."""
  arch, model, params = tiny_model(pflm=pflm, family=family, seed=4, noise=0.5, vocab=61)
  k = 2 if pflm else 0
  prompts = [[3, 4, 5, 6, 7], [8, 9], [10]]
  spec = decode.DecodeSpec(K=max(k, 1), pflm=pflm, max_new_tokens=10, temperature=0.0)
  out = {}
  for name, exe in (('kernel', INT8), ('xla', INT8_XLA)):
    eng = decode.Engine(arch, precision.cast_params(params, exe), exe, k=k)
    out[name] = np.asarray(eng.generate(prompts, spec, seed=7)[0])
  np.testing.assert_array_equal(out['kernel'], out['xla'])
  tokens = jnp.asarray([[3, 4, 5, 6, 7, 8, 9, 10]])
  pos = jnp.arange(8)[None]
  float_logits = model.apply({'params': params}, tokens, pos,
                             method=model_lib.Transformer.forward)
  int8_model = model_lib.build(arch, INT8)
  int8_logits = jax.jit(lambda p: int8_model.apply(
      quantize.variables(p), tokens, pos, method=model_lib.Transformer.forward))(
          precision.cast_params(params, INT8))
  rel = float(jnp.abs(int8_logits - float_logits).max() / jnp.abs(float_logits).max())
  assert 0 < rel < 0.05, rel


def test_served_int8_tokens_equal_alone_int8_tokens():
  """The slot engine on int8 weights (AR, two slots, five staggered requests, sampled and
  greedy) writes the offline int8 engine's tokens for each request."""
  arch, _, params = tiny_model(family='llama_gqa', seed=2, vocab=57)
  sampler = sampler_lib.Sampler(arch, params, k=0, exe=INT8)
  eng = engine_lib.SlotEngine(arch, sampler.params, INT8, k=0, K=1, max_slots=2)
  reqs = staggered_requests()
  for r, toks in zip(reqs, serve_staggered(eng, reqs)):
    want = sampler.generate_ids([r.prompt], r.max_tokens, temperature=r.params.temperature,
                                seed=r.params.seed, stop_at_eos=False)[0].tolist()
    assert toks == want, r.prompt


def test_bad_settings_name_the_field(monkeypatch, tmp_path):
  with pytest.raises(arch_lib.ArchitectureError, match=r"weights='int4'.*float, int8"):
    arch_lib.ExecConfig(weights='int4')
  with pytest.raises(arch_lib.ArchitectureError, match='int8_products'):
    arch_lib.ExecConfig(int8_products='avx')
  with pytest.raises(precision.PrecisionError, match='int8'):
    precision.choose('int4')
  arch, _, params = tiny_model(seed=1)
  with pytest.raises(decode.DecodeError, match="weights='int8' but the parameters are float"):
    decode.Engine(arch, params, INT8)
  with pytest.raises(decode.DecodeError, match="weights='float' but the parameters are int8"):
    engine_lib.SlotEngine(arch, precision.cast_params(params, INT8), None, k=0, K=1,
                          max_slots=1)
  # no compiler: a clear error before anything is built
  monkeypatch.setenv('KFORCING_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(cpu_kernels.KernelBuildError, match='CXX'):
    cpu_kernels.build()


def test_the_kernel_is_built_once_per_machine(monkeypatch, tmp_path):
  monkeypatch.setenv('KFORCING_KERNEL_CACHE', str(tmp_path))
  path = cpu_kernels.build()
  assert os.path.dirname(path) == str(tmp_path) and path.endswith('.so')
  mtime = os.path.getmtime(path)
  assert cpu_kernels.build() == path and os.path.getmtime(path) == mtime
  assert [f for f in os.listdir(tmp_path)] == [os.path.basename(path)]  # no temporaries
