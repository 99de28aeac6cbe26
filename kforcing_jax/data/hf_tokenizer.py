"""A model's own tokenizer files, as Hugging Face ships them: `tokenizer.json` (read with the
`tokenizers` library) and `tokenizer_config.json` (special tokens, whether a BOS is added,
the chat template; the template may also sit in `chat_template.jinja`).

`read` gives a `tokenizers.Tokenizer` and the settings kforcing_jax uses, normalised;
`write` stores both in a directory in the same layout (an export's tokenizer/ folder),
so that transformers' AutoTokenizer can read it too.
"""
from __future__ import annotations

import hashlib
import json
import os

import tokenizers

TOKENIZER_JSON = 'tokenizer.json'
CONFIG_JSON = 'tokenizer_config.json'
TEMPLATE_JINJA = 'chat_template.jinja'
SPECIAL = ('bos_token', 'eos_token', 'pad_token', 'unk_token')


def _content(token):
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(token, dict):
    return token.get('content')
  return token if isinstance(token, str) else None


def _template(value):
  """The default chat template of tokenizer_config.json's `chat_template` (a string, or a
  list of {'name', 'template'})."""
  if isinstance(value, list):
    named = {t.get('name'): t.get('template') for t in value if isinstance(t, dict)}
    return named.get('default') or next(iter(named.values()), None)
  return value if isinstance(value, str) else None


def read_config(path: str) -> dict:
  """{bos_token, eos_token, pad_token, unk_token, add_bos_token, chat_template} of a
  tokenizer directory (None where unset)."""
  raw = {}
  cfg_file = os.path.join(path, CONFIG_JSON)
  if os.path.exists(cfg_file):
    with open(cfg_file, encoding='utf-8') as f:
      raw = json.load(f)
  out = {k: _content(raw.get(k)) for k in SPECIAL}
  out['add_bos_token'] = raw.get('add_bos_token')
  out['chat_template'] = _template(raw.get('chat_template'))
  jinja_file = os.path.join(path, TEMPLATE_JINJA)
  if os.path.exists(jinja_file):
    with open(jinja_file, encoding='utf-8') as f:
      out['chat_template'] = f.read()
  return out


def has_tokenizer(path: str) -> bool:
  return os.path.isfile(os.path.join(path, TOKENIZER_JSON))


def fingerprint(tokenizer_json: str) -> str:
  return hashlib.sha256(tokenizer_json.encode('utf-8')).hexdigest()[:16]


def read(path: str) -> tuple[tokenizers.Tokenizer, dict, str]:
  """(tokenizer, read_config(path), fingerprint of tokenizer.json)."""
  file = os.path.join(path, TOKENIZER_JSON)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'data.tokenizer_path={path!r} has no {TOKENIZER_JSON}')
  with open(file, encoding='utf-8') as f:
    text = f.read()
  return tokenizers.Tokenizer.from_str(text), read_config(path), fingerprint(text)


def write(path: str, tokenizer_json: str, config: dict) -> None:
  """Writes tokenizer.json and a tokenizer_config.json with `config`'s settings."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, TOKENIZER_JSON), 'w', encoding='utf-8') as f:
    f.write(tokenizer_json)
  out = {'tokenizer_class': 'PreTrainedTokenizerFast'}
  out.update({k: config[k] for k in SPECIAL if config.get(k) is not None})
  if config.get('add_bos_token') is not None:
    out['add_bos_token'] = bool(config['add_bos_token'])
  if config.get('chat_template'):
    out['chat_template'] = config['chat_template']
  with open(os.path.join(path, CONFIG_JSON), 'w', encoding='utf-8') as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
