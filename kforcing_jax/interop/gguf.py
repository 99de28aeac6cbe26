"""GGUF files (llama.cpp) as a config.json-like dict, Hugging Face-named float32 tensors and
a tokenizer.

Tensors are dequantized with the `gguf` package (`gguf.quants.dequantize`, what transformers'
GGUF loader calls for these architectures), renamed from llama.cpp's names (token_embd,
blk.N.attn_q, ..., output_norm, output) to the Hugging Face names of
kforcing_jax.interop.weight_map, and the q/k rows that llama.cpp's converter permutes for
its RoPE are put back for the architectures whose converter does that ('llama', which
includes Mistral), as transformers does. The tokenizer is rebuilt from the
`tokenizer.ggml.*` metadata as a byte-level BPE `tokenizers.Tokenizer` (vocabulary, merges,
the split pattern of the pre-tokenizer type, control tokens as special tokens), the way
transformers' GGUF tokenizer converter builds it.
"""
from __future__ import annotations

import os
import re

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from kforcing_jax import errors

# general.architecture -> config.json architectures
ARCHS = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
         'qwen3': 'Qwen3ForCausalLM'}
# architectures whose llama.cpp converter permutes the q/k rows (and biases)
PERMUTED_QK = ('llama',)
_NAMES = (  # llama.cpp name -> Hugging Face name
    (r'token_embd\.weight', 'model.embed_tokens.weight'),
    (r'output_norm\.weight', 'model.norm.weight'),
    (r'output\.weight', 'lm_head.weight'),
    (r'blk\.(\d+)\.attn_norm\.weight', r'model.layers.\1.input_layernorm.weight'),
    (r'blk\.(\d+)\.ffn_norm\.weight', r'model.layers.\1.post_attention_layernorm.weight'),
    (r'blk\.(\d+)\.attn_q\.(weight|bias)', r'model.layers.\1.self_attn.q_proj.\2'),
    (r'blk\.(\d+)\.attn_k\.(weight|bias)', r'model.layers.\1.self_attn.k_proj.\2'),
    (r'blk\.(\d+)\.attn_v\.(weight|bias)', r'model.layers.\1.self_attn.v_proj.\2'),
    (r'blk\.(\d+)\.attn_output\.(weight|bias)', r'model.layers.\1.self_attn.o_proj.\2'),
    (r'blk\.(\d+)\.attn_q_norm\.weight', r'model.layers.\1.self_attn.q_norm.weight'),
    (r'blk\.(\d+)\.attn_k_norm\.weight', r'model.layers.\1.self_attn.k_norm.weight'),
    (r'blk\.(\d+)\.ffn_gate\.(weight|bias)', r'model.layers.\1.mlp.gate_proj.\2'),
    (r'blk\.(\d+)\.ffn_up\.(weight|bias)', r'model.layers.\1.mlp.up_proj.\2'),
    (r'blk\.(\d+)\.ffn_down\.(weight|bias)', r'model.layers.\1.mlp.down_proj.\2'),
)
# tokenizer.ggml.pre -> the split pattern its merges were learned with (types not listed
# use the GPT-2 byte-level pattern, as transformers' converter does)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {'llama3': _LLAMA3_SPLIT, 'llama-v3': _LLAMA3_SPLIT, 'llama-bpe': _LLAMA3_SPLIT,
          'smaug-bpe': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT, 'deepseek-r1-qwen': _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


class GGUFError(errors.UserError):
  pass


def _gguf():
  try:
    import gguf  # optional dependency (requirements-external.txt): only GGUF imports need it
  except ImportError:
    raise GGUFError('reading a .gguf file needs the gguf package (pip install -r '
                    'requirements-external.txt)') from None
  return gguf


class GGUFFile:
  """One GGUF file: metadata, tensor shapes and dequantized tensors under HF names."""

  def __init__(self, path: str):
    gguf = _gguf()
    self.path = path
    try:
      self.reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
      raise GGUFError(f'{path} is not a readable GGUF file (truncated or corrupt?): '
                      f'{type(e).__name__}: {e}') from None
    size = os.path.getsize(path)
    for t in self.reader.tensors:
      if t.data_offset + t.n_bytes > size:
        raise GGUFError(f'{path} is truncated: tensor {t.name} ends at byte '
                        f'{t.data_offset + t.n_bytes}, the file has {size}')
    self.arch = self.value('general.architecture')
    if self.arch not in ARCHS:
      raise GGUFError(f'{path}: general.architecture={self.arch!r} is not supported; '
                      f'supported: {", ".join(ARCHS)}')
    self.by_hf_name = {}
    for t in self.reader.tensors:
      self.by_hf_name[hf_name(t.name)] = t

  def value(self, key: str, default=None):
    field = self.reader.fields.get(key)
    if field is None:
      return default
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v

  def config(self) -> dict:
    """The model's config as a config.json dict (the keys kforcing_jax.interop.hf_config
    reads)."""
    a = self.arch
    need = {k: self.value(f'{a}.{k}') for k in (
        'embedding_length', 'block_count', 'feed_forward_length', 'attention.head_count')}
    missing = [f'{a}.{k}' for k, v in need.items() if v is None]
    if missing:
      raise GGUFError(f'{self.path}: the metadata has no {", ".join(missing)}')
    D, H = int(need['embedding_length']), int(need['attention.head_count'])
    Hkv = self.value(f'{a}.attention.head_count_kv', H)
    if isinstance(Hkv, list):
      raise GGUFError(f'{self.path}: {a}.attention.head_count_kv differs per layer ({Hkv}); '
                      'one KV head count for all layers is supported')
    if 'rope_freqs.weight' in {t.name for t in self.reader.tensors}:
      raise GGUFError(f'{self.path} scales RoPE with a rope_freqs tensor (Llama 3.1-style); '
                      'import the model\'s Hugging Face directory instead, whose config.json '
                      'states the scaling')
    head_dim = (self.value(f'{a}.attention.key_length') or self.value(f'{a}.rope.dimension_count')
                or D // H)
    vocab = self.value(f'{a}.vocab_size')
    if vocab is None:  # older files: the tokenizer's size
      vocab = len(self.value('tokenizer.ggml.tokens') or [])
    cfg = {
        'architectures': [ARCHS[a]], 'hidden_size': D, 'num_hidden_layers':
        int(need['block_count']), 'intermediate_size': int(need['feed_forward_length']),
        'num_attention_heads': H, 'num_key_value_heads': int(Hkv), 'head_dim': int(head_dim),
        'rms_norm_eps': float(self.value(f'{a}.attention.layer_norm_rms_epsilon', 1e-6)),
        'rope_theta': float(self.value(f'{a}.rope.freq_base', 10000.0)),
        'max_position_embeddings': int(self.value(f'{a}.context_length', 2048)),
        'vocab_size': int(vocab),
        'tie_word_embeddings': 'lm_head.weight' not in self.by_hf_name,
        'bos_token_id': self.value('tokenizer.ggml.bos_token_id'),
        # llama.cpp also stops at an end-of-turn token where the file names one
        'eos_token_id': [i for i in dict.fromkeys((self.value('tokenizer.ggml.eos_token_id'),
                                                   self.value('tokenizer.ggml.eot_token_id')))
                         if i is not None],
        'pad_token_id': self.value('tokenizer.ggml.padding_token_id'),
        'hidden_act': 'silu'}
    scaling = self.value(f'{a}.rope.scaling.type')
    if scaling not in (None, 'none'):
      if scaling != 'linear':
        raise GGUFError(f'{self.path}: {a}.rope.scaling.type={scaling!r}; supported: linear')
      cfg['rope_scaling'] = {'rope_type': 'linear',
                             'factor': float(self.value(f'{a}.rope.scaling.factor'))}
    return cfg

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """{HF name: shape in torch order ([out, in])}."""
    return {n: tuple(int(d) for d in reversed(t.shape.tolist()))
            for n, t in self.by_hf_name.items()}

  def gguf_name(self, name: str) -> str:
    t = self.by_hf_name.get(name)
    return f'{t.name} ({name})' if t is not None else name

  def read(self, name: str, cfg: dict) -> np.ndarray:
    """The dequantized float32 tensor `name` (HF name, torch layout), q/k un-permuted."""
    gguf = _gguf()
    t = self.by_hf_name[name]
    kind = gguf.GGMLQuantizationType(t.tensor_type)
    if kind.name.startswith('I') and not kind.name.startswith('IQ'):
      raise GGUFError(f'{self.path}: tensor {t.name} has integer type {kind.name}; weights '
                      'must be floating point or quantized')
    try:
      values = gguf.quants.dequantize(t.data, kind)
    except NotImplementedError:
      raise GGUFError(f'{self.path}: tensor {t.name} has type {kind.name}, which the gguf '
                      'package cannot dequantize; re-quantize the model to a supported type '
                      '(F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants, IQ-quants)') from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    values = np.asarray(values, np.float32).reshape(shape)
    if self.arch in PERMUTED_QK:
      if '.self_attn.q_proj.' in name:
        values = unpermute_qk(values, int(cfg['num_attention_heads']))
      elif '.self_attn.k_proj.' in name:
        values = unpermute_qk(values, int(cfg['num_key_value_heads']))
    return values

  def tokenizer(self) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) from the metadata."""
    return tokenizer_from_metadata(self.value, self.path)


def hf_name(gguf_name: str) -> str:
  for pattern, repl in _NAMES:
    if re.fullmatch(pattern, gguf_name):
      return re.sub(pattern, repl, gguf_name)
  return gguf_name  # unknown: reported as unexpected by the weight map


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row order: its converter stores each head's rows as (pair, half)
  for its interleaved RoPE; the rotate-half RoPE needs (half, pair)."""
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's printable spelling of the 256 bytes in byte-level vocabularies."""
  keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('\u00a1'), ord('\u00ac') + 1))
          + list(range(ord('\u00ae'), ord('\u00ff') + 1)))
  spelled, extra = {}, 0
  for b in range(256):
    if b in keep:
      spelled[b] = chr(b)
    else:
      spelled[b] = chr(256 + extra)
      extra += 1
  return spelled


def tokenizer_from_metadata(value, path: str = '') -> tuple[str, dict]:
  """(tokenizer.json, tokenizer_config) of GGUF tokenizer metadata (`value(key)` reads it);
  byte-level BPE (tokenizer.ggml.model=gpt2) only."""
  kind = value('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise GGUFError(f'{path}: tokenizer.ggml.model={kind!r}; only byte-level BPE (gpt2) '
                    'tokenizers are rebuilt from GGUF metadata: pass --tokenizer_path=DIR '
                    "with the model's tokenizer.json, or --tokenizer_path=none for ids only")
  tokens = list(value('tokenizer.ggml.tokens') or [])
  merges = list(value('tokenizer.ggml.merges') or [])
  types = list(value('tokenizer.ggml.token_type') or [1] * len(tokens))
  spelled = _byte_alphabet()
  alphabet = set(spelled.values())
  vocab = {}
  for i, t in enumerate(tokens):
    vocab[t if set(t) <= alphabet else ''.join(spelled[b] for b in t.encode('utf-8'))] = i
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(' ')) for m in merges],
                                        fuse_unk=False, byte_fallback=False,
                                        continuing_subword_prefix='', end_of_word_suffix=''))
  split = SPLITS.get(value('tokenizer.ggml.pre'))
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  # control tokens spelled outside the byte alphabet are llama.cpp mislabels: adding them
  # would grow the vocabulary
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab])

  def spelled_token(key):
    i = value(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  config = {'bos_token': spelled_token('tokenizer.ggml.bos_token_id'),
            'eos_token': spelled_token('tokenizer.ggml.eos_token_id'),
            'pad_token': spelled_token('tokenizer.ggml.padding_token_id'),
            'unk_token': spelled_token('tokenizer.ggml.unknown_token_id'),
            'add_bos_token': bool(value('tokenizer.ggml.add_bos_token', False)),
            'chat_template': value('tokenizer.chat_template')}
  if config['add_bos_token'] and config['bos_token']:
    bos = config['bos_token']
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
        special_tokens=[(bos, int(value('tokenizer.ggml.bos_token_id')))])
  return tok.to_str(), config
