"""The Sampler: text in / text out, ids in / ids out, one compile per shape, K <= k."""
import jax
import numpy as np
import pytest

import kforcing_jax
from kforcing_jax.decoding import engine as decode
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.data import tokenization
from tests.helpers import causal_logits, tiny_model


@pytest.fixture(scope='module')
def pflm_sampler():
  arch, _, params = tiny_model(pflm=True, vocab=32, seed=3, noise=0.5, never_emit=(31,))
  tok = tokenization.synthetic(32, 'test')
  return kforcing_jax.Sampler(arch, params, k=4, tokenizer=tok)


def test_generate_text_and_ids(pflm_sampler):
  s = pflm_sampler
  texts = s.generate(['| s3 s4', '| s9'], max_new_tokens=8, K=4, freq_penalty=0.5, seed=1)
  ids = s.generate_ids(s.encode_prompts(['| s3 s4', '| s9']), max_new_tokens=8, K=4,
                       freq_penalty=0.5, seed=1)
  assert ids.shape == (2, 8) and ids.dtype == np.int32
  for text, row in zip(texts, ids.tolist()):
    cut = row[:row.index(0)] if 0 in row else row  # EOS (0) ends a completion
    assert text == s.tokenizer.decode(cut)
  assert s.encode_prompts(['| s3 s4']) == [[0, 3, 4]]
  # the same request alone gives the same tokens (noise per row seed, not batch position)
  alone = s.generate_ids([[0, 9]], max_new_tokens=8, K=4, freq_penalty=0.5, seed=1,
                         row_seeds=[1])
  np.testing.assert_array_equal(alone[0], ids[1])


def test_same_shapes_compile_once(pflm_sampler):
  s = kforcing_jax.Sampler(pflm_sampler.arch, pflm_sampler.params, k=4,
                           tokenizer=pflm_sampler.tokenizer)
  a = s.generate_ids([[0, 1, 2]], max_new_tokens=6, seed=0)
  traces = s.engine.traces
  b = s.generate_ids([[0, 5, 6]], max_new_tokens=6, seed=1, freq_penalty=0.5)
  assert s.engine.traces == traces and a.shape == b.shape
  s.generate(['| s1 s2'], max_new_tokens=6, seed=2)  # same settings and shapes from text
  assert s.engine.traces == traces
  s.generate_ids([[0, 1, 2]], max_new_tokens=6, K=2)  # another K: another loop
  assert s.engine.traces == traces + 1


def test_logits_in_buckets_equal_the_exact_shapes():
  arch, _, params = tiny_model(seed=3)
  bucketed = kforcing_jax.Sampler(arch, params, k=0)
  exact = kforcing_jax.Sampler(arch, params, k=0, buckets=False)
  toks = np.random.default_rng(0).integers(0, 50, (9, 13))
  np.testing.assert_allclose(bucketed.logits(toks), exact.logits(toks), rtol=1e-5, atol=1e-5)
  size = bucketed._forward._cache_size()  # pylint: disable=protected-access
  for B, T in ((10, 16), (9, 9), (10, 14)):  # the bucket of [9, 13]: [10, 16]
    assert bucketed.logits(np.ones((B, T), int)).shape == (B, T, 53)
  assert bucketed._forward._cache_size() == size  # pylint: disable=protected-access
  with pytest.raises(decode.DecodeError, match=r'tokens have shape \[3\]'):
    bucketed.logits([1, 2, 3])


def test_samplers_of_the_same_configs_share_compiled_loops(pflm_sampler):
  """A new Sampler of the same model (other weights of the same shapes) reuses the loops
  and the forward that an earlier one compiled."""
  arch, tok = pflm_sampler.arch, pflm_sampler.tokenizer
  first = kforcing_jax.Sampler(arch, pflm_sampler.params, k=4, tokenizer=tok)
  first.generate_ids([[0, 1, 2], [0, 3]], max_new_tokens=7, seed=0)
  first.logits([[0, 1, 2]])
  spec = first.spec(max_new_tokens=7)
  loop = decode.loop_fn(first.arch, first.engine.exe, first.engine.plan(spec, 3))
  sizes = (loop._cache_size(), first._forward._cache_size())  # pylint: disable=protected-access
  traces = decode.TRACES['loop']
  other = jax.tree.map(lambda x: x * 0.5, pflm_sampler.params)
  second = kforcing_jax.Sampler(arch, other, k=4, tokenizer=tok)
  out = second.generate_ids([[0, 4, 5], [0, 6]], max_new_tokens=7, seed=1, freq_penalty=0.3)
  second.logits([[0, 4, 5]])
  assert decode.TRACES['loop'] == traces
  assert (loop._cache_size(), second._forward._cache_size()) == sizes  # pylint: disable=protected-access
  assert out.shape == (2, 7)


def test_window_is_enforced_by_the_engine(pflm_sampler):
  with pytest.raises(decode.DecodeError, match="K=8 is larger than the model's window k=4"):
    pflm_sampler.generate_ids([[0, 1]], max_new_tokens=8, K=8)
  with pytest.raises(decode.DecodeError, match="K=8 is larger than the model's window k=4"):
    pflm_sampler.engine.generate([[0, 1]], decode.DecodeSpec(K=8, pflm=True))


def test_ar_sampler_logits_and_eos():
  arch, model, params = tiny_model(vocab=32, seed=4, noise=0.5, never_emit=(31,))
  tok = tokenization.synthetic(32, 'test')
  s = kforcing_jax.Sampler(arch, params, k=0, tokenizer=tok)
  tokens = np.asarray([[0, 3, 4, 5], [0, 7, 8, 9]])
  logits = s.logits(tokens)
  assert logits.dtype == np.float32 and logits.shape == (2, 4, 32)
  np.testing.assert_allclose(logits, np.asarray(causal_logits(model, params, tokens)),
                             rtol=1e-6, atol=1e-6)
  # greedy from [0, 1, 2] emits EOS (0) as its 4th token; from [0, 3, 4] none in 12
  prompts = [[0, 1, 2], [0, 3, 4]]
  greedy = s.generate_ids(prompts, max_new_tokens=12, temperature=0.0, stop_at_eos=False)
  stopped = s.generate_ids(prompts, max_new_tokens=12, temperature=0.0)
  assert greedy.shape == stopped.shape == (2, 12)
  assert greedy[0, 3] == 0 and 0 not in greedy[0, :3] and 0 not in greedy[1]
  # after the first EOS the row holds padding (the reserved id); the other row goes on
  np.testing.assert_array_equal(stopped[0], np.r_[greedy[0, :4], [31] * 8])
  np.testing.assert_array_equal(stopped[1], greedy[1])
  with pytest.raises(decode.DecodeError, match='AR model'):
    s.engine.generate([[0, 1]], decode.DecodeSpec(K=2, pflm=True))


def test_sampler_without_tokenizer_decodes_ids_only():
  arch, _, params = tiny_model(vocab=32)
  s = kforcing_jax.Sampler(arch, params, k=0)
  assert s.generate_ids([[1, 2]], 3, temperature=0.0).shape == (1, 3)
  with pytest.raises(decode.DecodeError, match='no tokenizer'):
    s.generate(['hello'], 3)


def test_serving_precision_keeps_the_noise_encoder_float32(pflm_sampler):
  exe = arch_lib.ExecConfig(dtype='float32', param_dtype='bfloat16', dot_dtype='bfloat16')
  s = kforcing_jax.Sampler(pflm_sampler.arch, pflm_sampler.params, k=4, exe=exe)
  assert s.params['head']['kernel'].dtype == np.dtype('bfloat16')
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(s.params['noise_encoder']))
