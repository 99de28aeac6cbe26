"""Default main job: the built-in synthetic source, no download, 2 CPU cores.

  python main.py --config=configs/synthetic.py --workdir=/tmp/kf

Trains the AR teacher, then distils it progressively into push-forward students with
windows k = 1, 2, 4 (k >= 2 on on-policy targets), and evaluates every model (about 16
minutes on 2 CPU cores).

Variant k=8 (a student of window 8 distilled from the k=4 one, a block deeper than it;
15-25 more minutes on 2 CPU cores):
  python main.py --config=configs/synthetic.py --workdir=/tmp/kf \
      --config.pipeline=teacher,distill_k1,distill_k2,distill_k4,distill_k8,evaluate

The students' fidelity is bound by their training compute at this budget. Three times the
distill steps (about an hour on 2 CPU cores; BENCHMARKS.md, the main job's schedule) brought
a k=4 student without the extra block to within 4% of the teacher's NLL at K=4:
  python main.py --config=configs/synthetic.py --workdir=/tmp/kf3 \
      --config.stages.distill_k1.steps=1800 --config.stages.distill_k2.steps=900 \
      --config.stages.distill_k4.steps=2250
Most of that gain comes from the k=4 stage alone: twice its steps (about 6 more minutes)
brought the recipe's k=4 student from 1.07x to 1.04x the teacher's NLL at K=4:
  python main.py --config=configs/synthetic.py --workdir=/tmp/kf \
      --config.stages.distill_k4.steps=1500
"""
from kforcing_jax.configs import base


def get_config():
  c = base.get_config()
  c.pipeline = ('teacher', 'distill_k1', 'distill_k2', 'distill_k4', 'evaluate')
  c.model.d_model = 128
  c.model.n_layers = 3
  c.model.n_heads = 4
  c.model.dtype = 'float32'  # bf16 matmuls are slower than f32 on most CPUs.
  # Oscillating noise features: a 3-layer student resolves narrow CDF intervals in
  # hundreds of steps instead of thousands (see model.noise_freq_scale in base.py).
  c.model.noise_freq_scale = 32.0
  c.data.seq_len = 64  # sentences average 24 tokens; 64 keeps attention cheap on CPU.
  c.data.eval_batch_size = 64
  # 800 teacher steps: with 500 the teacher's samples hold far more floor-probability tokens
  # than the source (a heavy tail; BENCHMARKS.md, main job). k=1 learns the inverse CDF
  # from scratch; wider windows start from a distilled student; k=4 gets the most steps
  # (its K=4 samples carry the most floor-probability tokens at fewer steps).
  for name, steps, batch in (('teacher', 800, 32), ('distill_k1', 600, 16),
                             ('distill_k2', 300, 16), ('distill_k4', 750, 16),
                             ('distill_k8', 750, 16)):
    s = c.stages[name]
    s.update({'steps': steps, 'batch_size': batch, 'log_every': 100, 'checkpoint_every': 400})
    s.opt.update({'learning_rate': 3e-3, 'warmup_steps': 50, 'weight_decay': 0.0})
  c.stages.teacher.eval_every = 800
  # Wider windows learn the AR teacher's token after their own earlier tokens (on-policy
  # targets), with later window positions weighted more: in the ablation at this budget
  # (BENCHMARKS.md, distillation objectives) the k=4 student's all-4 agreement with the AR
  # rollout rose by ~0.02-0.03 over the paper's progressive targets, at the same sample NLL
  # and the same training time. (At k=1 every objective has the same targets.)
  for name in ('distill_k2', 'distill_k4', 'distill_k8'):
    c.stages[name].objective = 'on_policy'
    c.stages[name].position_power = 1.0
  # Wider windows need more depth than 3 blocks to work out their later tokens, which
  # depend in sequence on the earlier ones. One more block for k=4 (its teacher's 3 + 1)
  # brought its K=4 samples from 1.09x to 1.05x the teacher's NLL at the same steps, for
  # ~1.2x the stage's time; k=8 gets one more on top of that (5 blocks): with two more
  # than 3 its K=8 samples went from 1.31x to 1.08x (BENCHMARKS.md, a deeper k=4 student;
  # the k=8 variant). Each pass of a deeper student costs more: at this 3-block toy shape
  # the deeper students decode no faster than the AR teacher (at 30 blocks, as in SmolLM2,
  # one block is 3% of a pass).
  c.stages.distill_k4.extra_layers = 1
  c.stages.distill_k8.extra_layers = 1
  return c
