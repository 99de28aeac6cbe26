"""Imports a released K-Forcing PyTorch checkpoint as an export
(kforcing_jax.interop.released).

  python -m kforcing_jax.import_official --ckpt=hf://zwave/K-Forcing/pflm_owt_k4.ckpt \
      --out=released/pflm_owt_k4 [--tokenizer_path=DIR] [--k=4]
"""
from __future__ import annotations

from absl import app
from absl import flags

from kforcing_jax import errors
from kforcing_jax import runtime
from kforcing_jax.interop.released import import_checkpoint


def main(argv):
  del argv
  runtime.quiet_library_logs()
  f = FLAGS
  try:
    desc = import_checkpoint(f.ckpt, f.out, tokenizer=f.tokenizer,
                             tokenizer_path=f.tokenizer_path, mask_id=f.mask_id, k=f.k,
                             max_seq_len=f.max_seq_len, rope_base=f.rope_base,
                             trust_pickle=f.trust_pickle)
  except errors.UserError as e:
    raise SystemExit(f'error: {e}') from None
  a = desc['arch']
  print(f'imported {f.ckpt} ({"PFLM k=" + str(desc["k"]) if a["pflm"] else "AR"}, '
        f'V={a["vocab_size"]}, D={a["d_model"]}, L={a["n_layers"]}, H={a["n_heads"]}, '
        f'tokenizer {desc["tokenizer"]["name"]}, never emits {a["never_emit_ids"]}) to {f.out}')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_string('ckpt', None, '.ckpt/.pt/.bin/.npz file, or hf://zwave/K-Forcing/<file>')
  flags.DEFINE_string('out', None, 'export directory to write (must not exist)')
  flags.DEFINE_string('tokenizer', '', "gpt2 | bert-base-uncased | none ('' = from the "
                      'vocabulary size: 50258 gpt2, 30522 bert-base-uncased, else none)')
  flags.DEFINE_string('tokenizer_path', '', 'local directory with the tokenizer files')
  flags.DEFINE_integer('mask_id', -1, 'id never emitted (default: 50257 gpt2, 103 bert)')
  flags.DEFINE_integer('k', -1, 'PFLM window (default: from a _k<N> file name)')
  flags.DEFINE_integer('max_seq_len', -1, 'longest sequence (default: 1024 gpt2, 128 bert)')
  flags.DEFINE_float('rope_base', 10000.0, 'RoPE base the checkpoint was trained with')
  flags.DEFINE_bool('trust_pickle', False, 'allow a full pickle load of a file that needs it')
  flags.mark_flags_as_required(['ckpt', 'out'])
  app.run(main)
