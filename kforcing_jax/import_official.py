"""Imports a released K-Forcing PyTorch checkpoint as an export
(kforcing_jax.interop.released).

  python -m kforcing_jax.import_official --ckpt=hf://zwave/K-Forcing/pflm_owt_k4.ckpt \
      --out=released/pflm_owt_k4 [--tokenizer_path=DIR] [--k=4]
"""
from __future__ import annotations

from absl import flags

from kforcing_jax.interop.released import import_checkpoint
from kforcing_jax.pipeline import config_lib


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('ckpt', None, '.ckpt/.pt/.bin/.npz file, or hf://zwave/K-Forcing/<file>',
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'export directory to write (must not exist)',
                      flag_values=fv)
  flags.DEFINE_string('tokenizer', '', "gpt2 | bert-base-uncased | none ('' = from the "
                      'vocabulary size: 50258 gpt2, 30522 bert-base-uncased, else none)',
                      flag_values=fv)
  flags.DEFINE_string('tokenizer_path', '', 'local directory with the tokenizer files',
                      flag_values=fv)
  flags.DEFINE_integer('mask_id', -1, 'id never emitted (default: 50257 gpt2, 103 bert)',
                       flag_values=fv)
  flags.DEFINE_integer('k', -1, 'PFLM window (default: from a _k<N> file name)',
                       flag_values=fv)
  flags.DEFINE_integer('max_seq_len', -1, 'longest sequence (default: 1024 gpt2, 128 bert)',
                       flag_values=fv)
  flags.DEFINE_float('rope_base', 10000.0, 'RoPE base the checkpoint was trained with',
                     flag_values=fv)
  flags.DEFINE_bool('trust_pickle', False, 'allow a full pickle load of a file that needs it',
                    flag_values=fv)
  flags.mark_flags_as_required(['ckpt', 'out'], flag_values=fv)


def run(f) -> dict:
  desc = import_checkpoint(f.ckpt, f.out, tokenizer=f.tokenizer,
                           tokenizer_path=f.tokenizer_path, mask_id=f.mask_id, k=f.k,
                           max_seq_len=f.max_seq_len, rope_base=f.rope_base,
                           trust_pickle=f.trust_pickle)
  a = desc['arch']
  print(f'imported {f.ckpt} ({"PFLM k=" + str(desc["k"]) if a["pflm"] else "AR"}, '
        f'V={a["vocab_size"]}, D={a["d_model"]}, L={a["n_layers"]}, H={a["n_heads"]}, '
        f'tokenizer {desc["tokenizer"]["name"]}, never emits {a["never_emit_ids"]}) to {f.out}')
  return desc


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
