"""The external-LM evaluator (optional extra) on a tiny randomly initialised GPT-2 saved
with the real GPT-2 tokenizer files, offline."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from kforcing_jax.evaluation import external_lm  # noqa: E402
from kforcing_jax.pipeline import run as pipeline  # noqa: E402
from tests import conftest  # noqa: E402
from tests.conftest import synthetic_config  # noqa: E402


@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
  tok_dir = f"{conftest.testdata_dir()}/tokenizers/gpt2"
  d = tmp_path_factory.mktemp('ext') / 'gpt2-tiny'
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                n_head=2)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
  tok = transformers.GPT2Tokenizer(vocab=f'{tok_dir}/vocab.json',
                                   merges=f'{tok_dir}/merges.txt')
  assert tok.encode('The cat sat') == [464, 3797, 3332]  # the real GPT-2 ids
  tok.save_pretrained(d)
  return str(d)


def direct_nll(model, ids, start):
  with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
  return -np.mean([logp[t - 1, ids[t]] for t in range(start, len(ids))])


def test_batched_padded_scores_equal_one_row_forwards(tiny_gpt2):
  ext = external_lm.ExternalLM(tiny_gpt2, batch_size=3, device='cpu')
  assert ext.name == 'gpt2-tiny' and ext.max_len == 64
  prompts = ['The cat', 'In 1998 the', 'a', 'Stocks fell on Monday as']
  completions = [' sat on the mat.', ' company said', ' b c d e f g', ' investors']
  got = ext.row_nlls(prompts, completions)
  model = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
  for p, c, g in zip(prompts, completions, got):
    p_ids = [50256] + ext.tokenizer.encode(p)
    ids = p_ids + ext.tokenizer.encode(c)
    assert ext.encode_row(p, c) == (ids, len(p_ids))
    assert g == pytest.approx(direct_nll(model, ids, len(p_ids)), rel=1e-5)
  # a random 50,257-way model scores about log(V) per token
  assert np.all(np.abs(got - math.log(50257)) < 0.5)
  assert np.isnan(ext.row_nlls(['x'], [''])[0])


def test_bad_model_path_is_a_clear_error(tmp_path):
  with pytest.raises(external_lm.ExternalLMError, match='evaluate.external_lm'):
    external_lm.ExternalLM(str(tmp_path / 'nothing'))


def test_evaluate_stage_reports_the_external_key(tiny_gpt2, tmp_path):
  cfg = synthetic_config(steps=2, pipeline='teacher,evaluate')
  cfg.evaluate.external_lm = tiny_gpt2
  cfg.evaluate.external_batch_size = 2
  pipeline.run(cfg, str(tmp_path))
  with open(tmp_path / 'evaluate' / 'report.json', encoding='utf-8') as f:
    report = json.load(f)
  assert report['protocol']['external_lm'] == tiny_gpt2
  for r in report['rows']:
    assert set(r['gen_nll']) == {'exact', 'teacher', 'gpt2-tiny'}
    assert abs(r['gen_nll']['gpt2-tiny'] - math.log(50257)) < 0.5
  assert 'gen NLL (gpt2-tiny)' in (tmp_path / 'evaluate' / 'report.md').read_text()
