"""Plans a config's per-device memory on any machine, before launching it.

  python launch/plan_memory.py --config=configs/owt_8xh100.py --devices=8 \
      [--fused_attention] [--compile]

Fakes --devices CPU devices, prints the estimate (kforcing_jax.memory) of the teacher step
and of every distill_k<K> stage of the config's pipeline, and with --compile XLA's buffer
assignment of the real teacher step beside it (tests/test_memory.py holds the two within
10% at the paper's shape).
"""
import os
import sys

for _arg in sys.argv:  # fake CPU devices must be requested before jax initialises
  if _arg.startswith('--devices='):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={_arg.split("=")[1]}')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=wrong-import-position
import dataclasses

from absl import app
from absl import flags
from ml_collections import config_flags

from kforcing_jax.pipeline import config_lib
from kforcing_jax import errors
from kforcing_jax.training import memory
from kforcing_jax.training import objectives
from kforcing_jax.models import arch as arch_lib
from kforcing_jax.models import transformer as model_lib
from kforcing_jax.training import optim
from kforcing_jax import sharding as sharding_lib
from kforcing_jax.training import teacher
from kforcing_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file', lock_config=True)
flags.DEFINE_integer('devices', 0, 'fake this many CPU devices (planning a mesh on a CPU)')
flags.DEFINE_integer('vocab_size', 50258, 'vocabulary when model.vocab_size is -1 '
                     '(50258: GPT-2 + the reserved id; 30522: BERT)')
flags.DEFINE_bool('fused_attention', False, 'assume a fused attention kernel that never '
                  'materialises the scores (cuDNN on GPUs, bf16) for the teacher step')
flags.DEFINE_bool('compile', False, 'also compile the teacher step and print XLA\'s buffer '
                  'sizes on this backend')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS
GiB = memory.GiB


def main(argv):
  del argv
  cfg = _CONFIG.value
  t = cfg.stages.teacher
  try:
    config_lib.validate(cfg)
    vocab = cfg.model.vocab_size if cfg.model.vocab_size > 0 else FLAGS.vocab_size
    arch, exe = arch_lib.configs_from_run(cfg, vocab)
    mesh = sharding_lib.make_mesh(cfg.mesh)
    sharding_lib.check_batch(t.batch_size, mesh, 'stages.teacher.batch_size', t.microbatches,
                             'stages.teacher.microbatches')
  except errors.UserError as e:
    raise SystemExit(f'error: {e}') from None
  model = model_lib.build(arch, exe)
  tx = optim.make_optimizer(t.opt, max(t.steps, 1))
  abstract, shardings, _ = trainer.abstract_state(
      model_lib.init_fn(model, cfg.data.seq_len), tx, mesh, t.opt.ema_decay > 0)
  fused = True if FLAGS.fused_attention else None
  est = memory.estimate(arch, exe, abstract, mesh, t.batch_size, cfg.data.seq_len,
                        t.microbatches, fused_attention=fused)
  print(f'mesh {dict(mesh.shape)}, model D={arch.d_model} L={arch.n_layers} V={vocab}, '
        f'{memory.n_params(abstract) / 1e6:.1f}M parameters')
  print(f'teacher: batch {t.batch_size} x {cfg.data.seq_len}, {t.microbatches} '
        f'microbatches: {est.summary()}')
  for stage in config_lib.stages(cfg):
    if stage not in cfg.stages or cfg.stages[stage].kind != 'distill':
      continue
    s, k = cfg.stages[stage], cfg.stages[stage].k
    # the teacher as in a progressive chain (AR for k=1, window k/2 after it)
    target_arrays = objectives.get(s.objective).target_memory(objectives.Models(
        teacher=None, teacher_k=k // 2, ar=None, student=None, k=k))
    sharding_lib.check_batch(s.batch_size, mesh, f'stages.{stage}.batch_size',
                             s.microbatches, f'stages.{stage}.microbatches')
    d_est = memory.estimate(dataclasses.replace(arch, pflm=True), exe, abstract, mesh,
                            s.batch_size, cfg.data.seq_len, s.microbatches, window=k,
                            fused_attention=False, target_factor=target_arrays)
    print(f'{stage}: batch {s.batch_size} x {cfg.data.seq_len} windows of {k}, '
          f'{s.microbatches} microbatches: train step ~{d_est.train_total / GiB:.2f} GiB '
          f'(activations ~{d_est.activations / GiB:.2f})')
  if FLAGS.compile:
    measured = teacher.compile_teacher_step(model, tx, abstract, shardings, mesh, t.batch_size,
                                            cfg.data.seq_len, t.microbatches)
    if measured:
      print('XLA buffer assignment on this backend: arguments {:.2f} GiB, temp {:.2f} GiB, '
            'total {:.2f} GiB; estimate {:.2f} GiB'.format(
                measured['arguments'] / GiB, measured['temp'] / GiB, measured['total'] / GiB,
                est.train_total / GiB))


if __name__ == '__main__':
  app.run(main, flags_parser=config_lib.parse_flags)
