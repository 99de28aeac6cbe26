"""The token cache: a corpus tokenized once into memory-mapped row arrays.

A cache directory holds, per split, `{split}_tokens.bin` ([n, seq_len] int32), for padded
rows `{split}_mask.bin` ([n, seq_len] bool, False on padding) and, where rows start with a
prompt (chat contexts), `{split}_prompt_lens.bin` ([n] int32); `meta.json` (written last,
the directory renamed into place when complete) names the format, seq_len, packing, row
counts and tokenizer. Text corpora are cached here by their sources (data.cache_dir); a
context set built offline (kforcing_jax.build_contexts) is one such directory, read back
with data.source=tokens.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from kforcing_jax import errors

SPLITS = ('train', 'eval')
CACHE_FORMAT = 'kforcing_jax.tokens/1'


class DataConfigError(errors.UserError):
  pass


class ArraySource:
  """Rows as [n, seq_len] arrays (memory-mapped token caches, or small corpora); a split's
  mask may be None: every token is valid (concat rows). prompt_lens: per split, how many
  leading tokens of each row are its prompt (0: a row of plain text), where rows have one."""

  def __init__(self, tokenizer, seq_len, splits: dict[str, tuple[np.ndarray, Any]],
               prompt_lens: dict[str, np.ndarray] | None = None):
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self._splits = splits
    self._prompt_lens = prompt_lens
    for split, (tokens, _) in splits.items():
      if len(tokens) == 0:
        raise DataConfigError(f'the {split} split has no rows of data.seq_len={seq_len}: '
                              'add data or lower data.eval_fraction / data.seq_len')

  def num_rows(self, split: str) -> int:
    return len(self._splits[split][0])

  def rows(self, split: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = self._splits[split]
    order = np.argsort(ids)  # sorted reads of a memory-mapped file, then the batch order
    rows = np.empty((len(ids), self.seq_len), np.int32)
    rows[order] = tokens[ids[order]]
    if mask is None:
      return rows, np.ones(rows.shape, bool)
    valid = np.empty(rows.shape, bool)
    valid[order] = mask[ids[order]]
    return rows, valid

  def prompt_lengths(self, split: str, ids: np.ndarray) -> np.ndarray | None:
    """[len(ids)] int32 prompt lengths of the rows, or None when the rows have none."""
    if self._prompt_lens is None:
      return None
    return np.asarray(self._prompt_lens[split][np.asarray(ids)], np.int32)


def pad_rows(encoded: Sequence[Sequence[int]], seq_len: int, tok) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(encoded), seq_len), tok.pad_id, np.int32)
  mask = np.zeros((len(encoded), seq_len), bool)
  for r, ids in enumerate(encoded):
    ids = list(ids)
    if not tok.add_bos_eos:
      ids = ids + [tok.eos_id]
    ids = ids[:seq_len]
    tokens[r, :len(ids)] = ids
    mask[r, :len(ids)] = True
  return tokens, mask


class RowWriter:
  """Appends one split's rows to raw int32 (and, for `pad`, bool mask) files as records
  arrive, so a corpus is never held in memory: `pad` makes one row per record (EOS appended
  for GPT-2, truncated or padded to seq_len); `concat` joins records with EOS after each and
  cuts full seq_len blocks (the tail that fills no block is dropped)."""

  def __init__(self, directory: str, split: str, seq_len: int, packing: str, tok,
               prompts: bool = False):
    self.seq_len, self.packing, self.tok = seq_len, packing, tok
    self.rows = 0
    self._carry = np.zeros((0,), np.int32)
    self._tokens = open(os.path.join(directory, f'{split}_tokens.bin'), 'wb')
    self._mask = (open(os.path.join(directory, f'{split}_mask.bin'), 'wb')
                  if packing == 'pad' else None)
    if prompts and packing != 'pad':
      raise ValueError('rows with prompts need packing=pad (one row per record)')
    self._prompt_lens = (open(os.path.join(directory, f'{split}_prompt_lens.bin'), 'wb')
                         if prompts else None)

  def add(self, ids: Sequence[int], prompt_len: int = 0) -> None:
    """One record; prompt_len: how many of its leading ids are a prompt (rows with
    prompts only)."""
    if self.packing == 'pad':
      tokens, mask = pad_rows([ids], self.seq_len, self.tok)
      self._tokens.write(tokens.tobytes())
      self._mask.write(mask.tobytes())
      if self._prompt_lens is not None:
        self._prompt_lens.write(np.int32(min(prompt_len, self.seq_len)).tobytes())
      self.rows += 1
      return
    stream = np.concatenate([self._carry, np.asarray(list(ids) + [self.tok.eos_id], np.int32)])
    n = len(stream) // self.seq_len
    self._tokens.write(stream[:n * self.seq_len].tobytes())
    self._carry = stream[n * self.seq_len:]
    self.rows += n

  def close(self) -> int:
    for f in (self._tokens, self._mask, self._prompt_lens):
      if f is not None:
        f.close()
    return self.rows


def cache_key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_meta(directory: str) -> dict:
  """meta.json of a finished cache directory."""
  path = os.path.join(directory, 'meta.json')
  if not os.path.exists(path):
    raise DataConfigError(f'{directory!r} is not a finished token cache (no meta.json)')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def open_cache(directory: str, tok, seq_len: int) -> ArraySource:
  """The ArraySource of a finished cache directory (its meta.json is written last)."""
  meta = read_meta(directory)
  if meta.get('format') != CACHE_FORMAT or meta['seq_len'] != seq_len:
    raise DataConfigError(f'{directory}: not a token cache of seq_len {seq_len} '
                          f'({meta.get("format")}, seq_len {meta.get("seq_len")})')
  splits = {}
  for split in SPLITS:
    n = meta['rows'][split]
    path = os.path.join(directory, f'{split}_tokens.bin')
    tokens = (np.memmap(path, np.int32, 'r', shape=(n, seq_len)) if n else
              np.zeros((0, seq_len), np.int32))
    mask = None
    if meta['packing'] == 'pad':
      mask = (np.memmap(os.path.join(directory, f'{split}_mask.bin'), np.bool_, 'r',
                        shape=(n, seq_len)) if n else np.zeros((0, seq_len), bool))
    splits[split] = (tokens, mask)
  prompt_lens = None
  if meta.get('prompts'):
    prompt_lens = {split: np.fromfile(os.path.join(directory, f'{split}_prompt_lens.bin'),
                                      np.int32) for split in SPLITS}
  return ArraySource(tok, seq_len, splits, prompt_lens)


def write_cache(directory: str, rows: Iterable[tuple[str, Sequence[int], int]], tok,
                seq_len: int, packing: str, description: dict, prompts: bool = False) -> dict:
  """Writes (split, token ids, prompt length) rows into `directory` atomically (a temporary
  directory renamed when complete); returns its meta."""
  tmp = directory + f'.tmp{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  writers = {s: RowWriter(tmp, s, seq_len, packing, tok, prompts) for s in SPLITS}
  t0, n_records = time.time(), 0
  for split, ids, prompt_len in rows:
    writers[split].add(ids, prompt_len)
    n_records += 1
    if n_records % 100_000 == 0:
      print(f'data: tokenized {n_records:,} records ({time.time() - t0:.0f} s)', flush=True)
  counts = {s: w.close() for s, w in writers.items()}
  meta = {'format': CACHE_FORMAT, 'seq_len': seq_len, 'packing': packing, 'rows': counts,
          'records': n_records, 'prompts': prompts, 'tokenizer': tok.identity(),
          **description}
  with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)
  return meta


def build_cache(directory: str, records: Iterable[tuple[str, str]], tok, seq_len: int,
                packing: str, description: dict) -> None:
  """Tokenizes (split, text) records into `directory` (see write_cache)."""
  write_cache(directory, ((split, tok.encode(text), 0) for split, text in records), tok,
              seq_len, packing, description)


def cached_source(cache_dir: str, key: str, records_fn, tok, seq_len: int, packing: str,
                  description: dict, wait_s: float = 24 * 3600) -> ArraySource:
  """The corpus under cache_dir/tokens-<key>: built by process 0 from records_fn() (an
  iterable of (split, text)) when missing, then memory-mapped by every process, each
  reading only the rows it indexes. Other processes wait for process 0 (the directory
  must be on a filesystem all hosts share). cache_dir '' tokenizes into a temporary
  directory of each process (removed at exit), on every run."""
  shared = bool(cache_dir)
  if not shared:
    cache_dir = tempfile.mkdtemp(prefix='kforcing_tokens_')
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
  directory = os.path.join(cache_dir, f'tokens-{key}')
  done = os.path.join(directory, 'meta.json')
  if not os.path.exists(done):
    if jax.process_index() == 0 or not shared:
      os.makedirs(cache_dir, exist_ok=True)
      print(f'data: tokenizing the corpus once into {directory}', flush=True)
      build_cache(directory, records_fn(), tok, seq_len, packing, description)
    else:
      t0 = time.time()
      while not os.path.exists(done):
        if time.time() - t0 > wait_s:
          raise DataConfigError(f'process {jax.process_index()}: {done} did not appear in '
                                f'{wait_s:.0f} s; data.cache_dir must be shared by all hosts')
        time.sleep(5)
  return open_cache(directory, tok, seq_len)
