"""The whole pipeline on real LM1B text, small enough for a 2-core CPU.

  python main.py --config=configs/lm1b_tiny.py --workdir=/tmp/kf_lm1b_tiny

Reads the 12,216 held-out LM1B sentences in $KFORCING_TESTDATA (default
../shared/testdata) through the `text` source with the bert-base-uncased WordPiece
tokenizer from the same folder; sentences are [CLS] ... [SEP] padded to 64 with a loss
mask, 2% held out. Reports teacher-evaluated perplexity and entropy for every model.
The 30,522-way head dominates the cost on a CPU: about 25 minutes on 2 cores
(BENCHMARKS.md has the table).
"""
import os

from kforcing_jax.configs import synthetic

TESTDATA = os.environ.get('KFORCING_TESTDATA', '../shared/testdata')


def get_config():
  c = synthetic.get_config()  # the same CPU-sized model and schedules, on real text
  c.data.source = 'text'
  c.data.packing = 'pad'
  c.data.path = os.path.join(TESTDATA, 'lm1b', 'news.en.heldout-00010+00011-of-00050.txt')
  c.data.tokenizer = 'bert-base-uncased'
  c.data.tokenizer_path = os.path.join(TESTDATA, 'tokenizers', 'bert-base-uncased')
  c.data.eval_fraction = 0.02
  c.data.seq_len = 48  # LM1B sentences average ~30 WordPieces with [CLS]/[SEP]
  c.data.eval_batch_size = 16
  t = c.stages.teacher
  t.steps = 300
  t.batch_size = 16
  t.eval_every = 300
  t.checkpoint_every = 150
  for k in (1, 2, 4):
    c.stages[f'distill_k{k}'].steps = 150
  c.evaluate.num_prompts = 8
  c.evaluate.prompt_len = 4
  c.evaluate.max_new_tokens = 24
  c.evaluate.agreement_rows = 16
  return c
