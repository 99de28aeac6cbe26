"""Distil further from the released OpenWebText checkpoints (Hugging Face zwave/K-Forcing):
k=8 from the released k=4 PFLM, with the released vocabulary (GPT-2 BPE + reserved id
50257, never emitted), noise encoder and sinusoid (noise_freq_scale 1) at D=768, L=12,
seq 1024; logits are float32 whatever model.dtype.

  python -m kforcing_jax.import_official --ckpt=hf://zwave/K-Forcing/pflm_owt_k4.ckpt \
      --out=released/pflm_owt_k4
  python main.py --config=configs/owt_from_released.py --workdir=/tmp/kf_owt_k8

Variant, k=1 -> 2 -> 4 from the released AR teacher:

  python -m kforcing_jax.import_official --ckpt=hf://zwave/K-Forcing/ar_openwebtxt.ckpt \
      --out=released/ar_owt
  python main.py --config=configs/owt_from_released.py --workdir=/tmp/kf_owt_k4 \
      --config.pipeline=distill_k1,distill_k2,distill_k4 \
      --config.stages.distill_k1.teacher_stage=released/ar_owt

Teacher paths are export directories (relative to the working directory or absolute);
data as in configs/owt.py (offline: data.path and data.tokenizer_path).
"""
from kforcing_jax.configs import base
from kforcing_jax.configs import owt


def get_config():
  c = base.from_released(owt.get_config(), 'gpt2', 1024, 'released/pflm_owt_k4')
  c.stages.distill_k8.update({'steps': 50_000, 'batch_size': 128})
  return c
