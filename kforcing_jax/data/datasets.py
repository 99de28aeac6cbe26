"""Data sources and the deterministic, resumable, per-host-sharded batch iterator.

Every source exposes rows of `seq_len` token ids plus a validity mask:
  tokens [n, seq_len] int32, mask [n, seq_len] bool (False on padding).
Sources:
  synthetic    the seeded hidden Markov source (kforcing_jax.synthetic), no download.
  lm1b         tensorflow-datasets' `lm1b` builder, bert-base-uncased, padded rows.
  openwebtext  Hugging Face `openwebtext` online, or local .txt/.xz/.jsonl documents; GPT-2,
               documents joined with <|endoftext|> and cut into seq_len blocks.
  text         local text / JSONL files with any supported tokenizer, padded or packed.
  tokens       a token cache built offline (e.g. chat contexts: kforcing_jax.build_contexts),
               read as it is; its tokenizer must be the configured one.
Tokenizers: bert-base-uncased, gpt2, or hf (a model's own tokenizer.json and
tokenizer_config.json in data.tokenizer_path, e.g. an imported model's export/tokenizer).
Packing: `pad` = one sentence/record per row, [CLS] ... [SEP] for BERT (EOS appended for
GPT-2), truncated or padded to seq_len with a loss mask; `concat` = one stream cut into
blocks, no padding. TensorFlow is imported only by the lm1b source (docs/design.md section 8).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import lzma
import os
import tarfile
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from kforcing_jax.data import synthetic as synthetic_lib
from kforcing_jax.data import token_cache
from kforcing_jax.data import tokenization

SOURCES = ('synthetic', 'lm1b', 'openwebtext', 'text', 'tokens')
PACKINGS = ('pad', 'concat')
DEFAULT_TOKENIZER = {'lm1b': 'bert-base-uncased', 'openwebtext': 'gpt2', 'text': 'gpt2'}
DEFAULT_PACKING = {'lm1b': 'pad', 'openwebtext': 'concat', 'text': 'pad', 'synthetic': 'concat',
                   'tokens': 'pad'}
TOKENIZERS = ('bert-base-uncased', 'gpt2', tokenization.HF)
SPLITS = token_cache.SPLITS


DataConfigError = token_cache.DataConfigError
ArraySource = token_cache.ArraySource
pad_rows = token_cache.pad_rows


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------
class SyntheticSource:
  """Rows sampled on the fly; row content is a pure function of (seed, split, step)."""

  def __init__(self, cfg):
    self.hmm = synthetic_lib.source_from_config(cfg)
    self.seq_len = cfg.data.seq_len
    fp = hashlib.sha256(json.dumps(cfg.data.synthetic.to_dict(), sort_keys=True).encode())
    self.tokenizer = tokenization.synthetic(self.hmm.vocab_size, fp.hexdigest()[:16])
    self.seed = cfg.data.synthetic.seed

  def num_rows(self, split: str) -> int | None:
    return None

  def global_batch(self, split: str, step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, SPLITS.index(split), step, batch])
    tokens = self.hmm.sample(rng, batch, self.seq_len)
    return tokens, np.ones_like(tokens, bool)


class TfdsTextSource:
  """tensorflow-datasets random-access records (ArrayRecord), tokenised on access."""

  def __init__(self, tokenizer, seq_len, data_sources: dict[str, Any]):
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self._ds = data_sources

  def num_rows(self, split: str) -> int:
    return len(self._ds[split])

  def rows(self, split: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    texts = [_as_text(self._ds[split][int(i)]['text']) for i in ids]
    return pad_rows([self.tokenizer.encode(t) for t in texts], self.seq_len,
                    self.tokenizer)


def _as_text(x) -> str:
  return x.decode('utf-8') if isinstance(x, bytes) else str(x)


# --------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------
def list_files(path: str, field: str = 'data.path') -> list[str]:
  if not path:
    raise DataConfigError(f'{field} is empty: set it to a file, a directory or a glob of '
                          '.txt / .xz / .jsonl files')
  if os.path.isdir(path):
    files = sorted(f for f in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                   if os.path.isfile(f))
  else:
    files = sorted(glob.glob(path))
  files = [f for f in files if f.endswith(('.txt', '.xz', '.jsonl', '.json'))]
  if not files:
    raise DataConfigError(f'{field}={path!r}: no .txt, .xz or .jsonl files found there')
  return files


def _jsonl_texts(lines: Iterator[str], name: str) -> Iterator[str]:
  for n, line in enumerate(lines):
    if line.strip():
      rec = json.loads(line)
      if 'text' not in rec:
        raise DataConfigError(f'{name}:{n + 1}: JSONL records need a "text" field')
      yield rec['text']


def read_records(files: Sequence[str], unit: str) -> list[str]:
  """unit='line': one record per non-empty line (or JSONL record); 'file': per document."""
  records = []
  for f in files:
    if f.endswith('.xz'):
      if tarfile.is_tarfile(f):
        with tarfile.open(f, 'r:xz') as tar:
          for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile():
              text = tar.extractfile(m).read().decode('utf-8', 'replace')
              records.extend(_split(text, unit))
        continue
      with lzma.open(f, 'rt', encoding='utf-8') as fh:
        text = fh.read()
      name = f[:-3]
    else:
      with open(f, encoding='utf-8', errors='replace') as fh:
        text = fh.read()
      name = f
    if name.endswith(('.jsonl', '.json')):
      records.extend(_jsonl_texts(io.StringIO(text), f))
    else:
      records.extend(_split(text, unit))
  return records


def _split(text: str, unit: str) -> list[str]:
  if unit == 'file':
    return [text] if text.strip() else []
  return [line.strip() for line in text.splitlines() if line.strip()]


def heldout_mask(n: int, fraction: float, seed: int) -> np.ndarray:
  if not 0.0 < fraction < 1.0:
    raise DataConfigError(f'data.eval_fraction must be in (0, 1), got {fraction}')
  is_eval = np.random.default_rng([seed, 4242]).random(n) < fraction
  if n >= 2 and not is_eval.any():
    is_eval[np.random.default_rng([seed, 4243]).integers(n)] = True
  if n >= 2 and is_eval.all():
    is_eval[0] = False
  return is_eval


def _split_records(records: list[str], eval_records: list[str] | None, fraction: float,
                   seed: int) -> Iterator[tuple[str, str]]:
  if eval_records is not None:
    yield from (('train', r) for r in records)
    yield from (('eval', r) for r in eval_records)
    return
  is_eval = heldout_mask(len(records), fraction, seed)
  yield from ((('eval' if e else 'train'), r) for r, e in zip(records, is_eval))


def local_file_source(cfg, tok, packing: str) -> ArraySource:
  d = cfg.data
  unit = 'line' if packing == 'pad' else 'file'
  files = list_files(d.path)
  eval_files = list_files(d.eval_path, 'data.eval_path') if d.eval_path else []
  key = token_cache.cache_key([(f, os.path.getsize(f), os.path.getmtime(f)) for f in files + eval_files],
                  tok.fingerprint, packing, d.seq_len, d.eval_fraction, cfg.seed,
                  d.max_examples, unit)

  def records():
    recs = read_records(files, unit)
    if d.max_examples > 0:
      recs = recs[:d.max_examples]
    return _split_records(recs, read_records(eval_files, unit) if eval_files else None,
                          d.eval_fraction, cfg.seed)
  return token_cache.cached_source(d.cache_dir, key, records, tok, d.seq_len, packing,
                       {'source': 'files', 'path': d.path})


def openwebtext_hf_documents(max_examples: int) -> tuple[int, Iterator[str]]:
  """(document count, documents) of the Hugging Face `openwebtext` dataset (online);
  needs the optional `datasets` package."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top  (optional, heavy)
  except ImportError as e:
    raise DataConfigError(
        'data.source=openwebtext with data.path empty loads the Hugging Face dataset and '
        'needs `pip install datasets`; offline, set data.path to local .txt/.xz/.jsonl '
        'documents') from e
  ds = datasets.load_dataset('openwebtext', split='train', trust_remote_code=True)
  n = len(ds) if max_examples < 0 else min(len(ds), max_examples)
  return n, (ds[i]['text'] for i in range(n))


def openwebtext_hf_source(cfg, tok, packing: str) -> ArraySource:
  d = cfg.data
  key = token_cache.cache_key('hf:openwebtext', tok.fingerprint, packing, d.seq_len, d.eval_fraction,
                  cfg.seed, d.max_examples)

  def records():
    n, docs = openwebtext_hf_documents(d.max_examples)
    is_eval = heldout_mask(n, d.eval_fraction, cfg.seed)
    return ((('eval' if e else 'train'), text) for text, e in zip(docs, is_eval))
  return token_cache.cached_source(d.cache_dir, key, records, tok, d.seq_len, packing,
                       {'source': 'hf:openwebtext'})


def token_files_source(cfg, tok) -> ArraySource:
  """data.path: a finished token cache whose tokenizer and seq_len are the config's."""
  d = cfg.data
  meta = token_cache.read_meta(d.path)
  if meta.get('tokenizer') != tok.identity():
    raise DataConfigError(f'data.path={d.path!r} was tokenized with {meta.get("tokenizer")}; '
                          f'data.tokenizer gives {tok.identity()}')
  if meta.get('seq_len') != d.seq_len:
    raise DataConfigError(f'data.path={d.path!r} holds rows of {meta.get("seq_len")} tokens; '
                          f'set data.seq_len={meta.get("seq_len")}')
  return token_cache.open_cache(d.path, tok, d.seq_len)


def lm1b_source(cfg, tok) -> TfdsTextSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kw = {'data_dir': cfg.data.tfds_data_dir} if cfg.data.tfds_data_dir else {}
  builder = tfds.builder('lm1b', file_format='array_record', **kw)
  builder.download_and_prepare()
  sources = {'train': builder.as_data_source(split='train'),
             'eval': builder.as_data_source(split='test')}
  return TfdsTextSource(tok, cfg.data.seq_len, sources)


def resolve(cfg) -> tuple[str, str]:
  """(tokenizer name, packing) after defaults; raises on unknown values."""
  d = cfg.data
  if d.source not in SOURCES:
    raise DataConfigError(f'data.source={d.source!r} is not known; allowed: {", ".join(SOURCES)}')
  packing = d.packing or DEFAULT_PACKING[d.source]
  if packing not in PACKINGS:
    raise DataConfigError(f'data.packing={d.packing!r} is not known; allowed: pad, concat')
  if d.source == 'synthetic':
    if d.tokenizer not in ('', 'synthetic'):
      raise DataConfigError(f'data.tokenizer={d.tokenizer!r} cannot be used with '
                            'data.source=synthetic; leave it empty')
    return 'synthetic', 'concat'
  name = d.tokenizer or DEFAULT_TOKENIZER.get(d.source, '')
  if name not in TOKENIZERS:
    raise DataConfigError(f'data.tokenizer={name!r} is not supported with '
                          f'data.source={d.source}; allowed: {", ".join(TOKENIZERS)}')
  if name == tokenization.HF and not d.tokenizer_path:
    raise DataConfigError('data.tokenizer=hf needs data.tokenizer_path: a directory with '
                          'tokenizer.json and tokenizer_config.json (an export\'s tokenizer/)')
  return name, packing


def make_source(cfg):
  """Builds the configured source (tokenises local files, prepares TFDS as needed)."""
  _, packing = resolve(cfg)
  if cfg.data.seq_len < 2:
    raise DataConfigError(f'data.seq_len must be >= 2, got {cfg.data.seq_len}')
  if cfg.data.source == 'synthetic':
    return SyntheticSource(cfg)
  if cfg.data.source == 'tokens' and not cfg.data.path:
    raise DataConfigError('data.source=tokens needs data.path: a token cache directory '
                          '(e.g. written by python -m kforcing_jax.build_contexts)')
  if cfg.data.source == 'text' or (cfg.data.source == 'openwebtext' and cfg.data.path):
    list_files(cfg.data.path)  # a missing path is reported before any tokenizer download
  tok = make_tokenizer(cfg)
  if cfg.data.source == 'tokens':
    return token_files_source(cfg, tok)
  if cfg.data.source == 'lm1b':
    return lm1b_source(cfg, tok)
  if cfg.data.source == 'openwebtext' and not cfg.data.path:
    return openwebtext_hf_source(cfg, tok, packing)
  return local_file_source(cfg, tok, packing)


# --------------------------------------------------------------------------------------
# Iteration
# --------------------------------------------------------------------------------------
class BatchIterator:
  """Deterministic global batches; `state()` / `restore()` make a resumed run continue
  with exactly the batch it would have seen. Each process materialises only its own rows
  and the global array is assembled with jax.make_array_from_process_local_data."""

  def __init__(self, source, split: str, global_batch: int, sharding, seed: int,
               shuffle: bool = True):
    self.source, self.split, self.global_batch = source, split, global_batch
    self.sharding, self.seed, self.shuffle = sharding, seed, shuffle
    self.step = 0
    self._perm_epoch, self._perm = -1, None
    nproc, pid = jax.process_count(), jax.process_index()
    if global_batch % nproc:
      raise DataConfigError(f'batch size {global_batch} must divide by the process count {nproc}')
    per = global_batch // nproc
    self._lo, self._hi = pid * per, (pid + 1) * per

  def state(self) -> dict:
    return {'split': self.split, 'step': int(self.step), 'global_batch': self.global_batch}

  def restore(self, state: dict) -> None:
    if state.get('global_batch', self.global_batch) != self.global_batch:
      raise DataConfigError(
          f'the checkpoint was written with batch size {state["global_batch"]}, the config '
          f'asks for {self.global_batch}: a resumed run would not see the same data')
    self.step = int(state['step'])

  def example_ids(self, positions: np.ndarray) -> np.ndarray:
    n = self.source.num_rows(self.split)
    epoch, offset = positions // n, positions % n
    if not self.shuffle:
      return offset
    out = np.empty_like(positions)
    for e in np.unique(epoch):
      if e != self._perm_epoch:
        self._perm = np.random.default_rng([self.seed, 99, int(e)]).permutation(n)
        self._perm_epoch = int(e)
      sel = epoch == e
      out[sel] = self._perm[offset[sel]]
    return out

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    if isinstance(self.source, SyntheticSource):
      tokens, mask = self.source.global_batch(self.split, step, self.global_batch)
      tokens, mask = tokens[self._lo:self._hi], mask[self._lo:self._hi]
    else:
      pos = step * self.global_batch + np.arange(self._lo, self._hi)
      tokens, mask = self.source.rows(self.split, self.example_ids(pos))
    return {'tokens': tokens, 'mask': mask}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = self.local_batch(self.step)
    self.step += 1
    if self.sharding is None:
      return {k: jax.numpy.asarray(v) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(self.sharding, v,
                                                      (self.global_batch,) + v.shape[1:])
            for k, v in local.items()}


def model_vocab_size(cfg) -> int:
  """The model's vocabulary: model.vocab_size, or where it is -1 the tokenizer's."""
  v = int(cfg.model.vocab_size)
  return v if v > 0 else make_tokenizer(cfg).vocab_size


def make_tokenizer(cfg):
  """The tokenizer a config trains with, without preparing any data."""
  name, _ = resolve(cfg)
  if name == 'synthetic':
    return SyntheticSource(cfg).tokenizer
  # a model's own tokenizer may have fewer ids than its embedding table (padded vocabularies)
  vocab_size = max(int(cfg.model.vocab_size), 0) if name == tokenization.HF else 0
  return tokenization.load(name, cfg.data.tokenizer_path, vocab_size)
