"""The whole pipeline on real LM1B text, small enough for a 2-core CPU.

  python main.py --config=configs/lm1b_tiny.py --workdir=/tmp/kf_lm1b_tiny

Reads the 12,216 held-out LM1B sentences in $KFORCING_TESTDATA (default
../shared/testdata) through the `text` source with the bert-base-uncased WordPiece
tokenizer from the same folder; sentences are [CLS] ... [SEP] padded to 64 with a loss
mask, 2% held out. Reports teacher-evaluated perplexity and entropy for every model.
"""
import os

from configs import base

TESTDATA = os.environ.get('KFORCING_TESTDATA', '../shared/testdata')


def get_config():
  c = base.get_config()
  c.pipeline = 'teacher,distill_k1,distill_k2,distill_k4,evaluate'
  c.data.source = 'text'
  c.data.packing = 'pad'
  c.data.path = os.path.join(TESTDATA, 'lm1b', 'news.en.heldout-00010+00011-of-00050.txt')
  c.data.tokenizer = 'bert-base-uncased'
  c.data.tokenizer_path = os.path.join(TESTDATA, 'tokenizers', 'bert-base-uncased')
  c.data.eval_fraction = 0.02
  c.data.seq_len = 64
  c.data.batch_size = 32
  c.data.eval_batch_size = 32
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.dtype = 'float32'
  c.model.noise_freq_scale = 32.0
  c.train.steps = 600
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 100
  c.train.eval_every = 600
  c.train.checkpoint_every = 300
  c.distill.steps = 400
  c.distill.batch_size = 16
  c.distill.learning_rate = 3e-3
  c.distill.warmup_steps = 50
  c.evaluate.num_prompts = 16
  c.evaluate.prompt_len = 4
  c.evaluate.max_new_tokens = 40
  return c
