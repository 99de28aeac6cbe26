"""LM1B teacher + distillation at the paper's shape (D=768, L=12, seq 128).

  python main.py --config=configs/lm1b.py --workdir=gs://bucket/kf_lm1b

Downloads and prepares LM1B through tensorflow-datasets (ArrayRecord) on first use;
offline: --config.data.tfds_data_dir=DIR with the prepared dataset and
--config.data.tokenizer_path=DIR holding bert-base-uncased's vocab.txt.
"""
from kforcing_jax.configs import base


def get_config():
  c = base.get_config()
  c.pipeline = ('teacher', 'distill_k1', 'distill_k2', 'distill_k4')
  c.data.source = 'lm1b'
  c.data.seq_len = 128
  c.data.eval_batch_size = 512
  c.stages.teacher.update({'steps': 100_000, 'batch_size': 512})
  c.stages.teacher.opt.update({'warmup_steps': 2500, 'learning_rate': 3e-4})
  for s in base.distill_stages(c):
    s.update({'steps': 20_000, 'batch_size': 256})
  return c
