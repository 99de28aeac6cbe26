"""Parity of imported released checkpoints with the released PyTorch code, measured.

  python launch/official_parity.py --testdata=../shared/testdata --out=parity.json
  python launch/official_parity.py --random_released=DIR --vocab=8192 --d_model=256 \
      --n_layers=4 --n_heads=4      # random released-layout AR + PFLM k=4 checkpoints

The first form imports the fixtures of TESTDATA/official and prints, for each reference,
the largest logit difference (mask column left out) and the sampler's token agreement,
once with the released noise encoder (the default) and once reading the same weights as
the pre-version-3 encoder form ('scale_only_tanh': no LayerNorm bias, tanh GELU). The
second writes DIR/ar_k0.npz and DIR/pflm_k4.npz for import_official (speed checks of
imported models against natively built ones).
"""
import dataclasses
import json
import os
import sys
import tempfile

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

import kforcing_jax
from kforcing_jax.interop import released as import_official
from kforcing_jax.models import layouts
from kforcing_jax.models import arch as arch_lib
from kforcing_jax import runtime
from kforcing_jax.decoding import sampler as sampler_lib

MASK = 103
FLAGS = flags.FLAGS
flags.DEFINE_string('testdata', os.environ.get('KFORCING_TESTDATA', ''), 'shared testdata')
flags.DEFINE_string('out', '', 'JSON output (parity)')
flags.DEFINE_string('random_released', '', 'write random released-layout checkpoints here')
flags.DEFINE_integer('vocab', 8192, 'random checkpoints: vocabulary')
flags.DEFINE_integer('d_model', 256, 'random checkpoints: width')
flags.DEFINE_integer('n_layers', 4, 'random checkpoints: blocks')
flags.DEFINE_integer('n_heads', 4, 'random checkpoints: heads')


def max_diff(ours, theirs) -> float:
  keep = np.arange(theirs.shape[-1]) != MASK
  return float(np.abs(np.asarray(ours)[..., keep] - theirs[..., keep]).max())


def as_form(s: sampler_lib.Sampler, form: str) -> sampler_lib.Sampler:
  """The same weights read with another noise encoder form."""
  if form == s.arch.noise_encoder:
    return s
  params = dict(s.params)
  enc = dict(params['noise_encoder'])
  enc['ln'] = {'LayerNorm_0': {'scale': enc['ln']['LayerNorm_0']['scale']}}
  params['noise_encoder'] = enc
  return sampler_lib.Sampler(dataclasses.replace(s.arch, noise_encoder=form), params, k=s.k)


def pflm_rows(s, ref) -> dict:
  m, p, tau = s.engine.model, s.params, jnp.asarray(ref['pflm.tau'])
  train = layouts.apply_window(m, p, jnp.asarray(ref['pflm.train_ctx']), None,
                               jnp.asarray(ref['pflm.train_u']), tau)
  ctx, u = jnp.asarray(ref['pflm.roll_ctx']), jnp.asarray(ref['pflm.roll_u'])
  roll1 = layouts.apply_window(m, p, ctx, None, u[..., :2], tau)
  roll2 = layouts.apply_window(m, p, ctx, jnp.asarray(ref['pflm.roll_first']), u[..., 2:], tau)
  out = {'train_logits_max_diff': max_diff(train, ref['pflm.train_logits']),
         'rollout_logits1_max_diff': max_diff(roll1, ref['pflm.roll_logits1']),
         'rollout_logits2_max_diff': max_diff(roll2, ref['pflm.roll_logits2'])}
  prefix = ref['sample.prefix']
  for key, K, lam in (('K4_fp0', 4, 0.0), ('K4_fp0.5', 4, 0.5), ('K3_fp0.5', 3, 0.5)):
    toks = s.generate_ids(prefix.tolist(), max_new_tokens=int(ref['sample.num_new_tokens']),
                          K=K, freq_penalty=lam, noise=ref[f'sample.{key}.noise'])
    out[f'sample_{key}_token_agreement'] = float(
        np.mean(toks == ref[f'sample.{key}.tokens'][:, prefix.shape[1]:]))
  return out


def parity(testdata: str) -> dict:
  off = os.path.join(testdata, 'official')
  with np.load(os.path.join(off, 'reference.npz')) as z:
    ref = {k: z[k] for k in z.files}
  tmp = tempfile.mkdtemp()
  for name in ('ar_tiny', 'pflm_tiny_k4'):
    import_official.import_checkpoint(os.path.join(off, f'{name}_state.npz'),
                                      os.path.join(tmp, name), mask_id=MASK,
                                      k=4 if name.startswith('pflm') else -1)
  ar = kforcing_jax.load(os.path.join(tmp, 'ar_tiny'))
  pf = kforcing_jax.load(os.path.join(tmp, 'pflm_tiny_k4'))
  return {'ar_logits_max_diff': max_diff(ar.logits(ref['ar.tokens']), ref['ar.logits_hp']),
          'pflm': {form: pflm_rows(as_form(pf, form), ref) for form in arch_lib.NOISE_ENCODERS}}


def main(argv):
  del argv
  runtime.quiet_library_logs()
  if FLAGS.random_released:
    os.makedirs(FLAGS.random_released, exist_ok=True)
    hd = FLAGS.d_model // FLAGS.n_heads
    for name, pflm in (('ar_k0', False), ('pflm_k4', True)):
      path = os.path.join(FLAGS.random_released, f'{name}.npz')
      np.savez(path, **import_official.random_state(FLAGS.vocab, FLAGS.d_model, FLAGS.n_layers,
                                                    hd, pflm, seed=int(pflm)))
      print(f'wrote {path}')
    return
  if not FLAGS.testdata:
    sys.exit('error: --testdata=DIR (the shared testdata folder with official/)')
  result = parity(FLAGS.testdata)
  print(json.dumps(result, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
