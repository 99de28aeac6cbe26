"""Imports a Llama-family model (Llama, Mistral, Qwen2, Qwen3) as an export
(kforcing_jax.interop.hf).

  python -m kforcing_jax.import_hf --src=DIR|FILE.gguf|hf://OWNER/REPO --out=EXPORT \
      [--max_seq_len=N] [--tokenizer_path=DIR|none] [--dtype=float32|bfloat16]
"""
from __future__ import annotations

from absl import flags

from kforcing_jax.interop.hf import import_model
from kforcing_jax.pipeline import config_lib


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('src', None, 'a Hugging Face model directory (config.json + '
                      'safetensors), a .gguf file, or hf://OWNER/REPO[/FILE.gguf] (downloaded '
                      'when online)', flag_values=fv)
  flags.DEFINE_string('out', None, 'export directory to write (must not exist)',
                      flag_values=fv)
  flags.DEFINE_integer('max_seq_len', 0, 'longest sequence the export serves (default: the '
                       "model's max_position_embeddings, at most 8192)", flag_values=fv)
  flags.DEFINE_string('tokenizer_path', '', "a directory with the model's tokenizer.json "
                      "(default: the model's own files or GGUF metadata); 'none' imports ids "
                      'only', flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'how the export stores the '
                    'parameters (loading restores float32): bfloat16 halves the memory of the '
                    'import and the export, losslessly for bfloat16 checkpoints', flag_values=fv)
  flags.mark_flags_as_required(['src', 'out'], flag_values=fv)


def run(f) -> dict:
  desc = import_model(f.src, f.out, max_seq_len=f.max_seq_len, tokenizer_path=f.tokenizer_path,
                      dtype=f.dtype)
  a = desc['arch']
  chat = 'with a chat template' if desc.get('chat_template') else 'no chat template'
  print(f'imported {f.src} ({desc["provenance"]["architecture"]}: V={a["vocab_size"]}, '
        f'D={a["d_model"]}, L={a["n_layers"]}, H={a["n_heads"]}/{a["n_kv_heads"]} KV, '
        f'max_seq_len={a["max_seq_len"]}; tokenizer {desc["tokenizer"]["name"]}, {chat}) '
        f'to {f.out}')
  return desc


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
