"""Decoding speed of an imported Llama-family export beside transformers, in one process.

  python launch/hf_speed.py --export=EXPORT --reference=SRC [--batch_sizes=1,16] \
      [--new_tokens=128] [--repeats=3] [--out=hf_speed.json]

SRC is what the export was imported from (a Hugging Face directory or a .gguf file, loaded by
transformers as the reference). Both decode greedily the same `--new_tokens` tokens after
the same 8-token prompt for every row (EOS ignored), compile / warm-up excluded; the median
of --repeats timed runs. Ours runs in float32 and in the CPU's serving precision
(kforcing_jax.models.precision: `mixed` where the CPU has native bf16 dot instructions);
transformers in float32 with torch's own threads.
"""
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kforcing_jax  # noqa: E402
from kforcing_jax import runtime  # noqa: E402
from kforcing_jax.models import precision  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('export', None, 'the imported export')
flags.DEFINE_string('reference', None, 'the Hugging Face directory or .gguf it came from')
flags.DEFINE_string('batch_sizes', '1,16', 'comma-separated batch sizes')
flags.DEFINE_integer('new_tokens', 128, 'greedy tokens per row')
flags.DEFINE_integer('repeats', 3, 'timed runs per point (median)')
flags.DEFINE_string('out', 'hf_speed.json', 'JSON output')
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345]  # 8 ids, valid in any V >= 4650


def median_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def reference_model(src: str):
  if src.endswith('.gguf'):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(src), gguf_file=os.path.basename(src), dtype=torch.float32)
  return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)


def main(argv):
  del argv
  runtime.quiet_library_logs()
  sizes = [int(b) for b in FLAGS.batch_sizes.split(',')]
  n = FLAGS.new_tokens
  ref = reference_model(FLAGS.reference).eval()
  serving = precision.choose('auto')
  rows = []
  for b in sizes:
    row = {'batch_size': b, 'new_tokens': n}
    prompts = [PROMPT] * b
    for dtype in sorted({'float32', serving[0]}):
      m = kforcing_jax.load(FLAGS.export, dtype=dtype)
      s = median_seconds(lambda m=m: m.generate_ids(prompts, n, temperature=0.0,
                                                    stop_at_eos=False), FLAGS.repeats)
      row[f'ours_{dtype}_tokens_per_s'] = b * n / s
    ids = torch.tensor(prompts)

    def hf_generate():
      with torch.no_grad():
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                     min_new_tokens=n, do_sample=False, pad_token_id=0)
    row['transformers_float32_tokens_per_s'] = b * n / median_seconds(hf_generate,
                                                                        FLAGS.repeats)
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = {'cpu': runtime.cpu_model(), 'jax': jax.__version__,
            'torch': torch.__version__, 'transformers': transformers.__version__,
            'torch_threads': torch.get_num_threads(), 'serving_precision': serving,
            'date': time.strftime('%Y-%m-%d'), 'export': os.path.abspath(FLAGS.export),
            'rows': rows}
  with open(FLAGS.out, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['export', 'reference'])
  app.run(main)
