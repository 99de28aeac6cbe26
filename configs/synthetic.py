"""Default main job: the built-in synthetic source, no download, 2 CPU cores.

  python main.py --config=configs/synthetic.py --workdir=/tmp/kf

Trains the AR teacher, then distils it progressively into push-forward students with
windows k = 1, 2, 4, and evaluates every model (about 15 minutes on 2 CPU cores).
"""
from configs import base


def get_config():
  c = base.get_config()
  c.pipeline = 'teacher,distill_k1,distill_k2,distill_k4,evaluate'
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.dtype = 'float32'  # bf16 matmuls are slower than f32 on CPUs.
  # Oscillating noise features: a 3-layer student resolves narrow CDF intervals in
  # hundreds of steps instead of thousands (see model.noise_freq_scale in base.py).
  c.model.noise_freq_scale = 32.0
  c.data.seq_len = 64  # sentences average 24 tokens; 64 keeps attention cheap on CPU.
  c.data.batch_size = 32
  c.data.eval_batch_size = 64
  # 500 steps reach val NLL 1.02x the entropy rate but leave the tail too heavy: the
  # teacher's samples held 21x the source's rate of floor-probability tokens (2.6% vs
  # 0.12%, +0.29 nats of exact gen-NLL); 800 steps halve that.
  c.train.steps = 800
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 100
  c.train.eval_every = 800
  c.train.checkpoint_every = 400
  # The k=1 stage (0.936 held-out agreement after 1000 steps, 0.90 needed); wider windows
  # start from a distilled student. k=4 gets the most: at 450 steps 5.6% of its K=4 sample
  # tokens had floor probability under the source (teacher: 1.5%), at 900 steps 3.9%.
  c.distill.steps = 600
  c.distill.stage_steps = 'distill_k2=300,distill_k4=750'
  c.distill.batch_size = 16
  c.distill.learning_rate = 3e-3
  c.distill.warmup_steps = 50
  return c
