"""Tokenizers: bert-base-uncased WordPiece, GPT-2 BPE, the synthetic source's ids, and a
model's own tokenizer ('hf': its tokenizer.json, with its special tokens and chat template;
what imported Hugging Face and GGUF models use).

Each loads from a local directory (offline) or by name (online). `vocab_size` is the
model's vocabulary: it includes the reserved id that is never emitted (docs/design.md section 2.1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Sequence

from kforcing_jax.data import chat_template as chat_lib
from kforcing_jax.data import hf_tokenizer

HF = 'hf'  # a model's own tokenizer.json
KNOWN = ('bert-base-uncased', 'gpt2', 'synthetic', HF)
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
                r"""|\s+""")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  name: str
  vocab_size: int  # model vocabulary, reserved id included.
  eos_id: int  # ends a sentence / joins documents.
  pad_id: int  # fills padded rows (targets there are masked).
  never_emit_ids: tuple[int, ...]  # logits forced to a large negative value.
  fingerprint: str  # identifies the vocabulary; stored in checkpoints.
  add_bos_eos: bool  # whether encode() wraps text in [CLS] ... [SEP].
  _encode: Callable[[str], list[int]] = dataclasses.field(repr=False, compare=False)
  _decode: Callable[[Sequence[int]], str] = dataclasses.field(repr=False, compare=False)
  # prompts: special tokens spelled in the text ('<|endoftext|>', '[CLS]') are single ids,
  # as the released tokenizers give them; corpus text is encoded with _encode (ordinary)
  _encode_special: Callable[[str], list[int]] | None = dataclasses.field(
      default=None, repr=False, compare=False)
  # the model's chat template (jinja; '' = none) and its special tokens by role
  # (bos_token, eos_token, ...: what a template may use; /tokenizer_info reports them)
  chat_template: str = dataclasses.field(default='', repr=False, compare=False)
  template_tokens: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def encode(self, text: str) -> list[int]:
    return self._encode(text)

  def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
    """The prompt text of chat messages, as transformers' apply_chat_template renders it."""
    if not self.chat_template:
      raise chat_lib.ChatTemplateError(f'the tokenizer {self.name} has no chat template: the '
                                       'model is not a chat model')
    return chat_lib.render(self.chat_template, messages,
                           add_generation_prompt=add_generation_prompt,
                           special_tokens=self.template_tokens)

  def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of chat messages: the rendered template, its special tokens as single
    ids and nothing added around it (the template writes any BOS itself)."""
    return self._encode_special(self.render_chat(messages, add_generation_prompt),
                                add_special_tokens=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._decode([int(i) for i in ids])

  def identity(self) -> dict:
    return {'name': self.name, 'vocab_size': self.vocab_size, 'fingerprint': self.fingerprint}


def _file_hash(*paths: str) -> str:
  h = hashlib.sha256()
  for p in paths:
    with open(p, 'rb') as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _need(path: str, files: Sequence[str], name: str) -> list[str]:
  out = [os.path.join(path, f) for f in files]
  missing = [f for f in out if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(
        f'data.tokenizer_path={path!r}: the {name} tokenizer needs {", ".join(files)} there; '
        f'missing: {", ".join(missing)}')
  return out


def bert_base_uncased(path: str = '') -> Tokenizer:
  import tokenizers
  if path:
    (vocab,) = _need(path, ['vocab.txt'], 'bert-base-uncased')
    tok = tokenizers.BertWordPieceTokenizer(vocab, lowercase=True)
    fp = _file_hash(vocab)
  else:
    tok = tokenizers.Tokenizer.from_pretrained('bert-base-uncased')
    fp = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
  size = tok.get_vocab_size()
  if size != 30522:
    raise ValueError(f'data.tokenizer_path={path!r}: expected the 30,522-entry '
                     f'bert-base-uncased vocabulary, found {size} entries')
  return Tokenizer(
      name='bert-base-uncased', vocab_size=size, eos_id=102, pad_id=0,
      never_emit_ids=(103,), fingerprint=fp, add_bos_eos=True,
      _encode=lambda s: tok.encode(s).ids,
      _decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
      _encode_special=lambda s: tok.encode(s, add_special_tokens=False).ids,
      template_tokens={'bos_token': '[CLS]', 'eos_token': '[SEP]', 'pad_token': '[PAD]',
                       'unk_token': '[UNK]'})


def gpt2(path: str = '') -> Tokenizer:
  import tiktoken
  if path:
    (ranks_file,) = _need(path, ['gpt2.tiktoken'], 'gpt2')
    import tiktoken.load
    enc = tiktoken.Encoding(name='gpt2', pat_str=GPT2_PATTERN,
                            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(ranks_file),
                            special_tokens={'<|endoftext|>': 50256})
    fp = _file_hash(ranks_file)
  else:
    enc = tiktoken.get_encoding('gpt2')
    fp = hashlib.sha256(str(enc.n_vocab).encode() + enc.pat_str.encode()).hexdigest()[:16]
  if enc.n_vocab != 50257:
    raise ValueError(f'data.tokenizer_path={path!r}: expected 50,257 GPT-2 tokens, got '
                     f'{enc.n_vocab}')
  reserved = 50257
  return Tokenizer(
      name='gpt2', vocab_size=50258, eos_id=50256, pad_id=reserved,
      never_emit_ids=(reserved,), fingerprint=fp, add_bos_eos=False,
      _encode=lambda s: enc.encode_ordinary(s),
      _decode=lambda ids: enc.decode([i for i in ids if i < 50257]),
      _encode_special=lambda s: enc.encode(s, allowed_special='all'),
      template_tokens={'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>'})


def synthetic(vocab_size: int, fingerprint: str) -> Tokenizer:
  """The synthetic source's ids written as words: EOS is '|', symbol i is 's<i>'."""
  reserved = vocab_size - 1

  def encode(text: str) -> list[int]:
    ids = []
    for w in text.split():
      if w == '|':
        ids.append(0)
      elif w.startswith('s') and w[1:].isdigit() and 0 < int(w[1:]) < reserved:
        ids.append(int(w[1:]))
      else:
        raise ValueError(f'synthetic tokenizer: {w!r} is not a token; use "|" (EOS) or '
                         f's1..s{reserved - 1}')
    return ids

  def decode(ids: Sequence[int]) -> str:
    return ' '.join('|' if i == 0 else f's{i}' for i in ids if i != reserved)

  return Tokenizer(name='synthetic', vocab_size=vocab_size, eos_id=0, pad_id=reserved,
                   never_emit_ids=(reserved,), fingerprint=fingerprint, add_bos_eos=False,
                   _encode=encode, _decode=decode, template_tokens={'eos_token': '|'})


def hf(path: str, vocab_size: int = 0) -> Tokenizer:
  """A model's own tokenizer from DIR/tokenizer.json and DIR/tokenizer_config.json (EOS,
  pad, BOS, chat template). vocab_size: the model's (default: the tokenizer's). Corpus
  text is encoded as plain text; prompts (encode_prompt) as transformers' tokenizer(text)
  encodes them: special tokens written in the text are single ids, and the tokenizer's
  post-processor adds what it adds (e.g. a BOS)."""
  if not path:
    raise FileNotFoundError('data.tokenizer=hf needs data.tokenizer_path=DIR (with '
                            'tokenizer.json)')
  tok, config, fp = hf_tokenizer.read(path)
  plain = hf_tokenizer.read(path)[0]
  plain.encode_special_tokens = True  # corpus text: '<|im_end|>' in a document is text
  size = tok.get_vocab_size(with_added_tokens=True)
  vocab_size = int(vocab_size) or size
  if size > vocab_size:
    raise ValueError(f'data.tokenizer_path={path!r}: the tokenizer has {size} tokens, more '
                     f'than the model\'s {vocab_size}')

  def token_id(key):
    return None if config.get(key) is None else tok.token_to_id(config[key])

  eos = token_id('eos_token')
  if eos is None:
    raise ValueError(f'data.tokenizer_path={path!r}: {hf_tokenizer.CONFIG_JSON} names no '
                     'eos_token of the vocabulary')
  pad = token_id('pad_token')
  template_tokens = {k: config[k] for k in hf_tokenizer.SPECIAL if config.get(k) is not None}
  return Tokenizer(
      name=HF, vocab_size=vocab_size, eos_id=eos, pad_id=eos if pad is None else pad,
      never_emit_ids=(), fingerprint=fp, add_bos_eos=False,
      _encode=lambda s: plain.encode(s, add_special_tokens=False).ids,
      _decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
      _encode_special=lambda s, add_special_tokens=True: tok.encode(
          s, add_special_tokens=add_special_tokens).ids,
      chat_template=config.get('chat_template') or '', template_tokens=template_tokens)


def load(name: str, path: str = '', vocab_size: int = 0) -> Tokenizer:
  if name == 'bert-base-uncased':
    return bert_base_uncased(path)
  if name == 'gpt2':
    return gpt2(path)
  if name == HF:
    return hf(path, vocab_size)
  raise ValueError(f'data.tokenizer={name!r} is not supported; allowed: '
                   f'bert-base-uncased, gpt2, hf (synthetic comes with data.source=synthetic)')


BERT_CLS = 101


def encode_prompt(tok: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
  """Token ids of a prompt. Special tokens written in the text are single ids, as the
  released tokenizers (Hugging Face, add_special_tokens=False) give them:
  '<|endoftext|>' -> 50256, '[CLS]' -> 101. A BERT prompt starts with one [CLS] (added
  when the text has none) and gets no closing [SEP] (the sentence goes on); a model's own
  tokenizer adds what its post-processor adds (e.g. a BOS). add_special_tokens=False: only
  the text's own tokens."""
  if tok._encode_special is None:
    return tok.encode(text)
  if tok.name == HF:
    return list(tok._encode_special(text, add_special_tokens=add_special_tokens))
  ids = list(tok._encode_special(text))
  if add_special_tokens and tok.add_bos_eos and (not ids or ids[0] != BERT_CLS):
    ids = [BERT_CLS] + ids
  return ids


def from_identity(identity: dict, path: str = '') -> Tokenizer:
  """The tokenizer an export or checkpoint names ({'name', 'vocab_size', 'fingerprint'}):
  the synthetic one rebuilt from its identity, the others loaded from `path` (or by name
  when it is empty), None for an import that names no tokenizer ('none': ids only). A
  different vocabulary is an error naming both."""
  if identity['name'] == 'none':
    return None
  if identity['name'] == 'synthetic':
    return synthetic(int(identity['vocab_size']), identity['fingerprint'])
  tok = load(identity['name'], path, int(identity['vocab_size']))
  if identity['name'] == HF and tok.fingerprint != identity['fingerprint']:
    raise ValueError(f'the tokenizer.json in {path} (fingerprint {tok.fingerprint}) is not the '
                     f'one the model was exported with ({identity["fingerprint"]})')
  if tok.vocab_size != identity['vocab_size']:
    raise ValueError(f'tokenizer {identity["name"]} from {path or "the hub"} has '
                     f'{tok.vocab_size} ids, the model was trained with {identity["vocab_size"]}')
  return tok
