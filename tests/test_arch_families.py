"""Llama-family architectures (ArchConfig version 4): the parameter tree the importers map
onto, grouped-query attention equal to multi-head attention with repeated KV heads in
every attention strategy, RMSNorm, RoPE scaling and the whole model against transformers'
Llama and Qwen3, and the architecture's validation."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import modeling_rope_utils

from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models import flash_decode
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.training import distill
from tests.helpers import FAMILIES, causal_logits, jit_decode_step, jit_window, tiny_model


def flat_shapes(params) -> dict:
  return {'/'.join(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def contract_shapes(a: arch_lib.ArchConfig) -> dict:
  """The parameter tree of the architecture contract, written out by hand."""
  D, H, K, hd, F, V = a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.mlp_dim, a.vocab_size
  norm = (lambda p: {f'{p}/LayerNorm_0/scale': (D,)}) if a.norm == 'layernorm' else (
      lambda p: {f'{p}/scale': (D,)})
  out = {'embed/embedding': (V, D), **norm('ln_f')}
  if not a.tie_embeddings:
    out['head/kernel'] = (D, V)
  if a.head_bias:
    out['head/bias'] = (V,)
  for i in range(a.n_layers):
    b = f'block_{i}/'
    out.update({**norm(b + 'ln1'), **norm(b + 'ln2'), b + 'attn/out_kernel': (H, hd, D)})
    if K == H:
      out[b + 'attn/qkv_kernel'] = (D, 3, H, hd)
      if a.qkv_bias:
        out[b + 'attn/qkv_bias'] = (3, H, hd)
    else:
      out.update({b + 'attn/q_kernel': (D, H, hd), b + 'attn/kv_kernel': (D, 2, K, hd)})
      if a.qkv_bias:
        out.update({b + 'attn/q_bias': (H, hd), b + 'attn/kv_bias': (2, K, hd)})
    if a.out_bias:
      out[b + 'attn/out_bias'] = (D,)
    if a.qk_norm:
      out.update({b + 'attn/q_norm/scale': (hd,), b + 'attn/k_norm/scale': (hd,)})
    ins = ['fc_in'] if len(a.mlp_activations) == 1 else [
        f'fc_in_{j}' for j in range(len(a.mlp_activations))]
    for name in ins:
      out[f'{b}mlp/{name}/kernel'] = (D, F)
      if a.mlp_bias:
        out[f'{b}mlp/{name}/bias'] = (F,)
    out[b + 'mlp/fc_out/kernel'] = (F, D)
    if a.mlp_bias:
      out[b + 'mlp/fc_out/bias'] = (D,)
  return out


@pytest.mark.parametrize('family', list(FAMILIES))
def test_parameter_tree_follows_the_contract(family):
  arch = arch_lib.ArchConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, pflm=True,
                             **FAMILIES[family])
  boxed = jax.eval_shape(model_lib.init_fn(model_lib.build(arch)), jax.random.key(0))
  shapes = flat_shapes(nn.unbox(boxed))
  encoder = {k: v for k, v in shapes.items() if k.startswith('noise_encoder/')}
  assert {k: v for k, v in shapes.items() if k not in encoder} == contract_shapes(arch)
  # the noise encoder keeps its own form (width mlp_ratio * D, biases) whatever the backbone's
  assert encoder['noise_encoder/mlp/fc_in/kernel'] == (32, 128)
  assert encoder['noise_encoder/mlp/fc_out/bias'] == (32,)
  kv_axes = nn.get_partition_spec(boxed)['block_0']['attn']
  if arch.n_kv_heads != arch.n_heads:
    assert tuple(kv_axes['kv_kernel']) == ('embed', None, 'kv_heads', 'kv')
    assert tuple(kv_axes['q_kernel']) == ('embed', 'heads', 'kv')


def mha_twin(arch, params):
  """The multi-head model computing what the grouped-query `params` compute: each KV head
  repeated for its G query heads (query head h reads KV head h // G)."""
  G = arch.q_per_kv
  out = dict(params)
  for i in range(arch.n_layers):
    attn = dict(params[f'block_{i}']['attn'])
    q, kv = attn.pop('q_kernel'), attn.pop('kv_kernel')
    attn['qkv_kernel'] = jnp.concatenate([q[:, None], jnp.repeat(kv, G, axis=2)], axis=1)
    if 'q_bias' in attn:
      q_b, kv_b = attn.pop('q_bias'), attn.pop('kv_bias')
      attn['qkv_bias'] = jnp.concatenate([q_b[None], jnp.repeat(kv_b, G, axis=1)], axis=0)
    out[f'block_{i}'] = {**params[f'block_{i}'], 'attn': attn}
  return dataclasses.replace(arch, n_kv_heads=arch.n_heads), out


def cached_logits(model, params, tokens, step: int, products: str):
  """Logits of `tokens` fed `step` at a time through an explicit cache."""
  arch = model.arch
  B, T = tokens.shape
  S = T + 6
  cache = model_lib.init_cache(arch, model.exe, B, S)
  out = []
  for t in range(0, T, step):
    slots = t + jnp.arange(step)
    mask = jnp.broadcast_to(jnp.arange(S)[None, None, :] <= slots[None, :, None], (B, step, S))
    attend = attn_lib.Cached(jnp.int32(t), mask, jnp.zeros((B,), jnp.int32), products=products)
    logits, cache = jit_decode_step(model)(params, tokens[:, t:t + step], cache, attend,
                                           model_lib.arch_rope_cos_sin(
                                               arch, jnp.broadcast_to(slots, (B, step))))
    out.append(logits)
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize('family', ['llama_gqa', 'qwen3_like'])
def test_grouped_query_attention_equals_repeated_kv_heads(family):
  """Causal, window and cached (dot, reduce and kernel products) attention of a GQA model equal
  those of the MHA model whose KV heads are its KV heads repeated (transformers'
  repeat_kv): query head h reads KV head h // G."""
  arch, model, params = tiny_model(pflm=True, family=family, seed=3, layers=1)
  assert arch.n_kv_heads == 2 and arch.n_heads == 4
  mha_arch, mha_params = mha_twin(arch, params)
  mha = model_lib.build(mha_arch)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 50, (2, 9)))
  want = causal_logits(mha, mha_params, tokens)
  np.testing.assert_allclose(causal_logits(model, params, tokens), want, atol=2e-5, rtol=1e-5)
  # three inputs a step (dot, reduce); one a step through the CPU kernel
  for products, step in (('dot', 3), ('reduce', 3), ('kernel', 1)):
    np.testing.assert_allclose(cached_logits(model, params, tokens, step, products), want,
                               atol=2e-5, rtol=1e-5)
  win = jnp.asarray(rng.integers(0, 50, (2, 9, 2)))
  u = jnp.asarray(rng.random((2, 9, 2)), jnp.float32)
  np.testing.assert_allclose(jit_window(model)(params, tokens, win, u),
                             jit_window(mha)(mha_params, tokens, win, u), atol=2e-5, rtol=1e-5)


def test_flash_decode_groups_query_heads():
  """The Pallas decode kernel (interpret mode here) with 2 KV heads for 6 query heads equals
  the whole-cache attention over the KV heads repeated."""
  B, T, Q, H, K, D, S, slot = 2, 3, 3, 6, 2, 16, 2 * flash_decode.BLOCK_K, 70
  start_B = jnp.asarray([0, 41])
  keys = jax.random.split(jax.random.key(1), 5)
  q = jax.random.normal(keys[0], (B, T, H, D))
  k_new = jax.random.normal(keys[1], (B, Q, K, D))
  v_new = jax.random.normal(keys[2], (B, Q, K, D))
  ck = jax.random.normal(keys[3], (B, K, S, D))
  cv = jax.random.normal(keys[4], (B, K, S, D))
  ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k_new, 1, 2), (0, 0, slot, 0))
  cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v_new, 1, 2), (0, 0, slot, 0))
  with jax.default_matmul_precision('float32'):
    got = flash_decode.attention(q, k_new, v_new, ck, cv, slot, start_B)
    q_slots = slot + np.arange(T)
    mask = ((np.arange(S)[None, None, :] <= q_slots[None, :, None]) &
            (np.arange(S)[None, None, :] >= np.asarray(start_B)[:, None, None]))
    rep = lambda x: jnp.repeat(x, H // K, axis=1)
    want = attn_lib.cached_attention(q, rep(jnp.swapaxes(ck, 2, 3)), rep(cv), jnp.asarray(mask))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_rms_norm():
  """x / sqrt(mean(x^2) + eps) * scale in float32, eps honoured (a large eps on small inputs
  changes the result by far more than the tolerance)."""
  rng = np.random.default_rng(0)
  x = (0.05 * rng.standard_normal((2, 3, 8))).astype(np.float32)
  scale = rng.standard_normal(8).astype(np.float32)
  norm = model_lib.RMSNorm(arch_lib.ExecConfig(), eps=0.01)
  got = norm.apply({'params': {'scale': jnp.asarray(scale)}}, jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.float32
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  want = xb / np.sqrt(np.mean(xb ** 2, -1, keepdims=True) + 0.01) * scale
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


ROPE_SCALINGS = [('llama3', 8.0, 1.0, 4.0, 64), ('llama3', 32.0, 1.0, 4.0, 8192),
                 ('llama3', 8.0, 2.0, 8.0, 2048), ('linear', 2.0), ('linear', 4.5), ()]


@pytest.mark.parametrize('scaling', ROPE_SCALINGS)
@pytest.mark.parametrize('head_dim,base', [(8, 10000.0), (64, 500000.0), (128, 1e6)])
def test_rope_inverse_frequencies_equal_transformers(scaling, head_dim, base):
  params = {'rope_type': scaling[0] if scaling else 'default', 'rope_theta': base}
  params.update(zip(arch_lib.ROPE_SCALINGS[scaling[0]], scaling[1:]) if scaling else {})
  cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                 head_dim=head_dim, rope_parameters=params)
  init = (modeling_rope_utils.ROPE_INIT_FUNCTIONS[scaling[0]] if scaling else
          transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
          .compute_default_rope_parameters)
  want, attention_factor = init(cfg)
  assert attention_factor == 1.0
  got = model_lib.rope_inv_freq(head_dim, base, scaling)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
  if scaling == ROPE_SCALINGS[0] and head_dim == 8 and base == 10000.0:
    # all three bands: kept, interpolated, divided by the factor
    plain = model_lib.rope_inv_freq(head_dim, base)
    ratio = got / plain
    assert ratio[0] == 1 and 1 / scaling[1] < ratio[1] < 1 and np.all(ratio[2:] == 1 / 8)


def test_tied_head_equals_untied_head_with_the_embedding_transposed():
  arch, model, params = tiny_model(family='llama_gqa')
  untied = dataclasses.replace(arch, tie_embeddings=False)
  untied_params = {**params, 'head': {'kernel': params['embed']['embedding'].T}}
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 50, (2, 7)))
  np.testing.assert_allclose(causal_logits(model_lib.build(untied), untied_params, tokens),
                             causal_logits(model, params, tokens), atol=1e-5, rtol=1e-5)


def to_hf_state(arch, params) -> dict:
  """transformers Llama/Qwen3 tensors of our parameters (torch Linear weights are
  [out, in])."""
  D, hd = arch.d_model, arch.head_dim
  t = lambda x: torch.tensor(np.asarray(x, np.float32))
  state = {'model.embed_tokens.weight': t(params['embed']['embedding']),
           'model.norm.weight': t(params['ln_f']['scale'])}
  state['lm_head.weight'] = (state['model.embed_tokens.weight'] if arch.tie_embeddings else
                             t(params['head']['kernel'].T))
  for i in range(arch.n_layers):
    p, b = params[f'block_{i}'], f'model.layers.{i}.'
    attn = p['attn']
    kv = attn['kv_kernel']
    state.update({
        b + 'input_layernorm.weight': t(p['ln1']['scale']),
        b + 'post_attention_layernorm.weight': t(p['ln2']['scale']),
        b + 'self_attn.q_proj.weight': t(attn['q_kernel'].reshape(D, -1).T),
        b + 'self_attn.k_proj.weight': t(kv[:, 0].reshape(D, -1).T),
        b + 'self_attn.v_proj.weight': t(kv[:, 1].reshape(D, -1).T),
        b + 'self_attn.o_proj.weight': t(attn['out_kernel'].reshape(-1, D).T),
        b + 'mlp.gate_proj.weight': t(p['mlp']['fc_in_0']['kernel'].T),
        b + 'mlp.up_proj.weight': t(p['mlp']['fc_in_1']['kernel'].T),
        b + 'mlp.down_proj.weight': t(p['mlp']['fc_out']['kernel'].T)})
    if arch.qkv_bias:
      state.update({b + 'self_attn.q_proj.bias': t(attn['q_bias'].reshape(-1)),
                    b + 'self_attn.k_proj.bias': t(attn['kv_bias'][0].reshape(-1)),
                    b + 'self_attn.v_proj.bias': t(attn['kv_bias'][1].reshape(-1))})
    if arch.out_bias:
      state[b + 'self_attn.o_proj.bias'] = t(attn['out_bias'])
    if arch.qk_norm:
      state[b + 'self_attn.q_norm.weight'] = t(attn['q_norm']['scale'])
      state[b + 'self_attn.k_norm.weight'] = t(attn['k_norm']['scale'])
  assert hd * arch.n_heads == state['model.layers.0.self_attn.q_proj.weight'].shape[0]
  return state


@pytest.mark.parametrize('family,hf_class', [('llama_gqa', 'Llama'), ('qwen3_like', 'Qwen3')])
def test_logits_equal_transformers(family, hf_class):
  arch, model, params = tiny_model(family=family, seed=5)
  scaling = arch.rope_scaling
  rope = {'rope_type': scaling[0], 'rope_theta': arch.rope_base,
          **dict(zip(arch_lib.ROPE_SCALINGS[scaling[0]], scaling[1:]))}
  cfg = getattr(transformers, f'{hf_class}Config')(
      vocab_size=arch.vocab_size, hidden_size=arch.d_model, intermediate_size=arch.mlp_dim,
      num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads,
      num_key_value_heads=arch.n_kv_heads, head_dim=arch.head_dim, rms_norm_eps=arch.norm_eps,
      tie_word_embeddings=arch.tie_embeddings, attention_bias=arch.qkv_bias,
      max_position_embeddings=arch.max_seq_len, rope_parameters=rope, hidden_act='silu',
      attn_implementation='eager')
  assert arch.out_bias == arch.qkv_bias  # transformers' attention_bias sets both
  hf = getattr(transformers, f'{hf_class}ForCausalLM')(cfg).eval()
  missing, unexpected = hf.load_state_dict(to_hf_state(arch, params), strict=False)
  assert not unexpected and all('rotary' in m for m in missing), (missing, unexpected)
  tokens = np.random.default_rng(1).integers(0, arch.vocab_size, (2, 11))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(causal_logits(model, params, jnp.asarray(tokens)), want,
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('fields,message', [
    (dict(n_heads=9, d_model=36, n_kv_heads=5), 'model.n_kv_heads=5 must divide model.n_heads=9'),
    (dict(d_model=30), r'model.d_model=30 must divide by model.n_heads=4 \(or set model.head_dim\)'),
    (dict(head_dim=7), 'model.head_dim=7 must be even'),
    (dict(n_kv_heads=-1), 'model.n_kv_heads must be > 0'),
    (dict(mlp_activations=('swish',)),
     "model.mlp_activations='swish' is not allowed; allowed: gelu_tanh, gelu, silu, relu, linear"),
    (dict(mlp_activations=()), 'model.mlp_activations is empty'),
    (dict(norm='batchnorm'), "model.norm='batchnorm' is not allowed; allowed: layernorm, rmsnorm"),
    (dict(norm_eps=0.0), 'model.norm_eps must be > 0'),
    (dict(rope_scaling=('yarn', 2.0)),
     r"model.rope_scaling\[0\]='yarn' is not allowed; allowed: linear, llama3"),
    (dict(rope_scaling=('llama3', 8.0)), "'llama3' takes \\('llama3', factor, low_freq_factor"),
    (dict(rope_scaling=('linear', 0.0)), 'model.rope_scaling: factor=0.0 must be > 0'),
    (dict(rope_scaling=('linear', 'x')), 'factor must be numbers'),
])
def test_invalid_architectures_name_the_field(fields, message):
  with pytest.raises(arch_lib.ArchitectureError, match=message):
    arch_lib.ArchConfig(**{'vocab_size': 10, 'd_model': 32, 'n_heads': 4, **fields})


def test_derived_sizes_and_explicit_head_dim():
  a = arch_lib.ArchConfig(vocab_size=10, d_model=30, n_heads=4, head_dim=16, mlp_dim=7,
                          mlp_activations='silu,linear')
  assert (a.n_kv_heads, a.head_dim, a.mlp_dim, a.q_per_kv) == (4, 16, 7, 1)
  assert a.mlp_activations == ('silu', 'linear')
  b = arch_lib.ArchConfig(vocab_size=10, d_model=32, n_heads=4, n_kv_heads=1, mlp_ratio=3)
  assert (b.n_kv_heads, b.head_dim, b.mlp_dim, b.q_per_kv) == (1, 8, 96, 4)
  assert 'pflm' not in b.backbone() and b.backbone()['n_kv_heads'] == 1


@pytest.mark.parametrize('family', ['gpt_like', 'llama_gqa', 'qwen3_like'])
def test_cache_bytes_are_the_cache_arrays(family):
  for decode_attention in ('xla', 'pallas'):
    exe = arch_lib.ExecConfig(dtype='bfloat16', decode_attention=decode_attention)
    arch = arch_lib.ArchConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4,
                               **FAMILIES[family])
    cache = jax.eval_shape(lambda: model_lib.init_cache(arch, exe, 3, 64))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    assert model_lib.cache_bytes(arch, exe, 3, 64) == nbytes
    assert cache['v'][0].shape == (3, arch.n_kv_heads, 64, arch.head_dim)


@pytest.mark.parametrize('family', ['llama_gqa', 'qwen3_like'])
def test_engine_greedy_tokens_equal_the_full_forward_argmax(family):
  """The decoding engine (grouped-query cache, scaled RoPE, left padding) emits the tokens
  that the causal forward's argmax gives each prompt alone."""
  arch, model, params = tiny_model(family=family, seed=6, noise=0.5)
  prompts = [[3, 4, 5, 6, 7], [8, 9]]
  got, _ = decode.Engine(arch, params).generate(
      prompts, decode.DecodeSpec(max_new_tokens=6, temperature=0.0))
  for row, prompt in zip(np.asarray(got), prompts):
    seq = list(prompt)
    for _ in range(6):
      seq.append(int(jnp.argmax(causal_logits(model, params, jnp.asarray([seq]))[0, -1])))
    assert row.tolist() == seq[len(prompt):]


def test_student_takes_its_teachers_llama_form():
  """A student of an (imported) Llama teacher is a Llama whatever the run's model section
  says; the rest of the backbone must then match (distill compares backbone())."""
  teacher = arch_lib.ArchConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4,
                                rope_base=5e5, **FAMILIES['llama_gqa'])
  run = arch_lib.ArchConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4,
                            never_emit_ids=(52,))
  student = distill.student_arch(run, teacher, 'distill_k2')
  assert student.pflm and student.never_emit_ids == (52,)
  assert student.backbone() == teacher.backbone()


def test_pallas_engine_tokens_equal_the_whole_cache_engine_for_grouped_queries():
  """A grouped-query PFLM decoded through the Pallas flash-decoding kernel (interpret mode
  here) emits the tokens of the masked whole-cache attention."""
  arch, _, params = tiny_model(pflm=True, family='llama_gqa', seed=7, noise=0.5, layers=1)
  prompts = [[3, 4, 5, 6, 7, 8], [9, 10]]
  spec = decode.DecodeSpec(K=2, pflm=True, max_new_tokens=6)
  want, _ = decode.Engine(arch, params, k=2).generate(prompts, spec, seed=1)
  pallas = decode.Engine(arch, params, arch_lib.ExecConfig(decode_attention='pallas'), k=2)
  with jax.default_matmul_precision('float32'):
    got, _ = pallas.generate(prompts, spec, seed=1)
  np.testing.assert_array_equal(got, want)
