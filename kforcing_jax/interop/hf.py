"""Imports a Llama-family model (Llama, Mistral, Qwen2, Qwen3) from a Hugging Face directory,
a GGUF file or the Hugging Face Hub as a kforcing_jax export.

  python -m kforcing_jax.import_hf --src=DIR|FILE.gguf|hf://OWNER/REPO --out=EXPORT

A directory holds config.json (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`),
`model.safetensors` or shards listed in `model.safetensors.index.json`, and usually
tokenizer.json with tokenizer_config.json. Tensors are read one at a time and cast into
the parameter tree as they are read, so the host holds about one copy of the model in the
export's dtype (float32, or bfloat16 with --dtype=bfloat16; loading restores float32).
The mapping (kforcing_jax.interop.weight_map) is strict. The export is the self-describing
one of kforcing_jax.interop.export (an AR model, k=0) with the model's tokenizer files and
chat template in EXPORT/tokenizer/, its BOS/EOS/pad ids, and the source with the sha256
of every file read as provenance.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from kforcing_jax import errors
from kforcing_jax.data import hf_tokenizer
from kforcing_jax.decoding import sampler as sampler_lib
from kforcing_jax.interop import export as export_lib
from kforcing_jax.interop import gguf as gguf_lib
from kforcing_jax.interop import hf_config
from kforcing_jax.interop import weight_map
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.training import checkpoint as ckpt_lib

HF_PREFIX = 'hf://'
INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
TOKENIZER_DIR = 'tokenizer'  # inside the export
_HUB_FILES = ['*.json', '*.safetensors', '*.jinja']
# how the export stores the parameters (kforcing_jax.load restores them as float32):
# bfloat16 halves the importer's memory and the export, losslessly for bfloat16 checkpoints
PARAM_DTYPES = {'float32': np.float32, 'bfloat16': jnp.bfloat16}


class ImportFailed(errors.UserError):
  """A model that cannot be imported; the message names the file, field or flag."""


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


def resolve(src: str) -> str:
  """A local directory or .gguf file for SRC; hf://OWNER/REPO[/FILE.gguf] is downloaded."""
  if not src.startswith(HF_PREFIX):
    if os.path.isdir(src) or (os.path.isfile(src) and src.endswith('.gguf')):
      return src
    raise ImportFailed(f'--src={src!r} is neither a model directory nor a .gguf file (nor '
                       'hf://OWNER/REPO)')
  parts = src[len(HF_PREFIX):].strip('/').split('/')
  if len(parts) < 2:
    raise ImportFailed(f'--src={src!r}: expected hf://OWNER/REPO or hf://OWNER/REPO/FILE.gguf')
  repo, filename = '/'.join(parts[:2]), '/'.join(parts[2:])
  try:
    import huggingface_hub  # optional dependency (requirements-external.txt): hub only
    if filename:
      return huggingface_hub.hf_hub_download(repo_id=repo, filename=filename)
    return huggingface_hub.snapshot_download(repo_id=repo, allow_patterns=_HUB_FILES)
  except Exception as e:  # offline, unknown repo, no huggingface_hub: one clear message
    first = str(e).splitlines()[0] if str(e) else ''
    raise ImportFailed(
        f'could not download {repo}{"/" + filename if filename else ""} from the Hugging Face '
        f'Hub ({type(e).__name__}: {first}); download it where there is a network '
        f'(huggingface-cli download {repo} --local-dir DIR) and pass --src=DIR'
        f'{"/" + filename if filename else ""}') from None


class SafetensorsDir:
  """The safetensors tensors of a model directory, read one at a time as float32."""

  def __init__(self, path: str):
    from safetensors import safe_open  # optional dependency (requirements-external.txt)
    self.path = path
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
      with open(index, encoding='utf-8') as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.exists(os.path.join(path, SINGLE)):
      files = [SINGLE]
    else:
      have = ', '.join(sorted(os.listdir(path))[:12])
      raise ImportFailed(f'{path} has neither {SINGLE} nor {INDEX} (files: {have}); only '
                         'safetensors checkpoints are read')
    self.files = [os.path.join(path, f) for f in files]
    self.handles, self.where, self._shapes = {}, {}, {}
    for file in self.files:
      if not os.path.isfile(file):
        raise ImportFailed(f'{INDEX} lists {os.path.basename(file)}, which is not in {path}')
      try:
        handle = safe_open(file, framework='flax')
        for name in handle.keys():
          if name in self.where:
            raise ImportFailed(f'tensor {name} is in both {self.where[name]} and {file}')
          self.where[name] = file
          self._shapes[name] = tuple(handle.get_slice(name).get_shape())
      except ImportFailed:
        raise
      except Exception as e:  # the reader's own error type: truncated or corrupt file
        raise ImportFailed(f'{file} is not a readable safetensors file (truncated or '
                           f'corrupt?): {e}') from None
      self.handles[file] = handle

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return dict(self._shapes)

  def read(self, name: str) -> np.ndarray:
    with jax.default_device(jax.devices('cpu')[0]):
      return np.asarray(self.handles[self.where[name]].get_tensor(name), np.float32)


def param_shapes(arch: arch_lib.ArchConfig) -> dict[str, tuple[int, ...]]:
  abstract, _ = ckpt_lib.abstract_params(arch, sampler_lib.one_device_mesh())
  return weight_map.flatten_shapes(abstract)


def _token_id(tok, token):
  return None if token is None else tok.token_to_id(token)


def special_tokens(tokenizer_json: str, config: dict, ids: dict) -> tuple[dict, dict]:
  """(tokenizer config with eos/pad/bos spelled out, {'bos_id', 'eos_id', 'eos_ids',
  'pad_id'}): the tokenizer's own EOS (the end of a chat turn in chat models) when it
  names one, else the model config's first; pad falls back to EOS."""
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  config = dict(config)
  eos_id = _token_id(tok, config.get('eos_token'))
  if eos_id is None and ids['eos_ids']:
    eos_id = ids['eos_ids'][0]
  bos_id = _token_id(tok, config.get('bos_token'))
  bos_id = ids['bos_id'] if bos_id is None else bos_id
  pad_id = _token_id(tok, config.get('pad_token'))
  pad_id = ids['pad_id'] if pad_id is None else pad_id
  pad_id = eos_id if pad_id is None else pad_id
  for key, i in (('eos_token', eos_id), ('bos_token', bos_id), ('pad_token', pad_id)):
    if config.get(key) is None and i is not None:
      config[key] = tok.id_to_token(i)
  eos_ids = sorted({i for i in ids['eos_ids'] + [eos_id] if i is not None})
  return config, {'bos_id': bos_id, 'eos_id': eos_id, 'eos_ids': eos_ids, 'pad_id': pad_id}


def _tokenizer_source(local: str, gguf_file, tokenizer_path: str):
  """(tokenizer.json text, tokenizer config, files read) or (None, {}, []) for ids only."""
  if tokenizer_path == 'none':
    return None, {}, []
  if tokenizer_path or gguf_file is None:
    d = tokenizer_path or local
    if not hf_tokenizer.has_tokenizer(d):
      if tokenizer_path:
        raise ImportFailed(f'--tokenizer_path={tokenizer_path!r} has no '
                           f'{hf_tokenizer.TOKENIZER_JSON}')
      raise ImportFailed(f'{local} has no {hf_tokenizer.TOKENIZER_JSON}: pass '
                         '--tokenizer_path=DIR with the model\'s tokenizer files, or '
                         '--tokenizer_path=none to import ids only')
    file = os.path.join(d, hf_tokenizer.TOKENIZER_JSON)
    with open(file, encoding='utf-8') as f:
      text = f.read()
    files = [file] + [os.path.join(d, n) for n in (hf_tokenizer.CONFIG_JSON,
                                                   hf_tokenizer.TEMPLATE_JINJA)
                      if os.path.exists(os.path.join(d, n))]
    return text, hf_tokenizer.read_config(d), files
  text, config = gguf_file.tokenizer()
  return text, config, []


def import_model(src: str, out: str, *, max_seq_len: int = 0, tokenizer_path: str = '',
                 dtype: str = 'float32') -> dict:
  """Writes the export of SRC to OUT; returns its description."""
  if dtype not in PARAM_DTYPES:
    raise ImportFailed(f'--dtype={dtype!r}; allowed: {", ".join(PARAM_DTYPES)}')
  if os.path.exists(out):
    raise ImportFailed(f'--out={out} already exists; choose a new path')
  local = resolve(src)
  gguf_file = gguf_lib.GGUFFile(local) if local.endswith('.gguf') else None
  if gguf_file is not None:
    cfg, source, files = gguf_file.config(), gguf_file, [local]
  else:
    cfg_file = os.path.join(local, 'config.json')
    if not os.path.isfile(cfg_file):
      raise ImportFailed(f'{local} has no config.json: it is not a Hugging Face model directory')
    with open(cfg_file, encoding='utf-8') as f:
      cfg = json.load(f)
    source = SafetensorsDir(local)
    files = [cfg_file] + source.files
  arch = arch_lib.ArchConfig(**hf_config.arch_fields(cfg, max_seq_len))
  shapes = param_shapes(arch)
  placements = weight_map.plan(shapes, arch.n_layers)
  describe = gguf_file.gguf_name if gguf_file is not None else (lambda n: n)
  names = weight_map.check_names(placements, source.shapes(), arch.tie_embeddings, describe)
  read = ((lambda n: gguf_file.read(n, cfg)) if gguf_file is not None else source.read)
  tok_json, tok_config, tok_files = _tokenizer_source(local, gguf_file, tokenizer_path)
  desc = {'stage': 'imported', 'k': 0, 'arch': arch.to_dict(), 'tokenizer_path': '',
          'param_dtype': dtype}
  if tok_json is None:
    ids = hf_config.special_ids(cfg)
    desc['tokenizer'] = {'name': 'none', 'vocab_size': arch.vocab_size, 'fingerprint': ''}
    desc['special_ids'] = {**ids, 'eos_id': ids['eos_ids'][0] if ids['eos_ids'] else None}
  else:
    n_tok = tokenizers.Tokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)
    if n_tok > arch.vocab_size:
      raise ImportFailed(f'the tokenizer has {n_tok} tokens, the model\'s embedding only '
                         f'{arch.vocab_size} rows')
    tok_config, desc['special_ids'] = special_tokens(tok_json, tok_config,
                                                     hf_config.special_ids(cfg))
    desc['tokenizer'] = {'name': 'hf', 'vocab_size': arch.vocab_size,
                         'fingerprint': hf_tokenizer.fingerprint(tok_json)}
    desc['tokenizer_dir'] = TOKENIZER_DIR
    desc['chat_template'] = tok_config.get('chat_template') or ''
  desc['provenance'] = {
      'importer': 'kforcing_jax.import_hf', 'source': src,
      'format': 'gguf' if gguf_file is not None else 'safetensors',
      'architecture': cfg['architectures'][0],
      'files': [{'path': os.path.abspath(p), 'sha256': sha256(p)} for p in files + tok_files]}
  params = weight_map.build(placements, shapes, ((n, read(n)) for n in names),
                            PARAM_DTYPES[dtype])
  # as host jax arrays (no copy on the CPU) Orbax writes them without another copy of the
  # model in memory
  cpu = jax.devices('cpu')[0]
  params = jax.tree.map(lambda x: jax.device_put(x, cpu), params)
  desc = export_lib.write(out, params, desc, compress=False)
  del params
  if tok_json is not None:
    try:
      hf_tokenizer.write(os.path.join(out, TOKENIZER_DIR), tok_json, tok_config)
    except OSError:
      shutil.rmtree(out, ignore_errors=True)
      raise
  return desc
