"""OpenWebText at the paper's shape (D=768, L=12, seq 1024) on a Cloud TPU v4-8 (4 chips,
32 GiB HBM each): FSDP over the 4 chips, gradient accumulation for the paper's batch.

  launch/tpu_vm.sh --name=kf-v4 --zone=us-central2-b --accelerator=v4-8 \\
      --config=configs/owt_v4_8.py --workdir=gs://BUCKET/kf_owt

Memory per chip is printed at start-up; plan it with python launch/plan_memory.py
--config=configs/owt_v4_8.py --devices=4.
"""
from kforcing_jax.configs import base
from kforcing_jax.configs import owt


def get_config():
  c = owt.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 1
  # 512 teacher rows = 4 chips x 4 rows x 32 microbatches; 128 rows of k=4 windows (5x the
  # queries of a teacher row) = 4 chips x 1 row x 32
  base.set_microbatches(c, 32)
  return c
