"""OpenWebText at the paper's shape (D=768, L=12, seq 1024) on one node of 8 H100s (80 GiB):
FSDP over 4 x tensor parallelism over 2 (heads, MLP and vocabulary split across pairs of
GPUs), gradient accumulation for the paper's batch.

  launch/multi_gpu.sh --config=configs/owt_8xh100.py --workdir=/checkpoints/kf_owt
  (SLURM: launch/slurm_gpu.sh --nodes=1 --gpus_per_node=8 --config=configs/owt_8xh100.py ...)

Memory per GPU, printed at start-up (python -m kforcing_jax.memory
--config=configs/owt_8xh100.py --devices=8 --fused_attention): teacher ~12.7 GiB (cuDNN
attention), distill_k4 ~31.8 GiB; pure FSDP (--config.mesh.fsdp=8 --config.mesh.tensor=1)
also fits (teacher ~21.8 GiB with XLA attention).
"""
from configs import owt


def get_config():
  c = owt.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
  # 512 rows = 4 (data x fsdp) x 16 rows x 8 microbatches; activations split over all 8
  c.train.microbatches = 8
  c.distill.microbatches = 8
  return c
