"""Distil further from the released LM1B checkpoints (Hugging Face zwave/K-Forcing): k=8
from the released k=4 PFLM, with the released vocabulary (bert-base-uncased, [MASK]=103
never emitted), noise encoder and sinusoid (noise_freq_scale 1) at D=768, L=12, seq 128;
logits are float32 whatever model.dtype.

  python -m kforcing_jax.import_official --ckpt=hf://zwave/K-Forcing/pflm_lm1b_k4.ckpt \
      --out=released/pflm_lm1b_k4
  python main.py --config=configs/lm1b_from_released.py --workdir=/tmp/kf_lm1b_k8

Variant, k=1 -> 2 -> 4 from the released AR teacher:

  python -m kforcing_jax.import_official --ckpt=hf://zwave/K-Forcing/ar_best_lm1b.ckpt \
      --out=released/ar_lm1b
  python main.py --config=configs/lm1b_from_released.py --workdir=/tmp/kf_lm1b_k4 \
      --config.pipeline=distill_k1,distill_k2,distill_k4 \
      --config.stages.distill_k1.teacher_stage=released/ar_lm1b

Teacher paths are export directories (relative to the working directory or absolute);
data as in configs/lm1b.py.
"""
from kforcing_jax.configs import base
from kforcing_jax.configs import lm1b


def get_config():
  c = base.from_released(lm1b.get_config(), 'bert-base-uncased', 128, 'released/pflm_lm1b_k4')
  c.stages.distill_k8.update({'steps': 20_000, 'batch_size': 256})
  return c
