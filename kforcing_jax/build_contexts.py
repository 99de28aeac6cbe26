"""Builds a chat model's distillation contexts (kforcing_jax.pipeline.contexts): chat
prompts made from real sentences and rendered with the model's chat template, each with
the model's own sampled answer, plus plain sentences; split by sentence into train / eval
and written as a token cache for data.source=tokens.

  python -m kforcing_jax.build_contexts --export=exports/smollm2 \
      --text=../shared/testdata/lm1b/news.en.heldout-00010+00011-of-00050.txt \
      --out=contexts/smollm2
"""
from __future__ import annotations

import dataclasses
import os

from absl import flags

from kforcing_jax.interop import export as export_lib
from kforcing_jax.pipeline import config_lib
from kforcing_jax.pipeline import contexts as contexts_lib
from kforcing_jax.models import precision

_DEFAULTS = contexts_lib.ContextSpec()


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string('export', None, 'the AR teacher: an export with a chat tokenizer '
                      '(e.g. from kforcing_jax.import_hf)', flag_values=fv)
  flags.DEFINE_string('text', None, 'real sentences, one per line: a file, directory or glob '
                      'of .txt / .jsonl files', flag_values=fv)
  flags.DEFINE_string('out', None, 'output directory (replaced atomically when done)',
                      flag_values=fv)
  for field in dataclasses.fields(contexts_lib.ContextSpec):
    default = getattr(_DEFAULTS, field.name)
    define = flags.DEFINE_float if isinstance(default, float) else flags.DEFINE_integer
    define(field.name, default, f'ContextSpec.{field.name}', flag_values=fv)
  flags.DEFINE_enum('dtype', 'auto', ['auto', *precision.SERVE_DTYPES],
                    'the teacher\'s precision while answering (auto: the fastest exact-enough '
                    'one on this machine)', flag_values=fv)
  flags.mark_flags_as_required(['export', 'text', 'out'], flag_values=fv)


def run(f) -> dict:
  spec = contexts_lib.ContextSpec(**{fl.name: f[fl.name].value
                                     for fl in dataclasses.fields(contexts_lib.ContextSpec)})
  spec.validate()
  sentences = contexts_lib.read_sentences(f.text)
  sampler = export_lib.load(f.export, dtype=f.dtype)
  meta = contexts_lib.build(sampler, sentences, f.out, spec, {
      'teacher_export': os.path.abspath(f.export), 'text': f.text,
      'teacher_dtype': precision.choose(f.dtype)[0]})
  print(f'contexts: wrote {f.out}: {meta["rows"]} rows of {meta["seq_len"]} tokens '
        f'({meta["contexts"]}), mean answer {meta["mean_answer_tokens"]:.1f} tokens')
  return meta


def main(argv: list[str] | None = None) -> None:
  config_lib.cli_main(define_flags, run, argv)


if __name__ == '__main__':
  main()
