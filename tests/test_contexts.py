"""Chat distillation contexts (kforcing_jax.build_contexts) from an imported chat model: a
tiny random Llama with a ChatML tokenizer and template, imported like SmolLM2. The set is
deterministic, split by sentence (no held-out sentence in a training row), read back as
data.source=tokens with its prompts, and a K-Forcing recipe of the same form as
configs/smollm2_135m.py distils from the export, resumes and evaluates on it."""
import os
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import kforcing_jax  # noqa: E402
from kforcing_jax import build_contexts  # noqa: E402
from kforcing_jax.configs import smollm2_135m  # noqa: E402
from kforcing_jax.data import datasets as data_lib  # noqa: E402
from kforcing_jax.data import token_cache  # noqa: E402
from kforcing_jax.interop import hf as hf_lib  # noqa: E402
from kforcing_jax.pipeline import config_lib  # noqa: E402
from kforcing_jax.pipeline import contexts as contexts_lib  # noqa: E402
from kforcing_jax.pipeline import run as pipeline  # noqa: E402
from tests import test_chat  # noqa: E402
from tests import test_train  # noqa: E402

SEQ_LEN = 256
COUNTS = ['--num_chat=12', '--num_plain=4', '--eval_fraction=0.25', f'--seq_len={SEQ_LEN}',
          '--min_answer_tokens=16', '--batch_size=8']


@pytest.fixture(scope='module')
def chat_export(tmp_path_factory):
  root = tmp_path_factory.mktemp('ctx')
  hf = str(root / 'hf')
  test_chat.chat_tokenizer(hf)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=test_chat.hf_fixtures.V, hidden_size=32,
                                 intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=512, bos_token_id=0, eos_token_id=2)
  transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(hf)
  hf_lib.import_model(hf, str(root / 'export'))
  return str(root / 'export')


def sentences_file(testdata, tmp_path, n=60):
  path = os.path.join(testdata, 'lm1b', 'news.en.heldout-00010+00011-of-00050.txt')
  with open(path, encoding='utf-8') as f:
    lines = [next(f) for _ in range(n)]
  out = tmp_path / 'sentences.txt'
  out.write_text(''.join(lines), encoding='utf-8')
  return str(out)


def build(export, text, out, *extra):
  f = config_lib.cli_flags(build_contexts.define_flags, [
      'build_contexts', f'--export={export}', f'--text={text}', f'--out={out}',
      '--dtype=float32', *COUNTS, *extra])
  return build_contexts.run(f)


def files(directory):
  return {n: open(os.path.join(directory, n), 'rb').read() for n in sorted(os.listdir(directory))
          if n.endswith('.bin')}


def test_contexts_are_deterministic_and_split_by_sentence(chat_export, testdata, tmp_path):
  text = sentences_file(testdata, tmp_path)
  meta = build(chat_export, text, tmp_path / 'a')
  build(chat_export, text, tmp_path / 'b')
  assert files(tmp_path / 'a') == files(tmp_path / 'b')  # same seed, same bytes
  build(chat_export, text, tmp_path / 'c', '--seed=1')
  assert files(tmp_path / 'c') != files(tmp_path / 'a')
  assert meta['contexts'] == {'train': {'chat': 9, 'plain': 3}, 'eval': {'chat': 3, 'plain': 1}}
  assert meta['rows'] == {'train': 12, 'eval': 4}

  tok = kforcing_jax.load(chat_export).tokenizer
  src = token_cache.open_cache(str(tmp_path / 'a'), tok, SEQ_LEN)
  texts = {}
  for split in ('train', 'eval'):
    ids = np.arange(src.num_rows(split))
    tokens, mask = src.rows(split, ids)
    lens = src.prompt_lengths(split, ids)
    texts[split] = [tok.decode(r[m]) for r, m in zip(tokens, mask)]
    for row, m, n in zip(tokens, mask, lens):
      if n:  # a chat row: its prompt ends with the generation prompt, an answer follows
        prompt = tok.decode(row[:n])
        assert prompt.rstrip().endswith('assistant') and m[:n].all()
  assert sum(src.prompt_lengths('train', np.arange(12)) > 0) == 9
  # no held-out sentence reaches a training row, as a prompt or as plain text
  held_out = meta['eval_sentences']
  assert len(held_out) == 4
  for sentence in held_out:
    assert not any(sentence in t for t in texts['train'])
    assert any(sentence in t for t in texts['eval'])


def test_bad_contexts_requests_are_refused(chat_export, testdata, tmp_path):
  text = sentences_file(testdata, tmp_path, n=8)
  with pytest.raises(contexts_lib.ContextsError, match='only .* sentences fit'):
    build(chat_export, text, tmp_path / 'few')
  assert not os.path.exists(tmp_path / 'few')
  with pytest.raises(contexts_lib.ContextsError, match='--eval_fraction'):
    build(chat_export, text, tmp_path / 'x', '--eval_fraction=1.5')
  with pytest.raises(contexts_lib.ContextsError, match='longer than the model'):
    build(chat_export, text, tmp_path / 'x', '--seq_len=4096')


def recipe(export, contexts, steps=2):
  """configs/smollm2_135m.py at the tiny export's shape."""
  cfg = smollm2_135m.get_config()
  cfg.model.update({'vocab_size': test_chat.hf_fixtures.V, 'd_model': 32, 'n_layers': 2, 'n_heads': 4, 'n_kv_heads': 2,
                    'head_dim': 8, 'mlp_dim': 48, 'max_seq_len': 512, 'rope_base': 10000.0})
  cfg.data.path = str(contexts)
  cfg.data.tokenizer_path = os.path.join(export, 'tokenizer')
  cfg.data.seq_len = SEQ_LEN
  cfg.data.eval_batch_size = 2
  cfg.mesh.data = 1  # one of the 8 virtual devices
  cfg.pipeline = ('distill_k1', 'evaluate')
  s = cfg.stages.distill_k1
  s.update({'steps': steps, 'batch_size': 2, 'checkpoint_every': 2, 'eval_batches': 1,
            'log_every': 1})
  s.opt.warmup_steps = 1
  s.teacher_stage = export
  cfg.evaluate.update({'num_prompts': 2, 'num_samples': 1, 'max_new_tokens': 6,
                       'agreement_rows': 2, 'show_samples': 2})
  return cfg


def test_recipe_distils_the_export_resumes_and_evaluates(chat_export, testdata, tmp_path,
                                                         capsys):
  build(chat_export, sentences_file(testdata, tmp_path), tmp_path / 'ctx')
  cfg = recipe(chat_export, tmp_path / 'ctx', steps=4)
  calls = {'n': 0}
  real_next = data_lib.BatchIterator.__next__

  def dying_next(self):
    if self.split == 'train':
      calls['n'] += 1
      if calls['n'] == 4:
        raise KeyboardInterrupt('simulated preemption')
    return real_next(self)

  with mock.patch.object(data_lib.BatchIterator, '__next__', dying_next):
    with pytest.raises(KeyboardInterrupt):
      pipeline.run(cfg, str(tmp_path / 'run'))
  capsys.readouterr()
  out = pipeline.run(cfg, str(tmp_path / 'run'))
  assert 'distill_k1: resumed from step 2' in capsys.readouterr().out
  assert out['distill_k1']['k'] == 1
  steps = [m['step'] for m in test_train.read_metrics(tmp_path / 'run' / 'distill_k1')
           if 'train/loss' in m]
  assert steps == [1, 2, 3, 4]  # resumed at the step-2 checkpoint
  rows = out['evaluate']['rows']
  # the export the run distils is the reference row, evaluated like a teacher stage
  assert [(r['model'], r['K']) for r in rows if r['freq_penalty'] == 0] == [('teacher', 1),
                                                                            ('k1', 1)]
  assert rows[0]['stage'] == chat_export and rows[0]['agreement_all'] is None
  report = (tmp_path / 'run' / 'evaluate' / 'report.md').read_text(encoding='utf-8')
  # the held-out chat conversations are the prompts, and the samples are shown as text
  assert '## Samples' in report and report.count('### Prompt') == 2
  assert report.count('**teacher K=1:**') == 2 and report.count('**k1 K=1:**') == 2
  assert 'assistant' in report
  assert all(len(r['samples']) == 2 for r in rows if r['freq_penalty'] == 0)


def test_tokens_source_refuses_another_tokenizer(chat_export, testdata, tmp_path):
  build(chat_export, sentences_file(testdata, tmp_path), tmp_path / 'ctx')
  cfg = recipe(chat_export, tmp_path / 'ctx')
  cfg.data.seq_len = 128
  with pytest.raises(data_lib.DataConfigError, match='set data.seq_len=256'):
    data_lib.make_source(cfg)
  cfg = recipe(chat_export, tmp_path / 'ctx')
  cfg.data.tokenizer = 'gpt2'
  cfg.data.tokenizer_path = os.path.join(testdata, 'tokenizers', 'gpt2')
  with pytest.raises(data_lib.DataConfigError, match='was tokenized with'):
    data_lib.make_source(cfg)
  cfg.data.tokenizer, cfg.data.tokenizer_path = 'hf', ''
  with pytest.raises(data_lib.DataConfigError, match='data.tokenizer=hf needs'):
    data_lib.make_source(cfg)
