"""OpenWebText teacher + distillation at the paper's shape (D=768, L=12, seq 1024).

  python main.py --config=configs/owt.py --workdir=gs://bucket/kf_owt

With data.path empty, loads the Hugging Face `openwebtext` dataset (needs `datasets` and
internet), tokenized once into data.cache_dir; offline, --config.data.path=DIR of
.txt/.xz/.jsonl documents and --config.data.tokenizer_path=DIR with gpt2.tiktoken.
"""
from kforcing_jax.configs import base


def get_config():
  c = base.get_config()
  c.pipeline = ('teacher', 'distill_k1', 'distill_k2', 'distill_k4')
  c.data.source = 'openwebtext'
  c.data.seq_len = 1024
  c.data.eval_batch_size = 64
  c.data.eval_fraction = 0.0005
  c.data.cache_dir = '/tmp/kforcing_owt_cache'
  c.stages.teacher.update({'steps': 400_000, 'batch_size': 512})
  c.stages.teacher.opt.update({'warmup_steps': 2500, 'learning_rate': 6e-4})
  for s in base.distill_stages(c):
    s.update({'steps': 50_000, 'batch_size': 128})
  return c
