"""Default main job: the built-in synthetic source, no download, 2 CPU cores.

  python main.py --config=configs/synthetic.py --workdir=/tmp/kf
"""
from configs import base


def get_config():
  c = base.get_config()
  c.pipeline = 'teacher'
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.dtype = 'float32'  # bf16 matmuls are slower than f32 on CPUs.
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  c.train.steps = 2000
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.0
  c.train.log_every = 100
  c.train.eval_every = 1000
  c.train.checkpoint_every = 500
  return c
