import os

import pytest
import tokenizers

from kforcing_jax.data import tokenization


def test_bert_ids_of_known_string(testdata):
  tok = tokenization.load('bert-base-uncased', os.path.join(testdata, 'tokenizers',
                                                             'bert-base-uncased'))
  assert tok.encode('Hello world, K-Forcing!') == [101, 7592, 2088, 1010, 1047, 1011, 6932,
                                                   999, 102]
  assert tok.vocab_size == 30522 and tok.never_emit_ids == (103,) and tok.pad_id == 0
  assert tok.decode([101, 7592, 2088, 102]) == 'hello world'


def test_gpt2_ids_match_both_routes(testdata):
  d = os.path.join(testdata, 'tokenizers', 'gpt2')
  tok = tokenization.load('gpt2', d)
  text = 'Hello world, K-Forcing! The 2.4x speed-up is real.'
  ids = tok.encode(text)
  assert ids[:8] == [15496, 995, 11, 509, 12, 1890, 2259, 0]
  hf = tokenizers.ByteLevelBPETokenizer(os.path.join(d, 'vocab.json'),
                                        os.path.join(d, 'merges.txt'))
  assert hf.encode(text).ids == ids
  assert tok.decode(ids) == text
  assert tok.vocab_size == 50258 and tok.eos_id == 50256 and tok.never_emit_ids == (50257,)


def test_missing_tokenizer_files_name_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match='data.tokenizer_path'):
    tokenization.load('gpt2', str(tmp_path))
  with pytest.raises(ValueError, match='allowed: bert-base-uncased, gpt2'):
    tokenization.load('llama', '')


def test_synthetic_round_trip():
  tok = tokenization.synthetic(10, 'x')
  assert tok.encode('| s1 s8') == [0, 1, 8]
  assert tok.decode([0, 1, 8, 9]) == '| s1 s8'
  with pytest.raises(ValueError, match='not a token'):
    tok.encode('s9')
