import io
import lzma
import os
import tarfile
from unittest import mock

import numpy as np
import pytest

from kforcing_jax.configs import base
from kforcing_jax.configs import lm1b
from kforcing_jax.configs import owt
from kforcing_jax.data import datasets as data_lib
from tests.conftest import shrink, synthetic_config


def text_config(testdata, tmp_path, **kw):
  cfg = shrink(base.get_config())
  cfg.data.source = 'text'
  cfg.data.path = os.path.join(testdata, 'lm1b', 'lingvo_lm1b_100.txt')
  cfg.data.tokenizer = 'bert-base-uncased'
  cfg.data.tokenizer_path = os.path.join(testdata, 'tokenizers', 'bert-base-uncased')
  cfg.data.eval_fraction = 0.1
  cfg.data.cache_dir = str(tmp_path / 'cache')
  for k, v in kw.items():
    setattr(cfg.data, k, v)
  return cfg


def test_text_source_pads_sentences_with_a_mask(testdata, tmp_path):
  cfg = text_config(testdata, tmp_path)
  src = data_lib.make_source(cfg)
  n_train, n_eval = src.num_rows('train'), src.num_rows('eval')
  assert n_train + n_eval == 100 and n_eval >= 1
  tokens, mask = src.rows('train', np.arange(4))
  assert tokens.shape == (4, 32) and np.all(tokens[:, 0] == 101)  # [CLS]
  for row, m in zip(tokens, mask):
    n = m.sum()
    assert np.all(m[:n]) and not np.any(m[n:])
    assert np.all(row[n:] == 0)
    assert row[n - 1] == 102 or n == 32  # [SEP] unless truncated
  # the cache is reused and gives the same rows
  again = data_lib.make_source(cfg)
  np.testing.assert_array_equal(again.rows('train', np.arange(4))[0], tokens)
  assert len(os.listdir(cfg.data.cache_dir)) == 1


def test_owt_local_documents_are_packed(testdata, tmp_path):
  cfg = shrink(owt.get_config())
  cfg.data.path = os.path.join(testdata, 'owt', 'hf_dummy')
  cfg.data.tokenizer_path = os.path.join(testdata, 'tokenizers', 'gpt2')
  cfg.data.eval_fraction = 0.25
  src = data_lib.make_source(cfg)
  tok = src.tokenizer
  tokens, mask = src.rows('train', np.arange(src.num_rows('train')))
  assert mask.all() and tokens.shape[1] == 32
  flat = tokens.ravel()
  assert (flat == tok.eos_id).sum() >= 1  # documents joined with <|endoftext|>
  # the first block is the start of a train document
  docs = sorted(os.listdir(cfg.data.path))
  texts = [open(os.path.join(cfg.data.path, d), encoding='utf-8').read() for d in docs]
  assert any(tok.encode(t)[:32] == list(tokens[0]) for t in texts)
  # seeded held-out split: same documents every time, disjoint from train
  src2 = data_lib.make_source(cfg)
  np.testing.assert_array_equal(src2.rows('eval', np.arange(src2.num_rows('eval')))[0],
                                src.rows('eval', np.arange(src.num_rows('eval')))[0])


def test_owt_xz_and_jsonl_files(tmp_path):
  d = tmp_path / 'docs'
  d.mkdir()
  with lzma.open(d / 'a.txt.xz', 'wt') as f:
    f.write('first document\nwith two lines')
  (d / 'b.jsonl').write_text('{"text": "second"}\n{"text": "third"}\n')
  with tarfile.open(d / 'c.xz', 'w:xz') as tar:
    for name, text in (('x.txt', 'fourth'), ('y.txt', 'fifth')):
      blob = text.encode()
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  recs = data_lib.read_records(data_lib.list_files(str(d)), 'file')
  assert sorted(recs) == sorted(['first document\nwith two lines', 'second', 'third',
                                 'fourth', 'fifth'])


def test_owt_from_the_hub_is_tokenized_once_into_the_shared_cache(testdata, tmp_path):
  """The Hugging Face path (its loader replaced by the 4 real OWT documents) writes the
  same memory-mapped cache as the local-files path, with the same rows; a second run reads
  the cache without loading or tokenizing the corpus; concat rows store no mask."""
  docs_dir = os.path.join(testdata, 'owt', 'hf_dummy')
  texts = [open(os.path.join(docs_dir, f), encoding='utf-8').read()
           for f in sorted(os.listdir(docs_dir))]
  cfg = shrink(owt.get_config())
  cfg.data.tokenizer_path = os.path.join(testdata, 'tokenizers', 'gpt2')
  cfg.data.eval_fraction = 0.25
  cfg.data.cache_dir = str(tmp_path / 'hub_cache')
  calls = []

  def documents(max_examples):
    calls.append(max_examples)
    return len(texts), iter(texts)

  with mock.patch.object(data_lib, 'openwebtext_hf_documents', documents):
    hub = data_lib.make_source(cfg)
    again = data_lib.make_source(cfg)
  assert calls == [-1]  # tokenized once; the second source read the cache
  (entry,) = os.listdir(cfg.data.cache_dir)
  files = sorted(os.listdir(os.path.join(cfg.data.cache_dir, entry)))
  assert files == ['eval_tokens.bin', 'meta.json', 'train_tokens.bin']  # no mask files
  tokens, _ = hub.rows('train', np.arange(hub.num_rows('train')))
  assert isinstance(hub._splits['train'][0], np.memmap) and hub._splits['train'][1] is None
  np.testing.assert_array_equal(again.rows('train', np.arange(3))[0], tokens[:3])
  # the local-files path over the same documents: the same split and rows
  cfg.data.path = docs_dir
  cfg.data.cache_dir = str(tmp_path / 'files_cache')
  files_src = data_lib.make_source(cfg)
  np.testing.assert_array_equal(files_src.rows('train', np.arange(files_src.num_rows('train')))[0],
                                tokens)
  assert files_src.num_rows('eval') == hub.num_rows('eval')


def test_lm1b_through_the_real_tfds_builder(testdata, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (lm1b extra)
  cfg = shrink(lm1b.get_config())
  cfg.data.tfds_data_dir = str(tmp_path / 'tfds')
  cfg.data.tokenizer_path = os.path.join(testdata, 'tokenizers', 'bert-base-uncased')
  layout = os.path.join(testdata, 'lm1b', 'tfds_layout')
  with mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         return_value=layout):
    src = data_lib.make_source(cfg)
  assert src.num_rows('train') == 15 and src.num_rows('eval') == 15
  tokens, mask = src.rows('train', np.arange(15))
  assert np.all(tokens[:, 0] == 101) and mask.sum(1).min() > 3
  texts = [src.tokenizer.decode(r[m]) for r, m in zip(tokens, mask)]
  assert all(t and t == t.lower() for t in texts)


def test_iterator_is_deterministic_and_resumable():
  cfg = synthetic_config()
  src = data_lib.make_source(cfg)
  a = data_lib.BatchIterator(src, 'train', 4, None, 0)
  first = [next(a)['tokens'] for _ in range(3)]
  b = data_lib.BatchIterator(src, 'train', 4, None, 0)
  next(b)
  state = b.state()
  c = data_lib.BatchIterator(src, 'train', 4, None, 0)
  c.restore(state)
  np.testing.assert_array_equal(next(c)['tokens'], first[1])
  with pytest.raises(data_lib.DataConfigError, match='batch size'):
    data_lib.BatchIterator(src, 'train', 8, None, 0).restore(state)


def test_indexable_iterator_shuffles_per_epoch_and_splits_hosts(testdata, tmp_path):
  cfg = text_config(testdata, tmp_path)
  src = data_lib.make_source(cfg)
  n = src.num_rows('train')
  it = data_lib.BatchIterator(src, 'train', 4, None, seed=0)
  ids = np.concatenate([it.example_ids(np.arange(e * n, (e + 1) * n)) for e in (0, 1)])
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
  assert not np.array_equal(ids[:n], ids[n:])  # reshuffled each epoch
  # two "hosts" each take their half of the same global batch
  full = it.local_batch(3)['tokens']
  halves = []
  for pid in (0, 1):
    h = data_lib.BatchIterator(src, 'train', 4, None, seed=0)
    h._lo, h._hi = pid * 2, pid * 2 + 2  # what process pid of 2 would read
    halves.append(h.local_batch(3)['tokens'])
  np.testing.assert_array_equal(np.concatenate(halves), full)


def test_missing_or_bad_data_settings_name_the_field(tmp_path):
  cfg = synthetic_config()
  cfg.data.source = 'text'
  cfg.data.path = str(tmp_path / 'nothing')
  with pytest.raises(data_lib.DataConfigError, match='data.path'):
    data_lib.make_source(cfg)
  cfg.data.path = ''
  with pytest.raises(data_lib.DataConfigError, match='data.path is empty'):
    data_lib.make_source(cfg)
  cfg.data.source = 'wikipedia'
  with pytest.raises(data_lib.DataConfigError, match='allowed: synthetic, lm1b'):
    data_lib.make_source(cfg)
  cfg = synthetic_config()
  cfg.data.tokenizer = 'gpt2'
  with pytest.raises(data_lib.DataConfigError, match='data.tokenizer'):
    data_lib.make_source(cfg)
