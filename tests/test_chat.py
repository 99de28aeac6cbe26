"""/v1/chat/completions on an imported chat model: a tiny random Llama that transformers
builds and saves with a ChatML tokenizer and template (tests/hf_fixtures.py), imported as
an export and served by serve.build from --export. Through the official openai client, a greedy chat answer is
exactly the tokens kforcing_jax.load(EXPORT).generate_ids gives for the rendered prompt,
up to the end of turn, and the text transformers' greedy generate gives."""
import json
import os
import threading
import time

import httpx2 as httpx
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import openai  # noqa: E402
import tokenizers  # noqa: E402

import kforcing_jax  # noqa: E402
from kforcing_jax import serve  # noqa: E402
from kforcing_jax.data import tokenization  # noqa: E402
from kforcing_jax.interop import hf as hf_lib  # noqa: E402
from kforcing_jax.pipeline import config_lib  # noqa: E402
from kforcing_jax.serving import api  # noqa: E402
from kforcing_jax.serving import protocol  # noqa: E402
from tests import hf_fixtures  # noqa: E402
from tests.test_serving import free_port  # noqa: E402

MESSAGES = [{'role': 'system', 'content': 'You are helpful.'},
            {'role': 'user', 'content': 'What is the capital of France?'}]


def chat_tokenizer(path, eos='<|im_end|>'):
  """hf_fixtures' ChatML tokenizer (its template writes the BOS; encoding adds one too),
  with `eos` as its EOS."""
  hf_fixtures.tiny_tokenizer(path)
  file = os.path.join(path, 'tokenizer_config.json')
  with open(file, encoding='utf-8') as f:
    cfg = json.load(f)
  with open(file, 'w', encoding='utf-8') as f:
    json.dump({**cfg, 'eos_token': eos}, f)


def chat_model(path, eos='<|im_end|>', seed=0):
  """A tiny random Llama whose greedy answer to MESSAGES ends with <|im_end|> (id 2) after
  a few tokens: its head row of <|im_end|> is a scaled copy of a token's that the answer
  would have had a little later."""
  chat_tokenizer(path, eos)
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=hf_fixtures.V, hidden_size=64,
                                 intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=128,
                                 initializer_range=0.5, bos_token_id=0, eos_token_id=2)
  model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
  prompt = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(
      MESSAGES, add_generation_prompt=True, return_tensors='pt', return_dict=True)
  n = prompt['input_ids'].shape[1]
  head = model.lm_head.weight
  answer = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, n:].tolist()
  with torch.no_grad():
    for t in answer[4:]:
      head[2] = 1.5 * head[t]
      out = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, n:].tolist()
      if 2 in out and out.index(2) >= 2:
        break
  model.save_pretrained(path)
  return model


class ChatServer:
  def __init__(self, export, *flags):
    port = free_port()
    f = config_lib.cli_flags(serve.define_flags, ['serve', f'--export={export}',
                                                  f'--port={port}', '--dtype=float32', *flags])
    self.app = serve.build(f)
    self.server = serve.uvicorn_server(self.app, f)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      assert self.thread.is_alive()
      time.sleep(0.02)
    self.client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none',
                                max_retries=0)

  def close(self):
    self.server.should_exit = True
    self.thread.join(timeout=60)


@pytest.fixture(scope='module')
def chat(tmp_path_factory):
  root = tmp_path_factory.mktemp('chat')
  ref = chat_model(str(root / 'hf'))
  hf_lib.import_model(str(root / 'hf'), str(root / 'export'))
  s = ChatServer(str(root / 'export'), '--max_slots=2')
  yield s, ref, kforcing_jax.load(str(root / 'export')), str(root / 'hf')
  s.close()


def greedy(sampler, messages, n):
  """The served answer's expectation: greedy ids of the rendered prompt alone, through the
  first end of turn (<|im_end|>, the EOS)."""
  ids = sampler.generate_ids([sampler.tokenizer.encode_chat(messages)], n, temperature=0.0,
                             stop_at_eos=False)[0].tolist()
  eos = sampler.tokenizer.eos_id
  return ids[:ids.index(eos) + 1] if eos in ids else ids


def test_chat_answers_equal_greedy_decoding_and_transformers(chat):
  server, ref, sampler, src = chat
  c = server.client
  name = c.models.list().data[0].id
  reasons = []
  for n in (2, 24):
    r = c.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=n)
    want = greedy(sampler, MESSAGES, n)
    ch = r.choices[0]
    assert ch.model_extra['token_ids'] == want and ch.message.role == 'assistant'
    text_ids = want[:-1] if want[-1] == sampler.tokenizer.eos_id else want
    assert ch.message.content == sampler.tokenizer.decode(text_ids)
    assert ch.finish_reason == ('stop' if text_ids != want else 'length')
    reasons.append(ch.finish_reason)
    prompt = sampler.tokenizer.encode_chat(MESSAGES)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), len(want))
    # transformers' greedy generate of its own chat template, to the end of turn
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    enc = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors='pt',
                                     return_dict=True)  # with its mask: the BOS is the pad id
    ids = enc['input_ids']
    assert ids[0].tolist() == prompt
    out = ref.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert ch.message.content == hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
  assert reasons == ['length', 'stop']  # the answer ends at its end of turn


def test_chat_streams_deltas_and_usage(chat):
  server, _, sampler, _ = chat
  c = server.client
  whole = c.chat.completions.create(model='export', messages=MESSAGES, temperature=0,
                                    max_completion_tokens=12)
  chunks = list(c.chat.completions.create(model='export', messages=MESSAGES, temperature=0,
                                          max_completion_tokens=12, stream=True,
                                          stream_options={'include_usage': True}))
  steps = [ch for ch in chunks if ch.choices]
  assert all(ch.object == 'chat.completion.chunk' for ch in chunks)
  assert steps[0].choices[0].delta.role == 'assistant'
  text = ''.join(ch.choices[0].delta.content or '' for ch in steps)
  assert text == whole.choices[0].message.content
  assert sum((ch.choices[0].model_extra['token_ids'] for ch in steps), []) == \
      whole.choices[0].model_extra['token_ids']
  assert steps[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_equal_transformers(chat):
  """A greedy answer's logprobs (the softmax at temperature 1) and top_logprobs equal the
  log-softmax of transformers' forward over the prompt and answer."""
  server, ref, sampler, _ = chat
  r = server.client.chat.completions.create(model='export', messages=MESSAGES, temperature=0,
                                            max_tokens=6, logprobs=True, top_logprobs=3)
  ch = r.choices[0]
  ids = ch.model_extra['token_ids']
  prompt = sampler.tokenizer.encode_chat(MESSAGES)
  with torch.no_grad():
    lp = torch.log_softmax(ref(torch.tensor([prompt + ids])).logits[0].double(), -1)
  assert len(ch.logprobs.content) == len(ids)
  for j, (t, entry) in enumerate(zip(ids, ch.logprobs.content)):
    want = lp[len(prompt) - 1 + j]
    assert abs(entry.logprob - float(want[t])) < 2e-4
    top = want.topk(3)
    np.testing.assert_allclose([a.logprob for a in entry.top_logprobs], top.values, atol=2e-4)
    assert entry.token == sampler.tokenizer.decode([t])
    assert entry.bytes == list(entry.token.encode())


def test_tokenizer_info_and_tokenize_without_special_tokens(chat):
  """What lm-evaluation-harness's remote tokenizer reads: the special tokens by role, and
  /tokenize with add_special_tokens=false (no BOS from the post-processor)."""
  server, _, sampler, src = chat
  root = str(server.client.base_url).rstrip('/').removesuffix('/v1')
  info = httpx.get(root + '/tokenizer_info', timeout=60).json()
  hf_tok = transformers.AutoTokenizer.from_pretrained(src)
  assert info['eos_token'] == hf_tok.eos_token == '<|im_end|>'
  assert info['bos_token'] == hf_tok.bos_token and info['model_max_length'] == 128
  text = 'The capital of France <|im_end|> is Paris.'
  for special in (True, False):
    r = httpx.post(root + '/tokenize', json={'prompt': text, 'add_special_tokens': special},
                   timeout=60).json()
    assert r['tokens'] == hf_tok(text, add_special_tokens=special)['input_ids']
  eos = httpx.post(root + '/tokenize', json={'prompt': info['eos_token'],
                                             'add_special_tokens': False}, timeout=60).json()
  assert eos['tokens'] == [sampler.tokenizer.eos_id]


def test_chat_requests_are_checked(chat):
  server, _, _, _ = chat
  c = server.client
  for kw, match in (({'messages': [{'role': 'user', 'content': [{'type': 'image_url',
                                                                   'image_url': {'url': 'x'}}]}]},
                     'messages[0].content: expected a string or a list of'),
                    ({'messages': MESSAGES, 'tools': [{'type': 'function'}]},
                     'tools=[{"type": "function"}] is not supported'),
                    ({'messages': MESSAGES, 'top_logprobs': 2},
                     'top_logprobs: only allowed with logprobs=true'),
                    ({'messages': MESSAGES, 'max_tokens': 200}, "maximum length 128"),
                    ({'messages': []}, 'messages: List should have at least 1 item')):
    with pytest.raises(openai.BadRequestError, match=match.replace('[', r'\[')):
      c.chat.completions.create(model='export', **kw)
  # a list of text parts is the string they join
  parts = [{'type': 'text', 'text': 'What is the capital '}, {'type': 'text', 'text': 'of France?'}]
  a = c.chat.completions.create(model='export', temperature=0, max_tokens=6,
                                messages=[MESSAGES[0], {'role': 'user', 'content': parts}])
  b = c.chat.completions.create(model='export', temperature=0, max_tokens=6, messages=MESSAGES)
  assert a.choices[0].model_extra['token_ids'] == b.choices[0].model_extra['token_ids']


def test_end_of_turn_stops_a_chat_whose_eos_differs(tmp_path):
  """A ChatML template on a tokenizer whose EOS is <|endoftext|>: chat answers end at
  <|im_end|> too (completions only at the EOS)."""
  chat_tokenizer(str(tmp_path), eos='<|endoftext|>')
  tok = tokenization.hf(str(tmp_path))
  im_end = tokenizers.Tokenizer.from_file(str(tmp_path / 'tokenizer.json')).token_to_id(
      '<|im_end|>')
  assert serve.end_of_turn_ids(tok) == (im_end,) and tok.eos_id != im_end
  model = api.Model(name='m', k=0, K=1, vocab_size=320, max_len=64, tokenizer=tok,
                    eos_id=tok.eos_id, chat_template=tok.chat_template,
                    encode_chat=tok.encode_chat, end_of_turn_ids=(im_end,))
  chat_req = protocol.ChatCompletionRequest(messages=MESSAGES, max_tokens=4)
  assert api.parse_chat(chat_req, model).stop_ids == {im_end}
  assert api.parse_completion(protocol.CompletionRequest(prompt='hi'), model).stop_ids == set()
  ignore = protocol.ChatCompletionRequest(messages=MESSAGES, max_tokens=4, ignore_eos=True)
  assert api.parse_chat(ignore, model).stop_ids == set()
