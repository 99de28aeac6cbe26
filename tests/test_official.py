"""Imported released checkpoints equal the released PyTorch code: logits of every layout,
k=1 and rollout targets, and the released sampler's tokens, on the parity fixtures of
$KFORCING_TESTDATA/official (tiny random-weight checkpoints in the released layout, with
references computed by the released code)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kforcing_jax
from kforcing_jax.data import tokenization
from kforcing_jax.decoding import engine as decode
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import released as import_official
from kforcing_jax.models import attention as attn_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.pipeline import run as pipeline
from kforcing_jax.pipeline import run_dir
from kforcing_jax.pipeline import sample
from kforcing_jax.training import targets as targets_lib
from tests import conftest
from tests.helpers import jit_decode_step, jit_encode, jit_window

MASK = 103
TOL = 2e-5


def official(name=''):
  return os.path.join(conftest.testdata_dir(), 'official', name)


@pytest.fixture(scope='module')
def ref():
  with np.load(official('reference.npz')) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  d = tmp_path_factory.mktemp('imported')
  out = {}
  for name in ('ar_tiny', 'pflm_tiny_k4'):
    out[name] = str(d / name)
    import_official.import_checkpoint(official(f'{name}_state.npz'), out[name], mask_id=MASK,
                                      k=4 if name.startswith('pflm') else -1)
  return out


@pytest.fixture(scope='module')
def ar(exports):
  return kforcing_jax.load(exports['ar_tiny'])


@pytest.fixture(scope='module')
def pflm(exports):
  return kforcing_jax.load(exports['pflm_tiny_k4'])


def close(ours, theirs, tol=TOL):
  """Logits equal to tol outside the mask column, which both make very negative."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  keep = np.arange(ours.shape[-1]) != MASK
  np.testing.assert_allclose(ours[..., keep], theirs[..., keep], atol=tol, rtol=0)
  assert np.all(ours[..., MASK] < -999)


def test_imported_architecture(ar, pflm):
  assert ar.k == 0 and pflm.k == 4
  for s in (ar, pflm):
    a = s.arch
    assert (a.vocab_size, a.d_model, a.n_layers, a.n_heads) == (130, 64, 2, 4)
    assert a.never_emit_ids == (MASK,)
  assert pflm.arch.pflm and pflm.arch.noise_encoder == 'released'


def test_ar_logits_full_sequence(ar, ref):
  logits = ar.logits(ref['ar.tokens'])
  assert logits.dtype == np.float32 and logits.shape == (2, 12, 130)
  close(logits, ref['ar.logits_hp'])


def test_ar_logits_cached_path(ar, ref):
  """Prefill 5 tokens, then one token per step over the KV cache (infer_next_token)."""
  tokens, P = ref['ar.tokens'], int(ref['ar.cached_prefill_len'])
  model, params = ar.engine.model, ar.params
  B, T, S = tokens.shape[0], tokens.shape[1], 16
  cache = model_lib.init_cache(ar.arch, model.exe, B, S)
  out = []
  for start, end in [(0, P)] + [(t, t + 1) for t in range(P, T)]:
    slots = jnp.arange(start, end)
    mask = jnp.broadcast_to(jnp.arange(S)[None, None] <= slots[None, :, None], (B, end - start, S))
    attend = attn_lib.Cached(jnp.int32(start), mask, jnp.zeros((B,), jnp.int32),
                             products=model.exe.cache_products)
    rope_cs = model_lib.rope_cos_sin(jnp.broadcast_to(slots, (B, end - start)),
                                     ar.arch.head_dim, ar.arch.rope_base)
    logits, cache = jit_decode_step(model)(params, jnp.asarray(tokens[:, start:end]), cache,
                                           attend, rope_cs)
    out.append(np.asarray(logits))
  logprobs = np.asarray(jnp.asarray(np.concatenate(out, 1)) - jnp.asarray(
      np.concatenate(out, 1)).max(-1, keepdims=True))
  logprobs = logprobs - np.log(np.exp(logprobs).sum(-1, keepdims=True))
  close(logprobs, ref['ar.cached_logprobs'])


def test_ar_k1_targets(ar, ref):
  y = jax.jit(lambda p, c, u: targets_lib.ar_teacher_targets(ar.engine.model, p, c, u))(
      ar.params, jnp.asarray(ref['ar.targets_ctx']), jnp.asarray(ref['ar.targets_u']))
  np.testing.assert_array_equal(np.asarray(y), ref['ar.targets'])


def test_pflm_training_layout(pflm, ref):
  logits = jit_window(pflm.engine.model)(pflm.params, jnp.asarray(ref['pflm.train_ctx']), None,
                                         jnp.asarray(ref['pflm.train_u']),
                                         jnp.asarray(ref['pflm.tau']))
  close(logits, ref['pflm.train_logits'])


def test_pflm_two_cached_inference_steps(pflm, ref):
  """Step 1: [prompt | 4 hints]; step 2: [its 4 argmax tokens | 4 fresh hints] over the cache
  in which only real tokens' K/V survive."""
  model, params, arch = pflm.engine.model, pflm.params, pflm.arch
  ctx, tau = ref['pflm.inf_ctx'], jnp.asarray(ref['pflm.tau'])
  B, N, K, S = ctx.shape[0], ctx.shape[1], 4, 24
  cache = model_lib.init_cache(arch, model.exe, B, S)

  def step(tokens, u, start, cache):
    Q = tokens.shape[1] + K
    slots = start + jnp.arange(Q)
    mask = jnp.broadcast_to(jnp.arange(S)[None, None] <= slots[None, :, None], (B, Q, S))
    attend = attn_lib.Cached(jnp.int32(start), mask, jnp.zeros((B,), jnp.int32),
                             products=model.exe.cache_products)
    rope_cs = model_lib.rope_cos_sin(jnp.broadcast_to(slots, (B, Q)), arch.head_dim,
                                     arch.rope_base)
    hints = jit_encode(model)(params, jnp.asarray(u), tau)
    return jit_decode_step(model)(params, jnp.asarray(tokens), cache, attend, rope_cs, hints,
                                  logits_from=tokens.shape[1])

  logits1, cache = step(ctx, ref['pflm.inf_u1'], 0, cache)
  close(logits1, ref['pflm.inf_logits1'])
  np.testing.assert_array_equal(np.argmax(np.asarray(logits1), -1), ref['pflm.inf_tokens2'])
  logits2, _ = step(ref['pflm.inf_tokens2'], ref['pflm.inf_u2'], N, cache)
  close(logits2, ref['pflm.inf_logits2'])
  assert N + K == int(ref['pflm.inf_cache_len_after_step2'])


def test_pflm_rollout_and_targets(pflm, ref):
  """As a k=2 teacher: the first pass on u[..., :2], the rollout pass on u[..., 2:] with the
  first pass's tokens fed as real tokens, and the k=4 targets they make."""
  model, params = pflm.engine.model, pflm.params
  ctx, u = jnp.asarray(ref['pflm.roll_ctx']), jnp.asarray(ref['pflm.roll_u'])
  tau = jnp.asarray(ref['pflm.tau'])
  window = jit_window(model)
  first = window(params, ctx, None, u[..., :2], tau)
  close(first, ref['pflm.roll_logits1'])
  np.testing.assert_array_equal(np.argmax(np.asarray(first), -1), ref['pflm.roll_first'])
  second = window(params, ctx, jnp.asarray(ref['pflm.roll_first']), u[..., 2:], tau)
  close(second, ref['pflm.roll_logits2'])
  y = jax.jit(lambda p, c, u, t: targets_lib.pflm_teacher_targets(model, p, c, u, t))(
      params, ctx, u, tau)
  np.testing.assert_array_equal(np.asarray(y), ref['pflm.roll_targets'])


@pytest.mark.parametrize('key,K,penalty', [('K4_fp0', 4, 0.0), ('K4_fp0.5', 4, 0.5),
                                           ('K3_fp0.5', 3, 0.5)])
def test_released_sampler_tokens(pflm, ref, key, K, penalty):
  prefix = ref['sample.prefix']
  n = int(ref['sample.num_new_tokens'])
  out = pflm.generate_ids(prefix.tolist(), max_new_tokens=n, K=K, freq_penalty=penalty,
                          noise=ref[f'sample.{key}.noise'])
  assert out.shape == (2, n)
  np.testing.assert_array_equal(out, ref[f'sample.{key}.tokens'][:, prefix.shape[1]:])


def test_first_format_encoder_differs_from_released(exports, ref):
  """The encoder form matters: the same weights read as the pre-version-3 encoder (no
  LayerNorm bias, tanh GELU) give visibly different logits."""
  s = kforcing_jax.load(exports['pflm_tiny_k4'])
  old = model_lib.build(dataclasses.replace(s.arch, noise_encoder='scale_only_tanh'))
  params = dict(s.params)
  enc = dict(params['noise_encoder'])
  enc['ln'] = {'LayerNorm_0': {'scale': enc['ln']['LayerNorm_0']['scale']}}
  params['noise_encoder'] = enc
  logits = jit_window(old)(params, jnp.asarray(ref['pflm.train_ctx']), None,
                           jnp.asarray(ref['pflm.train_u']), jnp.asarray(ref['pflm.tau']))
  keep = np.arange(130) != MASK
  assert np.abs(np.asarray(logits)[..., keep] - ref['pflm.train_logits'][..., keep]).max() > 1e-2


def _export_params(path):
  s = kforcing_jax.load(path)
  return s.description, {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                         jax.tree_util.tree_flatten_with_path(s.params)[0]}


def test_ckpt_and_npz_give_the_same_export_and_ema_is_not_read(tmp_path, exports):
  torch = pytest.importorskip('torch')
  out = str(tmp_path / 'from_ckpt')
  desc = import_official.import_checkpoint(official('pflm_tiny_k4.ckpt'), out, mask_id=MASK)
  assert desc['k'] == 4  # from the file name
  assert desc['provenance']['sha256'] == import_official.sha256(official('pflm_tiny_k4.ckpt'))
  d_ckpt, p_ckpt = _export_params(out)
  d_npz, p_npz = _export_params(exports['pflm_tiny_k4'])
  assert d_ckpt['arch'] == d_npz['arch']
  assert p_ckpt.keys() == p_npz.keys()
  for k in p_ckpt:
    np.testing.assert_array_equal(p_ckpt[k], p_npz[k])
  # the decoy: the ema shadow parameters differ from every state-dict tensor of their
  # shape, so an importer that read them would not give the npz's (= state dict's) values
  ckpt = torch.load(official('pflm_tiny_k4.ckpt'), map_location='cpu', weights_only=True)
  shadow = [np.asarray(v.float()) for v in ckpt['ema']['shadow_params']]
  assert len(shadow) == len(ckpt['state_dict']) - 1  # all but the rotary buffer
  values = [np.asarray(v.float()) for v in ckpt['state_dict'].values()]
  for v in shadow:
    assert not any(w.shape == v.shape and np.allclose(w, v) for w in values)


def _state():
  with np.load(official('ar_tiny_state.npz')) as z:
    return {k: z[k] for k in z.files}


def test_renamed_and_truncated_tensors_are_named(tmp_path):
  state = _state()
  state['blocks.1.attn_qkv.weights'] = state.pop('blocks.1.attn_qkv.weight')
  np.savez(tmp_path / 'renamed.npz', **state)
  with pytest.raises(import_official.ImportFailed, match=r'missing: blocks\.1\.attn_qkv\.weight;'
                     r' unexpected: blocks\.1\.attn_qkv\.weights'):
    import_official.import_checkpoint(str(tmp_path / 'renamed.npz'), str(tmp_path / 'o1'),
                                      mask_id=MASK)
  state = _state()
  state['blocks.0.mlp.0.weight'] = state['blocks.0.mlp.0.weight'][:100]
  np.savez(tmp_path / 'truncated.npz', **state)
  with pytest.raises(import_official.ImportFailed, match=r'blocks\.0\.mlp\.0\.weight: '
                     r'\[100, 64\], expected \[256, 64\]'):
    import_official.import_checkpoint(str(tmp_path / 'truncated.npz'), str(tmp_path / 'o2'),
                                      mask_id=MASK)
  assert not os.path.exists(tmp_path / 'o1') and not os.path.exists(tmp_path / 'o2')


def test_bad_inputs_are_clear(tmp_path, monkeypatch):
  with pytest.raises(import_official.ImportFailed, match='--mask_id is needed'):
    import_official.import_checkpoint(official('ar_tiny_state.npz'), str(tmp_path / 'a'))
  unnamed = str(tmp_path / 'pflm.npz')
  with open(official('pflm_tiny_k4_state.npz'), 'rb') as src, open(unnamed, 'wb') as dst:
    dst.write(src.read())
  with pytest.raises(import_official.ImportFailed, match='does not record its window; pass --k'):
    import_official.import_checkpoint(unnamed, str(tmp_path / 'b'), mask_id=MASK)
  with pytest.raises(import_official.ImportFailed, match="allowed: gpt2, bert-base-uncased, none"):
    import_official.import_checkpoint(official('ar_tiny_state.npz'), str(tmp_path / 'c'),
                                      tokenizer='llama', mask_id=MASK)
  with pytest.raises(import_official.ImportFailed, match='rope_base'):
    import_official.import_checkpoint(official('ar_tiny_state.npz'), str(tmp_path / 'd'),
                                      mask_id=MASK, rope_base=500000.0)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  import huggingface_hub.constants  # pylint: disable=g-import-not-at-top  (read at import)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  with pytest.raises(import_official.ImportFailed, match=r'pflm_owt_k4\.ckpt.*--ckpt=/path/to/'
                     r'pflm_owt_k4\.ckpt'):
    import_official.import_checkpoint('hf://zwave/K-Forcing/pflm_owt_k4.ckpt',
                                      str(tmp_path / 'e'))


class _NotATensor:
  pass


def test_pickled_objects_need_trust_pickle(tmp_path):
  torch = pytest.importorskip('torch')
  state = {'backbone.' + k: torch.from_numpy(v) for k, v in _state().items()}
  path = str(tmp_path / 'ar_with_hparams.ckpt')
  torch.save({'state_dict': state, 'hyper_parameters': _NotATensor()}, path)
  with pytest.raises(import_official.ImportFailed, match='--trust_pickle'):
    import_official.import_checkpoint(path, str(tmp_path / 'a'), mask_id=MASK)
  desc = import_official.import_checkpoint(path, str(tmp_path / 'b'), mask_id=MASK,
                                           trust_pickle=True)
  assert desc['k'] == 0


def fixture_run_config(stage_names, steps=2):
  """The synthetic source with the fixtures' vocabulary (128 symbols + EOS + reserved =
  130 ids) and the fixtures' backbone shape."""
  cfg = conftest.synthetic_config(steps=steps, pipeline=stage_names)
  cfg.data.synthetic.n_symbols = 128
  cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 64, 2, 4
  return cfg


def test_distill_from_released_ar_teacher(tmp_path, exports):
  """AR (released) -> k1 -> k2 -> k4 from the config: the first stage's teacher is an
  imported export, the student never emits the teacher's mask id either."""
  cfg = fixture_run_config(('distill_k1', 'distill_k2', 'distill_k4'))
  cfg.stages.distill_k1.teacher_stage = exports['ar_tiny']
  out = pipeline.run(cfg, str(tmp_path))
  assert out['distill_k1']['teacher_stage'] == exports['ar_tiny']
  assert out['distill_k2']['teacher_stage'] == 'distill_k1'
  assert out['distill_k4']['teacher_stage'] == 'distill_k2'
  k4 = kforcing_jax.load_stage(str(tmp_path), 'distill_k4')
  assert k4.arch.never_emit_ids == (MASK, 129) and k4.arch.noise_encoder == 'released'
  ar = kforcing_jax.load(exports['ar_tiny'])
  k1 = kforcing_jax.load_stage(str(tmp_path), 'distill_k1')
  emb = "['embed']['embedding']"
  # the student started from the released weights (2 steps move them a little)
  flat = lambda p: {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                    jax.tree_util.tree_flatten_with_path(p)[0]}
  assert np.abs(flat(k1.params)[emb] - flat(ar.params)[emb]).max() < 0.05


def test_distill_k8_from_released_k4(tmp_path, exports):
  cfg = fixture_run_config(('distill_k8',))
  cfg.stages.distill_k8.teacher_stage = exports['pflm_tiny_k4']
  # the released recipe's objective: its chain holds no AR model to roll out
  cfg.stages.distill_k8.objective = 'progressive'
  out = pipeline.run(cfg, str(tmp_path))
  assert out['distill_k8']['k'] == 8
  k8 = kforcing_jax.load_stage(str(tmp_path), 'distill_k8')
  assert k8.k == 8 and k8.arch.noise_encoder == 'released'
  for K in (1, 4, 8):
    ids = k8.generate_ids([[0, 5, 7], [0, 9]], 16, K=K, seed=1)
    assert ids.shape == (2, 16) and not np.isin(ids, [MASK, 129]).any()
  with pytest.raises(decode.DecodeError, match="K=9 is larger than the model's window k=8"):
    k8.generate_ids([[0, 5]], 16, K=9)
  # a k=8 student cannot come from the released k=4 except as distill_k8
  bad = fixture_run_config(('distill_k4',))
  bad.stages.distill_k4.teacher_stage = exports['pflm_tiny_k4']
  bad.stages.distill_k4.objective = 'progressive'
  with pytest.raises(run_dir.StageError, match='can only teach window 8 under objective'):
    pipeline.run(bad, str(tmp_path / 'bad'))


@pytest.mark.parametrize('corpus,tokenizer', [('owt', 'gpt2'), ('lm1b', 'bert-base-uncased')])
def test_prompt_files_tokenize_as_released(corpus, tokenizer):
  """The released prompt files through the sample CLI's prompt path give the ids of the
  released tokenizers (special tokens written in the text are single ids)."""
  tok = tokenization.load(tokenizer, os.path.join(conftest.testdata_dir(), 'tokenizers',
                                                  tokenizer))
  prompts = sample.read_prompts(official(f'prefix_{corpus}_examples.jsonl'))
  with open(official('prefix_ids.json'), encoding='utf-8') as f:
    want = [r['ids'] for r in json.load(f)[corpus]]
  assert sampler_lib.encode_prompts(tok, prompts, 6) == want  # sample_records' path
  if tokenizer == 'bert-base-uncased':  # a prompt without [CLS] gets exactly one
    assert tokenization.encode_prompt(tok, 'the bank')[:1] == [101]
    assert tokenization.encode_prompt(tok, '[CLS] the bank').count(101) == 1
